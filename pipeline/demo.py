"""The README demo: synthetic logs through every stage that exists, end to end.

`make demo` runs this. It generates the config's days of synthetic logs, then runs the
nightly stages for each day in order, printing one line per stage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from features.config import DEFAULT_CONFIG, ConfigError, load_config
from features.errors import StageError


def run_demo(config_path: Path, warehouse: Path | None = None) -> int:
    from features.aggregates import build_daily_aggregates
    from features.examples import build_training_table
    from features.synthetic import generate_logs
    from features.validate import validate_day

    cfg = load_config(config_path)
    warehouse = warehouse or cfg.warehouse
    t0 = time.perf_counter()
    print(f"funnelrank demo: {cfg.generate.days} days of synthetic logs into {warehouse}")
    print(generate_logs(cfg, warehouse, progress=True).describe())

    days = [cfg.generate.start_date + dt.timedelta(days=i) for i in range(cfg.generate.days)]
    lag = dt.timedelta(days=cfg.contract.maturity_lag_days)
    for day in days:
        report = validate_day(cfg, warehouse, day)
        print(f"{day}  validate  {report.describe()}")
        aggregates = build_daily_aggregates(cfg, warehouse, day)
        print(f"{day}  features  {sum(aggregates['rows'].values()):,} key rows")
        if day - lag >= days[0]:
            manifest = build_training_table(cfg, warehouse, day)
            print(f"{day}  examples  {manifest['rows']['rows_out']:,} rows for mature day {manifest['date']}")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; data under {warehouse}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run config (TOML), default %(default)s")
    parser.add_argument("--warehouse", type=Path, default=None, help="data root; default: the config's `warehouse`")
    args = parser.parse_args(argv)
    try:
        return run_demo(args.config, args.warehouse)
    except ConfigError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"demo: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
