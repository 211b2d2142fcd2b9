"""Pretraining throughput on a GPU, in float32, bf16 autocast and with torch.compile; writes the figures to a JSON file.

Runs training steps (forward, backward, AdamW) of the default model on batches
of the bundled demo data, synchronising the device around the timed steps,
and records events and subjects per second and the peak GPU memory of each
variant. It runs on CPU too (`--device cpu`), which is how the tests check it.

    python -m benchmarks.gpu_throughput --out gpu_throughput.json
    python -m benchmarks.gpu_throughput --device cpu --quick --out /tmp/cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.common import machine
from benchmarks.throughput import build_cache
from seqsetvae.config import DataConfig, ModelConfig, PretrainConfig
from seqsetvae.data import SetSequenceDataset, make_loader
from seqsetvae.model.core import SeqSetVAE
from seqsetvae.physionet import DEMO_DATA_DIR

VARIANTS = ("float32", "bf16", "bf16_compile")


def run_variant(dataset: SetSequenceDataset, vocab_size: int, device: torch.device, variant: str,
                batch_size: int, steps: int, warmup_steps: int) -> dict:
    """Time `steps` training steps after `warmup_steps` untimed ones, which also absorb compilation."""
    torch.manual_seed(0)
    model = SeqSetVAE(ModelConfig(), vocab_size).to(device).train()
    if variant.endswith("compile"):
        model.compile(dynamic=True)
    config = PretrainConfig()
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if variant.startswith("bf16") else nullcontext()
    loader = make_loader(dataset, batch_size, shuffle=True)
    batches = iter(loader)

    def step() -> int:
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        optimiser.zero_grad(set_to_none=True)
        with autocast:
            loss = model(batch, beta=config.beta, free_bits=config.free_bits)["loss"]
        loss.backward()
        optimiser.step()
        return int(batch["event_mask"].sum())

    compile_start = time.perf_counter()
    for _ in range(warmup_steps):
        step()
    _synchronise(device)
    warmup_seconds = time.perf_counter() - compile_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    start = time.perf_counter()
    n_events = sum(step() for _ in range(steps))
    _synchronise(device)
    seconds = time.perf_counter() - start
    return {
        "events_per_second": n_events / seconds,
        "subjects_per_second": steps * batch_size / seconds,
        "seconds_per_step": seconds / steps,
        "warmup_seconds": warmup_seconds,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512], help="subjects per batch")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant and batch size")
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first, which include compilation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="variants to run")
    parser.add_argument("--quick", action="store_true", help="batch size 8, 2 timed steps, 1 warm-up step")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.steps, args.warmup_steps = [8], 2, 1

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible; run on a GPU machine or pass --device cpu")
    results = {"machine": machine(), "device": str(device), "steps": args.steps, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="seqsetvae-gpu-") as directory:
        cache, vocab_size = build_cache(DEMO_DATA_DIR, Path(directory) / "cache", DataConfig(max_sets=64))
        dataset = SetSequenceDataset(cache, 64, labelled=False)
        for batch_size in args.batch_sizes:
            for variant in args.variants:
                run = run_variant(dataset, vocab_size, device, variant, batch_size, args.steps, args.warmup_steps)
                results["runs"][f"{variant}_batch_{batch_size}"] = run
                print(f"{variant}, batch {batch_size}: {run['events_per_second']:.0f} events/s, "
                      f"{run['subjects_per_second']:.1f} subjects/s", flush=True)
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
