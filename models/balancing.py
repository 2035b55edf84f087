"""Task balancing: how the task losses (``models.losses``) combine into the one loss a
training step minimises.

fixed        sum_k w_k L_k with each task's ``loss_weight``.
uncertainty  learned weights (Kendall, Gal & Cipolla 2018).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from features.config import TaskConfig
from models.config import ModelConfig
from models.losses import task_losses
from models.nets import ModelOutput


class LossWeighting(nn.Module):
    """Combines the task losses into one scalar.

    fixed        sum_k w_k L_k with each task's ``loss_weight``.
    uncertainty  Kendall, Gal & Cipolla (2018) with learned s_k = log sigma_k^2:
                 sum_k exp(-s_k) L_k + s_k. This is the form most multi-task libraries
                 use; the paper's 0.5 factors (0.5 exp(-s) L + 0.5 s for regression) are
                 dropped, which only rescales the loss and the learning rate of s.
    """

    def __init__(self, cfg: ModelConfig, tasks: Sequence[TaskConfig]) -> None:
        super().__init__()
        self.mode = cfg.loss_weighting
        self.names = [t.name for t in tasks]
        self.register_buffer("fixed", torch.tensor([t.loss_weight for t in tasks]))
        self.log_vars = nn.Parameter(torch.zeros(len(tasks))) if self.mode == "uncertainty" else None

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([losses[t] for t in self.names])
        if self.log_vars is None:
            return (self.fixed * stacked).sum()
        return (torch.exp(-self.log_vars) * stacked + self.log_vars).sum()

    def weights(self) -> dict[str, float]:
        """Current effective weight per task (for logging)."""
        w = self.fixed if self.log_vars is None else torch.exp(-self.log_vars.detach())
        return {t: float(v) for t, v in zip(self.names, w, strict=True)}


def training_loss(
    out: ModelOutput,
    labels: Mapping[str, torch.Tensor],
    tasks: Sequence[TaskConfig],
    head: str,
    weighting: LossWeighting,
    penalty: torch.Tensor,
    penalty_strength: float,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scalar to minimise and its parts: weighted task losses + backbone penalty;
    ``weight``: each row's loss weight (``task_losses``)."""
    parts = task_losses(out, labels, tasks, head, weight)
    total = weighting(parts) + penalty_strength * penalty
    return total, {**{k: v.detach() for k, v in parts.items()}, "penalty": penalty.detach(), "total": total.detach()}
