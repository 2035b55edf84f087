"""Task losses, the ESMM conversion loss, and loss weighting (fixed or learned uncertainty).

Click: binary cross-entropy of pCTR against ``click`` on every impression.
Conversion, by head:
  direct  BCE of pCVR against ``conversion`` on clicked rows only (the classic sample
          selection bias: pCVR is then served on all impressions, trained on clicks).
  esmm    BCE of pCTCVR = pCTR x pCVR against ``conversion`` on every impression
          (Ma et al. 2018). Together with the click loss this learns pCVR over the entire
          space; both terms are always present in the total.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from features.config import ModelConfig
from models.nets import TASKS, ModelOutput

# p_ctcvr is clamped below 1 so log(1 - p) stays finite (and its gradient too).
_P_MAX = 1.0 - 1e-7


def task_losses(out: ModelOutput, click: torch.Tensor, conversion: torch.Tensor, head: str) -> dict[str, torch.Tensor]:
    """Mean loss per task: {"click": ..., "conversion": ...} (see the module docstring)."""
    click_loss = F.binary_cross_entropy_with_logits(out.click_logit, click)
    if head == "esmm":
        log_p = F.logsigmoid(out.click_logit) + F.logsigmoid(out.cvr_logit)  # log pCTCVR, stable
        log_not_p = torch.log1p(-out.p_ctcvr.clamp(max=_P_MAX))
        conversion_loss = -(conversion * log_p + (1.0 - conversion) * log_not_p).mean()
    elif head == "direct":
        per_row = F.binary_cross_entropy_with_logits(out.cvr_logit, conversion, reduction="none")
        # A batch without clicks gives 0 (with a graph), not NaN.
        conversion_loss = (per_row * click).sum() / click.sum().clamp(min=1.0)
    else:
        raise ValueError(f"unknown conversion head {head!r}; expected 'direct' or 'esmm'")
    return {"click": click_loss, "conversion": conversion_loss}


class LossWeighting(nn.Module):
    """Combines the task losses into one scalar.

    fixed        sum_k w_k L_k with the weights from the config.
    uncertainty  Kendall, Gal & Cipolla (2018) with learned s_k = log sigma_k^2:
                 sum_k exp(-s_k) L_k + s_k. This is the form most multi-task libraries
                 use; the paper's 0.5 factors (0.5 exp(-s) L + 0.5 s for regression) are
                 dropped, which only rescales the loss and the learning rate of s.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mode = cfg.loss_weighting
        self.register_buffer("fixed", torch.tensor([cfg.click_loss_weight, cfg.conversion_loss_weight]))
        self.log_vars = nn.Parameter(torch.zeros(len(TASKS))) if self.mode == "uncertainty" else None

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([losses[t] for t in TASKS])
        if self.log_vars is None:
            return (self.fixed * stacked).sum()
        return (torch.exp(-self.log_vars) * stacked + self.log_vars).sum()

    def weights(self) -> dict[str, float]:
        """Current effective weight per task (for logging)."""
        w = self.fixed if self.log_vars is None else torch.exp(-self.log_vars.detach())
        return {t: float(v) for t, v in zip(TASKS, w)}


def training_loss(
    out: ModelOutput,
    click: torch.Tensor,
    conversion: torch.Tensor,
    head: str,
    weighting: LossWeighting,
    penalty: torch.Tensor,
    penalty_strength: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scalar to minimise and its parts: weighted task losses + backbone penalty."""
    parts = task_losses(out, click, conversion, head)
    total = weighting(parts) + penalty_strength * penalty
    return total, {**{k: v.detach() for k, v in parts.items()}, "penalty": penalty.detach(), "total": total.detach()}
