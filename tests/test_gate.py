"""The promotion gate's rules against a champion (promote.rule): point, non_inferiority and
not_worse on a candidate equal to the champion, one clearly worse, and borderline ones where
they disagree as documented; what the decision says and tags; the config's checks."""

from __future__ import annotations

import math

import pytest

from features.config import ConfigError
from pipeline.config import FunnelConfig, parse_config
from pipeline.registry import gate, rule_decisions

RULES = ("point", "non_inferiority", "not_worse")
TOLERANCE = 0.005
Z95 = 1.6448536269514722  # one-sided 95%
CHAMPION = {
    "click_auc": 0.70,
    "cvr_auc": 0.65,
    "ctcvr_auc": 0.72,
    "click_calibration": 1.0,
    "ctcvr_calibration": 1.02,
}


def rules(rule: str, **promote) -> FunnelConfig:
    return parse_config(
        {
            "features": {"sparse": [{"name": "a", "table": "impressions", "column": "a"}]},
            "promote": {"rule": rule, "auc_tolerance": TOLERANCE, **promote},
        }
    )


def decide(cvr_change: float, cvr_se: float) -> dict[str, bool]:
    """Each rule's decision on a candidate whose cvr AUC moved by ``cvr_change`` (standard
    error ``cvr_se``), the other metrics unchanged."""
    evaluation = {
        "candidate": CHAMPION | {"cvr_auc": CHAMPION["cvr_auc"] + cvr_change},
        "champion": CHAMPION,
        "delta_auc_se": {"click": 0.002, "cvr": cvr_se, "ctcvr": 0.002},
    }
    decisions = rule_decisions(evaluation, rules("point"))
    assert list(decisions) == list(RULES)
    return {rule: d.promote for rule, d in decisions.items()}


def test_a_candidate_equal_to_the_champion_passes_every_rule():
    assert decide(0.0, 0.001) == dict.fromkeys(RULES, True)
    assert decide(0.0, 0.0) == dict.fromkeys(RULES, True)  # the same model: the paired error is 0


def test_a_drop_three_standard_errors_beyond_the_tolerance_fails_every_rule():
    se = 0.002
    assert decide(-(TOLERANCE + 3 * se), se) == dict.fromkeys(RULES, False)


def test_borderline_candidates_split_the_rules_as_documented():
    wide = 0.006
    # a drop just beyond the tolerance, within noise: only not_worse promotes (not a significant drop)
    assert decide(-(TOLERANCE + 0.001), wide) == {"point": False, "non_inferiority": False, "not_worse": True}
    # a drop just within the tolerance, but noisy: non_inferiority refuses (not shown to be within it)
    assert decide(-(TOLERANCE - 0.001), wide) == {"point": True, "non_inferiority": False, "not_worse": True}
    # the bounds sit at change -/+ z se: just inside and just outside -tolerance
    inside = -TOLERANCE + Z95 * wide + 1e-4
    assert decide(inside, wide)["non_inferiority"] and not decide(inside - 2e-4, wide)["non_inferiority"]
    outside = -TOLERANCE - Z95 * wide - 1e-4
    assert not decide(outside, wide)["not_worse"] and decide(outside + 2e-4, wide)["not_worse"]
    # the demo's third night before this change: cvr -0.0068 ± 0.0059 was refused by the point rule
    assert decide(-0.0068, 0.0059) == {"point": False, "non_inferiority": False, "not_worse": True}


def test_the_reason_and_tags_say_the_rule_the_bounds_and_the_decision():
    cfg = rules("not_worse", confidence=0.9)
    candidate = CHAMPION | {"cvr_auc": CHAMPION["cvr_auc"] - 0.008}
    decision = gate(candidate, CHAMPION, cfg, {"click": 0.002, "cvr": 0.004, "ctcvr": 0.002})
    z90 = 1.2815515655446004
    assert decision.promote and decision.rule == "not_worse"
    assert decision.reason.startswith("rule not_worse (90% one-sided bounds): no gate metric fell significantly")
    assert f"cvr_auc -0.0080 ± 0.0040 (bounds {-0.008 - z90 * 0.004:+.4f}, {-0.008 + z90 * 0.004:+.4f})" in (
        decision.reason
    )
    tags = decision.tags()
    assert tags["promotion_rule"] == "not_worse"
    assert float(tags["gate.cvr_auc.change"]) == pytest.approx(-0.008)
    assert float(tags["gate.cvr_auc.lower"]) == pytest.approx(-0.008 - z90 * 0.004, abs=1e-6)
    assert float(tags["gate.cvr_auc.upper"]) == pytest.approx(-0.008 + z90 * 0.004, abs=1e-6)
    assert tags["gate.cvr_auc.passed"] == "true" and tags["gate.cvr_auc.rule"] == "not_worse"

    refused = gate(candidate, CHAMPION, rules("non_inferiority"), {"click": 0.002, "cvr": 0.004, "ctcvr": 0.002})
    assert not refused.promote and refused.tags()["gate.cvr_auc.passed"] == "false"
    assert "cvr_auc 0.6420 fell 0.0080 ± 0.0040 below the champion's 0.6500" in refused.reason
    assert "not shown to be within the tolerance" in refused.reason


def test_without_a_standard_error_a_metric_is_judged_by_the_point_rule():
    cfg = rules("not_worse")
    worse = CHAMPION | {"click_auc": CHAMPION["click_auc"] - 0.02}
    for change_se in (None, {"click": math.nan, "cvr": 0.01, "ctcvr": 0.01}):  # an older evaluation; too few rows
        decision = gate(worse, CHAMPION, cfg, change_se)
        assert not decision.promote and decision.checks["click_auc"].rule == "point"
        assert decision.checks["click_auc"].lower is None
    # a NaN change never passes, whatever the rule
    broken = CHAMPION | {"click_auc": math.nan}
    for rule in RULES:
        assert not gate(broken, CHAMPION, rules(rule), {"click": 0.002, "cvr": 0.002, "ctcvr": 0.002}).promote


def test_the_first_model_and_calibration_bounds_are_the_same_under_every_rule():
    for rule in RULES:
        assert gate(CHAMPION, None, rules(rule)).promote
        decision = gate(CHAMPION | {"ctcvr_calibration": 1.4}, CHAMPION, rules(rule), {"click": 0.0, "cvr": 0.0})
        assert not decision.promote and "ctcvr_calibration 1.400 outside" in decision.reason


def test_rules_that_bound_the_change_need_metrics_with_a_standard_error():
    with pytest.raises(ConfigError, match=r"promote.rule = 'non_inferiority' .* click_gauc has none"):
        rules("non_inferiority", gate_metrics=["click_auc", "click_gauc"])
    assert rules("point", gate_metrics=["click_gauc"]).promote.rule == "point"
    with pytest.raises(ConfigError, match=r"promote.rule: Input should be 'point', 'non_inferiority' or 'not_worse'"):
        rules("lenient")
    with pytest.raises(ConfigError, match=r"promote.confidence: Input should be less than 1"):
        rules("not_worse", confidence=1.0)
