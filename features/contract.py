"""Raw data contract v1: the tables, the columns each must hold, and how a row's day is told.

Where each table lives under the warehouse: features.catalog.
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

from features.config import FeaturesConfig

TS = pa.timestamp("us", tz="UTC")

DAILY_TABLES = ("impressions", "clicks", "conversions")
SNAPSHOT_TABLES = ("users", "items")

# Required columns and their Arrow types. Context and attribute columns come from the
# feature spec (FeaturesConfig.columns_of): present, and of a type their features read
# (ids: string or integer; lists of those; numbers), checked by features.validate.
REQUIRED: dict[str, dict[str, pa.DataType]] = {
    "impressions": {"impression_id": pa.string(), "ts": TS, "user_id": pa.string(), "item_id": pa.string()},
    "clicks": {"impression_id": pa.string(), "ts": TS},
    "conversions": {"impression_id": pa.string(), "ts": TS},
    "users": {"user_id": pa.string()},
    "items": {"item_id": pa.string()},
}
OPTIONAL: dict[str, dict[str, pa.DataType]] = {"conversions": {"value": pa.float64()}}
KEYS: dict[str, str] = {
    "impressions": "impression_id",
    "clicks": "impression_id",
    "conversions": "impression_id",
    "users": "user_id",
    "items": "item_id",
}


def day_str(day: dt.date) -> str:
    return day.isoformat()


def day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


def in_day(col, day: dt.date):
    """Polars predicate: ``col`` (a UTC timestamp) falls in ``day``'s partition [00:00, next 00:00)."""
    return col.is_between(day_start(day), day_start(day + dt.timedelta(days=1)), closed="left")


def required_columns(table: str, spec: FeaturesConfig) -> list[str]:
    """Every column ``table`` must have: the contract's keys plus what the spec reads."""
    return list(dict.fromkeys([*REQUIRED[table], *spec.columns_of(table)]))
