"""Rolling point-in-time features: an aggregate key's daily counters of the days before a
row's day, summed over each window and turned into the features the row sees.

Window w covers the daily counters (features.daily_counters) of days [X - w, X - 1] for a
row of day X. Per window the features are the log1p'd imps, clicks and convs counts and the
click and conversion rates smoothed toward the window's global rate (over all keys) with
``features.prior_strength``; a key value with no history gets the same arithmetic at zero
counts (``rolling_defaults``).

The window sums, the global rates and the feature columns here are shared by both ways the
features are computed: the persisted rolling states of the ``examples`` stage
(features.rolling_state, keyed by key hash) and ``rolling_features``, one table per key
keyed by the key columns' values (what a serving bundle ships, and what the tests check the
states against).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl

from features.catalog import (
    daily_dir,
    daily_root,
    days_since_history_start,
    partition_days,
)
from features.config import AggregateKey, DataConfig
from features.daily_counters import COUNTS
from features.errors import DataContractError
from serving.spec import aggregate_feature_names


def count_column(metric: str, w: int) -> str:
    """The column of ``metric``'s count over window ``w`` (``_imps_7``)."""
    return f"_{metric}_{w}"


def window_days(day: dt.date, longest: int) -> list[dt.date]:
    """The days [day - longest, day - 1], newest first."""
    return [day - dt.timedelta(days=n) for n in range(1, longest + 1)]


def history_days(warehouse: Path, key: AggregateKey, day: dt.date, longest: int) -> tuple[list[dt.date], set[dt.date]]:
    """The days of [day - longest, day - 1] on or after the key's first daily partition (all
    of which must be there: ``days_since_history_start``), and every day with one."""
    root = daily_root(warehouse, key.name)
    existing = partition_days(root)
    if not existing:
        raise DataContractError(f"no daily aggregates for key {key.name!r} in {root}: run `funnelrank features` first")
    days = days_since_history_start(existing, window_days(day, longest), f"daily aggregates of key {key.name!r}", root)
    return days, existing


def _history(cfg: DataConfig, warehouse: Path, key: AggregateKey, day: dt.date) -> pl.LazyFrame:
    """The key's daily counts (key columns, imps, clicks, convs) of days [day - max window,
    day - 1] with ``age`` = day - d."""
    days, existing = history_days(warehouse, key, day, max(cfg.features.windows_days))
    frames = [
        pl.scan_parquet(daily_dir(warehouse, key.name, d) / "*.parquet").select(
            *key.columns, *COUNTS, pl.lit((day - d).days, pl.Int32).alias("age")
        )
        for d in days
    ]
    if not frames:  # before history: no events, but the key columns keep their types
        schema_only = pl.scan_parquet(daily_dir(warehouse, key.name, min(existing)) / "*.parquet").head(0)
        frames = [schema_only.select(*key.columns, *COUNTS, pl.lit(0, pl.Int32).alias("age"))]
    return pl.concat(frames)


def window_counts(windows: list[int]) -> list[pl.Expr]:
    """Aggregations summing each metric over each window of rows with an ``age`` (days
    before the features' day), named by ``count_column``."""
    # Masked columns summed plainly: much faster in a group-by than a filter per window.
    return [
        pl.when(pl.col("age") <= w).then(pl.col(metric)).otherwise(0).sum().alias(count_column(metric, w))
        for w in windows
        for metric in COUNTS
    ]


def global_rates(totals: dict[str, int | None], windows: list[int]) -> dict[int, tuple[float, float]]:
    """Per window: (clicks / imps, convs / clicks) over all keys; 0 when there is no event."""
    rates = {}
    for w in windows:
        imps, clicks, convs = (totals[count_column(m, w)] or 0 for m in COUNTS)
        rates[w] = (clicks / imps if imps else 0.0, convs / clicks if clicks else 0.0)
    return rates


def _smoothed(events: pl.Expr, base: pl.Expr, prior: float, global_rate: float) -> pl.Expr:
    """(events + prior * global_rate) / (base + prior); the global rate when that is 0 / 0."""
    denominator = base + prior
    return pl.when(denominator > 0).then((events + prior * global_rate) / denominator).otherwise(global_rate)


def _defaults(cfg: DataConfig, key: AggregateKey, rates: dict[int, tuple[float, float]]) -> dict[str, float]:
    """The features at zero counts: the same arithmetic, rounded to Float32 like the features."""
    prior = cfg.features.prior_strength
    defaults: dict[str, float] = {}
    for w in cfg.features.windows_days:
        ctr, cvr = rates[w]
        no_history = [
            0.0, 0.0, 0.0, (prior * ctr) / prior if prior > 0 else ctr, (prior * cvr) / prior if prior > 0 else cvr,
        ]  # fmt: skip
        no_history_f32 = (float(np.float32(v)) for v in no_history)
        defaults.update(zip(aggregate_feature_names(key.name, [w]), no_history_f32, strict=True))
    return defaults


def _features_from_counts(
    cfg: DataConfig, key: AggregateKey, counts: pl.DataFrame, rates: dict[int, tuple[float, float]]
) -> pl.DataFrame:
    """Key columns + the key's dense features from its per-window counts."""
    return counts.select(*key.columns, *feature_columns(cfg, key, rates))


def feature_columns(cfg: DataConfig, key: AggregateKey, rates: dict[int, tuple[float, float]]) -> list[pl.Expr]:
    """The key's dense features (Float32) from the per-window count columns."""
    prior = cfg.features.prior_strength
    features: list[pl.Expr] = []
    for w in cfg.features.windows_days:
        imps, clicks, convs = (pl.col(count_column(m, w)) for m in COUNTS)
        ctr, cvr = rates[w]
        features += [
            imps.log1p(), clicks.log1p(), convs.log1p(),
            _smoothed(clicks, imps, prior, ctr), _smoothed(convs, clicks, prior, cvr),
        ]  # fmt: skip
    names = aggregate_feature_names(key.name, cfg.features.windows_days)
    return [f.cast(pl.Float32).alias(n) for f, n in zip(features, names, strict=True)]


def rolled_features(
    cfg: DataConfig, warehouse: Path, day: dt.date
) -> tuple[dict[str, pl.LazyFrame], dict[str, dict[str, float]]]:
    """``rolling_features`` and ``rolling_defaults`` of every aggregate key in one pass
    over each key's history."""
    windows = cfg.features.windows_days
    frames: dict[str, pl.LazyFrame] = {}
    defaults: dict[str, dict[str, float]] = {}
    for key in cfg.features.aggregate_keys:
        history = _history(cfg, warehouse, key, day)
        totals, counts = pl.collect_all(
            [history.select(window_counts(windows)), history.group_by(key.columns).agg(window_counts(windows))]
        )
        rates = global_rates(totals.row(0, named=True), windows)
        frames[key.name] = _features_from_counts(cfg, key, counts, rates).lazy()
        defaults[key.name] = _defaults(cfg, key, rates)
    return frames, defaults


def rolling_features(cfg: DataConfig, warehouse: Path, day: dt.date) -> dict[str, pl.LazyFrame]:
    """Per aggregate key, the features as of the START of ``day``: key columns + the key's
    ``dense_names`` (Float32), one row per key value seen in the longest window.

    Window w covers the daily counters of days [day - w, day - 1]; counts are log1p'd,
    rates smoothed toward the window's global rate with ``prior_strength``.
    """
    return rolled_features(cfg, warehouse, day)[0]


def rolling_defaults(cfg: DataConfig, warehouse: Path, day: dt.date) -> dict[str, dict[str, float]]:
    """Per aggregate key, the value of each feature for a key value with no history
    (log1p(0) = 0 counts, the global rates): what a joiner fills missing rows with."""
    windows = cfg.features.windows_days
    defaults = {}
    for key in cfg.features.aggregate_keys:
        totals = _history(cfg, warehouse, key, day).select(window_counts(windows)).collect()
        defaults[key.name] = _defaults(cfg, key, global_rates(totals.row(0, named=True), windows))
    return defaults
