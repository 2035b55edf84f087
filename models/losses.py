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
A value task (``kind = "value"``): a regression of its numeric label y on the rows where its
``after`` task's label is 1 (so it learns E[y | after]), by ``value_loss``:
  log_mse  (z - log1p(y))^2: z predicts log1p(y); heavy-tailed values weigh in by their log.
  tweedie  Tweedie deviance with power rho in (1, 2) and the log link (z = log mu):
           -y exp((1 - rho) z) / (1 - rho) + exp((2 - rho) z) / (2 - rho), minimised at
           mu = E[y]; for values with many zeros (a compound Poisson-gamma mass at 0).
The mean runs over the ``after`` positives (a batch without any gives 0, with a graph).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from features.config import TaskConfig
from models.nets import ModelOutput

# P(after and task) is clamped below 1 so log(1 - p) stays finite (and its gradient too).
_P_MAX = 1.0 - 1e-7
# a tweedie head's log mean is clamped to this range inside the loss: exp() stays finite
_LOG_MU_RANGE = 30.0


def value_loss(task: TaskConfig, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row [B], value task ``task``'s loss of head output ``z`` against values ``y``
    (module docstring); every row, the caller masks."""
    if task.value_loss == "tweedie":
        rho = task.tweedie_power
        z = z.clamp(-_LOG_MU_RANGE, _LOG_MU_RANGE)
        return -y * torch.exp((1.0 - rho) * z) / (1.0 - rho) + torch.exp((2.0 - rho) * z) / (2.0 - rho)
    return (z - torch.log1p(y.clamp(min=0.0))) ** 2


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
        if t.is_value:
            after = labels[by_name[t.after].label_column]
            per_row = value_loss(t, logit, y) * after
        elif t.after is None:
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
        # direct and value: the mean over the `after` positives; a batch without any gives 0 (with a graph), not NaN
        over_after = t.is_value or (t.after is not None and head == "direct")
        rows = after.sum().clamp(min=1.0) if over_after else len(per_row)
        losses[t.name] = per_row.sum() / rows
    return losses
