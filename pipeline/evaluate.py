"""The ``evaluate`` stage: the candidate and the champion side by side on the newest
mature day (the candidate's validation day), with the models issue's metrics and plots
in an MLflow run of their own (a child of the night's run). A ``[table]`` source is
evaluated on its test split instead."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import torch

from features.catalog import training_dir
from features.contract import day_str
from features.errors import StageError
from features.examples import mature_day
from features.table_source import prepare_table
from models.loader import parquet_files, table_loader
from models.nets import MultiTaskNet
from models.predict import (
    auc_difference_standard_errors,
    predict,
    validation_metrics,
    view_curves,
)
from models.tracking import RunTracker, plot_reliability, plot_roc
from pipeline.config import FunnelConfig
from pipeline.registry import Champion, same_architecture


def champion_model(
    cfg: FunnelConfig, champion: Champion, champion_cfg: FunnelConfig, state: dict[str, torch.Tensor]
) -> tuple[MultiTaskNet | None, str]:
    """The champion (its training config and weights, see registry.champion_weights) as a
    torch model that can score today's training table, or None and why not."""
    if reason := same_architecture(champion_cfg, cfg):
        return None, f"champion v{champion.version} cannot score today's table: {reason}"
    small = [
        f.name
        for f, g in zip(champion_cfg.features.sparse, cfg.features.sparse, strict=True)
        if f.num_embeddings < g.num_embeddings
    ]
    if small:
        return None, f"champion v{champion.version} has smaller vocabularies than today's ids may use: {small}"
    n_dense = len(cfg.features.dense_names())
    net = MultiTaskNet(
        champion_cfg.features,
        champion_cfg.model,
        champion_cfg.tasks,
        np.zeros(n_dense, np.float32),
        np.ones(n_dense, np.float32),
    )
    net.load_state_dict(state)  # the champion's own normalisation statistics come with it
    return net.eval(), f"champion v{champion.version} (run {champion.run_id})"


def evaluation_table(cfg: FunnelConfig, warehouse: Path, run_date: dt.date | None) -> tuple[str, list[Path]]:
    """(name, files) of what evaluate scores: the mature day of ``run_date``, or the test
    split of a ``[table]`` source."""
    if cfg.table is not None:
        return "test", prepare_table(cfg, warehouse).files["test"]
    if run_date is None:
        raise StageError("evaluating on event logs needs a run date (--date)")
    day = mature_day(cfg, run_date)
    return day_str(day), parquet_files(training_dir(warehouse, day))


def evaluate_models(
    cfg: FunnelConfig,
    warehouse: Path,
    run_date: dt.date | None,
    candidate: MultiTaskNet,
    champion: MultiTaskNet | None,
    champion_note: str,
    parent_run_id: str | None = None,
) -> dict:
    """Metrics of both models on the mature day of ``run_date`` or a table's test split
    (``champion_note`` says which champion, or why there is none to compare with); logs a run with
    ``candidate/<metric>``, ``champion/<metric>`` and ``delta/<metric>`` plus ROC and
    reliability plots of both. Returns {"candidate": metrics, "champion": metrics | None,
    "delta_auc_se": view -> standard error of the candidate's AUC minus the champion's, ...}."""
    name, files = evaluation_table(cfg, warehouse, run_date)
    loader = table_loader(cfg, files, batch_size=16_384, shuffle=False)
    models = {"candidate": candidate.eval(), **({"champion": champion} if champion is not None else {})}
    preds = {who: predict(model, loader, torch.device("cpu")) for who, model in models.items()}
    metrics = {who: validation_metrics(cfg, pred) for who, pred in preds.items()}

    run_name = name if run_date is None else day_str(run_date)
    tags = {
        "stage": "evaluate",
        "eval_day": name,
        "champion": champion_note,
        **({"run_date": day_str(run_date)} if run_date is not None else {}),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tracker = RunTracker(cfg.state_dir, f"evaluate-{run_name}", tags)
    logged = {f"{who}/{k}": v for who, m in metrics.items() for k, v in m.items()}
    delta_auc_se: dict[str, float] = {}
    if "champion" in metrics:
        logged |= {
            f"delta/{k}": v - metrics["champion"][k]
            for k, v in metrics["candidate"].items()
            if not k.endswith("_auc_se")
        }
        # the change's own standard error (paired: both models scored the same rows), not a difference of SEs
        delta_auc_se = auc_difference_standard_errors(cfg, preds["candidate"], preds["champion"])
        logged |= {f"delta/{view}_auc_se": se for view, se in delta_auc_se.items()}
    tracker.log_metrics(logged, 0)
    curves = {f"{who} {view}": curve for who, pred in preds.items() for view, curve in view_curves(cfg, pred).items()}
    tracker.log_figure(plot_roc(curves), "plots/roc_candidate_vs_champion.png")
    tracker.log_figure(plot_reliability(curves), "plots/reliability_candidate_vs_champion.png")
    tracker.end()
    return {
        "eval_day": name,
        "rows": int(len(preds["candidate"]["user"])),
        "candidate": metrics["candidate"],
        "champion": metrics.get("champion"),
        "delta_auc_se": delta_auc_se,
        "champion_note": champion_note,
        "mlflow_run_id": tracker.run_id,
    }
