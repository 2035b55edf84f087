"""The README demo: synthetic logs through every stage that exists, end to end.

`make demo` runs this as `funnelrank demo`: it generates the config's days of
synthetic logs, runs validate -> features -> examples for each day in order, trains
the multi-task model on the newest window of mature days, and compares its validation
click AUC with the oracle AUC that the generator's true probabilities reach.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from features.config import FunnelConfig


def oracle_click_auc(warehouse: Path, day: dt.date) -> float:
    """Click AUC on ``day``'s training rows of the generator's noise-free click logit:
    the ceiling for a model that sees every feature."""
    import polars as pl

    from features.contract import truth_dir
    from features.examples import training_dir
    from models.metrics import auc

    rows = pl.scan_parquet(training_dir(warehouse, day) / "*.parquet").select("impression_id", "click")
    truth = pl.scan_parquet(truth_dir(warehouse, day) / "*.parquet").select("impression_id", "click_logit_observable")
    joined = rows.join(truth, on="impression_id").collect()
    return auc(joined["click"].to_numpy(), joined["click_logit_observable"].to_numpy())


def run_demo(cfg: FunnelConfig, warehouse: Path) -> None:
    from features.aggregates import build_daily_aggregates
    from features.examples import build_training_table
    from features.synthetic import generate_logs
    from features.validate import validate_day
    from models.tracking import tracking_uri
    from models.train import train_model

    t0 = time.perf_counter()
    print(f"funnelrank demo: {cfg.generate.days} days of synthetic logs into {warehouse}")
    print(generate_logs(cfg, warehouse, progress=True).describe())

    days = [cfg.generate.start_date + dt.timedelta(days=i) for i in range(cfg.generate.days)]
    lag = dt.timedelta(days=cfg.contract.maturity_lag_days)
    for day in days:
        step = time.perf_counter()
        report = validate_day(cfg, warehouse, day)
        aggregates = build_daily_aggregates(cfg, warehouse, day)
        line = f"{day}  validate {'ok' if report.passed else 'FAILED'} ({sum(t.quarantined_rows for t in report.tables.values()):,} quarantined)"
        line += f"  features {sum(aggregates['rows'].values()):,} key rows"
        if day - lag >= days[0]:
            manifest = build_training_table(cfg, warehouse, day)
            line += f"  examples {manifest['rows']['rows_out']:,} rows of {manifest['date']}"
        print(f"{line}  [{time.perf_counter() - step:.1f} s]")

    result = train_model(cfg, warehouse, days[-1], progress=True)
    val_day = days[-1] - lag
    m = result.val_metrics
    print(f"trained {cfg.model.backbone} / {cfg.model.conversion_head}: {result.epochs_run} epochs, validated on {val_day}")
    print(f"  click AUC {m['click_auc']:.4f} (oracle {oracle_click_auc(warehouse, val_day):.4f})  GAUC {m['click_gauc']:.4f}"
          f"  CVR AUC {m['cvr_auc']:.4f}  CTCVR AUC {m['ctcvr_auc']:.4f}")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    print(f"data under {warehouse}; runs in MLflow: mlflow ui --backend-store-uri {tracking_uri(cfg.state_dir)}")
