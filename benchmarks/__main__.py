"""Run every benchmark and write benchmarks/results.json.

    python -m benchmarks --quick     # small sizes, a few minutes
    python -m benchmarks             # the sizes of docs/benchmarks.md; the data-scale run takes the longest
    python -m benchmarks --only throughput sweep_cost

Each benchmark also runs alone as `python -m benchmarks.<name>`. Results are
merged into the file, so a partial run keeps the figures of the others. The GPU
benchmark runs only where CUDA is available; otherwise run
`python -m benchmarks.gpu_throughput` on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import data_scale, length_grouping, profile_step, sweep_cost, throughput, workers
from benchmarks.common import RESULTS_PATH, machine, update_results
from seqsetvae.physionet import DEMO_DATA_DIR

BENCHMARKS = ("throughput", "profile", "length_grouping", "sweep_cost", "workers", "data_scale")
REQUIRED_KEYS = (
    "vectorised_speedup",
    "vectorised_max_loss_diff",
    "sweep_cached_32_over_uncached_1",
    "prepare_peak_rss_gb",
    "epoch_read_peak_rss_gb",
    "prepare_seconds_by_subjects",
    "samples_per_second_by_workers",
)


def run(name: str, quick: bool, workdir: str | None) -> dict:
    """Run one benchmark at the quick or the full sizes and return its figures."""
    if name == "throughput":
        return throughput.measure(throughput.QUICK if quick else throughput.FULL, workdir)
    if name == "profile":
        sizes = throughput.QUICK if quick else throughput.FULL
        return {"profile_current": profile_step.profile_steps(sizes, steps=3 if quick else 10)}
    if name == "length_grouping":
        figures = length_grouping.measure(DEMO_DATA_DIR, {}, 4 if quick else 12, workdir)
        return {"length_grouping_demo": figures}
    if name == "sweep_cost":
        return sweep_cost.measure(sweep_cost.QUICK if quick else sweep_cost.FULL, workdir)
    if name == "workers":
        return workers.measure(workers.QUICK if quick else workers.FULL, workdir)
    if name == "data_scale":
        return data_scale.measure(data_scale.QUICK_SIZES if quick else data_scale.FULL_SIZES, workdir)
    raise ValueError(f"expected a benchmark name in {BENCHMARKS}, got {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes that finish in a few minutes")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="benchmarks to run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process benchmarks (default 1)")
    parser.add_argument("--workdir", help="directory for generated data (default: the system temporary directory)")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help=f"results file (default: {RESULTS_PATH})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    figures = {"mode": "quick" if args.quick else "full", "machine": machine(), "benchmark_seconds": {}}
    for name in args.only:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        figures.update(run(name, args.quick, args.workdir))
        figures["benchmark_seconds"][name] = round(time.perf_counter() - start, 1)
        # Written after each benchmark, so an interrupted run keeps what it measured.
        results = update_results(figures, args.results)
    missing = [key for key in REQUIRED_KEYS if key not in results]
    summary = {key: results[key] for key in REQUIRED_KEYS if key in results}
    print(json.dumps(summary, indent=2))
    print(f"Results written to {args.results}" + (f"; not measured yet: {', '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    main()
