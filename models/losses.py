"""Task losses and the funnel step's conversion loss (direct or ESMM); how they combine
into one training loss is ``models.balancing``.

A task without ``after``: binary cross-entropy of its logit against its label on every row.
A funnel step (``after`` set, e.g. conversion after click), by ``model.conversion_head``:
  direct  BCE of P(task | after) against the label on the rows where ``after``'s label is
          1 only (the classic sample selection bias: pCVR is then served on all
          impressions, trained on clicks).
  esmm    BCE of P(after and task) = P(after) x P(task | after) against the label on every
          row (Ma et al. 2018). Together with the earlier task's loss this learns
          P(task | after) over the entire space; both terms are always in the total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from features.config import TaskConfig
from models.nets import ModelOutput

# P(after and task) is clamped below 1 so log(1 - p) stays finite (and its gradient too).
_P_MAX = 1.0 - 1e-7


def task_losses(
    out: ModelOutput,
    labels: Mapping[str, torch.Tensor],
    tasks: Sequence[TaskConfig],
    head: str,
    weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Mean loss per task name (see the module docstring); ``labels`` by label column;
    ``weight`` [B] (``train.sample_weight``) multiplies each row's loss.

    Only the heads' logits are read (``out.logits``: the training space, before the
    sampling correction and the calibrators that the served ``out.probs`` include)."""
    if head not in ("direct", "esmm"):
        raise ValueError(f"unknown conversion head {head!r}; expected 'direct' or 'esmm'")
    by_name = {t.name: t for t in tasks}
    losses = {}
    for t in tasks:
        y, logit = labels[t.label_column], out.logits[t.name]
        if t.after is None:
            per_row = F.binary_cross_entropy_with_logits(logit, y, reduction="none")
        elif head == "esmm":
            after_logit = out.logits[t.after]
            log_p = F.logsigmoid(after_logit) + F.logsigmoid(logit)  # log P(after and task), stable
            joint = torch.sigmoid(after_logit) * torch.sigmoid(logit)
            per_row = -(y * log_p + (1.0 - y) * torch.log1p(-joint.clamp(max=_P_MAX)))
        else:
            after = labels[by_name[t.after].label_column]
            per_row = F.binary_cross_entropy_with_logits(logit, y, reduction="none") * after
        if weight is not None:
            per_row = per_row * weight
        # direct: the mean over the `after` positives; a batch without any gives 0 (with a graph), not NaN
        rows = after.sum().clamp(min=1.0) if t.after is not None and head == "direct" else len(per_row)
        losses[t.name] = per_row.sum() / rows
    return losses
