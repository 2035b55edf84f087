"""Throughput and peak memory of the `features` and `examples` stages.

    python -m benchmarks.bench_features                                   # 1M impressions/day, 28 days of history
    python -m benchmarks.bench_features --impressions 200000 --history-days 7
    python -m benchmarks.bench_features --warehouse /tmp/bench-wh          # keep the data there
    python -m benchmarks.bench_features --sequence-length 50               # + a click sequence of 50

Writes a synthetic warehouse of validated partitions directly (vectorised numpy/pyarrow,
shaped like the demo spec): ``--history-days`` days of N impressions behind the training
day L, day L + 1, plus the clicks/conversions of the days after them that their labels
wait for. Then, each in a fresh process (so peak RSS is per stage):

* features: ``build_daily_aggregates`` for every history day (impressions/s over all days);
* examples, first night: ``build_training_table`` for L (impressions/s of day L),
  vocabularies fresh, no rolling state yet: the states are recomputed from the history;
* examples, next night: ``features`` for L (untimed), then ``build_training_table`` for
  L + 1: the steady state, each key's rolling state advanced by one day.

``--sequence-length N`` adds a behaviour sequence to the spec (``clicked``: the user's last
N clicked items with their categories, features.sequences): the features stage then also
advances its per-user state each day, and the training table carries its list columns.

Each line shows wall seconds and the stage's CPU seconds (user + system, all threads):
on a busy machine the wall time grows, the CPU time much less. The last line times the
training table's own write once more on the rows just written: no examples stage can be
faster than that write, so it bounds the stage's impressions/s, and its CPU seconds show
how much of the machine's time it leaves to everything else at a given rate.

Targets on the 2-core dev machine: features >= 2M impressions/s, examples >= 1M
impressions/s, peak RSS < 4 GiB per stage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks.common import in_child, peak_rss_mib
from features.catalog import validated_dir
from features.contract import TS
from features.io import write_parquet_dir
from pipeline.config import DEFAULT_CONFIG, FunnelConfig, load_config

START = dt.date(2026, 1, 1)
US_PER_DAY = 86_400_000_000
CTR, CVR = 0.04, 0.10


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


def _snapshots(n_users: int, n_items: int, rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
    interest_len = rng.integers(0, 4, n_users)
    interests = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(interest_len)]), pa.int32()),
        _ids("cat", rng.integers(0, 40, interest_len.sum())),
    )
    users = pa.table({
        "user_id": _ids("u", np.arange(n_users)),
        "age_bucket": pa.array(["18-24", "25-34", "35-44", "45-54", "55+"]).take(rng.integers(0, 5, n_users)),
        "gender": pa.array(["f", "m", "u"]).take(rng.integers(0, 3, n_users)),
        "city": _ids("city", rng.integers(0, 60, n_users)),
        "interests": interests,
    })  # fmt: skip
    items = pa.table({
        "item_id": _ids("i", np.arange(n_items)),
        "category_id": _ids("cat", rng.integers(0, 40, n_items)),
        "brand_id": _ids("b", rng.integers(0, 300, n_items)),
        "shop_id": _ids("s", rng.integers(0, 600, n_items)),
        "price": rng.lognormal(3.0, 1.0, n_items),
    })  # fmt: skip
    return users, items


def _events(
    ids: pa.Array, ts_us: np.ndarray, day_start_us: int, value: np.ndarray | None = None
) -> dict[int, pa.Table]:
    """Split events by their own UTC day (0 = this day, 1 = the next)."""
    out = {}
    offset = (ts_us - day_start_us) // US_PER_DAY
    for ahead in np.unique(offset):
        mask = offset == ahead
        cols = {"impression_id": ids.filter(pa.array(mask)), "ts": pa.array(ts_us[mask], TS)}
        if value is not None:
            cols["value"] = pa.array(value[mask])
        out[int(ahead)] = pa.table(cols)
    return out


def write_warehouse(warehouse: Path, n: int, history_days: int, lag: int, seed: int) -> dt.date:
    """Validated partitions for history_days + 2 days of n impressions; returns the first training day."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(1_000, n // 10), max(500, n // 50)
    users, items = _snapshots(n_users, n_items, rng)
    day_l = START + dt.timedelta(days=history_days)
    pending: dict[tuple[str, dt.date], list[pa.Table]] = {}
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    for d in range(history_days + 2 + lag):
        day = START + dt.timedelta(days=d)
        start_us = int((dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC) - epoch).total_seconds()) * 1_000_000
        write_parquet_dir(validated_dir(warehouse, "users", day), users)
        write_parquet_dir(validated_dir(warehouse, "items", day), items)
        if d <= history_days + 1:
            ts = np.sort(start_us + rng.integers(0, US_PER_DAY, n))
            imp_ids = _ids(f"{day.isoformat()}-", np.arange(n))
            imps = pa.table({
                "impression_id": imp_ids,
                "ts": pa.array(ts, TS),
                "user_id": _ids("u", (n_users * rng.random(n) ** 2).astype(np.int64)),  # skewed activity
                "item_id": _ids("i", (n_items * rng.random(n) ** 3).astype(np.int64)),  # skewed popularity
                "device": pa.array(["ios", "android", "web"]).take(rng.integers(0, 3, n)),
                "slot": pa.array(rng.integers(0, 10, n)),
            })  # fmt: skip
            write_parquet_dir(validated_dir(warehouse, "impressions", day), imps)
            clicked = np.flatnonzero(rng.random(n) < CTR)
            click_ts = ts[clicked] + rng.integers(1_000_000, 20 * 60_000_000, len(clicked))
            converted = rng.random(len(clicked)) < CVR
            conv_ts = click_ts[converted] + rng.integers(60_000_000, 20 * 3_600_000_000, converted.sum())
            click_ids = imp_ids.take(pa.array(clicked))
            for ahead, t in _events(click_ids, click_ts, start_us).items():
                pending.setdefault(("clicks", day + dt.timedelta(days=ahead)), []).append(t)
            values = rng.lognormal(3.0, 1.0, converted.sum())
            for ahead, t in _events(click_ids.filter(pa.array(converted)), conv_ts, start_us, values).items():
                pending.setdefault(("conversions", day + dt.timedelta(days=ahead)), []).append(t)
        for table in ("clicks", "conversions"):
            parts = pending.pop((table, day), [])
            write_parquet_dir(validated_dir(warehouse, table, day), pa.concat_tables(parts) if parts else _empty(table))
    return day_l


def _empty(table: str) -> pa.Table:
    fields = [("impression_id", pa.string()), ("ts", TS)] + (
        [("value", pa.float64())] if table == "conversions" else []
    )
    return pa.schema(fields).empty_table()


def _stage_features(cfg: FunnelConfig, warehouse: Path, days: list[dt.date], out: mp.Queue) -> None:
    from features.daily_counters import build_daily_aggregates

    started = time.perf_counter()
    phases: dict[str, float] = {}
    for day in days:
        for phase, secs in build_daily_aggregates(cfg, warehouse, day)["timings_s"].items():
            phases[phase] = phases.get(phase, 0.0) + secs
    seconds = time.perf_counter() - started
    out.put((seconds, _cpu_seconds(), peak_rss_mib(), {k: round(v, 2) for k, v in phases.items()}))


def _stage_examples(cfg: FunnelConfig, warehouse: Path, run_date: dt.date, out: mp.Queue) -> None:
    import polars as pl

    from features.catalog import DATA_FILE, training_dir
    from features.examples import build_training_table, write_training_file

    started = time.perf_counter()
    manifest = build_training_table(cfg, warehouse, run_date)
    seconds, cpu, rss = time.perf_counter() - started, _cpu_seconds(), peak_rss_mib()
    # The table's own write, repeated on its rows: what the stage costs at the least, however
    # fast everything before the write.
    frame = pl.read_parquet(training_dir(warehouse, dt.date.fromisoformat(manifest["date"])) / DATA_FILE)
    scratch = Path(tempfile.mkdtemp(prefix="write-alone-", dir=warehouse))
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    write_training_file(frame, scratch / DATA_FILE)
    write_alone = (time.perf_counter() - started, _cpu_seconds() - cpu_started)
    shutil.rmtree(scratch)
    out.put((seconds, cpu, rss, manifest["timings_s"], write_alone))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--impressions", type=int, default=1_000_000, help="impressions per day (default %(default)s)")
    parser.add_argument(
        "--history-days", type=int, default=28, help="days of history behind the training day (default %(default)s)"
    )
    parser.add_argument(
        "--warehouse", type=Path, default=None, help="keep the data here (default: a temp dir, removed)"
    )
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=0,
        help="add a click sequence of this many items and their categories (default: none)",
    )
    args = parser.parse_args(argv)

    warehouse = args.warehouse or Path(tempfile.mkdtemp(prefix="bench-features-"))
    overrides: dict = {"warehouse": str(warehouse)}
    if args.sequence_length:
        overrides["features"] = {
            "sequences": [{"name": "clicked", "items": ["item_id", "category_id"], "max_length": args.sequence_length}]
        }
    cfg = load_config(args.config, overrides)
    lag = cfg.contract.maturity_lag_days
    try:
        t = time.perf_counter()
        day_l = write_warehouse(warehouse, args.impressions, args.history_days, lag, cfg.seed)
        print(
            f"wrote {args.history_days + 2} days x {args.impressions:,} impressions in {time.perf_counter() - t:.1f} s"
        )

        print(f"load average before the stages: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        history = [START + dt.timedelta(days=d) for d in range(args.history_days)]
        secs, cpu, rss, phases = in_child(_stage_features, cfg, warehouse, history)
        n_hist = args.impressions * len(history)
        print(
            f"features: {n_hist:,} impressions ({len(history)} days) in {secs:.2f} s (CPU {cpu:.1f} s) = "
            f"{n_hist / secs:,.0f} impressions/s, peak RSS {rss:,.0f} MiB"
        )
        print(f"features phases over all days (s): {phases}")

        for night, day in (("first night", day_l), ("next night", day_l + dt.timedelta(days=1))):
            if day > day_l:
                in_child(_stage_features, cfg, warehouse, [day - dt.timedelta(days=1)])
            secs, cpu, rss, timings, write_alone = in_child(
                _stage_examples, cfg, warehouse, day + dt.timedelta(days=lag)
            )
            print(
                f"examples, {night}: {args.impressions:,} impressions in {secs:.2f} s (CPU {cpu:.1f} s) = "
                f"{args.impressions / secs:,.0f} impressions/s, peak RSS {rss:,.0f} MiB"
            )
            print(f"examples phases, {night} (s): {timings}")
        (write_s, write_cpu), cores = write_alone, os.cpu_count()
        print(
            f"writing the table alone, once more: {write_s:.2f} s (CPU {write_cpu:.2f} s) = a ceiling of "
            f"{args.impressions / write_s:,.0f} "
            "impressions/s for the stage; at 1M impressions/s the write alone takes "
            f"{write_cpu * 1e6 / args.impressions / cores:.0%} of "
            f"the {cores} cores' time"
        )
        print(f"load average after the stages: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if args.warehouse is None:
            shutil.rmtree(warehouse, ignore_errors=True)


if __name__ == "__main__":
    main()
