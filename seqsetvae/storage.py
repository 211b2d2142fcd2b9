"""Storage locations for Ray Train and Tune results: local paths or pyarrow URIs."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

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
    scheme = urlparse(storage).scheme
    if scheme == "file":
        return str(Path(urlparse(storage).path).resolve())
    if scheme in URI_SCHEMES:
        return storage
    if scheme and len(scheme) > 1:
        raise UserInputError(
            f"--storage {storage}: unsupported scheme '{scheme}'; use a local path or one of "
            + ", ".join(f"{s}://" for s in URI_SCHEMES)
        )
    return str(Path(storage).resolve())
