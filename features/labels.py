"""Labels derived from the validated logs: click, conversion and its value per impression.

``click`` = a click for the impression within ``click_window`` after it (both ends
included); ``conversion`` = a conversion within ``attribution_window`` after the
impression's FIRST qualifying click. Late events live in later days' partitions, so a
day's labels read the clicks of ``day .. day + ceil(click_window / 1 day)`` and the
conversions of ``day .. day + maturity_lag_days``. The two join helpers here are shared
with the point-in-time aggregates, so features and labels count the same events.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl

from features.catalog import holds_data, scan_validated, validated_dir
from features.config import DataConfig
from features.contract import day_str
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
    return conversions.select("impression_id", pl.col("ts").alias("conv_ts"), "value").join(
        clicked, on="impression_id"
    ).filter(pl.col("conv_ts").is_between(pl.col("first_click"), pl.col("first_click") + window, closed="both"))


def _scan_label_events(
    warehouse: Path, table: str, day: dt.date, lag_days: int, allow_immature: bool
) -> pl.LazyFrame:
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
    cfg: DataConfig, warehouse: Path, day: dt.date, allow_immature: bool = False, impressions: pl.DataFrame | None = None
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
    converted = attributed_conversions(clicked, conversions, contract.attribution_window).group_by("row").agg(pl.col("value").sum())
    clicked, converted = pl.collect_all([clicked.select("row"), converted])
    click, conversion, value = np.zeros(impressions.height, np.int8), np.zeros(impressions.height, np.int8), np.zeros(impressions.height)
    click[clicked["row"].to_numpy()] = 1
    conversion[converted["row"].to_numpy()] = 1
    value[converted["row"].to_numpy()] = converted["value"].to_numpy()
    return pl.DataFrame({"impression_id": impressions["impression_id"], "click": click, "conversion": conversion, "conversion_value": value})
