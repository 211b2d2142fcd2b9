"""Sweep cost: a Tune sweep of the head on cached `[mu, std]` features against one head that re-encodes every batch.

Both use the same frozen encoder, the same tensor cache and the same number of
epochs per head. The encoder is the default model with random weights, because
the cost does not depend on the weights. The cache is built beforehand and not
timed.

- cached sweep: `tune.sweep.run_sweep`, which encodes the train and tuning
  labels once, then trains `trials` heads with Ray Tune and Optuna on those
  features. Its wall time includes starting Ray.
- uncached trial: `seqsetvae.finetune.run_finetune`, which trains one head
  with the encoder inside the LightningModule, so every epoch encodes every
  subject again.

    python -m benchmarks.sweep_cost            # demo data, 32 trials, 10 epochs per head
    python -m benchmarks.sweep_cost --quick
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import benchmark_main, machine
from benchmarks.synthetic import demo_or_generated
from seqsetvae.cache import ensure_cache, fit_preprocessor
from seqsetvae.config import DataConfig, FinetuneConfig, ModelConfig, PretrainConfig, TuneConfig
from seqsetvae.lit import PretrainModule


@dataclass
class Sizes:
    """Sizes of one sweep-cost run; `generated_subjects` 0 means the demo data."""

    trials: int
    max_epochs: int
    generated_subjects: int


FULL = Sizes(trials=32, max_epochs=10, generated_subjects=0)
QUICK = Sizes(trials=8, max_epochs=3, generated_subjects=600)
TINY = Sizes(trials=2, max_epochs=1, generated_subjects=120)


def write_pretrained(path: Path, preprocessing: dict) -> None:
    """Write a `pretrained.pt` of a freshly initialised default model, in the format `seqsetvae pretrain` exports."""
    torch.manual_seed(0)
    module = PretrainModule(asdict(ModelConfig()), asdict(PretrainConfig()), preprocessing)
    state = {key.removeprefix("model."): value for key, value in module.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams)}, path)


def measure(sizes: Sizes, workdir: str | None = None) -> dict:
    from seqsetvae.finetune import run_finetune
    from tune.sweep import run_sweep

    root = Path(tempfile.mkdtemp(prefix="seqsetvae-sweep-cost-", dir=workdir))
    try:
        meds_root = demo_or_generated(root / "meds", sizes.generated_subjects)
        data_config = DataConfig()
        preprocessor = fit_preprocessor(meds_root, data_config)
        ensure_cache(meds_root, root / "cache", data_config, preprocessor)
        checkpoint = root / "pretrained.pt"
        write_pretrained(checkpoint, preprocessor.to_dict())
        finetune_config = FinetuneConfig(max_epochs=sizes.max_epochs)

        start = time.perf_counter()
        sweep = run_sweep(
            meds_root, checkpoint, root / "sweep", data_config, finetune_config,
            TuneConfig(num_samples=sizes.trials), cache_dir=root / "cache",
        )
        sweep_seconds = time.perf_counter() - start
        print(f"cached sweep of {sweep.n_trials} trials: {sweep_seconds:.1f} s", flush=True)

        start = time.perf_counter()
        run_finetune(meds_root, checkpoint, root / "finetune", data_config, finetune_config, cache_dir=root / "cache")
        uncached_seconds = time.perf_counter() - start
        print(f"one uncached trial: {uncached_seconds:.1f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    return {
        "sweep_cached_32_over_uncached_1": round(sweep_seconds / uncached_seconds, 3),
        "sweep_cost": {
            "sizes": asdict(sizes) | {"data": "demo" if not sizes.generated_subjects else "generated"},
            "cached_sweep_seconds": sweep_seconds,
            "cached_trials": sweep.n_trials,
            "uncached_trial_seconds": uncached_seconds,
            "machine": machine(),
        },
    }


def main() -> None:
    benchmark_main(__doc__, measure, FULL, QUICK, "sweep_cost", "8 trials of 3 epochs on 600 generated subjects")


if __name__ == "__main__":
    main()
