"""Insight into a finished head sweep: the trial table, Optuna's parameter importances and the history.

The sweep runs Optuna inside Ray Tune, whose searcher state is a pickle. The
report instead rebuilds an Optuna study from `trials.csv`, with the
distributions of the sweep's search space, so nothing pickled is read.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from seqsetvae.errors import UserInputError
from seqsetvae.report.figures import new_figure, save_figure

logger = logging.getLogger(__name__)

TRIALS_FILE = "trials.csv"
PARAM_PREFIX = "config/"
VALUE_COLUMN = "val_auprc"
# The name of VALUE_COLUMN in tables written before trials could keep their last epoch.
OLD_VALUE_COLUMN = "best_val_auprc"


def load_trials(sweep_dir: Path) -> pd.DataFrame:
    """Read `trials.csv` of a sweep; parameter columns lose their `config/` prefix.

    Raises:
        UserInputError: the file is missing or lacks the sweep's columns.
    """
    path = sweep_dir / TRIALS_FILE
    if not path.is_file():
        raise UserInputError(f"{path}: file not found; pass the output directory of `seqsetvae tune` as --sweep-dir")
    trials = pd.read_csv(path).rename(columns={OLD_VALUE_COLUMN: VALUE_COLUMN})
    missing = [column for column in (VALUE_COLUMN, "epochs", "status") if column not in trials.columns]
    if missing:
        raise UserInputError(f"{path}: missing columns {', '.join(missing)}; expected a trials table written by the sweep")
    return trials.rename(columns=lambda column: column.removeprefix(PARAM_PREFIX))


def param_names(trials: pd.DataFrame, distributions: dict) -> list[str]:
    return [name for name in distributions if name in trials.columns]


def _param_value(value, distribution):
    """Return a trials.csv cell as the value Optuna stored; an empty cell is the None category."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        # pandas reads a column of numbers and blanks as floats; match the category's own type.
        for choice in distribution.choices:
            if choice is not None and not isinstance(choice, str) and not isinstance(value, str) and choice == value:
                return choice
    return value.item() if isinstance(value, np.generic) else value


def rebuild_study(trials: pd.DataFrame, distributions: dict) -> optuna.Study:
    """Return an Optuna study with one finished trial per row of the trial table.

    Rows without a finite value are added as failed trials. A row whose
    parameter lies outside the search space (a base config outside it, run as
    the first trial) is left out with a warning.
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line for a study that only contains rows
    try:
        study = optuna.create_study(direction="maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    names = param_names(trials, distributions)
    skipped = 0
    for _, row in trials.iterrows():
        params = {name: _param_value(row[name], distributions[name]) for name in names}
        value = float(row[VALUE_COLUMN])
        finite = math.isfinite(value)
        try:
            trial = optuna.trial.create_trial(
                params=params,
                distributions={name: distributions[name] for name in names},
                value=value if finite else None,
                state=optuna.trial.TrialState.COMPLETE if finite else optuna.trial.TrialState.FAIL,
            )
        except ValueError:
            skipped += 1
            continue
        study.add_trial(trial)
    if skipped:
        logger.warning("%d trial(s) have parameters outside the search space and are left out of the importances", skipped)
    return study


def param_importances(study: optuna.Study, seed: int) -> dict[str, float] | None:
    """Return fANOVA importances of each parameter for the trial value, or None when they cannot be computed."""
    completed = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    if len(completed) < 2:
        logger.warning("Parameter importances need at least 2 completed trials, got %d", len(completed))
        return None
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as error:
        logger.warning("Parameter importances could not be computed: %s", error)
        return None
    return {name: float(value) for name, value in importances.items()}


def plot_importances(importances: dict[str, float], n_trials: int, out_dir: Path) -> Path:
    """Draw the importances as horizontal bars, largest on top."""
    figure = new_figure("sweep_importance.png")
    axes = figure.add_subplot()
    names = list(importances)[::-1]
    values = [importances[name] for name in names]
    bars = axes.barh(names, values, color="tab:blue")
    axes.bar_label(bars, labels=[f"{value:.2f}" for value in values], padding=3, fontsize=8)
    axes.set_xlim(0, max(1.0, max(values) * 1.15))
    axes.set_xlabel("Importance: share of the variance of best val/auprc (fANOVA)")
    axes.set_ylabel("Head hyperparameter")
    axes.set_title(f"Hyperparameter importance over {n_trials} completed trials")
    axes.grid(axis="x", alpha=0.3)
    return save_figure(figure, out_dir, "sweep_importance.png")


def plot_history(trials: pd.DataFrame, out_dir: Path) -> Path:
    """Draw each trial's best val/auprc in trial order, and the best value so far."""
    ordered = trials.dropna(subset=["trial_number"]).sort_values("trial_number", kind="stable")
    numbers = ordered["trial_number"].to_numpy()
    values = ordered[VALUE_COLUMN].to_numpy(dtype=float)
    finite = np.isfinite(values)
    figure = new_figure("sweep_history.png")
    axes = figure.add_subplot()
    axes.plot(numbers[finite], values[finite], marker="o", linestyle="none", color="tab:blue", label="trial")
    best_so_far = np.fmax.accumulate(np.where(finite, values, -np.inf))
    has_best = np.isfinite(best_so_far)
    axes.step(numbers[has_best], best_so_far[has_best], where="post", color="tab:red", label="best so far")
    if (~finite).any():
        low = np.nanmin(values) if finite.any() else 0.0
        axes.plot(numbers[~finite], np.full((~finite).sum(), low), marker="x", linestyle="none", color="black",
                  label="failed trial (no value)")  # fmt: skip
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("Trial number (order of Optuna's suggestions)")
    axes.set_ylabel("Best validation AUPRC of the trial")
    axes.set_title(f"Optimisation history of {len(ordered)} trials")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    return save_figure(figure, out_dir, "sweep_history.png")


def trials_markdown(trials: pd.DataFrame, names: list[str]) -> str:
    """Return the trial table as Markdown, best trial first."""
    ordered = trials.sort_values(VALUE_COLUMN, ascending=False, kind="stable", na_position="last")
    has_number = "trial_number" in ordered.columns
    header = (["trial"] if has_number else []) + names + ["best val/auprc", "epochs", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for _, row in ordered.iterrows():
        cells = [_format_param(row["trial_number"])] if has_number else []
        cells += [_format_param(row[name]) for name in names]
        value = row[VALUE_COLUMN]
        cells += [f"{value:.4f}" if math.isfinite(value) else "none", str(int(row["epochs"])), str(row["status"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format_param(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "none"
        return f"{value:.3g}"
    return str(value)


def sweep_insight(sweep_dir: Path, out_dir: Path, seed: int) -> dict:
    """Write the sweep figures to `out_dir`; return the trial table, importances and figure names."""
    from ray.tune.search.optuna import OptunaSearch

    from tune.search_space import search_space

    trials = load_trials(sweep_dir)
    distributions = OptunaSearch.convert_search_space(search_space())
    names = param_names(trials, distributions)
    study = rebuild_study(trials, distributions)
    importances = param_importances(study, seed)
    figures = []
    n_completed = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    if importances is not None:
        figures.append(plot_importances(importances, n_completed, out_dir).name)
    if "trial_number" in trials.columns and trials["trial_number"].notna().any():
        figures.append(plot_history(trials, out_dir).name)
    else:
        logger.warning(
            "%s has no trial numbers, so the optimisation history is not drawn; run the sweep again to add it",
            sweep_dir / TRIALS_FILE,
        )
    finite = trials[VALUE_COLUMN].notna()
    best = trials.loc[trials[VALUE_COLUMN].idxmax()] if finite.any() else None
    return {
        "sweep_dir": str(sweep_dir),
        "n_trials": len(trials),
        "n_completed": n_completed,
        "best_val_auprc": float(best[VALUE_COLUMN]) if best is not None else None,
        "best_trial": int(best["trial_number"]) if best is not None and "trial_number" in trials.columns else None,
        "importances": importances,
        "figures": figures,
        "table_markdown": trials_markdown(trials, names),
    }
