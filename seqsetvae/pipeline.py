"""The whole job: cache, pretrain, sweep, export, evaluate and report, with a summary."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from seqsetvae.cache import ensure_cache, fit_preprocessor
from seqsetvae.meds_io import SPLITS
from seqsetvae.config import DataConfig, FinetuneConfig, ModelConfig, PretrainConfig, ReportConfig, TuneConfig
from seqsetvae.encoder import load_pretrained_encoder
from seqsetvae.evaluate import evaluate
from seqsetvae.export import export_model
from seqsetvae.head import HEAD_FILE, load_head_state
from seqsetvae.pretrain import run_pretraining
from seqsetvae.report.build import write_report

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
N_STAGES = 6


def run_pipeline(
    out_dir: str | Path,
    meds_root: str | Path,
    data_config: DataConfig,
    model_config: ModelConfig,
    pretrain_config: PretrainConfig,
    finetune_config: FinetuneConfig,
    tune_config: TuneConfig,
    address: str | None = None,
    storage: str | None = None,
    report_config: ReportConfig | None = None,
    pretrained_ckpt: str | Path | None = None,
) -> dict:
    """Run every stage, write `<out_dir>/summary.json` and return the summary.

    With `pretrained_ckpt`, pretraining is skipped. The heads are swept on that
    encoder, and the cache uses the preprocessing stored with it.
    """
    from tune.sweep import run_sweep  # the sweep entry point lives in the top-level tune package

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    stage_seconds: dict[str, float] = {}
    start = time.monotonic()

    def stage(name: str, number: int) -> float:
        logger.info("Stage %d/%d: %s", number, N_STAGES, name)
        return time.monotonic()

    begin = stage("tensor cache", 1)
    if pretrained_ckpt:
        preprocessor = load_pretrained_encoder(pretrained_ckpt).preprocessor
    else:
        preprocessor = fit_preprocessor(meds_root, data_config)
    # Every split is checked here, so a missing held-out split fails before training and not at the end.
    ensure_cache(meds_root, cache, data_config, preprocessor, required=SPLITS, need_labels=True)
    stage_seconds["cache"] = time.monotonic() - begin

    begin = stage("pretraining", 2)
    if pretrained_ckpt:
        logger.info("Skipping pretraining: the heads are swept on the encoder in %s", pretrained_ckpt)
        pretrained_path, best_val_loss = str(Path(pretrained_ckpt).resolve()), None
        # The report draws the pretraining curves when the checkpoint sits in a pretraining directory.
        pretrain_dir = Path(pretrained_path).parent
    else:
        pretrained = run_pretraining(
            meds_root,
            out / "pretrain",
            data_config,
            model_config,
            pretrain_config,
            cache_dir=cache,
            storage=storage,
            address=address,
            preprocessor=preprocessor,
        )
        pretrained_path, pretrain_dir = pretrained.pretrained_path, out / "pretrain"
        best_val_loss = pretrained.best_val_loss
    stage_seconds["pretrain"] = time.monotonic() - begin

    begin = stage("head sweep", 3)
    sweep = run_sweep(
        meds_root,
        pretrained_path,
        out / "sweep",
        data_config,
        finetune_config,
        tune_config,
        cache_dir=cache,
        storage=f"{storage.rstrip('/')}/sweep" if storage else None,
        address=address,
    )
    stage_seconds["tune"] = time.monotonic() - begin

    begin = stage("export", 4)
    encoder = load_pretrained_encoder(pretrained_path)
    export_dir = export_model(
        encoder,
        load_head_state(Path(sweep.best_dir) / HEAD_FILE),
        data_config,
        sweep.best_params,
        {"val_auprc": sweep.val_auprc, "val_auroc": sweep.val_auroc},
        out / "export",
    )
    stage_seconds["export"] = time.monotonic() - begin

    begin = stage("held-out evaluation", 5)
    held_out = evaluate(export_dir, meds_root, "held_out", out / "evaluation", cache_dir=cache)
    stage_seconds["evaluate"] = time.monotonic() - begin

    begin = stage("report", 6)
    report_config = report_config or ReportConfig()
    report = write_report(
        export_dir,
        meds_root,
        "held_out",
        out / "report",
        report_config,
        cache_dir=cache,
        sweep_dir=out / "sweep",
        pretrain_dir=pretrain_dir,
    )
    stage_seconds["report"] = time.monotonic() - begin

    summary = {
        "data": str(Path(meds_root).resolve()),
        "best_params": sweep.best_params,
        "val_auprc": sweep.val_auprc,
        "val_auroc": sweep.val_auroc,
        "held_out": {key: held_out[key] for key in ("auroc", "auprc", "accuracy", "n", "n_positive")},
        "export_dir": str(export_dir),
        "pretrained": pretrained_path,
        "pretrain_best_val_loss": best_val_loss,
        "sweep_dir": str(out / "sweep"),
        "evaluation_dir": str(out / "evaluation"),
        "report": {
            "path": str(out / "report" / "report.md"),
            "challenge_score": report["challenge_score"],
            "baseline_auroc": report["baseline"]["auroc"],
            "baseline_auprc": report["baseline"]["auprc"],
            "baseline_challenge_score": report["baseline"]["challenge_score"],
        },
        "n_trials": sweep.n_trials,
        "stage_seconds": stage_seconds,
        "total_seconds": time.monotonic() - start,
        "config": {
            "data": asdict(data_config),
            "model": asdict(model_config),
            "pretrain": asdict(pretrain_config),
            "finetune": asdict(finetune_config),
            "tune": asdict(tune_config),
            "report": asdict(report_config),
        },
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
