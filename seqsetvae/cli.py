"""The `seqsetvae` command line.

Options come from the config dataclasses: field `max_sets` is `--max-sets`.
Every subcommand takes `--config FILE`, a YAML mapping whose keys are named like
the options (`max_sets` or `max-sets`); flags given on the command line override
it, and the dataclass defaults fill the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from seqsetvae.config import (
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    ReportConfig,
    TuneConfig,
    from_dict,
)
from seqsetvae.errors import UserInputError

logger = logging.getLogger("seqsetvae")

# Options of `run` and `train` whose field names clash between stages get a prefix.
FINETUNE_PREFIX = "finetune_"

# The config classes of `run`, and the prefix of their options; `submit` forwards the same options.
PIPELINE_CONFIGS = (
    (DataConfig, ""),
    (ModelConfig, ""),
    (PretrainConfig, ""),
    (FinetuneConfig, FINETUNE_PREFIX),
    (TuneConfig, ""),
    (ReportConfig, ""),
)


def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", "null", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def add_config_options(parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: Sequence[str] = ()) -> None:
    """Add one option per field of `cls`; defaults stay unset so config files can fill them."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for spec in dataclasses.fields(cls):
        if spec.name in skip:
            continue
        name = prefix + spec.name
        flag = "--" + name.replace("_", "-")
        help_text = f"{spec.metadata.get('help', '')} (default: {spec.default})"
        if isinstance(spec.default, bool):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif spec.default is None:
            group.add_argument(flag, dest=name, type=_optional_float, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=type(spec.default), default=argparse.SUPPRESS, help=help_text)


def build_config(cls: type, values: dict[str, Any], prefix: str = "", skip: Sequence[str] = ()) -> Any:
    """Build `cls` from merged option values, stripping the option prefix."""
    fields = {f.name for f in dataclasses.fields(cls)} - set(skip)
    own = {name: values[prefix + name] for name in fields if prefix + name in values}
    return from_dict(cls, own, source="options")


def load_yaml_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"--config {file}: file not found")
    try:
        content = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserInputError(f"--config {file}: invalid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(content, dict):
        raise UserInputError(f"--config {file}: expected a mapping of option names to values, got {type(content).__name__}")
    return {str(key).replace("-", "_"): value for key, value in content.items()}


def merged_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Merge the YAML config (if any) under the flags given on the command line."""
    cli = {key: value for key, value in vars(args).items() if key not in ("command", "handler", "dataset")}
    values: dict[str, Any] = {}
    if cli.get("config"):
        values = load_yaml_config(cli["config"])
        known = {action.dest for action in parser._subparser_for(args)._actions}  # type: ignore[attr-defined]
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserInputError(
                f"--config {cli['config']}: unknown keys {', '.join(unknown)}; "
                f"run `seqsetvae {args.command} --help` for the valid option names"
            )
    values.update({key: value for key, value in cli.items() if value is not None or key not in values})
    return values


def _require(values: dict[str, Any], *names: str) -> None:
    missing = [name for name in names if values.get(name) in (None, "")]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise UserInputError(f"missing required option(s) {flags}; give them as flags or in --config")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of option values; flags on the command line override it")
    parser.add_argument("--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING or ERROR")


def _add_ray(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", help="Ray cluster to join, for example auto on a cluster node; default starts Ray locally on 127.0.0.1"
    )
    _add_storage(parser)


def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        help="where Ray keeps results and checkpoints: a local path or a URI (file://, s3://, gs://); "
        "multi-node runs need a URI or a shared filesystem (default: under --out)",
    )


def _add_pipeline_options(parser: argparse.ArgumentParser, out_help: str, add_ray_options) -> None:
    """Add the options of the whole pipeline, shared by `run` and `submit`."""
    _add_data_path(parser, required=False)
    parser.add_argument("--out", help=out_help)
    parser.add_argument(
        "--pretrained-ckpt",
        help="skip pretraining and sweep heads on this encoder: pretrained.pt or a Lightning .ckpt",
    )
    add_ray_options(parser)
    for cls, prefix in PIPELINE_CONFIGS:
        add_config_options(parser, cls, prefix=prefix)


def _add_data_path(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--data", help="MEDS dataset root (with data/ and metadata/)" + ("" if required else "; default: the bundled demo dataset"))
    parser.add_argument("--cache-dir", help="tensor cache directory (default: OUT/cache)")


# Subcommand handlers ----------------------------------------------------------


def cmd_prepare(values: dict[str, Any]) -> int:
    from seqsetvae.physionet import convert_physionet2012

    _require(values, "raw", "out")
    report = convert_physionet2012(
        values["raw"],
        values["out"],
        split_seed=values["split_seed"] if values.get("split_seed") is not None else 0,
        all_to_split=values.get("all_to_split"),
    )
    for line in report.summary_lines():
        print(line)
    print(f"MEDS dataset written to {values['out']}")
    return 0


def cmd_pretrain(values: dict[str, Any]) -> int:
    from seqsetvae.pretrain import run_pretraining

    _require(values, "data", "out")
    result = run_pretraining(
        values["data"],
        values["out"],
        build_config(DataConfig, values),
        build_config(ModelConfig, values),
        build_config(PretrainConfig, values),
        cache_dir=values.get("cache_dir"),
        storage=values.get("storage"),
        address=values.get("address"),
    )
    print(f"Pretrained weights: {result.pretrained_path}")
    print(f"Best val/loss {result.best_val_loss:.4f}; {result.wall_seconds:.0f} s")
    return 0


def cmd_finetune(values: dict[str, Any], prefix: str = "") -> int:
    from seqsetvae.finetune import run_finetune

    _require(values, "data", "pretrained_ckpt")
    out = values.get("out") or "runs/finetune"
    metrics = run_finetune(
        values["data"],
        values["pretrained_ckpt"],
        out,
        build_config(DataConfig, values),
        build_config(FinetuneConfig, values, prefix=prefix),
        cache_dir=values.get("cache_dir"),
    )
    print(json.dumps(metrics, indent=2))
    print(f"Exported model: {Path(out).resolve() / 'export'}")
    return 0


def cmd_train(values: dict[str, Any]) -> int:
    mode = "finetune" if values.get("finetune") else values.get("mode", "pretrain")
    if mode == "finetune":
        return cmd_finetune(values, prefix=FINETUNE_PREFIX)
    return cmd_pretrain(values)


def cmd_tune(values: dict[str, Any]) -> int:
    from tune.sweep import run_sweep

    _require(values, "data", "pretrained_ckpt", "out")
    result = run_sweep(
        values["data"],
        values["pretrained_ckpt"],
        values["out"],
        build_config(DataConfig, values),
        build_config(FinetuneConfig, values),
        build_config(TuneConfig, values),
        cache_dir=values.get("cache_dir"),
        storage=values.get("storage"),
        address=values.get("address"),
        resume=bool(values.get("resume")),
    )
    print(f"Best val/auprc {_fmt(result.val_auprc)} over {result.n_trials} trials")
    print(f"Best parameters: {json.dumps(result.best_params)}")
    print(f"Best head checkpoint: {result.best_dir}")
    return 0


def cmd_evaluate(values: dict[str, Any]) -> int:
    from seqsetvae.evaluate import evaluate

    _require(values, "model", "data", "out")
    metrics = evaluate(
        values["model"], values["data"], values.get("split") or "held_out", values["out"], values.get("cache_dir"), values.get("task")
    )
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_report(values: dict[str, Any]) -> int:
    from seqsetvae.report.build import run_dirs_beside, write_report

    _require(values, "model", "data", "out")
    config = build_config(ReportConfig, values)
    sweep_dir, pretrain_dir = run_dirs_beside(values["model"])
    sweep_dir = values.get("sweep_dir") or sweep_dir
    pretrain_dir = values.get("pretrain_dir") or pretrain_dir
    for flag, directory in (("--sweep-dir", sweep_dir), ("--pretrain-dir", pretrain_dir)):
        if directory is not None and not Path(directory).is_dir():
            raise UserInputError(f"{flag} {directory}: directory not found; pass the directory that `seqsetvae run` wrote")
    logger.info("Sweep directory: %s; pretraining directory: %s", sweep_dir or "none", pretrain_dir or "none")
    write_report(
        values["model"],
        values["data"],
        values.get("split") or "held_out",
        values["out"],
        config,
        cache_dir=values.get("cache_dir"),
        task=values.get("task"),
        sweep_dir=sweep_dir,
        pretrain_dir=pretrain_dir,
    )
    print(f"Report: {Path(values['out']).resolve() / 'report.md'}")
    return 0


def cmd_run(values: dict[str, Any]) -> int:
    from seqsetvae.pipeline import run_pipeline
    from seqsetvae.physionet import DEMO_DATA_DIR

    _require(values, "out")
    data = values.get("data") or str(DEMO_DATA_DIR)
    summary = run_pipeline(
        values["out"],
        data,
        build_config(DataConfig, values),
        build_config(ModelConfig, values),
        build_config(PretrainConfig, values),
        build_config(FinetuneConfig, values, prefix=FINETUNE_PREFIX),
        build_config(TuneConfig, values),
        address=values.get("address"),
        storage=values.get("storage"),
        report_config=build_config(ReportConfig, values),
        pretrained_ckpt=values.get("pretrained_ckpt"),
    )
    print(format_summary(summary))
    return 0


# Options of `submit`, besides the config fields, that the job receives; unset ones are left out.
PIPELINE_OPTIONS = ("data", "cache_dir", "out", "pretrained_ckpt", "storage", "log_level")


def pipeline_arguments(values: dict[str, Any]) -> list[str]:
    """Return the `run` options among `values` as command-line arguments for the job.

    Values from --config are included, so the job needs no config file.
    """
    args: list[str] = []
    for name in PIPELINE_OPTIONS:
        if values.get(name) is not None:
            args += ["--" + name.replace("_", "-"), str(values[name])]
    for cls, prefix in PIPELINE_CONFIGS:
        for name in (prefix + spec.name for spec in dataclasses.fields(cls)):
            if name not in values:
                continue
            flag = "--" + name.replace("_", "-")
            value = values[name]
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            else:
                # A None config value is an optional number left unset, which the options spell "none".
                args += [flag, "none" if value is None else str(value)]
    return args


def cmd_submit(values: dict[str, Any]) -> int:
    from ray.job_submission import JobStatus

    from seqsetvae.submit import check_job_paths, connect, follow_job, submit_pipeline

    _require(values, "out")
    args = pipeline_arguments(values)
    check_job_paths(args)
    client = connect(values.get("address"))
    job_id = submit_pipeline(client, args, values.get("working_dir") or ".")
    print(f"Submitted Ray job {job_id}", flush=True)
    if values.get("no_wait"):
        print(f"Follow it with: ray job logs --follow {job_id}")
        return 0
    try:
        status = follow_job(client, job_id, lambda text: print(text, end="", flush=True))
    except KeyboardInterrupt:
        print(f"seqsetvae submit: stopped following; job {job_id} keeps running (`ray job stop {job_id}` ends it)", file=sys.stderr)
        return 130
    print(f"Ray job {job_id} finished with status {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def cmd_best(values: dict[str, Any]) -> int:
    from seqsetvae.sweep_record import export_best

    _require(values, "sweep", "export")
    best = export_best(values["sweep"], values["export"])
    print(f"Best checkpoint: {best.checkpoint}")
    print(f"Best val/auprc {best.val_auprc:.4f}")
    print(f"Best parameters: {json.dumps({key: best.params[key] for key in TUNED_KEYS if key in best.params})}")
    print(f"Exported model: {best.export_dir}")
    return 0


def _fmt(value: Any) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def format_summary(summary: dict) -> str:
    """Return the end-of-run table shown by `seqsetvae run`."""
    held_out = summary["held_out"]
    report = summary["report"]
    params = ", ".join(f"{k}={v}" for k, v in summary["best_params"].items() if k in TUNED_KEYS)
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in summary["stage_seconds"].items())
    rows = [
        ("best parameters", params),
        ("validation AUPRC", _fmt(summary["val_auprc"])),
        ("held-out AUROC", _fmt(held_out["auroc"])),
        ("held-out AUPRC", _fmt(held_out["auprc"])),
        ("held-out accuracy", _fmt(held_out["accuracy"])),
        ("held-out labels", f"{held_out['n']} ({held_out['n_positive']} positive)"),
        ("exported model", summary["export_dir"]),
        ("predictions", str(Path(summary["evaluation_dir"]) / "predictions.parquet")),
        ("baseline AUROC, AUPRC", f"{_fmt(report['baseline_auroc'])}, {_fmt(report['baseline_auprc'])}"),
        ("challenge score", f"{_fmt(report['challenge_score'])} (baseline {_fmt(report['baseline_challenge_score'])})"),
        ("report", report["path"]),
        ("summary", str(Path(summary["export_dir"]).parent / "summary.json")),
        ("wall time", f"{summary['total_seconds']:.0f} s ({seconds})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["", "seqsetvae run summary", "-" * (width + 40)] + [f"{name:<{width}}  {value}" for name, value in rows])


TUNED_KEYS = ("focal_gamma", "focal_alpha", "head_init", "head_lr", "weight_decay")


# Parser -----------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that remembers which subparser handled the arguments."""

    def _subparser_for(self, args: argparse.Namespace) -> argparse.ArgumentParser:
        parser = self._commands[args.command]
        if args.command == "prepare":
            parser = self._datasets[args.dataset]
        return parser


def build_parser() -> Parser:
    parser = Parser(prog="seqsetvae", description="Sequence-of-sets VAEs for clinical event data, trained on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser._commands = {}
    parser._datasets = {}

    def command(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        child = sub.add_parser(name, help=help_text, description=help_text)
        child.set_defaults(handler=handler)
        _add_common(child)
        parser._commands[name] = child
        return child

    prepare = sub.add_parser("prepare", help="convert a raw dataset to MEDS", description="Convert a raw dataset to MEDS.")
    parser._commands["prepare"] = prepare
    datasets = prepare.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    physionet = datasets.add_parser("physionet2012", help="PhysioNet/CinC Challenge 2012 stays and outcomes")
    parser._datasets["physionet2012"] = physionet
    physionet.set_defaults(handler=cmd_prepare)
    _add_common(physionet)
    physionet.add_argument("--raw", action="append", help="a set directory or .tar.gz archive, or an Outcomes-*.txt file; repeat for several")
    physionet.add_argument("--out", help="output MEDS directory; must be empty or absent")
    physionet.add_argument("--split-seed", type=int, help="seed of the stratified 80/10/10 split (default: 0)")
    physionet.add_argument("--all-to-split", help="put every subject into this split (train, tuning or held_out), for an external test set")

    pretrain = command("pretrain", "pretrain the sequence-of-sets VAE with Ray Train", cmd_pretrain)
    _add_data_path(pretrain)
    pretrain.add_argument("--out", help="run directory for pretrained weights, metrics and Ray results")
    _add_ray(pretrain)
    for cls in (DataConfig, ModelConfig, PretrainConfig):
        add_config_options(pretrain, cls)

    finetune = command("finetune", "train one linear head on the frozen encoder, without a sweep", cmd_finetune)
    _add_data_path(finetune)
    finetune.add_argument("--pretrained-ckpt", help="pretraining checkpoint: pretrained.pt or a Lightning .ckpt")
    finetune.add_argument("--out", help="output directory (default: runs/finetune)")
    add_config_options(finetune, DataConfig)
    add_config_options(finetune, FinetuneConfig)

    train = command("train", "pretrain or finetune, as in the original research scripts", cmd_train)
    train.add_argument("--mode", choices=("pretrain", "finetune"), help="pretrain (default) or finetune")
    train.add_argument("--finetune", action="store_true", default=None, help="same as --mode finetune")
    _add_data_path(train)
    train.add_argument("--out", help="output directory")
    train.add_argument("--pretrained-ckpt", help="pretraining checkpoint, for --mode finetune")
    _add_ray(train)
    for cls in (DataConfig, ModelConfig, PretrainConfig):
        add_config_options(train, cls)
    add_config_options(train, FinetuneConfig, prefix=FINETUNE_PREFIX)

    tune_cmd = command("tune", "sweep the head on the frozen encoder with Ray Tune and Optuna", cmd_tune)
    _add_data_path(tune_cmd)
    tune_cmd.add_argument("--pretrained-ckpt", help="pretraining checkpoint: pretrained.pt or a Lightning .ckpt")
    tune_cmd.add_argument("--out", help="sweep directory")
    tune_cmd.add_argument("--resume", action="store_true", default=None, help="continue the interrupted sweep in --out")
    _add_ray(tune_cmd)
    add_config_options(tune_cmd, DataConfig)
    add_config_options(tune_cmd, FinetuneConfig)
    add_config_options(tune_cmd, TuneConfig)

    evaluate = command("evaluate", "evaluate an exported model on one split", cmd_evaluate)
    evaluate.add_argument("--model", help="export directory written by run, tune or finetune")
    _add_data_path(evaluate)
    evaluate.add_argument("--split", help="split to evaluate (default: held_out)")
    evaluate.add_argument("--task", help="label task (default: the one the model was trained on)")
    evaluate.add_argument("--out", help="output directory for metrics.json and predictions.parquet")

    report = command("report", "write report.md, report.json and figures: the model beside a gradient-boosting baseline", cmd_report)
    report.add_argument("--model", help="export directory written by run, tune or finetune")
    _add_data_path(report)
    report.add_argument("--split", help="split to report on (default: held_out); the threshold is always chosen on tuning")
    report.add_argument("--task", help="label task (default: the one the model was trained on)")
    report.add_argument("--out", help="output directory for report.md, report.json and the PNG figures")
    report.add_argument("--sweep-dir", help="sweep directory with trials.csv (default: sweep/ next to --model, if present)")
    report.add_argument(
        "--pretrain-dir", help="pretraining directory with TensorBoard logs (default: pretrain/ next to --model, if present)"
    )
    add_config_options(report, ReportConfig)

    run = command("run", "run the whole job: cache, pretrain, sweep, export, evaluate, report", cmd_run)
    _add_pipeline_options(run, "run directory", _add_ray)

    submit = command("submit", "submit the options of `run` as a Ray job to a running cluster and follow its logs", cmd_submit)
    submit.add_argument(
        "--address", help="dashboard address of the cluster, for example http://127.0.0.1:8265 (default: RAY_ADDRESS)"
    )
    submit.add_argument("--working-dir", default=".", help="checkout that Ray uploads for the job (default: .)")
    submit.add_argument("--no-wait", action="store_true", default=None, help="print the job ID and return without following the job")
    _add_pipeline_options(submit, "run directory on the cluster, an absolute path", _add_storage)

    best = command("best", "export the best head of a finished sweep from its storage", cmd_best)
    best.add_argument("--sweep", help="the --storage or --out of a finished tune or run: a local path or a URI (file://, s3://, gs://)")
    best.add_argument("--export", help="export directory to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        values = merged_options(parser, args)
        return args.handler(values)
    except UserInputError as error:
        print(f"seqsetvae {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seqsetvae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
