"""Probe the frozen encoders of finished runs with the logistic regression of the ablations.

    python -m benchmarks.probe RUN_DIR [RUN_DIR ...]

A RUN_DIR is the output directory of `seqsetvae run`. The probe loads its
`pretrain/pretrained.pt` (or, for a run given `--pretrained-ckpt`, the
encoder that its `summary.json` names), encodes the labelled splits of its `cache/` and fits
the probe of `benchmarks.ablations` on each feature variant. This separates
the encoder from the head: a swept head far below the probe of its own
encoder points at the head's selection, not at pretraining. Prints one JSON
line per run and variant.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from benchmarks.ablations import LABELLED_SPLITS, probe_variants
from seqsetvae.cache import SplitCache
from seqsetvae.encoder import load_pretrained_encoder
from seqsetvae.errors import UserInputError

VARIANTS = ("last", "last_mu")


def probe_run(run_dir: Path, seed: int = 0) -> dict[str, dict]:
    """Return the probe scores of each feature variant of the encoder of one `seqsetvae run` directory.

    Raises:
        UserInputError: the directory has no `summary.json`, encoder checkpoint or cached split.
    """
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise UserInputError(f"{summary_path}: not found; pass the output directory of a finished `seqsetvae run`")
    summary = json.loads(summary_path.read_text())
    data_config = summary["config"]["data"]
    # A run given --pretrained-ckpt has no pretrain/ directory, so its summary names the encoder it used.
    pretrained = run_dir / "pretrain" / "pretrained.pt"
    encoder = load_pretrained_encoder(pretrained if pretrained.is_file() else summary["pretrained"])
    caches = {}
    for split in LABELLED_SPLITS:
        split_dir = run_dir / "cache" / split
        if not split_dir.is_dir():
            raise UserInputError(
                f"{split_dir}: cached split not found; pass the directory of a finished `seqsetvae run`"
            )
        caches[split] = SplitCache(run_dir / "cache", split, task=data_config["task"])
    return probe_variants(encoder.model, caches, data_config["max_sets"], seed, VARIANTS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output directories of `seqsetvae run`")
    parser.add_argument("--seed", type=int, default=0, help="random state of the logistic regression")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for run_dir in args.runs:
        try:
            scores = probe_run(run_dir, args.seed)
        except UserInputError as error:
            raise SystemExit(str(error)) from None
        for variant, result in scores.items():
            print(json.dumps({"run": str(run_dir), "variant": variant, **result}), flush=True)


if __name__ == "__main__":
    main()
