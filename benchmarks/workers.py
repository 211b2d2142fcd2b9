"""Worker scaling: pretraining samples per second with 1 and with 2 Ray Train workers, and Ray's start-up cost.

Each worker count runs `run_pretraining` twice on the same cache, for one and
for E epochs. The difference of the two wall times is the time of E - 1
epochs (training and validation), so

    epoch seconds      = (T(E epochs) - T(1 epoch)) / (E - 1)
    samples per second = train subjects / epoch seconds
    start-up seconds   = T(1 epoch) - epoch seconds

where start-up covers the worker group, the trainer set-up, checkpointing and
the export. Starting the local Ray instance is timed separately, once.
Workers divide the machine's CPUs among themselves (`cpus_per_worker` 0).

    python -m benchmarks.workers            # 1,000 generated subjects
    python -m benchmarks.workers --quick
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import benchmark_main, machine
from benchmarks.synthetic import demo_or_generated
from seqsetvae.cache import SplitCache, ensure_cache, fit_preprocessor
from seqsetvae.config import DataConfig, ModelConfig, PretrainConfig


@dataclass
class Sizes:
    """Sizes of one worker-scaling run; `generated_subjects` 0 means the demo data."""

    batch_size: int
    max_sets: int
    generated_subjects: int
    epochs: int = 5
    worker_counts: tuple[int, ...] = (1, 2)


FULL = Sizes(batch_size=32, max_sets=64, generated_subjects=1000)
QUICK = Sizes(batch_size=16, max_sets=32, generated_subjects=400, epochs=3)
TINY = Sizes(batch_size=8, max_sets=8, generated_subjects=60, epochs=2)


def measure(sizes: Sizes, workdir: str | None = None) -> dict:
    import ray

    from seqsetvae.pretrain import run_pretraining
    from seqsetvae.ray_utils import init_ray

    root = Path(tempfile.mkdtemp(prefix="seqsetvae-workers-", dir=workdir))
    try:
        meds_root = demo_or_generated(root / "meds", sizes.generated_subjects)
        data_config = DataConfig(max_sets=sizes.max_sets)
        preprocessor = fit_preprocessor(meds_root, data_config)
        ensure_cache(meds_root, root / "cache", data_config, preprocessor, splits=("train", "tuning"))
        n_train = SplitCache(root / "cache", "train").n_subjects

        started_here = not ray.is_initialized()
        start = time.perf_counter()
        init_ray()
        ray_start_seconds = time.perf_counter() - start

        walls: dict[int, dict[int, float]] = {}
        for n_workers in sizes.worker_counts:
            walls[n_workers] = {}
            for epochs in (1, sizes.epochs):
                config = PretrainConfig(
                    max_epochs=epochs, batch_size=sizes.batch_size, num_workers=n_workers,
                    run_name=f"workers-{n_workers}-epochs-{epochs}",
                )
                start = time.perf_counter()
                run_pretraining(
                    meds_root, root / f"run-{n_workers}-{epochs}", data_config, ModelConfig(), config,
                    cache_dir=root / "cache", preprocessor=preprocessor,
                )
                walls[n_workers][epochs] = time.perf_counter() - start
                print(f"{n_workers} worker(s), {epochs} epoch(s): {walls[n_workers][epochs]:.1f} s", flush=True)
        if started_here:
            ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    per_workers = {}
    for n_workers, wall in walls.items():
        epoch_seconds = (wall[sizes.epochs] - wall[1]) / (sizes.epochs - 1)
        per_workers[str(n_workers)] = {
            "epoch_seconds": epoch_seconds,
            "samples_per_second": n_train / epoch_seconds if epoch_seconds > 0 else float("nan"),
            "startup_seconds": wall[1] - epoch_seconds,
            "wall_seconds_1_epoch": wall[1],
            f"wall_seconds_{sizes.epochs}_epochs": wall[sizes.epochs],
        }
    return {
        "samples_per_second_by_workers": {key: round(value["samples_per_second"], 2) for key, value in per_workers.items()},
        "workers": {
            "sizes": asdict(sizes) | {"train_subjects": n_train, "data": "generated" if sizes.generated_subjects else "demo"},
            "ray_start_seconds": ray_start_seconds,
            "per_workers": per_workers,
            "machine": machine(),
        },
    }


def main() -> None:
    benchmark_main(__doc__, measure, FULL, QUICK, "workers", "400 generated subjects, smaller batches")


if __name__ == "__main__":
    main()
