"""Run the whole pipeline once per seed and summarise its spread.

    python -m benchmarks.seeds --config configs/physionet2012.yaml --data MEDS_DIR \\
        --out runs/seeds --seeds 0 1 2

Each seed runs `seqsetvae run --config CONFIG --data MEDS_DIR --out OUT/seed-N`
with N as the pretraining, finetuning, search and report seed; the data split
stays the one in MEDS_DIR. A seed whose summary.json exists is not run again.
With --pretrained-from RUNS, each seed skips pretraining and sweeps heads on
RUNS/seed-N/pretrain/pretrained.pt, the encoder of an earlier seed run. This
measures a change to the head stage on the same encoders.
OUT/seeds.json contains every seed's held-out figures, the report's
gradient-boosting baseline and wall time, and their mean and sample standard
deviation over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

FIGURES = ("auroc", "auprc", "baseline_auroc", "baseline_auprc", "val_auprc", "total_minutes")


def seed_figures(summary: dict) -> dict:
    """Pick the held-out model and baseline figures and the wall time from a run's summary.json."""
    return {
        "auroc": summary["held_out"]["auroc"],
        "auprc": summary["held_out"]["auprc"],
        "baseline_auroc": summary["report"]["baseline_auroc"],
        "baseline_auprc": summary["report"]["baseline_auprc"],
        "val_auprc": summary["val_auprc"],
        "total_minutes": summary["total_seconds"] / 60,
    }


def spread(per_seed: dict[int, dict]) -> dict:
    """Return the mean and the sample standard deviation (0 for one seed) of every figure."""
    result = {}
    for name in FIGURES:
        values = [figures[name] for figures in per_seed.values()]
        result[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config given to seqsetvae run")
    parser.add_argument("--data", required=True, help="MEDS directory")
    parser.add_argument("--out", required=True, type=Path, help="directory of the seed runs and seeds.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run")
    parser.add_argument(
        "--pretrained-from", type=Path, help="directory of earlier seed runs whose encoders are reused"
    )
    args = parser.parse_args(argv)

    per_seed = {}
    for seed in args.seeds:
        run_dir = args.out / f"seed-{seed}"
        if not (run_dir / "summary.json").is_file():
            seed_flags = []
            for name in ("seed", "finetune-seed", "search-seed", "report-seed"):
                seed_flags += [f"--{name}", str(seed)]
            command = [
                sys.executable, "-m", "seqsetvae.cli", "run", "--config", args.config, "--data", args.data,
                "--out", str(run_dir), *seed_flags,
            ]  # fmt: skip
            if args.pretrained_from:
                command += ["--pretrained-ckpt", str(args.pretrained_from / f"seed-{seed}" / "pretrain" / "pretrained.pt")]
            subprocess.run(command, check=True)
        per_seed[seed] = seed_figures(json.loads((run_dir / "summary.json").read_text()))
        print(f"seed {seed}: {json.dumps(per_seed[seed])}", flush=True)

    result = {
        "config": args.config,
        "pretrained_from": str(args.pretrained_from) if args.pretrained_from else None,
        "seeds": per_seed,
        "spread": spread(per_seed),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["spread"], indent=2))


if __name__ == "__main__":
    main()
