"""What the model serves: the task heads' logits -> the probabilities the scorer returns,
and the fit of the calibrators after training.

``ServedProbabilities`` is the last step of ``models.nets.MultiTaskNet.forward_from_embeddings``,
so training's validation, ``evaluate`` and the exported ONNX graph (``models.export``) share one
definition of it. Three small steps:

1. **Negative down-sampling correction.** A model trained on every positive of the first task
   and a fraction r of its negatives (``train.negative_sampling_rate``) learns odds 1/r times
   too high: its logit + log r is the logit on unsampled rows. A funnel step after that task
   needs none: its rows that matter (the first task's positives) were all kept, so
   P(step | first task) is unchanged.
2. **A calibrator per task** on the corrected logit: a strictly increasing piecewise-linear
   map of logits to logits, extended linearly beyond its end knots. ``platt``: one segment, a
   slope and a bias (Platt scaling); ``isotonic``: ``model.calibration_segments`` segments
   between quantiles of the validation day's logits, each slope fitted (a monotone fit by
   maximum likelihood, not the pool-adjacent-violators step function: steps would tie rows and
   move the AUC). The identity until fitted.
3. **The funnel product**: a task without ``after`` is served as p = sigmoid(calibrated logit);
   a funnel step's conditional p(step | after) = sigmoid(its calibrated logit) and its joint
   p(after and step) = p(after) x p(step | after).

Which quantities are calibrated (``fit_calibration``, on the validation day after training):
a task without ``after`` (pCTR) against its labels on every row; a funnel step through its
served joint probability (pCTCVR): its calibrator is the maximum-likelihood fit of
calibrated pCTR x sigmoid(g(conversion logit)) to the step's labels on every row (ESMM's own
loss, pCTR's calibrator held). So pCTCVR = pCTR x pCVR holds exactly after calibration, both
factors stay probabilities, and pCVR is the conditional that makes the product calibrated.

The calibrators are strictly increasing, so the ordering (and AUC) of pCTR and of pCVR does not
move; pCTCVR, a product of two recalibrated factors, is re-ranked slightly.

A value task (``kind = "value"``) is no probability and gets no logit calibrator: its head's
output z is served as E[value | after] = exp(z + s) - 1 (``value_loss = "log_mse"``: z
predicts log1p(value), the -1 undoes the 1; floored at 0) or exp(z + s) (``"tweedie"``: z
predicts log E[value]). The log scale s (0 until fitted) is fitted with the calibrators
(any method but ``none``) on the validation day's rows where the value task's ``after``
label is 1, so that the mean served value equals the mean observed one there. For
log_mse this also undoes exp(E[log(1 + value)]) <= E[1 + value] (Jensen): the mean of
the log is not the log of the mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from features.config import TaskConfig

# rows per piece when a calibrator runs over a whole day (its [rows, segments] intermediate)
_CHUNK_ROWS = 65_536
# the joint probability is clamped below 1 so log(1 - p) stays finite while fitting
_P_MAX = 1.0 - 1e-12
# a value head's exponent is clamped below this (e**50 ~ 5e21: no value means more), so a
# wild output gives a huge but finite E[value] in float32
VALUE_LOG_MAX = 50.0
# the fitted slopes' floor: a region of logits without information still keeps its order
# (float32 values of a flatter segment could tie and move the AUC)
MIN_SLOPE = 1e-3
# a calibrator has 2 to a few dozen parameters: a seeded sample of this many rows fits it as well
# as a bigger day, and bounds the fit's design matrix (rows x segments, float64)
FIT_MAX_ROWS = 1_000_000


def ramps(z: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """[B, K]: how far each logit of ``z`` [B] runs along each of the K segments between
    ``knots`` (the first and last segment extended beyond the ends), so that the
    piecewise-linear function through (knots, values) is values[0] + ramps @ slopes. Clipped
    differences and a matmul: plain ONNX operators, any batch size."""
    widths = knots[1:] - knots[:-1]
    segments = torch.arange(len(widths), device=z.device)
    first, last = (segments == 0).to(z.dtype), (segments == len(widths) - 1).to(z.dtype)
    inside = torch.minimum(torch.relu(z.unsqueeze(-1) - knots[:-1]), widths)
    below, above = torch.clamp(z - knots[0], max=0.0), torch.relu(z - knots[-1])
    return inside + below.unsqueeze(-1) * first + above.unsqueeze(-1) * last


def piecewise_linear(z: torch.Tensor, knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear function through (knots, values) at ``z`` [B], extended with its
    first and last slope beyond the ends."""
    slopes = (values[1:] - values[:-1]) / (knots[1:] - knots[:-1])
    return values[0] + ramps(z, knots) @ slopes


class LogitCalibrator(nn.Module):
    """A strictly increasing piecewise-linear map of logits with ``segments`` segments (1:
    Platt's slope and bias); the identity until fitted. Knots and values are buffers: the
    checkpoint and the exported graph carry them, no optimiser sees them."""

    def __init__(self, segments: int) -> None:
        super().__init__()
        identity = torch.linspace(-1.0, 1.0, segments + 1)
        self.register_buffer("knots", identity.clone())
        self.register_buffer("values", identity.clone())

    def reset(self) -> None:
        """Back to the identity."""
        identity = torch.linspace(-1.0, 1.0, len(self.knots), dtype=self.knots.dtype, device=self.knots.device)
        self.knots.copy_(identity)
        self.values.copy_(identity)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return piecewise_linear(z, self.knots, self.values)

    def describe(self) -> dict[str, float]:
        """Platt (one segment): its slope and bias; else the slopes' range."""
        knots, values = self.knots.double(), self.values.double()
        slopes = (values[1:] - values[:-1]) / (knots[1:] - knots[:-1])
        if len(slopes) == 1:
            return {"slope": float(slopes[0]), "bias": float(values[0] - slopes[0] * knots[0])}
        return {"min_slope": float(slopes.min()), "max_slope": float(slopes.max())}


def expected_value(task: TaskConfig, z: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """E[value | after] of value task ``task``'s head output ``z`` with its fitted
    ``log_scale`` (module docstring): exp(z + s) for tweedie, exp(z + s) - 1 floored at 0 for log_mse."""
    z = torch.clamp(z + log_scale, max=VALUE_LOG_MAX)
    return torch.exp(z) if task.value_loss == "tweedie" else torch.relu(torch.expm1(z))


class ServedProbabilities(nn.Module):
    """Head logits (task -> [B]) -> the served probability of every task view: the
    negative-sampling correction, each task's calibrator, the funnel product (module
    docstring); and (``expected_values``) each value task's E[value | after].

    ``tasks`` are the binary tasks (calibrated), ``value_tasks`` the value tasks."""

    def __init__(self, tasks: Sequence[TaskConfig], method: str, segments: int) -> None:
        super().__init__()
        self.tasks = [t for t in tasks if not t.is_value]
        self.value_tasks = [t for t in tasks if t.is_value]
        self.method = method
        self.calibrators = nn.ModuleDict(
            {t.name: LogitCalibrator(segments if method == "isotonic" else 1) for t in self.tasks}
        )
        # per task, added to its head's logit: log r for the negative-sampled first task, else 0
        self.register_buffer("logit_offsets", torch.zeros(len(self.tasks)))
        # per value task, its fitted log scale s (module docstring)
        self.register_buffer("value_log_scales", torch.zeros(len(self.value_tasks)))

    def start_training(self, negative_sampling_rate: float) -> None:
        """Before a run trains: identity calibrators (a warm start's old ones would not fit
        the new weights; they are fitted again after training) and the run's sampling correction."""
        for calibrator in self.calibrators.values():
            calibrator.reset()
        self.logit_offsets.zero_()
        self.value_log_scales.zero_()
        self.logit_offsets[0] = float(np.log(negative_sampling_rate))

    def corrected(self, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each head's logit in the unsampled space (the calibrators' input)."""
        return {t.name: logits[t.name] + self.logit_offsets[i] for i, t in enumerate(self.tasks)}

    def forward(self, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        corrected = self.corrected(logits)
        probs: dict[str, torch.Tensor] = {}
        for t in self.tasks:  # a task's `after` is never itself a funnel step, so it is done first
            if t.after is None:
                probs[t.name] = torch.sigmoid(self.calibrators[t.name](corrected[t.name]))
        for t in self.tasks:
            if t.after is not None:
                probs[t.conditional_name] = torch.sigmoid(self.calibrators[t.name](corrected[t.name]))
                probs[t.joint_name] = probs[t.after] * probs[t.conditional_name]
        return probs

    def expected_values(self, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Value task -> [B] its served E[value | after] (module docstring)."""
        return {
            t.name: expected_value(t, logits[t.name], self.value_log_scales[i]) for i, t in enumerate(self.value_tasks)
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A model saved before calibration existed has none of these buffers: it was trained
        # on every row and never calibrated, which is exactly the identity kept here.
        for name, tensor in self.state_dict(prefix=prefix, keep_vars=True).items():
            state_dict.setdefault(name, tensor.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def of_logits(self, logits: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``forward`` over whole arrays of head logits (e.g. a day's), a piece at a time."""
        return _chunked(self.forward, logits)

    def values_of_logits(self, logits: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``expected_values`` over whole arrays of head logits, a piece at a time."""
        return _chunked(self.expected_values, logits)


@torch.no_grad()
def _chunked(fn, logits: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``fn`` (task -> [B] tensors in, name -> [B] tensors out) over whole arrays, a piece at a time."""
    n = len(next(iter(logits.values())))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, _CHUNK_ROWS):
        piece = {k: torch.from_numpy(np.asarray(v[start : start + _CHUNK_ROWS])) for k, v in logits.items()}
        for name, p in fn(piece).items():
            parts.setdefault(name, []).append(p.numpy())
    return {name: np.concatenate(p) for name, p in parts.items()}


def fit_calibration(
    served: ServedProbabilities, logits: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]
) -> dict[str, dict]:
    """Fit ``served``'s calibrators in place (method ``served.method``; ``none`` keeps the
    identity) on a day's head logits (task -> [N], ``predict``'s ``logit_<task>``) and labels
    (label column -> [N]); per task, what was fitted or why not. Tasks without ``after`` first,
    then each funnel step with its ``after``'s calibrated probability held, then each value
    task's log scale (module docstring).
    A day of more than FIT_MAX_ROWS rows is fitted on a seeded sample of that many."""
    report: dict[str, dict] = {}
    if served.method == "none":
        return {t.name: {"skipped": "model.calibration = 'none'"} for t in (*served.tasks, *served.value_tasks)}
    n = len(next(iter(logits.values())))
    if n > FIT_MAX_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(n, FIT_MAX_ROWS, replace=False))
        logits = {k: np.asarray(v)[rows] for k, v in logits.items()}
        labels = {k: np.asarray(v)[rows] for k, v in labels.items()}
    with torch.no_grad():
        corrected = {
            name: z.numpy()
            for name, z in served.corrected({k: torch.from_numpy(np.asarray(v)) for k, v in logits.items()}).items()
        }
    for t in sorted(served.tasks, key=lambda task: task.after is not None):
        y = np.asarray(labels[t.label_column], dtype=np.float64)
        positives = int((y > 0).sum())
        if positives == 0 or positives == len(y):
            report[t.name] = {"skipped": f"label '{t.label_column}' has one class only on {len(y):,} rows"}
            continue
        calibrator = served.calibrators[t.name]
        # a funnel step: the calibrated logit of the task it follows (as served), held
        after_logit = None if t.after is None else _apply(served.calibrators[t.after], corrected[t.after])
        knots = _grid(corrected[t.name], len(calibrator.knots) - 1)
        values = _fit_increasing(corrected[t.name].astype(np.float64), y, knots, after_logit)
        calibrator.knots.copy_(torch.from_numpy(knots))
        calibrator.values.copy_(torch.from_numpy(values))
        report[t.name] = {"rows": len(y), "positives": positives, **calibrator.describe()}
    labels_of = {t.name: t.label_column for t in served.tasks}
    for i, t in enumerate(served.value_tasks):
        report[t.name] = _fit_value_scale(served, i, np.asarray(logits[t.name]), labels, labels_of[t.after])
    return report


def _fit_value_scale(
    served: ServedProbabilities, index: int, z: np.ndarray, labels: Mapping[str, np.ndarray], after_label: str
) -> dict:
    """Value task ``index``'s log scale: the mean served value equals the mean observed one
    on the rows where ``after_label`` is 1 (module docstring)."""
    t = served.value_tasks[index]
    rows = np.asarray(labels[after_label]) > 0
    if not rows.any():
        return {"skipped": f"label '{after_label}' has no positives on {len(rows):,} rows"}
    z = z[rows].astype(np.float64)
    observed = np.asarray(labels[t.label_column], dtype=np.float64)[rows]
    shift = 0.0 if t.value_loss == "tweedie" else 1.0  # log_mse: exp(z + s) estimates 1 + value
    peak = z.max()  # log-sum-exp: a mean of exp(z) that cannot overflow
    log_mean_exp = peak + np.log(np.mean(np.exp(z - peak)))
    mean_target = observed.mean() + shift
    if mean_target <= 0.0:
        return {"skipped": f"label '{t.label_column}' is 0 on every one of its {int(rows.sum()):,} rows"}
    log_scale = float(np.log(mean_target) - log_mean_exp)
    served.value_log_scales[index] = log_scale
    return {"rows": int(rows.sum()), "log_scale": log_scale}


@torch.no_grad()
def _apply(calibrator: LogitCalibrator, z: np.ndarray) -> np.ndarray:
    """``calibrator`` over a whole array of logits, a piece at a time."""
    return np.concatenate(
        [calibrator(torch.from_numpy(z[lo : lo + _CHUNK_ROWS])).numpy() for lo in range(0, len(z), _CHUNK_ROWS)]
    )


def _grid(z: np.ndarray, segments: int) -> np.ndarray:
    """``segments`` + 1 knots over the logits ``z``: their quantiles at evenly spaced levels
    (min and max at the ends), or evenly spaced from min to max where quantiles tie."""
    z = z.astype(np.float64)
    knots = np.quantile(z, np.linspace(0.0, 1.0, segments + 1))
    low, high = knots[0], knots[-1]
    if high - low < 1e-6:  # one logit for every row: any line through it
        low, high = low - 1.0, high + 1.0
    if not (np.diff(knots) > 1e-6 * (high - low)).all():
        knots = np.linspace(low, high, segments + 1)
    return knots


def _fit_increasing(
    z: np.ndarray, y: np.ndarray, knots: np.ndarray, after_logit: np.ndarray | None, max_iter: int = 100
) -> np.ndarray:
    """Values at ``knots`` of the strictly increasing piecewise-linear g maximising the
    likelihood of ``y`` under p = sigmoid(g(z)), or, for a funnel step, p = sigmoid(a) x
    sigmoid(g(z)) with a the calibrated logit of the task it follows.

    With the knots fixed, g(z) = g0 + ramps(z, knots) @ slopes is linear in its parameters
    over a fixed design (computed once): a logistic regression whose slopes are kept above
    MIN_SLOPE as MIN_SLOPE + softplus(theta). L-BFGS from the identity, in float64."""
    design = ramps(torch.from_numpy(z), torch.from_numpy(knots))
    y_t = torch.from_numpy(y)
    after_t = None if after_logit is None else torch.from_numpy(np.asarray(after_logit, dtype=np.float64))
    start = torch.tensor([knots[0]], dtype=torch.float64, requires_grad=True)
    identity = float(np.log(np.expm1(1.0 - MIN_SLOPE)))  # slopes of 1
    theta = torch.full((design.shape[1],), identity, dtype=torch.float64, requires_grad=True)

    def slopes() -> torch.Tensor:
        return MIN_SLOPE + F.softplus(theta)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        g = start + design @ slopes()
        if after_t is None:
            loss = F.binary_cross_entropy_with_logits(g, y_t)
        else:
            log_p = F.logsigmoid(after_t) + F.logsigmoid(g)  # log P(after and step), stable
            log_not_p = torch.log1p(-(torch.sigmoid(after_t) * torch.sigmoid(g)).clamp(max=_P_MAX))
            loss = -(y_t * log_p + (1.0 - y_t) * log_not_p).mean()
        loss.backward()
        return loss

    optimiser = torch.optim.LBFGS(
        [start, theta],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-8,
        tolerance_change=1e-11,
        line_search_fn="strong_wolfe",
    )
    optimiser.step(closure)
    with torch.no_grad():
        increments = slopes() * torch.from_numpy(np.diff(knots))
        return torch.cat([start, start + torch.cumsum(increments, 0)]).numpy()
