"""Task balancing: how the task losses (``models.losses``) become the one loss a training
step minimises and the gradient it applies (``model.loss_weighting``).

fixed        sum_k w_k L_k, w_k = the task's ``loss_weight``.
uncertainty  Kendall, Gal & Cipolla (2018) with learned s_k = log sigma_k^2:
             sum_k exp(-s_k) L_k + s_k. This is the form most multi-task libraries use;
             the paper's 0.5 factors are dropped, which only rescales the loss and the
             learning rate of s.
dwa          Dynamic Weight Average (Liu, Johns & Davison 2019): w = K softmax(r / T) with
             r_k = the task's mean loss over the last window / over the window before it.
             A window is ``model.dwa_window_steps`` steps (the paper's is an epoch; a
             nightly run has few), T = ``model.dwa_temperature``; w = 1 for the first two
             windows. A task whose loss falls more slowly gets more weight.
gradnorm     GradNorm (Chen et al. 2018): learned weights w (renormalised to sum to K after
             every step) pull each task's gradient norm on the last shared layer,
             G_k = w_k ||grad_W L_k||, towards mean(G) x r_k^alpha, where
             r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0)) is the task's relative inverse
             training rate and alpha = ``model.gradnorm_alpha``. w learns from
             sum_k |G_k - target_k| alone (the target held constant), not from the task
             losses, at ``model.gradnorm_lr_scale`` x the dense learning rate.
pcgrad       PCGrad (Yu et al. 2020), with the fixed weights: on the shared dense
             parameters each task's weighted gradient is projected off the gradient of
             every other task it conflicts with (negative inner product), in a random task
             order; the sum of the projected gradients is applied.

Which parameters each method touches, and why. The embedding tables are updated inside the
backward by FBGEMM's fused optimiser (``models.train``): their gradients are never
materialised, so no method can see or change a task's gradient there; they always get the
gradient of the weighted total, whose weights fixed, uncertainty, dwa and gradnorm set.
PCGrad rewrites the gradient of the backbone's shared dense parameters only
(``Backbone.shared_parameters``: the shared bottom, the MMoE experts, PLE's shared experts
and shared gates); towers, heads and gates belong to one task each, where there is nothing
to project. single_task and soft_sharing share no dense parameter: pcgrad equals fixed
there. GradNorm's last shared layer is ``Backbone.last_shared_layer`` (the bottom's, every
expert's or PLE's shared experts' last Linear); where the backbone shares none it is the
backbone input (pooled embeddings and dense features: the shared tables' output).

Under torchrun the per-task gradients and losses these methods read are averaged over the
ranks first (``shared_task_gradients``), so every rank takes the same decision and 1 and 2
ranks train alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from features.config import TaskConfig
from models.config import ModelConfig
from models.distributed import mean_over_ranks
from models.losses import task_losses
from models.nets import ModelOutput


def shared_task_gradients(losses: Sequence[torch.Tensor], shared: Sequence[torch.Tensor]) -> torch.Tensor:
    """[K, n]: the gradient of each of ``losses`` w.r.t. ``shared`` (parameters or an
    activation), flattened and averaged over the ranks. ``autograd.grad`` keeps the graph
    for the step's backward and never reaches the fused embedding update."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(shared), retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(s)).flatten() for g, s in zip(grads, shared, strict=True)]
            )
        )
    return mean_over_ranks(torch.stack(rows).float())


def pcgrad(grads: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """PCGrad on task gradients ``grads`` [K, n]: (sum of the projected gradients [n],
    number of projections made). Task i's gradient is projected off each other task's
    original gradient g_j, in a random order, when their inner product is negative:
    g_i <- g_i - min(g_i . g_j, 0) / |g_j|^2 g_j. Written without branches, so it never
    waits for the device."""
    projected = grads.clone()
    squared = grads.square().sum(1).clamp_min(torch.finfo(grads.dtype).tiny)
    projections = torch.zeros((), dtype=torch.long, device=grads.device)
    k = len(grads)
    for i in range(k):
        for j in torch.randperm(k, generator=generator).tolist():
            if j == i:
                continue
            dot = projected[i] @ grads[j]
            projected[i] -= dot.clamp(max=0.0) / squared[j] * grads[j]
            projections += (dot < 0).long()
    return projected.sum(0), projections


class LossWeighting(nn.Module):
    """The task weights of ``model.loss_weighting`` and the weighted total (module docstring).

    State that must survive a resume (DWA's windows, GradNorm's weights and initial losses)
    is in buffers and parameters, saved with the checkpoint."""

    def __init__(self, cfg: ModelConfig, tasks: Sequence[TaskConfig]) -> None:
        super().__init__()
        self.mode = cfg.loss_weighting
        self.names = [t.name for t in tasks]
        k = len(tasks)
        self.register_buffer("fixed", torch.tensor([t.loss_weight for t in tasks]))
        self.log_vars = nn.Parameter(torch.zeros(k)) if self.mode == "uncertainty" else None
        self.learned = nn.Parameter(torch.ones(k)) if self.mode == "gradnorm" else None
        self.lr_scale = cfg.gradnorm_lr_scale if self.mode == "gradnorm" else 1.0
        self.alpha, self.temperature, self.window = cfg.gradnorm_alpha, cfg.dwa_temperature, cfg.dwa_window_steps
        if self.mode == "dwa":
            self.register_buffer("dwa_weights", torch.ones(k))
            self.register_buffer("window_sum", torch.zeros(k, dtype=torch.float64))
            self.register_buffer("window_steps", torch.zeros((), dtype=torch.long))
            self.register_buffer("window_means", torch.full((2, k), float("nan"), dtype=torch.float64))
        if self.mode == "gradnorm":
            self.register_buffer("initial_losses", torch.full((k,), float("nan")))
            self.register_buffer("norm_ratios", torch.ones(k))  # G_k / mean(G) of the last step, logged

    def current(self) -> torch.Tensor:
        """[K] the weights the next total uses (constants to the task losses' graph)."""
        if self.log_vars is not None:
            return torch.exp(-self.log_vars.detach())
        if self.learned is not None:
            return self.learned.detach()
        if self.mode == "dwa":
            return self.dwa_weights * self.fixed
        return self.fixed

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([losses[t] for t in self.names])
        if self.log_vars is not None:
            return (torch.exp(-self.log_vars) * stacked + self.log_vars).sum()
        return (self.current() * stacked).sum()

    def weights(self) -> dict[str, float]:
        """Current effective weight per task (for logging)."""
        return {t: float(v) for t, v in zip(self.names, self.current(), strict=True)}

    def step_metrics(self) -> dict[str, torch.Tensor]:
        """What a logged step records besides its losses: ``task_weight_<task>`` and, for
        gradnorm, ``gradnorm_ratio_<task>`` (G_k / mean G: 1 when balanced)."""
        metrics = {f"task_weight_{t}": w for t, w in zip(self.names, self.current(), strict=True)}
        if self.learned is not None:
            metrics |= {f"gradnorm_ratio_{t}": r for t, r in zip(self.names, self.norm_ratios, strict=True)}
        return metrics

    # ------------------------------------------------------------ dwa

    def observe(self, losses: Mapping[str, torch.Tensor]) -> None:
        """DWA: add one step's task losses to the window; at its end, new weights from the
        ratio of the last two windows' mean losses (averaged over the ranks: a collective,
        every rank calls it on the same steps)."""
        if self.mode != "dwa":
            return
        self.window_sum += torch.stack([losses[t].detach() for t in self.names]).double()
        self.window_steps += 1
        if int(self.window_steps) < self.window:
            return
        means = mean_over_ranks(self.window_sum / self.window)
        self.window_means.copy_(torch.stack([self.window_means[1], means]))
        self.window_sum.zero_()
        self.window_steps.zero_()
        if torch.isfinite(self.window_means).all():
            rate = self.window_means[1] / self.window_means[0].clamp_min(1e-12)
            self.dwa_weights.copy_(len(self.names) * torch.softmax(rate / self.temperature, dim=0))

    # ------------------------------------------------------------ gradnorm

    def gradnorm_backward(self, losses: Mapping[str, torch.Tensor], last_shared: Sequence[torch.Tensor]) -> None:
        """GradNorm: the gradient of sum_k |G_k - target_k| w.r.t. the learned weights, set
        as their ``.grad`` (call after the step's backward, before the optimiser). With G_k
        = w_k g_k and the target constant, d/dw_k = sign(G_k - target_k) g_k."""
        stacked = torch.stack([losses[t] for t in self.names])
        norms = shared_task_gradients(list(stacked), last_shared).norm(dim=1)
        mean_losses = mean_over_ranks(stacked.detach())
        if torch.isnan(self.initial_losses).any():
            self.initial_losses.copy_(mean_losses)
        inverse_rate = mean_losses / self.initial_losses.clamp_min(1e-12)
        relative = inverse_rate / inverse_rate.mean()
        w = self.learned.detach()
        norm = w * norms
        target = norm.mean() * relative.pow(self.alpha)
        self.norm_ratios.copy_(norm / norm.mean().clamp_min(1e-12))
        self.learned.grad = torch.sign(norm - target) * norms

    @torch.no_grad()
    def renormalise(self) -> None:
        """GradNorm: after the optimiser step, the weights are made positive and to sum to K."""
        if self.learned is not None:
            w = self.learned.clamp_min(1e-3)
            self.learned.copy_(w * len(self.names) / w.sum())


def training_loss(
    out: ModelOutput,
    labels: Mapping[str, torch.Tensor],
    tasks: Sequence[TaskConfig],
    head: str,
    weighting: LossWeighting,
    penalty: torch.Tensor,
    penalty_strength: float,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the scalar to minimise, the task losses with their graph, the detached parts to
    log): weighted task losses + backbone penalty; ``weight``: each row's loss weight
    (``task_losses``)."""
    losses = task_losses(out, labels, tasks, head, weight)
    total = weighting(losses) + penalty_strength * penalty
    parts = {**{k: v.detach() for k, v in losses.items()}, "penalty": penalty.detach(), "total": total.detach()}
    return total, losses, parts
