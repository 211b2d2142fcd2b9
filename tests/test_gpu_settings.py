"""The GPU and CPU branches of distributed training, selected and checked without a GPU."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from ray.train import ScalingConfig

from seqsetvae.cli import main
from seqsetvae.config import PretrainConfig
from seqsetvae.errors import UserInputError
from seqsetvae.ray_utils import cpus_per_worker, ddp_backend, lightning_accelerator, worker_resources

SMALL_MODEL = [
    "--d-model", "32", "--latent-dim", "8", "--n-inducing", "8", "--n-heads", "2",
    "--n-set-layers", "1", "--n-seq-layers", "1", "--max-sets", "24", "--max-events-per-set", "24",
]  # fmt: skip


def test_ddp_backend_gpu_is_nccl():
    assert ddp_backend(True) == "nccl"


def test_ddp_backend_cpu_is_gloo():
    assert ddp_backend(False) == "gloo"


def test_lightning_accelerator_branches():
    assert lightning_accelerator(True) == "gpu"
    assert lightning_accelerator(False) == "cpu"


def test_gpu_worker_reserves_one_gpu():
    resources = worker_resources(True, cpus_per_worker(0, 4, use_gpu=True))
    assert resources == {"CPU": 1, "GPU": 1}
    scaling = ScalingConfig(num_workers=4, use_gpu=True, resources_per_worker=resources)
    assert scaling.num_gpus_per_worker == 1
    assert scaling.num_cpus_per_worker == 1


def test_gpu_worker_keeps_requested_cpus():
    assert cpus_per_worker(6, 4, use_gpu=True) == 6


def test_cpu_worker_reserves_no_gpu(ray_local):
    # The local Ray instance of the tests has 2 CPUs.
    resources = worker_resources(False, cpus_per_worker(0, 2))
    assert resources == {"CPU": 1}
    assert cpus_per_worker(0, 1) == 2
    assert ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker=resources).num_gpus_per_worker == 0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_cpu_precisions_accepted(precision):
    assert PretrainConfig(precision=precision).precision == precision


@pytest.mark.parametrize("precision", ["16-mixed", "16-true"])
def test_fp16_needs_gpu(precision):
    with pytest.raises(UserInputError, match=f"precision: {precision} needs --use-gpu"):
        PretrainConfig(precision=precision)
    assert PretrainConfig(precision=precision, use_gpu=True).precision == precision


def test_unknown_precision_is_one_line_error(small_meds, tmp_path, capsys):
    code = main(["pretrain", "--data", str(small_meds), "--out", str(tmp_path), "--precision", "bf16"])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("seqsetvae pretrain: error: precision: expected one of 32-true, bf16-mixed")
    assert "got 'bf16'" in error
    assert error.count("\n") == 1


@pytest.mark.e2e
def test_bf16_mixed_pretraining_on_cpu(small_meds, ray_local, tmp_path):
    code = main(
        [
            "pretrain", "--data", str(small_meds), "--out", str(tmp_path), "--precision", "bf16-mixed",
            "--max-epochs", "1", "--num-workers", "1", "--batch-size", "32", "--beta-warmup-steps", "5",
            "--run-name", "bf16", *SMALL_MODEL,
        ]
    )  # fmt: skip
    assert code == 0
    metrics = pd.read_csv(tmp_path / "pretrain_metrics.csv")
    assert torch.isfinite(torch.tensor(metrics["train/loss"].to_numpy())).all()
    assert torch.isfinite(torch.tensor(metrics["val/loss"].to_numpy())).all()
    weights = torch.load(tmp_path / "pretrained.pt", weights_only=True)
    # bf16-mixed keeps the weights in float32 and computes in bfloat16 under autocast.
    assert all(value.dtype == torch.float32 for value in weights["state_dict"].values() if value.is_floating_point())
    assert weights["hyper_parameters"]["pretrain_config"]["precision"] == "bf16-mixed"
