"""How related the tasks are, as training sees it: the cosine between their gradients on
what they share, measured every ``train.relatedness_every_steps`` training steps and
reported per epoch (``train/grad_cosine/<a>-<b>``, ``train/conflict_share/<a>-<b>``).

A negative cosine is a conflict: a step that helps one task's loss hurts the other's
(first order). Many conflicting steps are the sign of negative transfer that pcgrad and
the per-task models of ``funnelrank experiment transfer`` address. The gradients are the
ones ``models.balancing.shared_task_gradients`` takes: on the backbone's shared dense
parameters, or its input when the tasks share only embeddings; under torchrun averaged
over the ranks, so every rank reports the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class GradientRelatedness:
    """Per-pair gradient cosines of the sampled steps of one epoch."""

    def __init__(self, tasks: Sequence[str]) -> None:
        self.pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
        self.names = [f"{tasks[i]}-{tasks[j]}" for i, j in self.pairs]
        self.cosines: list[torch.Tensor] = []  # [pairs] per sampled step, kept on the device

    def add(self, grads: torch.Tensor) -> None:
        """One step's task gradients [K, n]."""
        unit = grads / grads.norm(dim=1, keepdim=True).clamp_min(torch.finfo(grads.dtype).tiny)
        cos = unit @ unit.T
        self.cosines.append(torch.stack([cos[i, j] for i, j in self.pairs]).detach())

    def epoch_metrics(self) -> dict[str, float]:
        """``grad_cosine`` (mean over pairs and steps), ``conflict_share`` (share of the
        sampled steps where some pair conflicts) and both per pair; the sample resets.
        NaN when no step was sampled or nothing shared has a gradient."""
        if not self.cosines:
            return {"grad_cosine": float("nan"), "conflict_share": float("nan")}
        cos = torch.stack(self.cosines).double().cpu()  # [steps, pairs]
        self.cosines = []
        conflict = cos < 0
        return {
            "grad_cosine": float(cos.mean()),
            "conflict_share": float(conflict.any(1).double().mean()),
            **{f"grad_cosine/{n}": float(c) for n, c in zip(self.names, cos.mean(0), strict=True)},
            **{f"conflict_share/{n}": float(c) for n, c in zip(self.names, conflict.double().mean(0), strict=True)},
        }
