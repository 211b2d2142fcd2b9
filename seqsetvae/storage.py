"""Storage locations for Ray Train and Tune results: local paths or pyarrow URIs."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from seqsetvae.errors import UserInputError

# Schemes that pyarrow.fs resolves and Ray accepts as storage_path.
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss")


def resolve_storage(storage: str | None, default: Path) -> str:
    """Return a storage path Ray accepts: an absolute local path or a URI.

    Multi-node runs need a URI or a filesystem shared by every node, because
    each worker writes its checkpoints there.
    """
    if not storage:
        return str(Path(default).resolve())
    scheme = _checked_scheme(storage, "--storage ")
    if scheme == "file":
        return str(Path(urlparse(storage).path).resolve())
    if scheme:
        return storage
    return str(Path(storage).resolve())


def _checked_scheme(location: str, label: str = "") -> str:
    """Return the URI scheme of `location`, or "" for a local path.

    A one-letter scheme is a Windows drive letter, so it counts as a local path.

    Raises:
        UserInputError: the scheme is not one that pyarrow.fs and Ray read.
    """
    scheme = urlparse(location).scheme
    if scheme in URI_SCHEMES:
        return scheme
    if len(scheme) > 1:
        raise UserInputError(
            f"{label}{location}: unsupported scheme '{scheme}'; use a local path or one of "
            + ", ".join(f"{s}://" for s in URI_SCHEMES)
        )
    return ""


def filesystem_and_path(location: str) -> tuple[pafs.FileSystem, str]:
    """Return the pyarrow filesystem of a local path or URI and the path inside it.

    Every URI goes through `pyarrow.fs.FileSystem.from_uri`, `file://` included,
    so the code that reads `s3://` and `gs://` storage is the code that the
    tests run on `file://` URIs.
    """
    if _checked_scheme(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except (pa.ArrowException, OSError) as error:
            reason = str(error).splitlines()[0][:200]
            raise UserInputError(
                f"{location}: cannot open this storage URI ({reason}); check the URI and the credentials"
            ) from None
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def join_location(location: str, *parts: str) -> str:
    """Append path parts to a local path or URI, keeping its scheme."""
    if _checked_scheme(location):
        return "/".join([location.rstrip("/"), *(part.strip("/") for part in parts if part)])
    return str(Path(location, *parts))


def exists(location: str) -> bool:
    filesystem, path = filesystem_and_path(location)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str) -> str:
    filesystem, path = filesystem_and_path(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def write_text(location: str, text: str) -> None:
    """Write a text file to storage, creating its parent directories.

    On a local filesystem the file is written under a temporary name and
    renamed, so a reader never sees half of it. An object store replaces an
    object in one request.
    """
    filesystem, path = filesystem_and_path(location)
    filesystem.create_dir(str(PurePosixPath(path).parent), recursive=True)
    target = path + ".tmp" if isinstance(filesystem, pafs.LocalFileSystem) else path
    with filesystem.open_output_stream(target) as stream:
        stream.write(text.encode("utf-8"))
    if target != path:
        filesystem.move(target, path)


def upload_file(local_file: str | Path, location: str) -> None:
    filesystem, path = filesystem_and_path(location)
    filesystem.create_dir(str(PurePosixPath(path).parent), recursive=True)
    pafs.copy_files(
        str(Path(local_file).resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem
    )


def download(location: str, local_path: str | Path) -> Path:
    """Copy a file or a directory tree from storage to a local path."""
    filesystem, path = filesystem_and_path(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise UserInputError(f"{location}: not found in storage")
    target = Path(local_path)
    # pyarrow copies into existing directories only.
    (target if info.type == pafs.FileType.Directory else target.parent).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(target), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
    return target
