"""Ranking and calibration metrics shared by train and evaluate.

Pure numpy and vectorised (no torch), so evaluate can score onnxruntime outputs with the
same code. Every metric returns ``nan`` when it is undefined (no rows, one class only)
rather than raising, so a tiny or degenerate day still produces a full metrics dict.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from features.config import VALUE_METRICS, ValueView

LOGLOSS_EPS = 1e-7
METRIC_NAMES = ("auc", "auc_se", "gauc", "logloss", "calibration", "ece")


def _as_labels(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels, dtype=np.float64).ravel()


def _average_ranks_sorted(sorted_keys: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """For rows already sorted by ``sorted_keys``: the 0-based average position of each
    row's tie run (rows equal in every key) and the start position of each run.

    Average positions give tied scores the mean of the ranks they span, which is what makes
    the rank-sum AUC count a tied positive/negative pair as one half.
    """
    n = len(sorted_keys[0])
    new_run = np.zeros(n, dtype=bool)
    if n:
        new_run[0] = True
    for key in sorted_keys:
        new_run[1:] |= key[1:] != key[:-1]
    run_starts = np.flatnonzero(new_run)
    run_ends = np.append(run_starts[1:], n)
    run_id = np.cumsum(new_run) - 1
    average_position = (run_starts + run_ends - 1) / 2.0
    return average_position[run_id], run_starts


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores`` in their own order; tied scores share their average rank."""
    order = np.argsort(scores, kind="stable")
    position, _ = _average_ranks_sorted((scores[order],))
    ranks = np.empty(len(scores))
    ranks[order] = position + 1.0
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula; ties get average ranks.

    ``nan`` when either class is absent.
    """
    y = _as_labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum_pos = float(_average_ranks(s)[y > 0].sum())
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _placements(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placements: each positive's share of negatives it outranks, each negative's
    share of positives that outrank it (ties count one half). Both average to the AUC.
    From three rankings (all rows, positives alone, negatives alone): a row's rank among
    all rows minus its rank within its class counts the other class's rows below it."""
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    ranks = _average_ranks(s)
    return (ranks[y] - _average_ranks(s[y])) / n_neg, 1.0 - (ranks[~y] - _average_ranks(s[~y])) / n_pos


def auc_standard_error(labels: np.ndarray, scores: np.ndarray) -> float:
    """Standard error of ``auc`` over resamples of the rows (DeLong et al., Biometrics 1988):
    var(placements of positives) / n_pos + var(placements of negatives) / n_neg, with no
    pair formed. ``nan`` with fewer than two rows of either class."""
    return auc_difference_standard_error(labels, scores, None)


def auc_difference_standard_error(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray | None) -> float:
    """Standard error of auc(a) - auc(b), two models scored on the same rows (DeLong's paired
    test): the placements' differences take the placements' place, so what the two models
    share (the rows' difficulty) cancels. ``scores_b=None``: the standard error of auc(a)."""
    y = _as_labels(labels) > 0
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos < 2 or n_neg < 2:
        return float("nan")
    pos, neg = _placements(y, np.asarray(scores_a, dtype=np.float64).ravel())
    if scores_b is not None:
        pos_b, neg_b = _placements(y, np.asarray(scores_b, dtype=np.float64).ravel())
        pos, neg = pos - pos_b, neg - neg_b
    return float(np.sqrt(pos.var(ddof=1) / n_pos + neg.var(ddof=1) / n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Group AUC: per-group AUC averaged with weights = group size (impressions).

    Groups with one class only are skipped (their AUC is undefined); ``nan`` when no group
    has both classes. Vectorised: one sort by (group, score), then per-group rank sums.
    """
    y = _as_labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    g = np.asarray(groups).ravel()
    if len(y) == 0:
        return float("nan")
    order = np.lexsort((s, g))  # last key is the primary one: group, then score
    y, s, g = y[order], s[order], g[order]
    position, _ = _average_ranks_sorted((g, s))
    group_start_flags = np.ones(len(g), dtype=bool)
    group_start_flags[1:] = g[1:] != g[:-1]
    group_starts = np.flatnonzero(group_start_flags)
    group_id = np.cumsum(group_start_flags) - 1
    rank_in_group = position - group_starts[group_id] + 1.0

    size = np.diff(np.append(group_starts, len(g))).astype(np.float64)
    n_pos = np.bincount(group_id, weights=y)
    n_neg = size - n_pos
    rank_sum_pos = np.bincount(group_id, weights=rank_in_group * y)
    valid = (n_pos > 0) & (n_neg > 0)
    if not valid.any():
        return float("nan")
    group_auc = (rank_sum_pos[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2.0) / (n_pos[valid] * n_neg[valid])
    return float(np.average(group_auc, weights=size[valid]))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy; probabilities are clipped to [eps, 1 - eps]."""
    y = _as_labels(labels)
    if len(y) == 0:
        return float("nan")
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean predicted probability / observed positive rate (1.0 = calibrated on average)."""
    y = _as_labels(labels)
    if len(y) == 0 or y.sum() == 0:
        return float("nan")
    return float(np.mean(np.asarray(probs, dtype=np.float64)) / y.mean())


def _bin_stats(labels: np.ndarray, probs: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin on [0, 1]: row count, sum of predictions, sum of labels."""
    y = _as_labels(labels)
    p = np.asarray(probs, dtype=np.float64).ravel()
    index = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    return count, np.bincount(index, weights=p, minlength=bins), np.bincount(index, weights=y, minlength=bins)


def ece(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: sum over equal-width bins of
    (bin share of rows) * |mean prediction - observed rate|."""
    count, sum_p, sum_y = _bin_stats(labels, probs, bins)
    n = count.sum()
    if n == 0:
        return float("nan")
    return float(np.abs(sum_p - sum_y).sum() / n)


def reliability_curve(
    labels: np.ndarray, probs: np.ndarray, bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: (mean prediction, observed rate, row count); ``nan`` for empty
    bins (matplotlib leaves those points out)."""
    count, sum_p, sum_y = _bin_stats(labels, probs, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sum_p / count, sum_y / count, count.astype(np.int64)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, threshold) at each distinct score,
    descending, starting at (0, 0) with threshold +inf. Rates are ``nan`` when a class is
    absent. The trapezoid area under (fpr, tpr) equals :func:`auc`."""
    y = _as_labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_run = np.append(s[1:] != s[:-1], True) if len(s) else np.zeros(0, dtype=bool)
    true_pos = np.cumsum(y)[last_of_run]
    false_pos = np.cumsum(1.0 - y)[last_of_run]
    true_pos = np.concatenate([[0.0], true_pos])
    false_pos = np.concatenate([[0.0], false_pos])
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = true_pos / true_pos[-1]
        fpr = false_pos / false_pos[-1]
    return fpr, tpr, np.concatenate([[np.inf], s[last_of_run]])


def _task(labels: np.ndarray, probs: np.ndarray | None, groups: np.ndarray | None) -> dict[str, float]:
    nan = float("nan")
    if probs is None:
        return dict.fromkeys(METRIC_NAMES, nan)
    return {
        "auc": auc(labels, probs),
        "auc_se": auc_standard_error(labels, probs),
        "gauc": gauc(labels, probs, groups) if groups is not None else nan,
        "logloss": logloss(labels, probs),
        "calibration": calibration(labels, probs),
        "ece": ece(labels, probs),
    }


def view_metrics(
    views: Mapping[str, tuple[str, str | None]],
    labels: Mapping[str, np.ndarray],
    probs: Mapping[str, np.ndarray | None],
    groups: np.ndarray | None,
) -> dict[str, float]:
    """All metrics of every task view, keyed ``{view}_{metric}``.

    ``views``: view -> (label column, mask column or None), as ``features.config.task_views``
    gives them; e.g. click (label click, all rows), cvr (label conversion, only the rows
    whose click is 1: conversion given click), ctcvr (label conversion, all rows).
    ``labels``: column -> 0/1 array; ``probs``: view -> predictions. Metrics: auc, auc_se
    (its standard error over resamples of these rows, ``auc_standard_error``), gauc
    (grouped by ``groups``, e.g. user codes), logloss, calibration, ece. A view missing
    from ``probs`` (or None) or ``groups=None`` gives ``nan`` for its keys, so the key set
    is always the same.
    """
    groups_all = None if groups is None else np.asarray(groups).ravel()
    out: dict[str, float] = {}
    for view, (label, mask_column) in views.items():
        p = probs.get(view)
        p = None if p is None else np.asarray(p, dtype=np.float64).ravel()
        keep = _view_rows(labels, mask_column)
        y, g = _as_labels(labels[label])[keep], None if groups_all is None else groups_all[keep]
        out.update({f"{view}_{name}": value for name, value in _task(y, None if p is None else p[keep], g).items()})
    return out


def view_auc_difference_standard_errors(
    views: Mapping[str, tuple[str, str | None]],
    labels: Mapping[str, np.ndarray],
    probs_a: Mapping[str, np.ndarray],
    probs_b: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """Per task view (as in ``view_metrics``), the standard error of auc(a) - auc(b) for two
    models' predictions on the same rows: ``auc_difference_standard_error``."""
    out = {}
    for view, (label, mask_column) in views.items():
        keep = _view_rows(labels, mask_column)
        out[view] = auc_difference_standard_error(
            _as_labels(labels[label])[keep],
            np.asarray(probs_a[view]).ravel()[keep],
            np.asarray(probs_b[view]).ravel()[keep],
        )
    return out


def rmse(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Root mean squared error; ``nan`` without rows."""
    a, p = np.asarray(actual, dtype=np.float64).ravel(), np.asarray(predicted, dtype=np.float64).ravel()
    return float(np.sqrt(np.mean((p - a) ** 2))) if len(a) else float("nan")


def mae(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Mean absolute error; ``nan`` without rows."""
    a, p = np.asarray(actual, dtype=np.float64).ravel(), np.asarray(predicted, dtype=np.float64).ravel()
    return float(np.mean(np.abs(p - a))) if len(a) else float("nan")


def _gini(actual: np.ndarray, scores: np.ndarray) -> float:
    """The Gini of ``actual`` (>= 0) ordered by ``scores``: the area between the share of the
    actual total captured by the top-scored rows (the cumulative curve) and the diagonal.
    From the scores' ascending average ranks r: sum(a r) / (sum(a) n) - (n + 1) / (2n); tied
    scores share their rank (as if their rows came in random order), so a constant score is 0."""
    n = len(actual)
    return float(actual @ _average_ranks(scores) / (actual.sum() * n) - (n + 1) / (2.0 * n))


def normalized_gini(actual: np.ndarray, scores: np.ndarray) -> float:
    """How well ``scores`` order ``actual`` (values >= 0, e.g. revenue per impression): the
    Gini of the actual values ordered by the scores over that of the perfect order, 1 for a
    perfect order, 0 for a random or constant one, negative when reversed. ``nan`` without
    rows or when every actual value is equal."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(a) == 0 or a.sum() <= 0:
        return float("nan")
    best = _gini(a, a)
    return _gini(a, s) / best if best > 0 else float("nan")


def value_metrics(
    views: Mapping[str, ValueView],
    labels: Mapping[str, np.ndarray],
    values: Mapping[str, np.ndarray | None],
    probs: Mapping[str, np.ndarray | None],
) -> dict[str, float]:
    """Every value task's metrics, keyed ``{task}_{metric}`` (``features.config.VALUE_METRICS``).

    ``views``: value task -> its ValueView (``features.config.value_views``); ``values``: task
    -> predicted E[value | after]; ``probs``: task view -> served probability. On the rows
    where the after task's label is 1 (e.g. converted, so clicked too): rmse and mae of the
    predicted value, calibration = mean predicted / mean observed value. On every row: gini,
    the normalised Gini of the expected revenue P(after) x E[value | after] (e.g. pCTCVR x
    E[value | conversion]) against the realised value (the label where after is 1, else 0).
    A task missing from ``values`` (or its after view from ``probs``) gives ``nan``."""
    out: dict[str, float] = {}
    for task, view in views.items():
        predicted, p_after = values.get(task), probs.get(view.after_view)
        after = _as_labels(labels[view.after_label]) > 0
        realised = np.where(after, np.asarray(labels[view.label], dtype=np.float64).ravel(), 0.0)
        if predicted is None:
            out.update({f"{task}_{m}": float("nan") for m in VALUE_METRICS})
            continue
        e = np.asarray(predicted, dtype=np.float64).ravel()
        observed = realised[after].mean() if after.any() else float("nan")
        out[f"{task}_rmse"] = rmse(realised[after], e[after])
        out[f"{task}_mae"] = mae(realised[after], e[after])
        out[f"{task}_calibration"] = float(e[after].mean() / observed) if after.any() and observed > 0 else float("nan")
        out[f"{task}_gini"] = (
            float("nan") if p_after is None else normalized_gini(realised, np.asarray(p_after).ravel() * e)
        )
    return out


def _view_rows(labels: Mapping[str, np.ndarray], mask_column: str | None) -> np.ndarray | slice:
    """The rows a view is measured on: all, or those whose ``mask_column`` label is 1."""
    return slice(None) if mask_column is None else _as_labels(labels[mask_column]) > 0
