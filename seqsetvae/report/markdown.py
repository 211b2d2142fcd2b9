"""Render report.json's content as report.md."""

from __future__ import annotations

FIGURE_NOTES = {
    "roc": "ROC curves of both models; dots mark each model's threshold chosen on the {threshold_split} split.",
    "precision_recall": (
        "Precision-recall curves; the dashed line is the positive rate, the precision of a model without skill."
    ),
    "calibration": (
        "Reliability diagram: observed positive rate against mean predicted probability per bin, "
        "and below it the distribution of predictions."
    ),
    "sweep_importance": "fANOVA importance of each head hyperparameter for the best val/auprc of a trial.",
    "sweep_history": "Best val/auprc of each trial in the order Optuna suggested them, and the best so far.",
    "pretraining_curves": "Pretraining reconstruction loss, KL, beta and active latent units over optimiser steps.",
}


def _number(value, digits: int = 4) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def _with_interval(metrics: dict, name: str) -> str:
    interval = metrics.get(f"{name}_ci")
    text = _number(metrics.get(name))
    if interval is not None:
        text += f" [{interval[0]:.4f}, {interval[1]:.4f}]"
    return text


def _metric_rows(report: dict) -> list[str]:
    model, baseline = report, report["baseline"]
    level = round(100 * report["bootstrap"]["confidence_level"])
    rows = [
        (f"AUROC [{level}% CI]", _with_interval(model, "auroc"), _with_interval(baseline, "auroc")),
        (f"AUPRC [{level}% CI]", _with_interval(model, "auprc"), _with_interval(baseline, "auprc")),
        (
            f"challenge score min(Se, PPV) [{level}% CI]",
            _with_interval(model, "challenge_score"),
            _with_interval(baseline, "challenge_score"),
        ),
        (f"threshold (chosen on {model['threshold_split']})", _number(model["threshold"]), _number(baseline["threshold"])),
        (
            f"min(Se, PPV) on {model['threshold_split']} at that threshold",
            _number(model["tuning_challenge_score"]),
            _number(baseline["tuning_challenge_score"]),
        ),
        ("sensitivity at threshold", _number(model["sensitivity"]), _number(baseline["sensitivity"])),
        ("PPV at threshold", _number(model["ppv"]), _number(baseline["ppv"])),
        ("specificity at threshold", _number(model["specificity"]), _number(baseline["specificity"])),
        ("accuracy at threshold", _number(model["accuracy_at_threshold"]), _number(baseline["accuracy_at_threshold"])),
        ("accuracy at 0.5", _number(model["accuracy"]), _number(baseline["accuracy"])),
        ("Brier score", _number(model["brier"]), _number(baseline["brier"])),
    ]
    lines = ["| metric | seqsetvae | gradient boosting |", "| --- | --- | --- |"]
    lines += [f"| {name} | {left} | {right} |" for name, left, right in rows]
    return lines


def _difference_lines(report: dict) -> list[str]:
    difference = report["difference"]
    if not difference:
        return []
    parts = [f"{name.upper()} {_with_interval(difference, name)}" for name in ("auroc", "auprc") if name in difference]
    return [
        "",
        "Model minus baseline, with intervals from the same resamples (paired): " + "; ".join(parts) + ".",
    ]


def _figure_lines(report: dict, names: list[str]) -> list[str]:
    lines = []
    for name in names:
        file = report["figures"].get(name)
        if file is None:
            continue
        note = FIGURE_NOTES[name].format(threshold_split=report["threshold_split"])
        lines += ["", f"![{name}]({file})", "", note]
    return lines


def _sweep_lines(report: dict, sweep: dict | None) -> list[str]:
    lines = ["", "## Head sweep", ""]
    if sweep is None:
        return lines + ["No sweep directory was given, so this section is empty."]
    lines.append(
        f"{sweep['n_trials']} trials ({sweep['n_completed']} completed) in `{sweep['sweep_dir']}`; "
        f"best val/auprc {_number(sweep['best_val_auprc'])}."
    )
    if sweep["importances"]:
        ranked = ", ".join(f"{name} {value:.2f}" for name, value in sweep["importances"].items())
        lines += ["", f"Parameter importances (fANOVA): {ranked}."]
    lines += ["", sweep["table_markdown"]]
    return lines + _figure_lines(report, ["sweep_importance", "sweep_history"])


def _pretraining_lines(report: dict) -> list[str]:
    pretraining = report["pretraining"]
    lines = ["", "## Pretraining", ""]
    if pretraining is None:
        return lines + ["No pretraining directory was given, so this section is empty."]
    if pretraining["source"] is None:
        return lines + [f"`{pretraining['pretrain_dir']}` has no logged metrics."]
    final = pretraining["final"]
    values = ", ".join(
        f"{tag} {final[tag]:.4f}" for tag in ("val/recon_loss", "val/kl_loss", "val/active_units") if tag in final
    )
    lines.append(f"Curves from {pretraining['source']} in `{pretraining['pretrain_dir']}`.")
    if values:
        lines += ["", f"Last validation values: {values}."]
    return lines + _figure_lines(report, ["pretraining_curves"])


def render_markdown(report: dict, sweep: dict | None) -> str:
    """Return the report as Markdown, figures linked by relative path."""
    bootstrap = report["bootstrap"]
    info = report["baseline"]["info"]
    lines = [
        f"# Evaluation report: {report['split']} split",
        "",
        f"Model `{report['export_dir']}` on `{report['data']}`, task `{report['task']}`: "
        f"{report['n']} labels, {report['n_positive']} positive (positive rate {report['positive_rate']:.4f}).",
        "",
        "## Model and baseline",
        "",
        *_metric_rows(report),
        *_difference_lines(report),
        "",
        f"Intervals are {bootstrap['method']} bootstrap intervals over {bootstrap['resamples']} resamples of the "
        f"{report['split']} labels (seed {bootstrap['seed']}). The challenge score is the PhysioNet/CinC 2012 event 1 "
        f"score, min(sensitivity, positive predictive value). Each model's threshold maximises it on the "
        f"{report['threshold_split']} split and is then applied unchanged here.",
        "",
        f"The baseline is a scikit-learn {info['model']} fitted on {info['n_train_labels']} train labels: "
        f"the last, minimum, maximum and mean value and the event count of the {info['n_codes']} most frequent "
        f"codes, from events at or before each prediction time ({info['n_features']} features, "
        f"{info['n_iterations']} boosting iterations).",
        *_figure_lines(report, ["roc", "precision_recall", "calibration"]),
        *_sweep_lines(report, sweep),
        *_pretraining_lines(report),
        "",
    ]
    return "\n".join(lines)
