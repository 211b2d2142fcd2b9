"""CPU cost of a pretraining epoch with shuffled batches against length-grouped batches.

A batch is padded to its longest stay. The set encoder skips padded sets,
but the causal transformer, the decoders and the losses run on all of them,
so a batch of random stays costs about as much as a batch of long ones.
`group_by_length` (seqsetvae.sampling.LengthGroupedSampler) draws each batch
from stays of similar length instead.

For each batch order the script counts the sets of one epoch after padding,
exactly. It times forward, backward and AdamW step in CPU seconds on a
sample of the epoch's batches. The sample takes the batches at evenly spaced
quantiles of padded size, so it spans short and long batches alike. Its mean
times the number of batches estimates the CPU seconds of an epoch.

    python -m benchmarks.length_grouping                  # the shipped demo data, default model
    python -m benchmarks.length_grouping --data MEDS_DIR --config configs/physionet2012.yaml \\
        --set seq_width=256 --label physionet2012_seq_width_256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.ablations import parse_overrides
from benchmarks.common import machine, update_results
from benchmarks.throughput import build_cache
from seqsetvae.cli import load_yaml_config
from seqsetvae.config import DataConfig, ModelConfig, PretrainConfig, from_dict
from seqsetvae.data import SetSequenceDataset
from seqsetvae.model.core import SeqSetVAE
from seqsetvae.physionet import DEMO_DATA_DIR
from seqsetvae.sampling import LengthGroupedSampler


def epoch_batches(lengths: np.ndarray, batch_size: int, grouped: bool, seed: int) -> list[np.ndarray]:
    """Return the batches of one epoch, shuffled or length-grouped, as index arrays."""
    if grouped:
        order = np.fromiter(LengthGroupedSampler(lengths, batch_size, seed=seed), dtype=np.int64)
    else:
        order = np.random.default_rng(seed).permutation(len(lengths))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def padded_sets(batch: np.ndarray, lengths: np.ndarray) -> int:
    """Return the number of sets in `batch` after padding to its longest stay."""
    return len(batch) * int(lengths[batch].max())


def quantile_sample(batches: list[np.ndarray], lengths: np.ndarray, count: int) -> list[np.ndarray]:
    """Return `count` batches at evenly spaced quantiles of padded size."""
    ranked = sorted(batches, key=lambda batch: padded_sets(batch, lengths))
    positions = ((np.arange(count) + 0.5) * len(ranked) / count).astype(int)
    return [ranked[position] for position in positions]


def step_seconds(
    dataset: SetSequenceDataset,
    batches: list[np.ndarray],
    model_config: ModelConfig,
    config: PretrainConfig,
    vocab_size: int,
) -> list[float]:
    """Return the CPU seconds of forward, backward and optimiser step on each batch, after one untimed step."""
    torch.manual_seed(config.seed)
    model = SeqSetVAE(model_config, vocab_size).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def step(batch: np.ndarray) -> None:
        optimiser.zero_grad()
        model(dataset.collate(batch.tolist()), beta=config.beta, free_bits=config.free_bits)["loss"].backward()
        optimiser.step()

    step(batches[0])
    seconds = []
    for batch in batches:
        start = time.process_time()
        step(batch)
        seconds.append(time.process_time() - start)
    return seconds


def measure(meds_root: Path, values: dict, sample_batches: int, workdir: str | None = None) -> dict:
    """Compare shuffled and length-grouped batches of one epoch of the train split."""
    data_config = from_dict(DataConfig, values)
    model_config = from_dict(ModelConfig, values)
    config = from_dict(PretrainConfig, values)
    with tempfile.TemporaryDirectory(prefix="seqsetvae-grouping-", dir=workdir) as directory:
        cache, vocab_size = build_cache(meds_root, Path(directory) / "cache", data_config)
        dataset = SetSequenceDataset(cache, data_config.max_sets, labelled=False)
        lengths = dataset.sample_lengths()
        result: dict = {"subjects": len(lengths), "real_sets": int(lengths.sum()), "batch_size": config.batch_size}
        for name, grouped in (("shuffled", False), ("grouped", True)):
            batches = epoch_batches(lengths, config.batch_size, grouped, config.seed)
            sample = quantile_sample(batches, lengths, min(sample_batches, len(batches)))
            seconds = step_seconds(dataset, sample, model_config, config, vocab_size)
            result[name] = {
                "batches": len(batches),
                "padded_sets": sum(padded_sets(batch, lengths) for batch in batches),
                "sampled_batches": len(sample),
                "cpu_seconds_per_step": float(np.mean(seconds)),
                "epoch_cpu_seconds": float(np.mean(seconds)) * len(batches),
            }
    result["padded_over_real_sets"] = {
        name: result[name]["padded_sets"] / result["real_sets"] for name in ("shuffled", "grouped")
    }
    grouped_seconds, shuffled_seconds = result["grouped"]["epoch_cpu_seconds"], result["shuffled"]["epoch_cpu_seconds"]
    result["epoch_cpu_grouped_over_shuffled"] = grouped_seconds / shuffled_seconds
    return result


def positive_int(text: str) -> int:
    """Parse a count of at least 1 for argparse."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text}: expected an integer of at least 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DEMO_DATA_DIR, help="MEDS directory (default: the shipped demo data)"
    )
    parser.add_argument("--config", help="YAML config of seqsetvae run whose data, model and pretraining options apply")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one option")
    parser.add_argument(
        "--sample-batches", type=positive_int, default=12, help="batches timed per batch order (default 12)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--label", default="demo", help="name of this measurement in the results file")
    parser.add_argument("--workdir", help="directory for the temporary cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    values = load_yaml_config(args.config) if args.config else {}
    for overrides in parse_overrides(args.set).values():
        values.update(overrides)
    result = measure(args.data, values, args.sample_batches, args.workdir)
    result.update({"options": values, "threads": args.threads, "machine": machine()})
    update_results({f"length_grouping_{args.label}": result})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
