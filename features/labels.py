"""Labels derived from the validated logs: click, conversion and its value per impression.

``click`` = a click for the impression within ``click_window`` after it (both ends
included); ``conversion`` = a conversion within ``attribution_window`` after the
impression's FIRST qualifying click. Late events live in later days' partitions, so a
day's labels read the clicks of ``day .. day + ceil(click_window / 1 day)`` and the
conversions of ``day .. day + maturity_lag_days``. The two join helpers here are shared
with the point-in-time aggregates and the behaviour sequences (through ``day_activity``,
the events by the day they happen on), so features and labels count the same events.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features.catalog import (
    days_since_history_start,
    holds_data,
    partition_days,
    scan_validated,
    validated_dir,
    validated_root,
)
from features.config import DataConfig
from features.contract import DAILY_TABLES, day_start, day_str
from features.errors import DataContractError


def scan_events(warehouse: Path, table: str, day: dt.date) -> pl.LazyFrame:
    """A day's validated clicks or conversions as (impression_id, ts, value).

    ``value`` is optional in the contract: conversions without it are worth 0.
    """
    frame = scan_validated(warehouse, table, day)
    value = pl.col("value") if "value" in frame.collect_schema() else pl.lit(0.0)
    return frame.select("impression_id", "ts", value.cast(pl.Float64).fill_null(0.0).alias("value"))


def first_clicks(impressions: pl.LazyFrame, clicks: pl.LazyFrame, window: dt.timedelta) -> pl.LazyFrame:
    """One row per impression with a click in [ts, ts + window]: its columns + ``first_click``.

    ``impressions`` holds impression_id, ts and any columns to carry along (e.g. key columns).
    """
    qualifying = impressions.join(
        clicks.select("impression_id", pl.col("ts").alias("click_ts")), on="impression_id"
    ).filter(pl.col("click_ts").is_between(pl.col("ts"), pl.col("ts") + window, closed="both"))
    return qualifying.group_by("impression_id").agg(
        pl.col("click_ts").min().alias("first_click"), pl.exclude("impression_id", "click_ts").first()
    )


def attributed_conversions(clicked: pl.LazyFrame, conversions: pl.LazyFrame, window: dt.timedelta) -> pl.LazyFrame:
    """Conversion events in [first_click, first_click + window], with the clicked rows' columns."""
    return (
        conversions.select("impression_id", pl.col("ts").alias("conv_ts"), "value")
        .join(clicked, on="impression_id")
        .filter(pl.col("conv_ts").is_between(pl.col("first_click"), pl.col("first_click") + window, closed="both"))
    )


@dataclass(frozen=True)
class DayActivity:
    """What can hold an event on a day D, by the time the event happens: an impression shown
    on D, first clicked on D (``clicked.first_click``) or whose first attributed conversion
    is on D (``conversions.conv_ts``). Impressions of up to ``maturity_lag_days`` before D
    are read, as their clicks and conversions may fall on D."""

    impressions: pl.LazyFrame  # impression_id, ts, the carried columns; those late enough to have an event on D
    clicked: pl.LazyFrame  # first_clicks of them: one row per clicked impression
    conversions: pl.LazyFrame  # attributed_conversions of ``clicked``: conv_ts, value and its columns
    partitions: list[Path]  # the validated partitions read: per day, impressions, clicks, conversions


def activity_days(cfg: DataConfig, warehouse: Path, day: dt.date) -> list[dt.date]:
    """The days whose impressions can have an event on ``day``: ``day`` and the
    ``maturity_lag_days`` before it, those since history starts (a missing one after that raises)."""
    earlier = [day - dt.timedelta(days=n) for n in range(cfg.contract.maturity_lag_days, 0, -1)]
    imps_root = validated_root(warehouse, "impressions")
    return [*days_since_history_start(partition_days(imps_root), earlier, "validated impressions", imps_root), day]


def activity_partitions(warehouse: Path, days: list[dt.date]) -> list[Path]:
    """The validated partitions of ``days`` (``activity_days``) that ``day_activity`` reads."""
    return [validated_dir(warehouse, t, d) for d in days for t in DAILY_TABLES]


def day_activity(cfg: DataConfig, warehouse: Path, day: dt.date, carried: list[str]) -> DayActivity:
    """The impressions, first clicks and attributed conversions that can fall on ``day``,
    each row with the impression's ``carried`` columns."""
    days = activity_days(cfg, warehouse, day)
    # Only earlier impressions late enough to have a click or an attributed conversion on
    # ``day`` matter: that skips most of the earlier days before the join.
    earliest = day_start(day) - cfg.contract.click_window - cfg.contract.attribution_window
    impressions = pl.concat(
        [scan_validated(warehouse, "impressions", d).select("impression_id", "ts", *carried) for d in days]
    ).filter(pl.col("ts") >= earliest)
    clicks = pl.concat([scan_events(warehouse, "clicks", d) for d in days])
    conversions = pl.concat([scan_events(warehouse, "conversions", d) for d in days])
    clicked = first_clicks(impressions, clicks, cfg.contract.click_window)
    converted = attributed_conversions(clicked, conversions, cfg.contract.attribution_window)
    return DayActivity(impressions, clicked, converted, activity_partitions(warehouse, days))


def _scan_label_events(warehouse: Path, table: str, day: dt.date, lag_days: int, allow_immature: bool) -> pl.LazyFrame:
    """Events of ``day .. day + lag_days``; a missing later day means immature labels."""
    frames = [scan_events(warehouse, table, day)]
    for ahead in range(1, lag_days + 1):
        later = day + dt.timedelta(days=ahead)
        if holds_data(validated_dir(warehouse, table, later)):
            frames.append(scan_events(warehouse, table, later))
        elif not allow_immature:
            raise DataContractError(
                f"labels of {day_str(day)} are not mature: validated {table} for {day_str(later)} missing "
                f"in {validated_dir(warehouse, table, later)} (validate that day first, or pass allow_immature=True)"
            )
    return pl.concat(frames, how="vertical")


def build_labels(
    cfg: DataConfig,
    warehouse: Path,
    day: dt.date,
    allow_immature: bool = False,
    impressions: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """impression_id, click (Int8), conversion (Int8), conversion_value (Float64) for every
    validated impression of ``day``, in the impressions' order.

    Raises DataContractError naming the missing table/day when a later partition that can
    still hold this day's clicks or conversions is absent, unless ``allow_immature``.
    ``impressions``: the day's validated impressions when the caller has read them already.
    """
    contract = cfg.contract
    if impressions is None:
        impressions = scan_validated(warehouse, "impressions", day).select("impression_id", "ts").collect()
    clicks = _scan_label_events(warehouse, "clicks", day, contract.click_lag_days, allow_immature)
    conversions = _scan_label_events(warehouse, "conversions", day, contract.maturity_lag_days, allow_immature)

    # Only the few clicked rows are joined; their labels are then set by row position,
    # which spares two joins of every impression on its string id.
    rows = impressions.lazy().select("impression_id", "ts").with_row_index("row")
    clicked = first_clicks(rows, clicks, contract.click_window).select("impression_id", "row", "first_click")
    converted = (
        attributed_conversions(clicked, conversions, contract.attribution_window)
        .group_by("row")
        .agg(pl.col("value").sum())
    )
    clicked, converted = pl.collect_all([clicked.select("row"), converted])
    click, conversion, value = (
        np.zeros(impressions.height, np.int8),
        np.zeros(impressions.height, np.int8),
        np.zeros(impressions.height),
    )
    click[clicked["row"].to_numpy()] = 1
    conversion[converted["row"].to_numpy()] = 1
    value[converted["row"].to_numpy()] = converted["value"].to_numpy()
    return pl.DataFrame(
        {
            "impression_id": impressions["impression_id"],
            "click": click,
            "conversion": conversion,
            "conversion_value": value,
        }
    )
