"""Pretraining step throughput of the packed, vectorised model against a one-set-at-a-time reference.

Part 1 compares, on the same batches and with the same weights in eval mode,
`SeqSetVAE.forward` + backward against `benchmarks.reference.reference_loss` +
backward: the time per batch and the loss difference, relative to the loss
(`vectorised_max_loss_diff`) and absolute.

Part 2 measures training steps (DataLoader, forward, backward, AdamW) on the
demo data and on generated data of growing size, in events and subjects per
second, with the share of the step spent loading batches.

Torch uses one thread by default here, and times are CPU seconds of this
process (`time.process_time`), with wall seconds beside them. On one thread
the CPU time is the work itself, so the figures stay stable when other
processes share the machine, which stretches wall time instead.

    python -m benchmarks.throughput            # full sizes
    python -m benchmarks.throughput --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, update_results
from benchmarks.reference import reference_loss
from seqsetvae.cache import SplitCache, ensure_cache, fit_preprocessor
from seqsetvae.config import DataConfig, ModelConfig, PretrainConfig
from seqsetvae.data import SetSequenceDataset, make_loader
from seqsetvae.model.core import SeqSetVAE
from seqsetvae.physionet import DEMO_DATA_DIR


@dataclass
class Sizes:
    """Sizes of one throughput run."""

    batch_size: int
    max_sets: int
    reference_batches: int
    steps: int
    generated_subjects: tuple[int, ...]


FULL = Sizes(batch_size=32, max_sets=64, reference_batches=1, steps=20, generated_subjects=(2_000, 8_000, 32_000))
QUICK = Sizes(batch_size=8, max_sets=16, reference_batches=1, steps=4, generated_subjects=(300,))
TINY = Sizes(batch_size=2, max_sets=4, reference_batches=1, steps=2, generated_subjects=(60,))


def build_cache(meds_root: Path, cache_dir: Path, config: DataConfig) -> tuple[SplitCache, int]:
    """Build the train split's cache and return it with the vocabulary size."""
    preprocessor = fit_preprocessor(meds_root, config)
    ensure_cache(meds_root, cache_dir, config, preprocessor, splits=("train",))
    return SplitCache(cache_dir, "train"), preprocessor.vocab_size


def compare_with_reference(dataset: SetSequenceDataset, vocab_size: int, sizes: Sizes, seed: int = 0) -> dict:
    """Time forward + backward of both paths on the same batches and return the loss differences."""
    torch.manual_seed(seed)
    model = SeqSetVAE(ModelConfig(), vocab_size).eval()
    config = PretrainConfig()
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(sizes.reference_batches):
        batch = dataset.collate(rng.choice(len(dataset), sizes.batch_size, replace=False).tolist())
        # One untimed pass, so one-off allocations are not counted.
        model(batch, beta=config.beta, free_bits=config.free_bits)["loss"].backward()

        model.zero_grad()
        start, start_wall = time.process_time(), time.perf_counter()
        loss = model(batch, beta=config.beta, free_bits=config.free_bits)["loss"]
        loss.backward()
        vectorised_seconds, vectorised_wall = time.process_time() - start, time.perf_counter() - start_wall

        model.zero_grad()
        start, start_wall = time.process_time(), time.perf_counter()
        expected = reference_loss(model, batch, beta=config.beta, free_bits=config.free_bits)
        expected.backward()
        reference_seconds, reference_wall = time.process_time() - start, time.perf_counter() - start_wall

        rows.append(
            {
                "sets": int(batch["set_mask"].sum()),
                "events": int(batch["event_mask"].sum()),
                "loss": loss.item(),
                "reference_loss": expected.item(),
                "abs_loss_diff": abs(loss.item() - expected.item()),
                "vectorised_cpu_seconds": vectorised_seconds,
                "reference_cpu_seconds": reference_seconds,
                "vectorised_wall_seconds": vectorised_wall,
                "reference_wall_seconds": reference_wall,
            }
        )
    vectorised = sum(row["vectorised_cpu_seconds"] for row in rows)
    reference = sum(row["reference_cpu_seconds"] for row in rows)
    wall_speedup = sum(row["reference_wall_seconds"] for row in rows) / sum(row["vectorised_wall_seconds"] for row in rows)
    return {
        "speedup": reference / vectorised,
        "wall_speedup": wall_speedup,
        "max_abs_loss_diff": max(row["abs_loss_diff"] for row in rows),
        "max_rel_loss_diff": max(row["abs_loss_diff"] / abs(row["reference_loss"]) for row in rows),
        "vectorised_cpu_seconds_per_batch": vectorised / len(rows),
        "reference_cpu_seconds_per_batch": reference / len(rows),
        "batches": rows,
    }


def training_throughput(dataset: SetSequenceDataset, vocab_size: int, batch_size: int, steps: int, seed: int = 0) -> dict:
    """Run `steps` training steps through the DataLoader and return events and subjects per CPU second."""
    torch.manual_seed(seed)
    model = SeqSetVAE(ModelConfig(), vocab_size).train()
    config = PretrainConfig()
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loader = iter(make_loader(dataset, batch_size, shuffle=True, seed=seed))

    # One untimed step, so one-off allocations are not counted.
    _train_step(model, optimiser, next(loader), config)
    load_seconds = compute_seconds = 0.0
    n_subjects = n_events = n_slots = 0
    start_wall = time.perf_counter()
    for _ in range(steps):
        start = time.process_time()
        batch = next(loader)
        loaded = time.process_time()
        _train_step(model, optimiser, batch, config)
        load_seconds += loaded - start
        compute_seconds += time.process_time() - loaded
        n_subjects += batch["codes"].shape[0]
        n_events += int(batch["event_mask"].sum())
        n_slots += batch["event_mask"].numel()
    wall = time.perf_counter() - start_wall
    total = load_seconds + compute_seconds
    return {
        "batch_size": batch_size,
        "steps": steps,
        "subjects_per_second": n_subjects / total,
        "events_per_second": n_events / total,
        "cpu_seconds_per_step": total / steps,
        "wall_events_per_second": n_events / wall,
        "load_fraction": load_seconds / total,
        "padding_fraction": 1.0 - n_events / n_slots,
    }


def _train_step(model: SeqSetVAE, optimiser: torch.optim.Optimizer, batch: dict, config: PretrainConfig) -> None:
    optimiser.zero_grad()
    model(batch, beta=config.beta, free_bits=config.free_bits)["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimiser.step()


def measure(sizes: Sizes, workdir: str | None = None) -> dict:
    from benchmarks.synthetic import generate

    root = Path(tempfile.mkdtemp(prefix="seqsetvae-throughput-", dir=workdir))
    try:
        demo_cache, demo_vocab = build_cache(DEMO_DATA_DIR, root / "demo-cache", DataConfig(max_sets=sizes.max_sets))
        demo = SetSequenceDataset(demo_cache, sizes.max_sets, labelled=False)
        comparison = compare_with_reference(demo, demo_vocab, sizes)
        print(f"demo: vectorised {comparison['vectorised_cpu_seconds_per_batch']:.3f} CPU s/batch, reference "
              f"{comparison['reference_cpu_seconds_per_batch']:.2f} CPU s/batch, speedup {comparison['speedup']:.1f}x, "
              f"max loss diff {comparison['max_abs_loss_diff']:.2e}", flush=True)
        runs = {"demo": training_throughput(demo, demo_vocab, sizes.batch_size, sizes.steps)}

        generated_comparison = None
        for n_subjects in sizes.generated_subjects:
            generate(root / f"meds-{n_subjects}", n_subjects)
            cache, vocab = build_cache(root / f"meds-{n_subjects}", root / f"cache-{n_subjects}", DataConfig(max_sets=sizes.max_sets))
            dataset = SetSequenceDataset(cache, sizes.max_sets, labelled=False)
            if generated_comparison is None:
                generated_comparison = compare_with_reference(dataset, vocab, sizes)
            runs[f"generated_{n_subjects}"] = training_throughput(dataset, vocab, sizes.batch_size, sizes.steps)
            shutil.rmtree(root / f"meds-{n_subjects}")
        for name, run in runs.items():
            print(f"{name}: {run['events_per_second']:.0f} events/s, {run['subjects_per_second']:.1f} subjects/s, "
                  f"{run['load_fraction']:.0%} loading", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    comparisons = [comparison] + ([generated_comparison] if generated_comparison else [])
    return {
        "vectorised_speedup": round(min(c["speedup"] for c in comparisons), 2),
        # Relative, because float32 resolves a loss of about 40 only to 4e-6.
        "vectorised_max_loss_diff": max(c["max_rel_loss_diff"] for c in comparisons),
        "vectorised_max_abs_loss_diff": max(c["max_abs_loss_diff"] for c in comparisons),
        "throughput": {
            "sizes": {"batch_size": sizes.batch_size, "max_sets": sizes.max_sets, "steps": sizes.steps,
                      "reference_batches": sizes.reference_batches, "model": ModelConfig().__dict__},
            "reference_comparison": {"demo": comparison, "generated": generated_comparison},
            "training": runs,
            "machine": machine(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches and few steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--workdir", help="directory for temporary data (default: the system temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures = measure(QUICK if args.quick else FULL, args.workdir)
    update_results(figures)
    print(json.dumps({key: value for key, value in figures.items() if key != "throughput"}, indent=2))


if __name__ == "__main__":
    main()
