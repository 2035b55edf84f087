"""Point-in-time aggregates: daily counters per aggregate key, rolled over previous days.

Point-in-time rule: the dense features of a row on day X use only events that happened
on days strictly before X. Each day's counters are therefore kept by EVENT time:

* ``imps``: impressions whose ts is on D;
* ``clicks``: impressions whose first qualifying click (see features.labels) is on D;
* ``convs``: clicked impressions whose first attributed conversion is on D, and
  ``conv_value``: the value of the attributed conversions on D.

Summed over all days these equal the sums of the ``click``, ``conversion`` and
``conversion_value`` labels, so features and labels count the same events. A click or
conversion on D belongs to an impression of up to ``maturity_lag_days`` earlier, whose
partitions are read to attribute it to the impression's key (user, item, user x category,
...). Key columns are looked up on the impression, else in the users / items snapshot
accepted on D.

Layout: ``<warehouse>/features/daily/<key name>/date=D/part-0.parquet``.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
import polars as pl

from features.config import AGGREGATE_METRICS, AggregateKey, FunnelConfig
from features.contract import SNAPSHOT_TABLES, day_str, scan_validated, validated_dir
from features.errors import DataContractError
from features.io import write_parquet_dir
from features.labels import attributed_conversions, attribution_window, click_window, first_clicks, scan_events

COUNTS = ("imps", "clicks", "convs")
SNAPSHOT_JOIN_KEY = {"users": "user_id", "items": "item_id"}


def daily_root(warehouse: Path, key_name: str) -> Path:
    return Path(warehouse) / "features" / "daily" / key_name


def daily_dir(warehouse: Path, key_name: str, day: dt.date) -> Path:
    return daily_root(warehouse, key_name) / f"date={day_str(day)}"


def partition_days(root: Path) -> set[dt.date]:
    """Days of the ``date=YYYY-MM-DD`` folders under ``root`` that hold Parquet files
    (half-written ``.tmp-`` folders are not partitions)."""
    if not root.is_dir():
        return set()
    return {
        dt.date.fromisoformat(p.name.removeprefix("date="))
        for p in root.iterdir()
        if p.name.startswith("date=") and any(p.glob("*.parquet"))
    }


def days_since_history_start(existing: set[dt.date], wanted: list[dt.date], what: str, root: Path) -> list[dt.date]:
    """The ``wanted`` days on or after the first existing day, all of which must exist.

    Days before history starts hold no events; a missing day after it is a gap (a stage
    did not run), which would silently turn into zeros, so it raises, naming the day.
    """
    if not existing:
        return []
    start = min(existing)
    days = sorted(d for d in wanted if d >= start)
    missing = [d for d in days if d not in existing]
    if missing:
        raise DataContractError(
            f"{what} for {day_str(missing[0])} missing in {root} while history starts on {day_str(start)}: "
            f"a stage did not run for that day"
        )
    return days


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


def _in_day(col: pl.Expr, day: dt.date) -> pl.Expr:
    return col.is_between(_day_start(day), _day_start(day + dt.timedelta(days=1)), closed="left")


def _key_column_sources(cfg: FunnelConfig, warehouse: Path, day: dt.date) -> dict[str, str]:
    """Where each aggregate-key column comes from: "impressions", "users" or "items"."""
    schemas = {"impressions": scan_validated(warehouse, "impressions", day).collect_schema()}
    sources: dict[str, str] = {}
    for key in cfg.features.aggregate_keys:
        for col in key.columns:
            for table in ("impressions", *SNAPSHOT_TABLES):
                if table not in schemas:
                    schemas[table] = scan_validated(warehouse, table, day).collect_schema()
                if col in schemas[table]:
                    sources[col] = table
                    break
            else:
                raise DataContractError(
                    f"aggregate key {key.name!r}: column {col!r} is in none of the validated "
                    f"impressions, users, items of {day_str(day)}"
                )
    return sources


def daily_events(cfg: FunnelConfig, warehouse: Path, day: dt.date) -> tuple[pl.LazyFrame, list[str]]:
    """Rows of activity on ``day`` (an impression shown, first clicked or converting that
    day): key columns + imps, clicks, convs, conv_value; and the partitions it reads."""
    sources = _key_column_sources(cfg, warehouse, day)
    carried = list(dict.fromkeys(
        [c for c, t in sources.items() if t == "impressions"]
        + [SNAPSHOT_JOIN_KEY[t] for t in sources.values() if t != "impressions"]
    ))
    lag = cfg.contract.maturity_lag_days
    earlier = [day - dt.timedelta(days=n) for n in range(lag, 0, -1)]
    imps_root = validated_dir(warehouse, "impressions", day).parent
    days = [*days_since_history_start(partition_days(imps_root), earlier, "validated impressions", imps_root), day]

    # Only earlier impressions late enough to have a click or an attributed conversion on
    # ``day`` matter: that skips most of the earlier days before the join.
    earliest = _day_start(day) - click_window(cfg.contract) - attribution_window(cfg.contract)
    impressions = pl.concat(
        [scan_validated(warehouse, "impressions", d).select("impression_id", "ts", *carried) for d in days]
    ).filter(pl.col("ts") >= earliest)
    clicks = pl.concat([scan_events(warehouse, "clicks", d) for d in days])
    conversions = pl.concat([scan_events(warehouse, "conversions", d) for d in days])
    inputs = [str(validated_dir(warehouse, t, d)) for d in days for t in ("impressions", "clicks", "conversions")]

    clicked = first_clicks(impressions, clicks, click_window(cfg.contract))
    conv_ts = pl.col("conv_ts")
    converted = (
        attributed_conversions(clicked, conversions, attribution_window(cfg.contract))
        .group_by("impression_id")
        .agg(
            _in_day(conv_ts.min(), day).cast(pl.Int64).alias("convs"),
            pl.col("value").filter(_in_day(conv_ts, day)).sum().alias("conv_value"),
            _in_day(conv_ts, day).any().alias("active"),
            *[pl.col(c).first() for c in carried],
        )
        .filter("active")
        .drop("active")
    )
    events = pl.concat(
        [
            impressions.filter(_in_day(pl.col("ts"), day)).select(*carried, pl.lit(1, pl.Int64).alias("imps")),
            clicked.filter(_in_day(pl.col("first_click"), day)).select(*carried, pl.lit(1, pl.Int64).alias("clicks")),
            converted.select(*carried, "convs", "conv_value"),
        ],
        how="diagonal",
    ).with_columns(pl.col(*COUNTS).fill_null(0), pl.col("conv_value").fill_null(0.0))

    for table in SNAPSHOT_TABLES:
        attrs = [c for c, t in sources.items() if t == table]
        if attrs:
            on = SNAPSHOT_JOIN_KEY[table]
            events = events.join(scan_validated(warehouse, table, day).select(on, *attrs), on=on, how="left")
            inputs.append(str(validated_dir(warehouse, table, day)))
    return events, inputs


def build_daily_aggregates(cfg: FunnelConfig, warehouse: Path, day: dt.date) -> dict:
    """Write each aggregate key's counters of ``day`` (key columns + imps, clicks, convs
    as Int64, conv_value as Float64, sorted by key) atomically; return a manifest."""
    started = time.perf_counter()
    events, inputs = daily_events(cfg, warehouse, day)
    events = events.collect()
    manifest: dict = {"date": day_str(day), "impressions": int(events["imps"].sum()), "inputs": inputs, "rows": {}, "outputs": {}}
    for key in cfg.features.aggregate_keys:
        counters = (
            events.group_by(key.columns)
            .agg(pl.col(*COUNTS).sum().cast(pl.Int64), pl.col("conv_value").sum().cast(pl.Float64))
            .sort(key.columns, nulls_last=True)
        )
        target = write_parquet_dir(daily_dir(warehouse, key.name, day), counters.to_arrow())
        manifest["rows"][key.name] = counters.height
        manifest["outputs"][key.name] = str(target)
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    return manifest


# --- rolling point-in-time features -------------------------------------------------------


def _count_name(metric: str, w: int) -> str:
    return f"_{metric}_{w}"


def _history(cfg: FunnelConfig, warehouse: Path, key: AggregateKey, day: dt.date) -> pl.LazyFrame:
    """The key's daily counters of days [day - max window, day - 1] with ``age`` = day - d."""
    root = daily_root(warehouse, key.name)
    existing = partition_days(root)
    if not existing:
        raise DataContractError(f"no daily aggregates for key {key.name!r} in {root}: run `funnelrank features` first")
    wanted = [day - dt.timedelta(days=n) for n in range(1, max(cfg.features.windows_days) + 1)]
    days = days_since_history_start(existing, wanted, f"daily aggregates of key {key.name!r}", root)
    frames = [
        pl.scan_parquet(daily_dir(warehouse, key.name, d) / "*.parquet").with_columns(
            pl.lit((day - d).days, pl.Int32).alias("age")
        )
        for d in days
    ]
    if not frames:  # before history: no events, but the key columns keep their types
        schema_only = pl.scan_parquet(daily_dir(warehouse, key.name, min(existing)) / "*.parquet").head(0)
        frames = [schema_only.with_columns(pl.lit(0, pl.Int32).alias("age"))]
    return pl.concat(frames)


def _window_counts(windows: list[int]) -> list[pl.Expr]:
    return [
        pl.col(metric).filter(pl.col("age") <= w).sum().alias(_count_name(metric, w))
        for w in windows
        for metric in COUNTS
    ]


def _global_rates(history: pl.LazyFrame, windows: list[int]) -> dict[int, tuple[float, float]]:
    """Per window: (clicks / imps, convs / clicks) over all keys; 0 when there is no event."""
    totals = history.select(_window_counts(windows)).collect().row(0, named=True)
    rates = {}
    for w in windows:
        imps, clicks, convs = (totals[_count_name(m, w)] or 0 for m in COUNTS)
        rates[w] = (clicks / imps if imps else 0.0, convs / clicks if clicks else 0.0)
    return rates


def _smoothed(events: pl.Expr, base: pl.Expr, prior: float, global_rate: float) -> pl.Expr:
    """(events + prior * global_rate) / (base + prior); the global rate when that is 0 / 0."""
    denominator = base + prior
    return pl.when(denominator > 0).then((events + prior * global_rate) / denominator).otherwise(global_rate)


def _key_features(cfg: FunnelConfig, warehouse: Path, key: AggregateKey, day: dt.date) -> tuple[pl.LazyFrame, dict[str, float]]:
    windows, prior = cfg.features.windows_days, cfg.features.prior_strength
    history = _history(cfg, warehouse, key, day)
    rates = _global_rates(history, windows)
    features: list[pl.Expr] = []
    defaults: dict[str, float] = {}
    for w in windows:
        imps, clicks, convs = (pl.col(_count_name(m, w)) for m in COUNTS)
        ctr, cvr = rates[w]
        features += [
            imps.log1p(), clicks.log1p(), convs.log1p(),
            _smoothed(clicks, imps, prior, ctr), _smoothed(convs, clicks, prior, cvr),
        ]
        # The same arithmetic at zero counts, rounded to Float32 like the features.
        no_history = [0.0, 0.0, 0.0, (prior * ctr) / prior if prior > 0 else ctr, (prior * cvr) / prior if prior > 0 else cvr]
        defaults.update(zip(_feature_names(key, w), (float(np.float32(v)) for v in no_history), strict=True))
    names = [n for w in windows for n in _feature_names(key, w)]
    frame = history.group_by(key.columns).agg(_window_counts(windows)).select(
        *key.columns, *[f.cast(pl.Float32).alias(n) for f, n in zip(features, names, strict=True)]
    )
    return frame, defaults


def _feature_names(key: AggregateKey, w: int) -> list[str]:
    # Same order as FeaturesConfig.dense_names (AGGREGATE_METRICS).
    return [f"{key.name}_{metric}_{w}d" for metric in AGGREGATE_METRICS]


def rolling_features(cfg: FunnelConfig, warehouse: Path, day: dt.date) -> dict[str, pl.LazyFrame]:
    """Per aggregate key, the features as of the START of ``day``: key columns + the key's
    ``dense_names`` (Float32), one row per key value seen in the longest window.

    Window w covers the daily counters of days [day - w, day - 1]; counts are log1p'd,
    rates smoothed toward the window's global rate with ``prior_strength``.
    """
    return {key.name: _key_features(cfg, warehouse, key, day)[0] for key in cfg.features.aggregate_keys}


def rolling_defaults(cfg: FunnelConfig, warehouse: Path, day: dt.date) -> dict[str, dict[str, float]]:
    """Per aggregate key, the value of each feature for a key value with no history
    (log1p(0) = 0 counts, the global rates): what a joiner fills missing rows with."""
    return {key.name: _key_features(cfg, warehouse, key, day)[1] for key in cfg.features.aggregate_keys}


def attach_rolling_features(
    rows: pl.LazyFrame, cfg: FunnelConfig, frames: dict[str, pl.LazyFrame], defaults: dict[str, dict[str, float]]
) -> pl.LazyFrame:
    """Left-join each key's rolling features onto ``rows`` (which must hold the key
    columns), keeping row order; rows without history get the defaults."""
    for key in cfg.features.aggregate_keys:
        rows = rows.join(frames[key.name], on=key.columns, how="left", maintain_order="left").with_columns(
            pl.col(name).fill_null(pl.lit(value, pl.Float32)) for name, value in defaults[key.name].items()
        )
    return rows
