"""Profile pretraining steps on the demo data with torch.profiler and list what dominates.

Prints the share of each part of a step (set encoder, prior, decoder and
losses, backward, optimiser, batch loading, marked with `record_function`)
and the operators with the most self CPU time. It also times forward +
backward with the set encoder's sets in 1, 2, 4 and 8 length buckets, in CPU
seconds. Everything is stored in the results file.

    python -m benchmarks.profile_step
    python -m benchmarks.profile_step --quick
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.common import machine, update_results
from benchmarks.throughput import FULL, QUICK, Sizes, build_cache
from seqsetvae.config import DataConfig, ModelConfig, PretrainConfig
from seqsetvae.data import SetSequenceDataset, make_loader
from seqsetvae.model import core
from seqsetvae.model.core import SeqSetVAE
from seqsetvae.physionet import DEMO_DATA_DIR

STAGES = ("load", "set_encoder", "prior", "decoder_and_loss", "backward", "optimiser")


def profile_steps(sizes: Sizes, steps: int, top: int = 15) -> dict:
    """Profile `steps` training steps and return the time share of each stage and the top operators."""
    with tempfile.TemporaryDirectory(prefix="seqsetvae-profile-") as directory:
        cache, vocab_size = build_cache(DEMO_DATA_DIR, Path(directory) / "cache", DataConfig(max_sets=sizes.max_sets))
        dataset = SetSequenceDataset(cache, sizes.max_sets, labelled=False)
        torch.manual_seed(0)
        model = SeqSetVAE(ModelConfig(), vocab_size).train()
        config = PretrainConfig()
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr)
        loader = iter(make_loader(dataset, sizes.batch_size, shuffle=True))
        _instrument(model)

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(steps):
                with record_function("load"):
                    batch = next(loader)
                optimiser.zero_grad()
                with record_function("decoder_and_loss"):
                    loss = model(batch, beta=config.beta, free_bits=config.free_bits)["loss"]
                with record_function("backward"):
                    loss.backward()
                with record_function("optimiser"):
                    optimiser.step()

    events = profiler.key_averages()
    stage_ms = {event.key: event.cpu_time_total / 1e3 for event in events if event.key in STAGES}
    # The decoder_and_loss range contains the whole forward; subtract the nested encoder parts.
    stage_ms["decoder_and_loss"] = stage_ms.get("decoder_and_loss", 0.0) - stage_ms.get("set_encoder", 0.0) - stage_ms.get("prior", 0.0)
    total = sum(stage_ms.values())
    operators = sorted((e for e in events if e.key not in STAGES), key=lambda e: e.self_cpu_time_total, reverse=True)
    self_total = sum(e.self_cpu_time_total for e in events if e.key not in STAGES)
    return {
        "steps": steps,
        "stage_share": {key: round(value / total, 3) for key, value in stage_ms.items()},
        "ms_per_step": total / steps,
        "top_operators": [
            {"name": e.key, "self_share": round(e.self_cpu_time_total / self_total, 3), "calls": e.count}
            for e in operators[:top]
        ],
    }


def compare_set_buckets(sizes: Sizes, bucket_counts: tuple[int, ...] = (1, 2, 4, 8), n_batches: int = 3) -> dict:
    """Return the CPU seconds of forward + backward per batch for each number of set-encoder buckets.

    One bucket is the set encoder before bucketing: every set padded to the
    largest set of the batch. The losses must not depend on the bucketing.
    """
    with tempfile.TemporaryDirectory(prefix="seqsetvae-buckets-") as directory:
        cache, vocab_size = build_cache(DEMO_DATA_DIR, Path(directory) / "cache", DataConfig(max_sets=sizes.max_sets))
        dataset = SetSequenceDataset(cache, sizes.max_sets, labelled=False)
        batches = [dataset.collate(list(range(i * sizes.batch_size, (i + 1) * sizes.batch_size))) for i in range(n_batches)]
        torch.manual_seed(0)
        model = SeqSetVAE(ModelConfig(), vocab_size).eval()
        default = core.SET_BUCKETS
        result = {}
        try:
            for buckets in bucket_counts:
                core.SET_BUCKETS = buckets
                seconds, losses = 0.0, []
                for batch in batches:
                    model.zero_grad()
                    start = time.process_time()
                    loss = model(batch, beta=0.5, free_bits=0.05)["loss"]
                    loss.backward()
                    seconds += time.process_time() - start
                    losses.append(loss.item())
                result[str(buckets)] = {"cpu_seconds_per_batch": seconds / n_batches, "losses": losses}
        finally:
            core.SET_BUCKETS = default
    return result


def _instrument(model: SeqSetVAE) -> None:
    """Wrap the set encoder and the prior in record_function ranges named after STAGES."""
    for name in ("set_encoder", "prior"):
        module = getattr(model, name)
        original = module.forward

        def forward(*args, _original=original, _name=name, **kwargs):
            with record_function(_name):
                return _original(*args, **kwargs)

        module.forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches and few steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--label", default="current", help="name of this profile in the results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    result = profile_steps(sizes, steps=3 if args.quick else 10)
    result["set_buckets"] = compare_set_buckets(sizes)
    result.update({"batch_size": sizes.batch_size, "max_sets": sizes.max_sets, "machine": machine()})
    print(json.dumps(result, indent=2))
    update_results({f"profile_{args.label}": result})


if __name__ == "__main__":
    main()
