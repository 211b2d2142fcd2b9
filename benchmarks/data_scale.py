"""Data scale: preparation time and peak memory, and one epoch read, on generated MEDS data of growing size.

For each size, a dataset is generated under a temporary directory, then two
fresh processes run the product's code and report their wall time and peak
resident memory (ru_maxrss, which counts pages of memory-mapped files too):

- prepare: `fit_preprocessor` and `ensure_cache` on every split;
- epoch read: one shuffled epoch of the train split through the pretraining
  DataLoader (`SetSequenceDataset` and its vectorised collate), no model.

    python -m benchmarks.data_scale                      # 25k, 50k, 100k, 200k subjects
    python -m benchmarks.data_scale --sizes 1000 2000
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import cpu_seconds, machine, peak_rss_gb, run_child, update_results

FULL_SIZES = (25_000, 50_000, 100_000, 200_000)
QUICK_SIZES = (1_000, 2_000, 4_000)
EPOCH_BATCH_SIZE = 32


def prepare(data: str, cache: str) -> dict:
    from seqsetvae.cache import ensure_cache, fit_preprocessor
    from seqsetvae.config import DataConfig

    config = DataConfig()
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    preprocessor = fit_preprocessor(data, config)
    fitted = time.perf_counter()
    reports = ensure_cache(data, cache, config, preprocessor)
    return {
        "fit_seconds": fitted - start,
        "cache_seconds": time.perf_counter() - fitted,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": cpu_seconds() - cpu_start,
        "events": sum(report.n_events for report in reports.values()),
        "peak_rss_gb": peak_rss_gb(),
    }


def read_epoch(cache: str) -> dict:
    from seqsetvae.cache import SplitCache
    from seqsetvae.config import DataConfig
    from seqsetvae.data import SetSequenceDataset, make_loader

    dataset = SetSequenceDataset(SplitCache(cache, "train"), DataConfig().max_sets, labelled=False)
    loader = make_loader(dataset, EPOCH_BATCH_SIZE, shuffle=True)
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    n_subjects = n_events = 0
    for batch in loader:
        n_subjects += batch["codes"].shape[0]
        n_events += int(batch["event_mask"].sum())
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds() - cpu_start,
        "subjects": n_subjects,
        "events": n_events,
        "subjects_per_second": n_subjects / seconds,
        "peak_rss_gb": peak_rss_gb(),
    }


def measure(sizes: tuple[int, ...], workdir: str | None = None) -> dict:
    """Generate, prepare and read each size in turn; each dataset is deleted before the next."""
    per_size = {}
    for n_subjects in sizes:
        root = Path(tempfile.mkdtemp(prefix=f"seqsetvae-scale-{n_subjects}-", dir=workdir))
        try:
            generated = run_child("benchmarks.data_scale", "--child", "generate", "--subjects", str(n_subjects), "--data", str(root / "meds"))
            prepared = run_child("benchmarks.data_scale", "--child", "prepare", "--data", str(root / "meds"), "--cache", str(root / "cache"))
            epoch = run_child("benchmarks.data_scale", "--child", "read", "--cache", str(root / "cache"))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        per_size[n_subjects] = {"generated": generated, "prepare": prepared, "epoch_read": epoch}
        print(f"{n_subjects} subjects: {generated['events']} events, prepare {prepared['seconds']:.1f} s "
              f"({prepared['peak_rss_gb']:.2f} GB), epoch read {epoch['seconds']:.1f} s ({epoch['peak_rss_gb']:.2f} GB)", flush=True)
    largest = per_size[max(sizes)]
    return {
        "prepare_seconds_by_subjects": {str(n): round(per_size[n]["prepare"]["seconds"], 2) for n in sizes},
        "prepare_cpu_seconds_by_subjects": {str(n): round(per_size[n]["prepare"]["cpu_seconds"], 2) for n in sizes},
        "prepare_peak_rss_gb": round(max(per_size[n]["prepare"]["peak_rss_gb"] for n in sizes), 3),
        "epoch_read_peak_rss_gb": round(max(per_size[n]["epoch_read"]["peak_rss_gb"] for n in sizes), 3),
        "data_scale": {
            "sizes": list(sizes),
            "events_by_subjects": {str(n): per_size[n]["generated"]["events"] for n in sizes},
            "largest": largest,
            "per_size": {str(n): per_size[n] for n in sizes},
            "epoch_batch_size": EPOCH_BATCH_SIZE,
            "machine": machine(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(FULL_SIZES), help="numbers of subjects")
    parser.add_argument("--quick", action="store_true", help=f"use the small sizes {QUICK_SIZES}")
    parser.add_argument("--workdir", help="directory for the generated data (default: the system temporary directory)")
    parser.add_argument("--child", choices=("generate", "prepare", "read"), help=argparse.SUPPRESS)
    parser.add_argument("--subjects", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "generate":
        from benchmarks.synthetic import generate

        print(json.dumps(generate(args.data, args.subjects)))
    elif args.child == "prepare":
        print(json.dumps(prepare(args.data, args.cache)))
    elif args.child == "read":
        print(json.dumps(read_epoch(args.cache)))
    else:
        sizes = QUICK_SIZES if args.quick else tuple(args.sizes)
        figures = measure(sizes, args.workdir)
        update_results(figures)
        print(json.dumps({key: value for key, value in figures.items() if key != "data_scale"}, indent=2))


if __name__ == "__main__":
    main()
