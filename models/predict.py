"""Predictions of a model over a training table and the metrics of those predictions.

``predict`` runs a model over a loader (every rank the same number of steps under
torchrun, repeats dropped); ``gather_predictions`` joins all ranks' predictions, so
metrics are computed on the whole table; ``validation_metrics`` and
``auc_difference_standard_errors`` measure them per task view, ``view_curves`` gives the
(labels, predictions) pairs of the ROC and reliability plots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

from models.config import TrainingConfig
from models.distributed import world_size
from models.loader import Batch, TrainingTableLoader
from models.metrics import value_metrics, view_auc_difference_standard_errors, view_metrics
from models.nets import ModelOutput
from serving.spec import probability_output, value_output


def forward(model: torch.nn.Module, batch: Batch, amp: bool) -> ModelOutput:
    """The model's outputs in float32. With ``amp`` (CUDA) the forward runs under bf16
    autocast (the Linear layers; FBGEMM's embedding kernels keep float32); the heads turn
    their logits to float32 before the probabilities."""
    with torch.autocast(batch.dense.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(batch.dense, batch.sparse)
    if not amp:
        return out
    gates = {t: g.float() for t, g in out.gates.items()} if out.gates else out.gates
    return dataclasses.replace(out, features=out.features.float(), gates=gates)


def fixed_steps(loader: TrainingTableLoader, steps: int) -> Iterator[tuple[Batch, bool]]:
    """Exactly ``steps`` (batch, is_repeat) of ``loader``: a shard that runs out first (row
    groups do not split evenly over the ranks) starts again, with is_repeat = True."""
    done = 0
    while done < steps:
        for batch in loader:
            if done == steps:
                return
            yield batch, done >= len(loader)
            done += 1


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: TrainingTableLoader,
    device: torch.device,
    steps: int | None = None,
    amp: bool = False,
) -> dict[str, np.ndarray]:
    """Over a whole loader: ``label_<column>`` per label, ``p_<view>`` per task view (served:
    corrected and calibrated), ``e_<task>`` per value task (its served E[value | after]),
    ``logit_<task>`` per task (its head's, as trained: what a
    calibrator is fitted on), the user codes ``user`` and (mmoe, ple) each task's mean gate
    weights ``gate_<task>`` and the mean entropy of its gate, ``entropy_<task>`` (nats; 0:
    one expert per row, log(experts): every row mixes all alike).

    ``steps`` > len(loader): run that many forward passes (a collective under torchrun)
    and drop the repeated batches' output."""
    model.eval()
    parts: dict[str, list] = {}
    gate_sums: dict[str, torch.Tensor] = {}
    entropy_sums: dict[str, torch.Tensor] = {}
    for batch, repeated in fixed_steps(loader, len(loader) if steps is None else steps):
        batch = batch.to(device, non_blocking=True)
        out = forward(model, batch, amp)
        if repeated:
            continue
        columns = {
            "user": batch.user,
            **{f"label_{k}": v for k, v in batch.labels.items()},
            **{probability_output(k): v for k, v in out.probs.items()},
            **{value_output(k): v for k, v in out.values.items()},
            **{f"logit_{k}": v for k, v in out.logits.items()},
        }
        for k, v in columns.items():
            parts.setdefault(k, []).append(v.cpu().numpy())
        for t, w in (out.gates or {}).items():
            gate_sums[t] = gate_sums.get(t, 0) + w.sum(0).cpu()
            entropy_sums[t] = entropy_sums.get(t, 0) - torch.special.xlogy(w, w).sum().cpu()
    result = {k: np.concatenate(v) for k, v in parts.items()}
    result.update({f"gate_{t}": (s / len(result["user"])).numpy() for t, s in gate_sums.items()})
    result.update({f"entropy_{t}": (s / len(result["user"])).numpy() for t, s in entropy_sums.items()})
    return result


def gather_predictions(pred: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All ranks' predictions in rank order (gate usage and entropy: the row-weighted mean),
    on every rank."""
    if world_size() == 1:
        return pred
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, pred)
    rows = np.array([len(p["user"]) for p in everyone], dtype=np.float64)
    return {
        k: (
            sum(p[k] * n for p, n in zip(everyone, rows, strict=True)) / rows.sum()
            if k.startswith(("gate_", "entropy_"))
            else np.concatenate([p[k] for p in everyone])
        )
        for k in pred
    }


def prediction_labels(pred: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``predict``'s labels by label column."""
    return {k.removeprefix("label_"): v for k, v in pred.items() if k.startswith("label_")}


def _labels_and_probs(pred: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``predict``'s output as (label column -> labels, task view -> probabilities)."""
    return prediction_labels(pred), {k.removeprefix("p_"): v for k, v in pred.items() if k.startswith("p_")}


def validation_metrics(cfg: TrainingConfig, pred: dict[str, np.ndarray]) -> dict[str, float]:
    """Every task view's metrics (``models.metrics.view_metrics``) and every value task's
    (``models.metrics.value_metrics``) of ``predict``'s output."""
    groups = pred["user"] if (pred["user"] >= 0).any() else None
    labels, probs = _labels_and_probs(pred)
    values = {task: pred.get(value_output(task)) for task in cfg.value_views()}
    return view_metrics(cfg.views(), labels, probs, groups) | value_metrics(cfg.value_views(), labels, values, probs)


def auc_difference_standard_errors(
    cfg: TrainingConfig, pred_a: dict[str, np.ndarray], pred_b: dict[str, np.ndarray]
) -> dict[str, float]:
    """Per task view, the standard error of auc(a) - auc(b) for two models' ``predict``
    outputs on the same rows (paired: ``models.metrics.auc_difference_standard_error``)."""
    labels, probs_a = _labels_and_probs(pred_a)
    return view_auc_difference_standard_errors(cfg.views(), labels, probs_a, _labels_and_probs(pred_b)[1])


def view_curves(cfg: TrainingConfig, pred: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(labels, predictions) per task view for ROC and reliability plots, e.g. click, cvr
    (on the clicked rows only) and ctcvr."""
    curves = {}
    for view, (label, mask) in cfg.views().items():
        y, p = pred[f"label_{label}"], pred[f"p_{view}"]
        keep = slice(None) if mask is None else pred[f"label_{mask}"] > 0
        curves[view if mask is None else f"{view} ({mask} = 1)"] = (y[keep], p[keep])
    return curves
