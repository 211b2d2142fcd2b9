"""Ray Train pretraining on 2 workers with uneven splits and a worker that dies mid-epoch.

One real `seqsetvae pretrain` process runs the whole scenario: 9 train and 7
tuning subjects on 2 ranks, a batch size of 3, 3 epochs, and the last worker
exiting at optimiser step 3, one step into the second epoch. The tests read
its output, its Ray session logs and the files it wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from itertools import product
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import make_meds_subset
from seqsetvae.callbacks import EXIT_AT_STEP_ENV
from seqsetvae.checkpoint import load_weights_only
from seqsetvae.data import SetSequenceDataModule
from seqsetvae.lit import PretrainModule
from seqsetvae.sampling import ShardedBatchSampler

from .meds_data import TINY_FLAGS, events_table, read_split, write_events

EPOCHS, BATCH_SIZE, EXIT_STEP = 3, 3, 3
# 9 train subjects on 2 ranks with batches of 3: DistributedSampler pads to 5 per rank, so 2 steps per epoch.
STEPS_PER_EPOCH = 2
# Subject ids and a measured value that cannot appear in a log line by chance.
ID_OFFSET = 9_900_000_000
PLANTED_VALUES = (31415.927, 27182.818)


def relabel(root: Path) -> None:
    """Move every subject id by ID_OFFSET and give each train stay a measurement with a planted value."""
    for relative in ("metadata/subject_splits.parquet", "labels/in_hospital_mortality/0.parquet"):
        table = pq.read_table(root / relative)
        ids = pc.add(table.column("subject_id"), ID_OFFSET)
        pq.write_table(table.set_column(0, "subject_id", ids), root / relative)
    for split in ("train", "tuning", "held_out"):
        events = read_split(root, split)
        events["subject_id"] += ID_OFFSET
        if split == "train":
            first = events.groupby("subject_id", as_index=False)["time"].min()
            first["code"] = "PLANTED"
            first["numeric_value"] = np.resize(np.asarray(PLANTED_VALUES, dtype=np.float32), len(first))
            events = pd.concat([events, first]).sort_values(["subject_id", "time"], kind="stable")
        write_events(root, split, events_table(events))


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    meds = make_meds_subset(base / "meds", {"train": 9, "tuning": 7, "held_out": 4})
    relabel(meds)
    out = base / "run"
    # Ray's socket paths must stay short, so its session directory is not under pytest's temporary path.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {
        **os.environ,
        EXIT_AT_STEP_ENV: str(EXIT_STEP),
        "RAY_TMPDIR": ray_tmp,
        "RAY_DEDUP_LOGS": "0",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "seqsetvae.cli", "pretrain", "--data", str(meds), "--out", str(out),
        "--num-workers", "2", "--max-epochs", str(EPOCHS), "--batch-size", str(BATCH_SIZE), "--max-failures", "1",
        "--beta-warmup-steps", "2", *TINY_FLAGS,
    ]  # fmt: skip
    try:
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
        session_logs = {
            str(path.relative_to(ray_tmp)): path.read_text(errors="replace")
            for path in Path(ray_tmp).rglob("*")
            if path.is_file() and path.suffix in (".log", ".out", ".err")
        }
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {
        "meds": meds,
        "out": out,
        "returncode": finished.returncode,
        "output": finished.stdout + finished.stderr,
        "session_logs": session_logs,
    }


def test_run_finishes_after_worker_death(fault_run):
    assert fault_run["returncode"] == 0, fault_run["output"][-3000:]
    assert f"exits at step {EXIT_STEP}" in fault_run["output"]
    assert "Resuming pretraining from the latest checkpoint" in fault_run["output"]
    assert (fault_run["out"] / "pretrained.pt").is_file()


def test_no_completed_epoch_trained_again(fault_run):
    history = pd.read_csv(fault_run["out"] / "pretrain_metrics.csv")
    assert history["epoch"].tolist() == list(range(EPOCHS))
    assert history["step"].tolist() == [STEPS_PER_EPOCH * (epoch + 1) for epoch in range(EPOCHS)]
    # The first epoch ended before the failure; the restarted group must not train it again.
    for epoch in range(1, EPOCHS + 1):
        assert fault_run["output"].count(f"Pretraining epoch {epoch}/{EPOCHS} done") == 1


def test_every_rank_reports_every_checkpoint(fault_run):
    reports = set(re.findall(r"Reporting training result (\d+): .*? from rank (\d)", fault_run["output"]))
    expected = {(str(number), str(rank)) for number, rank in product(range(1, EPOCHS + 1), (0, 1))}
    assert reports == expected


def test_validation_counts_each_subject_once(fault_run):
    """The val/loss that Ray reported on 2 ranks equals one process validating the same weights."""
    content = load_weights_only(fault_run["out"] / "pretrained.pt")
    hparams = content["hyper_parameters"]
    module = PretrainModule(hparams["model_config"], hparams["pretrain_config"], hparams["preprocessing"])
    module.model.load_state_dict(content["state_dict"])
    datamodule = SetSequenceDataModule(fault_run["out"] / "cache", max_sets=24, batch_size=BATCH_SIZE)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    local = trainer.validate(module, datamodule=datamodule, verbose=False)[0]

    history = pd.read_csv(fault_run["out"] / "pretrain_metrics.csv")
    best = history.loc[history["val/loss"].idxmin()]
    for key in ("val/loss", "val/recon_loss", "val/kl_loss", "val/active_units"):
        assert local[key] == pytest.approx(best[key], rel=1e-5, abs=1e-6), key


def test_logs_hold_no_ids_or_values(fault_run):
    meds = fault_run["meds"]
    ids = pq.read_table(meds / "metadata" / "subject_splits.parquet").column("subject_id").to_pylist()
    texts = [("output", fault_run["output"])]
    texts += list(fault_run["session_logs"].items())
    assert len(texts) > 10
    # Whole numbers only: Ray's logs carry nanosecond timestamps, whose digits contain any short number.
    for name, text in texts:
        for subject in ids:
            assert re.search(rf"\b{subject}\b", text) is None, name
            # The ids without the offset are the demo's real subject ids.
            assert re.search(rf"\b{subject - ID_OFFSET}\b", text) is None, name
        for value in PLANTED_VALUES:
            assert re.search(rf"\b{int(value)}\.\d", text) is None, name
            assert f"{value:.4e}" not in text, name


@pytest.mark.parametrize("n_samples, batch_size, world_size", [(7, 3, 2), (33, 16, 2), (1, 4, 2), (5, 1, 3), (64, 8, 4)])
def test_sharded_batches_cover_once(n_samples, batch_size, world_size):
    samplers = [ShardedBatchSampler(n_samples, batch_size, world_size, rank) for rank in range(world_size)]
    batches = [list(sampler) for sampler in samplers]
    assert len({len(rank_batches) for rank_batches in batches}) == 1
    assert all(len(batch) <= batch_size for rank_batches in batches for batch in rank_batches)
    seen = sorted(index for rank_batches in batches for batch in rank_batches for index in batch)
    assert seen == list(range(n_samples))
