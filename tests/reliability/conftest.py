"""Fixtures of the reliability tests: a tiny pretrained checkpoint and an export, trained for real on demo stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqsetvae.cli import main
from seqsetvae.pretrain import export_pretrained

from .meds_data import TINY_DATA, TINY_FLAGS, build_cache, pretrain_steps


@pytest.fixture(scope="session")
def tiny_pretrained(small_meds, tmp_path_factory) -> Path:
    """A pretrained.pt from a few real optimiser steps of pretraining without Ray."""
    out = tmp_path_factory.mktemp("tiny-pretrain")
    preprocessor, _ = build_cache(small_meds, out / "cache", TINY_DATA, splits=("train", "tuning"))
    trainer = pretrain_steps(out / "cache", preprocessor, TINY_DATA, steps=3, val_batches=1)
    trainer.save_checkpoint(out / "last.ckpt")
    export_pretrained(out / "last.ckpt", out / "pretrained.pt")
    return out / "pretrained.pt"


@pytest.fixture(scope="session")
def tiny_export(small_meds, tiny_pretrained, tmp_path_factory) -> Path:
    """An export directory written by `seqsetvae finetune` on the tiny pretrained encoder."""
    out = tmp_path_factory.mktemp("tiny-finetune")
    code = main(
        ["finetune", "--data", str(small_meds), "--pretrained-ckpt", str(tiny_pretrained), "--out", str(out),
         "--max-epochs", "2", *TINY_FLAGS[-4:]]
    )  # fmt: skip
    assert code == 0
    return out / "export"
