"""models.metrics against brute-force definitions and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from features.config import TaskConfig, task_views
from models.metrics import (
    auc,
    auc_difference_standard_error,
    auc_standard_error,
    calibration,
    ece,
    gauc,
    logloss,
    reliability_curve,
    roc_curve,
    view_auc_difference_standard_errors,
    view_metrics,
)


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """O(n^2) definition: P(score_pos > score_neg) + 0.5 P(tie)."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed: int):
    rng = np.random.default_rng(seed)
    labels = (rng.random(300) < 0.3).astype(np.int8)
    scores = rng.integers(0, 12, 300) / 11.0  # few distinct values: many ties
    assert auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


def _pairwise_delong_se(labels: np.ndarray, scores: np.ndarray, other: np.ndarray | None = None) -> float:
    """DeLong's variance written out over every positive/negative pair (of auc(scores) -
    auc(other) when ``other`` is given)."""

    def kernel(s):
        pos, neg = s[labels == 1], s[labels == 0]
        return (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])

    k = kernel(scores) - (0 if other is None else kernel(other))
    return math.sqrt(k.mean(1).var(ddof=1) / k.shape[0] + k.mean(0).var(ddof=1) / k.shape[1])


@pytest.mark.parametrize("seed", range(3))
def test_auc_standard_error_matches_pairwise_delong_with_ties(seed: int):
    rng = np.random.default_rng(seed)
    labels = (rng.random(400) < 0.4).astype(np.int8)
    scores = rng.integers(0, 9, 400) / 8.0 + 0.3 * labels  # informative, many ties
    assert auc_standard_error(labels, scores) == pytest.approx(_pairwise_delong_se(labels, scores), rel=1e-10)


def test_auc_standard_error_predicts_the_spread_of_resampled_auc():
    rng = np.random.default_rng(0)
    labels = (rng.random(4000) < 0.3).astype(np.int8)
    scores = rng.normal(size=4000) + 1.2 * labels
    resampled = [auc(labels[i], scores[i]) for i in rng.integers(0, 4000, (400, 4000))]
    assert auc_standard_error(labels, scores) == pytest.approx(np.std(resampled), rel=0.15)


@pytest.mark.parametrize("seed", range(3))
def test_auc_difference_standard_error_matches_pairwise_paired_delong(seed: int):
    rng = np.random.default_rng(seed)
    labels = (rng.random(400) < 0.4).astype(np.int8)
    a = rng.integers(0, 9, 400) / 8.0 + 0.3 * labels
    b = a + rng.normal(0, 0.2, 400)  # a correlated second model
    assert auc_difference_standard_error(labels, a, b) == pytest.approx(_pairwise_delong_se(labels, a, b), rel=1e-10)
    assert auc_difference_standard_error(labels, a, a) == 0.0


def test_auc_difference_standard_error_predicts_resampled_differences():
    rng = np.random.default_rng(1)
    labels = (rng.random(4000) < 0.3).astype(np.int8)
    a = rng.normal(size=4000) + 1.2 * labels
    b = a + rng.normal(0, 0.5, 4000)
    differences = [auc(labels[i], a[i]) - auc(labels[i], b[i]) for i in rng.integers(0, 4000, (400, 4000))]
    paired = auc_difference_standard_error(labels, a, b)
    assert paired == pytest.approx(np.std(differences), rel=0.15)
    # what the models share cancels: far below the unpaired sqrt(se_a^2 + se_b^2)
    assert paired < 0.6 * math.hypot(auc_standard_error(labels, a), auc_standard_error(labels, b))


def test_view_auc_difference_standard_errors_measure_cvr_on_clicked_rows():
    rng = np.random.default_rng(2)
    click = (rng.random(600) < 0.5).astype(np.int8)
    conversion = click * (rng.random(600) < 0.4)
    a = {v: rng.random(600) for v in ("click", "cvr", "ctcvr")}
    b = {v: p + rng.normal(0, 0.3, 600) for v, p in a.items()}
    out = view_auc_difference_standard_errors(FUNNEL, {"click": click, "conversion": conversion}, a, b)
    clicked = click == 1
    assert out["cvr"] == auc_difference_standard_error(conversion[clicked], a["cvr"][clicked], b["cvr"][clicked])
    assert out["ctcvr"] == auc_difference_standard_error(conversion, a["ctcvr"], b["ctcvr"])


def test_auc_standard_error_edge_cases():
    assert auc_standard_error([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 0.0  # perfectly separated: no spread
    assert math.isnan(auc_standard_error([0, 1, 1], [0.1, 0.2, 0.3]))  # one negative
    assert math.isnan(auc_standard_error([], []))


def test_auc_edge_cases():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([], []))


@pytest.mark.parametrize("seed", range(3))
def test_gauc_matches_per_group_loop(seed: int):
    rng = np.random.default_rng(seed)
    n = 2000
    groups = rng.integers(0, 60, n)
    labels = (rng.random(n) < 0.2).astype(np.int8)
    scores = np.round(rng.random(n) + 0.3 * labels, 1)  # ties within groups
    total = weight = 0.0
    for g in np.unique(groups):
        mask = groups == g
        y, s = labels[mask], scores[mask]
        if 0 < y.sum() < len(y):
            total += mask.sum() * _pairwise_auc(y, s)
            weight += mask.sum()
    assert gauc(labels, scores, groups) == pytest.approx(total / weight, abs=1e-12)


def test_gauc_skips_single_class_groups_and_handles_string_groups():
    labels = np.array([1, 0, 0, 1, 1, 1, 0])
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.6, 0.7])
    groups = np.array(["a", "a", "b", "b", "c", "c", "a"])
    # a: pos 0.9 vs neg 0.1, 0.7 -> 1.0 (3 rows); b: pos 0.2 vs neg 0.8 -> 0.0 (2 rows); c skipped
    assert gauc(labels, scores, groups) == pytest.approx((3 * 1.0 + 2 * 0.0) / 5)
    assert math.isnan(gauc([1, 0], [0.3, 0.2], [1, 2]))


def test_logloss_calibration_ece_hand_cases():
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))  # clipped, finite
    assert calibration([1, 0, 0, 0], [0.5, 0.5, 0.25, 0.25]) == pytest.approx(0.375 / 0.25)
    assert math.isnan(calibration([0, 0], [0.1, 0.2]))
    # bins of width 0.5: {0.2, 0.3} -> |0.25 - 0.5| ; {0.9} -> |0.9 - 1|
    assert ece([1, 0, 1], [0.2, 0.3, 0.9], bins=2) == pytest.approx((2 * 0.25 + 1 * 0.1) / 3)
    assert ece([0, 1], [0.3, 0.3], bins=10) == pytest.approx(0.2)
    assert ece([1], [1.0], bins=4) == pytest.approx(0.0)  # p = 1 falls into the last bin


def test_curves():
    rng = np.random.default_rng(0)
    labels = (rng.random(500) < 0.3).astype(np.int8)
    scores = np.round(rng.random(500) + 0.2 * labels, 2)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.isinf(thresholds[0]) and (np.diff(thresholds) < 0).all()
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auc(labels, scores), abs=1e-12)

    mean_pred, observed, count = reliability_curve([0, 1, 1], [0.1, 0.15, 0.9], bins=4)
    assert count.tolist() == [2, 0, 0, 1]
    assert mean_pred[0] == pytest.approx(0.125) and observed[0] == pytest.approx(0.5)
    assert math.isnan(mean_pred[1]) and observed[3] == 1.0


FUNNEL = task_views(
    [TaskConfig(name="click"), TaskConfig(name="conversion", after="click", joint_name="ctcvr", conditional_name="cvr")]
)


def test_view_metrics_names_and_cvr_on_clicked_rows_only():
    click = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    conversion = np.array([1, 0, 1, 0, 0, 0, 0, 0])
    p_click = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    # on clicked rows p_cvr ranks conversions perfectly; unclicked rows would ruin it if used
    p_cvr = np.array([0.9, 0.1, 0.8, 0.2, 0.99, 0.99, 0.99, 0.99])
    p_ctcvr = p_click * p_cvr
    groups = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    labels = {"click": click, "conversion": conversion}
    metrics = view_metrics(FUNNEL, labels, {"click": p_click, "cvr": p_cvr, "ctcvr": p_ctcvr}, groups)
    names = [
        f"{t}_{m}"
        for t in ("click", "ctcvr", "cvr")
        for m in ("auc", "auc_se", "gauc", "logloss", "calibration", "ece")
    ]
    assert list(metrics) == names
    assert metrics["click_auc"] == 1.0
    assert metrics["cvr_auc"] == 1.0 and metrics["cvr_gauc"] == 1.0
    assert metrics["cvr_calibration"] == pytest.approx(np.mean(p_cvr[:4]) / 0.5)
    assert metrics["ctcvr_auc"] == pytest.approx(auc(conversion, p_ctcvr))
    assert metrics["ctcvr_auc_se"] == pytest.approx(auc_standard_error(conversion, p_ctcvr))
    assert metrics["cvr_auc_se"] == 0.0  # perfectly ranked on the clicked rows
    assert metrics["ctcvr_logloss"] == pytest.approx(logloss(conversion, p_ctcvr))

    without_heads = view_metrics(FUNNEL, labels, {"click": p_click}, None)
    assert list(without_heads) == names
    assert math.isnan(without_heads["cvr_auc"]) and math.isnan(without_heads["click_gauc"])
    assert without_heads["click_auc"] == 1.0
