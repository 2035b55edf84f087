"""The README demo: synthetic logs through the nightly pipeline, end to end.

`make demo` runs this as `funnelrank demo`: it generates the config's days of synthetic
logs, backfills validate -> features -> examples over the early days, then runs the
full nightly pipeline over the last ``nights`` days (a full training the first night,
warm-started fine-tunes after, each evaluated against the champion, exported and put
through the promotion gate), prints the comparison of the nights' runs, the newest
model's click AUC beside the oracle AUC of the generator's hidden model, and a few
candidates ranked by the champion's ONNX bundle loaded from the MLflow registry.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from pipeline.config import FunnelConfig


def oracle_click_auc(warehouse: Path, day: dt.date) -> float:
    """Click AUC on ``day``'s training rows of the generator's noise-free click logit:
    the ceiling for a model that sees every feature."""
    import polars as pl

    from features.catalog import training_dir, truth_dir
    from models.metrics import auc

    rows = pl.scan_parquet(training_dir(warehouse, day) / "*.parquet").select("impression_id", "click")
    truth = pl.scan_parquet(truth_dir(warehouse, day) / "*.parquet").select("impression_id", "click_logit_observable")
    joined = rows.join(truth, on="impression_id").collect()
    return auc(joined["click"].to_numpy(), joined["click_logit_observable"].to_numpy())


def demo_request(warehouse: Path, day: dt.date, n_candidates: int = 8) -> dict:
    """A ranking request: the most active user of ``day``, that day's context of their first
    impression, and the day's most shown items as candidates."""
    import polars as pl

    from features.catalog import scan_validated

    impressions = scan_validated(warehouse, "impressions", day)
    user = (
        impressions.group_by("user_id")
        .len()
        .sort(["len", "user_id"], descending=[True, False])
        .first()
        .collect()["user_id"][0]
    )
    context_row = impressions.filter(pl.col("user_id") == user).sort("ts").first().collect()
    items = (
        impressions.group_by("item_id")
        .len()
        .sort(["len", "item_id"], descending=[True, False])
        .head(n_candidates)
        .collect()
    )
    context = {c: context_row[c][0] for c in ("device", "slot") if c in context_row.columns}
    return {"user_id": user, "context": context, "candidates": [{"item_id": i} for i in items["item_id"]]}


def gate_rule_line(cfg: FunnelConfig) -> str:
    """The promotion rule in force, in words."""
    rules = cfg.promote
    bounds = f" at {rules.confidence:.0%} one-sided confidence" if rules.rule != "point" else ""
    return f"promotion rule {rules.rule}{bounds}, tolerance {rules.auc_tolerance} on {', '.join(cfg.gate_metrics)}"


def print_rule_decisions(cfg: FunnelConfig, results: dict) -> None:
    """Per night evaluated against a champion: what each promotion rule decides on its
    evaluation (the same candidate and champion; the rule in force chose the champion of later nights)."""
    from pipeline.registry import rule_decisions

    evaluated = {
        day: night["evaluate"] for day, night in results.items() if (night.get("evaluate") or {}).get("champion")
    }
    if not evaluated:
        return
    print(f"\nthe promotion rules on each night's evaluation (in force: {cfg.promote.rule}):")
    for day, evaluation in evaluated.items():
        decisions = rule_decisions(evaluation, cfg)
        verdicts = ", ".join(f"{rule} {'promotes' if d.promote else 'refuses'}" for rule, d in decisions.items())
        changes = ", ".join(
            f"{m} {c.change:+.4f}" + (f" ± {c.se:.4f}" if c.se is not None else "")
            for m, c in decisions["point"].checks.items()
        )
        print(f"  {day}: {verdicts}  ({changes})")


def run_demo(cfg: FunnelConfig, warehouse: Path, nights: int = 3) -> None:
    from features.examples import mature_day
    from features.synthetic import generate_logs
    from models.tracking import tracking_uri
    from pipeline.compare import compare_runs, render
    from pipeline.nightly import run_nights
    from pipeline.registry import current_champion
    from serving.bundle import load_bundle_from_mlflow
    from serving.scorer import Scorer

    t0 = time.perf_counter()
    days = [cfg.generate.start_date + dt.timedelta(days=i) for i in range(cfg.generate.days)]
    if len(days) < nights + cfg.contract.maturity_lag_days + cfg.train.window_days - 1:
        raise ValueError(
            f"generate.days = {len(days)} is too few for {nights} nights of a {cfg.train.window_days}-day training "
            "window"
        )
    print(f"funnelrank demo: {len(days)} days of synthetic logs into {warehouse}")
    print(generate_logs(cfg, warehouse, progress=True).describe())

    first_night = days[-nights]
    print(f"\nbackfill {days[0]} .. {first_night - dt.timedelta(days=1)}: validate -> features -> examples")
    run_nights(cfg, warehouse, days[0], first_night - dt.timedelta(days=1), last="examples")
    print(f"\nnightly {first_night} .. {days[-1]}: every stage; {gate_rule_line(cfg)}")
    results = run_nights(cfg, warehouse, first_night, days[-1])
    print_rule_decisions(cfg, results)

    print()
    rows, where = compare_runs(cfg, last=nights)
    render(rows)
    print(f"trend report: {where}")

    newest = results[days[-1]]
    val_day = mature_day(cfg, days[-1])
    print(
        f"\nnewest model: click AUC {newest['evaluate']['candidate']['click_auc']:.4f} on {val_day} "
        f"(oracle {oracle_click_auc(warehouse, val_day):.4f}: the generator's noise-free click logit)"
    )

    if current_champion(cfg) is None:
        print("\nno model passed the promotion gate (see the promote lines above): no champion to rank with")
        return
    bundle = load_bundle_from_mlflow(
        f"models:/{cfg.promote.model_name}@champion", tracking_uri=tracking_uri(cfg.state_dir)
    )
    request = demo_request(warehouse, days[-1])
    print(
        f"\nchampion bundle {bundle.version} ranks {len(request['candidates'])} candidates for user "
        f"{request['user_id']} "
        f"(context {request['context']}):"
    )
    for rank, c in enumerate(Scorer(bundle).score(request), 1):
        predictions = "  ".join(f"{k} {v:.4g}" for k, v in c.items() if k not in ("item_id", "score"))
        print(f"  {rank}. {c['item_id']:>10s}  {predictions}  score {c['score']:.3e}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s")
    print(f"data under {warehouse}; runs in MLflow: mlflow ui --backend-store-uri {tracking_uri(cfg.state_dir)}")
