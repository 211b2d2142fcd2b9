"""Storage locations: local paths and URIs, read and written through pyarrow.fs."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from seqsetvae.errors import UserInputError
from seqsetvae.storage import (
    download,
    exists,
    filesystem_and_path,
    join_location,
    read_text,
    resolve_storage,
    upload_file,
    write_text,
)


def test_resolve_storage_default_and_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage(None, Path("runs/x")) == str(tmp_path / "runs" / "x")
    assert resolve_storage("results", Path("unused")) == str(tmp_path / "results")


def test_resolve_storage_uris():
    assert resolve_storage("file:///data/ray", Path("unused")) == "/data/ray"
    assert resolve_storage("s3://bucket/prefix", Path("unused")) == "s3://bucket/prefix"
    assert resolve_storage("gs://bucket/prefix", Path("unused")) == "gs://bucket/prefix"


def test_resolve_storage_rejects_unknown_scheme():
    with pytest.raises(UserInputError) as error:
        resolve_storage("ftp://host/dir", Path("unused"))
    message = str(error.value)
    assert message.startswith("--storage ftp://host/dir: unsupported scheme 'ftp'")
    assert "s3://" in message
    assert "\n" not in message


def test_file_uri_opens_through_pyarrow(tmp_path):
    filesystem, path = filesystem_and_path(f"file://{tmp_path}/sweep")
    assert isinstance(filesystem, pafs.LocalFileSystem)
    assert path == f"{tmp_path}/sweep"


def test_join_location_keeps_scheme(tmp_path):
    assert join_location("s3://bucket/prefix/", "sweep", "record.json") == "s3://bucket/prefix/sweep/record.json"
    assert join_location(str(tmp_path), "sweep") == str(tmp_path / "sweep")


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_text_round_trip(tmp_path, as_uri):
    root = f"file://{tmp_path}" if as_uri else str(tmp_path)
    location = join_location(root, "a", "b", "record.json")
    assert not exists(location)
    write_text(location, '{"x": 1}')
    assert exists(location)
    assert read_text(location) == '{"x": 1}'
    assert (tmp_path / "a" / "b" / "record.json").read_text() == '{"x": 1}'
    assert not (tmp_path / "a" / "b" / "record.json.tmp").exists()


def test_upload_and_download_tree(tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"\x00\x01weights")
    storage = f"file://{tmp_path}/storage"
    upload_file(source, join_location(storage, "exp", "trial", "weights.bin"))
    upload_file(source, join_location(storage, "exp", "trial", "nested", "more.bin"))
    copied = download(join_location(storage, "exp", "trial"), tmp_path / "local" / "trial")
    assert (copied / "weights.bin").read_bytes() == b"\x00\x01weights"
    assert (copied / "nested" / "more.bin").read_bytes() == b"\x00\x01weights"


def test_download_missing_names_location(tmp_path):
    location = f"file://{tmp_path}/missing"
    with pytest.raises(UserInputError, match="missing: not found in storage"):
        download(location, tmp_path / "target")
