"""The search space of the head sweep.

Keys are `FinetuneConfig` field names, the same names as the command-line
options and the YAML keys, so a sampled trial config overrides the base config
field by field.
"""

from __future__ import annotations

from typing import Any

from ray import tune

# Weight of the positive class; None applies no class weight.
FOCAL_ALPHAS = (None, 0.25, 0.5, 0.75, 0.9)
# Learning rates of the head. Its input is standardised and its rate decays to 0 along a cosine, so
# the rates that matter are those that let it converge within the run. On PhysioNet 2012, heads
# below 1e-3 were still undertrained after 60 epochs and did worse on the held-out split.
HEAD_LR_RANGE = (1e-3, 1e-2)


def search_space() -> dict[str, Any]:
    """Return the Tune search space: focal gamma and alpha, head initialisation, learning rate, weight decay."""
    return {
        "focal_gamma": tune.uniform(0.0, 5.0),
        "focal_alpha": tune.choice(list(FOCAL_ALPHAS)),
        "head_init": tune.choice(["normal", "xavier", "zero_logodds"]),
        "head_lr": tune.loguniform(*HEAD_LR_RANGE),
        "weight_decay": tune.choice([0.0, 1e-4, 1e-3]),
    }


def default_point(base: dict[str, Any]) -> dict[str, Any]:
    """Return the base config's values of the searched keys, evaluated as the first trial."""
    return {key: base[key] for key in search_space()}
