"""A process that dies while writing an export, pretrained weights, features or the tensor cache leaves the previous artifact.

Each writer runs in a real child process whose file size limit (RLIMIT_FSIZE)
is below the size of what it writes. With SIGXFSZ at its default action the
kernel ends the process in the middle of the write, as a full disk or a
killed job would, so no cleanup code runs.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from seqsetvae.cache import SplitCache, ensure_cache, load_preprocessor
from seqsetvae.encoder import load_features, load_pretrained_encoder, save_features
from seqsetvae.errors import UserInputError
from seqsetvae.export import EXPORT_FILES, export_model, load_export
from seqsetvae.head import load_head_state
from tune.sweep import encode_splits

from .meds_data import TINY_DATA, build_cache, copy_dataset, events_table, read_split, write_events

LIMIT_BYTES = 4096
KILLED = -signal.SIGXFSZ


def run_limited(body: str, *args: str) -> subprocess.CompletedProcess:
    """Run `body` in a child process that the kernel kills once it writes a file beyond LIMIT_BYTES."""
    prelude = textwrap.dedent(
        f"""
        import resource, signal, sys
        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT_BYTES}, resource.RLIM_INFINITY))
        """
    )
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body), *args], capture_output=True, text=True, timeout=120)


def digest(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


EXPORT_BODY = """
from seqsetvae.config import DataConfig
from seqsetvae.encoder import load_pretrained_encoder
from seqsetvae.export import export_model
from seqsetvae.head import load_head_state
pretrained, head, out = sys.argv[1:4]
encoder = load_pretrained_encoder(pretrained)
state = {key: value * 2 for key, value in load_head_state(head).items()}
limit()
export_model(encoder, state, DataConfig(max_sets=24, max_events_per_set=24), {}, {"val/auprc": 0.5}, out)
"""


def write_export(tiny_export: Path, tiny_pretrained: Path, export: Path) -> None:
    """Write a complete export in this process."""
    encoder = load_pretrained_encoder(tiny_pretrained)
    export_model(encoder, load_head_state(tiny_export / "head.safetensors"), TINY_DATA, {}, {"val/auprc": 0.4}, export)


def test_export_killed_midway_keeps_previous(tiny_export, tiny_pretrained, tmp_path):
    export = tmp_path / "export"
    write_export(tiny_export, tiny_pretrained, export)
    before = digest(export)

    killed = run_limited(EXPORT_BODY, str(tiny_pretrained), str(tiny_export / "head.safetensors"), str(export))
    assert killed.returncode == KILLED, killed.stderr
    assert digest(export) == before
    assert sorted(path.name for path in export.iterdir()) == sorted(EXPORT_FILES)
    load_export(export)


def test_export_between_renames_recovers(tiny_export, tiny_pretrained, tmp_path):
    export = tmp_path / "export"
    write_export(tiny_export, tiny_pretrained, export)
    before = digest(export)
    # What a crash between the two renames of the swap leaves: the previous export under .old.
    export.rename(tmp_path / "export.old")
    with pytest.raises(UserInputError, match="export.old contains the export before an interrupted one"):
        load_export(export)

    killed = run_limited(EXPORT_BODY, str(tiny_pretrained), str(tiny_export / "head.safetensors"), str(export))
    assert killed.returncode == KILLED, killed.stderr
    assert digest(export) == before
    assert not (tmp_path / "export.old").exists()


PRETRAINED_BODY = """
from seqsetvae.pretrain import export_pretrained
source, out = sys.argv[1:3]
limit()
export_pretrained(source, out)
"""


def test_pretrained_export_killed_keeps_previous(tiny_pretrained, tmp_path):
    target = tmp_path / "pretrained.pt"
    target.write_bytes(tiny_pretrained.read_bytes())
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    # The Lightning checkpoint next to the fixture's pretrained.pt is the source of both.
    killed = run_limited(PRETRAINED_BODY, str(tiny_pretrained.parent / "last.ckpt"), str(target))
    assert killed.returncode == KILLED, killed.stderr
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before


FEATURES_BODY = """
import numpy as np
from seqsetvae.encoder import save_features
limit()
save_features({"features": np.ones((4000, 8), np.float32), "label": np.zeros(4000, bool)}, sys.argv[1])
"""


def test_features_killed_midway_keep_previous(tmp_path):
    path = tmp_path / "features" / "train-abc.npz"
    save_features({"features": np.zeros((3, 8), np.float32), "label": np.ones(3, bool)}, path)
    killed = run_limited(FEATURES_BODY, str(path))
    assert killed.returncode == KILLED, killed.stderr
    features = load_features(path)
    assert features["features"].shape == (3, 8)
    assert features["label"].all()


CACHE_BODY = """
import json
from seqsetvae.cache import ensure_cache
from seqsetvae.config import DataConfig
from seqsetvae.preprocess import Preprocessor
meds, cache, preprocessing = sys.argv[1:4]
preprocessor = Preprocessor.from_dict(json.loads(open(preprocessing).read()))
limit()
ensure_cache(meds, cache, DataConfig(max_sets=24, max_events_per_set=24), preprocessor, splits=("tuning",))
"""


def test_cache_build_killed_keeps_previous(small_meds, tmp_path):
    root = copy_dataset(small_meds, tmp_path / "meds")
    cache_dir = tmp_path / "cache"
    build_cache(root, cache_dir, TINY_DATA, splits=("train", "tuning"))
    before = digest(cache_dir / "tuning")

    # New tuning data makes the cached split stale, so the next call rebuilds it.
    tuning = read_split(root, "tuning")
    write_events(root, "tuning", events_table(tuning.iloc[: len(tuning) // 2]))
    killed = run_limited(CACHE_BODY, str(root), str(cache_dir), str(cache_dir / "preprocessor.json"))
    assert killed.returncode == KILLED, killed.stderr
    assert digest(cache_dir / "tuning") == before
    assert len(list(cache_dir.glob(".staging-*"))) == 1
    SplitCache(cache_dir, "tuning")

    # The next build replaces the split and removes what the killed one left.
    reports = ensure_cache(root, cache_dir, TINY_DATA, load_preprocessor(cache_dir), splits=("tuning",))
    assert reports["tuning"].n_events < len(tuning)
    assert digest(cache_dir / "tuning") != before
    assert not list(cache_dir.glob(".staging-*"))


def test_damaged_features_are_computed_again(small_meds, tiny_pretrained, tmp_path, caplog):
    cache_dir, feature_dir = tmp_path / "cache", tmp_path / "features"
    _, first = encode_splits(tiny_pretrained, small_meds, cache_dir, feature_dir, TINY_DATA, ("train", "tuning"))
    (path,) = feature_dir.glob("tuning-*.npz")
    path.write_bytes(path.read_bytes()[:200])
    with caplog.at_level(logging.WARNING, logger="tune.sweep"):
        _, second = encode_splits(tiny_pretrained, small_meds, cache_dir, feature_dir, TINY_DATA, ("train", "tuning"))
    assert "Computing the features of split 'tuning' again" in caplog.text
    np.testing.assert_array_equal(second["tuning"]["features"], first["tuning"]["features"])
    assert load_features(path)["features"].shape == first["tuning"]["features"].shape
