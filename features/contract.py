"""Raw data contract v1: where each table lives under the warehouse and what it must hold.

Layout under a warehouse root (Hive-style, partitioned by UTC day)::

    raw/impressions/date=YYYY-MM-DD/*.parquet
    raw/clicks/date=YYYY-MM-DD/*.parquet
    raw/conversions/date=YYYY-MM-DD/*.parquet
    raw/users/*.parquet            latest snapshot
    raw/items/*.parquet            latest snapshot
    validated/<table>/date=D/      rows that passed (users/items: the snapshot as of D)
    quarantine/<table>/date=D/     rows that broke the contract, with a `reason` column
    reports/validate/date=D.json   validation report
    truth/impressions/date=D/      generator's true probabilities (synthetic data only;
                                   never under raw/, so no stage can read it by accident)
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa

from features.config import FeaturesConfig

TS = pa.timestamp("us", tz="UTC")

DAILY_TABLES = ("impressions", "clicks", "conversions")
SNAPSHOT_TABLES = ("users", "items")

# Required columns and their Arrow types. Context and attribute columns come from the
# feature spec (FeaturesConfig.columns_of) and are checked for presence, not type.
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


def raw_dir(warehouse: Path, table: str, day: dt.date | None = None) -> Path:
    """The folder of a raw table (a day's partition for daily tables)."""
    if table in DAILY_TABLES:
        if day is None:
            raise ValueError(f"table {table!r} is partitioned by day: a date is required")
        return Path(warehouse) / "raw" / table / f"date={day_str(day)}"
    if table in SNAPSHOT_TABLES:
        return Path(warehouse) / "raw" / table
    raise ValueError(f"unknown raw table {table!r}; expected one of {DAILY_TABLES + SNAPSHOT_TABLES}")


def quarantine_dir(warehouse: Path, table: str, day: dt.date) -> Path:
    return Path(warehouse) / "quarantine" / table / f"date={day_str(day)}"


def validated_dir(warehouse: Path, table: str, day: dt.date) -> Path:
    """Rows that passed ``validate`` for ``day`` (what downstream stages read).

    For users/items this is the snapshot as accepted on that day, so a rerun of an old
    day sees the attributes it saw then."""
    return Path(warehouse) / "validated" / table / f"date={day_str(day)}"


def report_path(warehouse: Path, stage: str, day: dt.date) -> Path:
    return Path(warehouse) / "reports" / stage / f"date={day_str(day)}.json"


def truth_dir(warehouse: Path, day: dt.date) -> Path:
    return Path(warehouse) / "truth" / "impressions" / f"date={day_str(day)}"


def required_columns(table: str, spec: FeaturesConfig) -> list[str]:
    """Every column ``table`` must have: the contract's keys plus what the spec reads."""
    return list(dict.fromkeys([*REQUIRED[table], *spec.columns_of(table)]))


def scan_validated(warehouse: Path, table: str, day: dt.date):
    """Lazily read a table's validated partition for ``day`` (daily table or snapshot).

    Raises DataContractError naming the folder when ``validate`` has not run for that day.
    """
    import polars as pl

    from features.errors import DataContractError

    folder = validated_dir(warehouse, table, day)
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataContractError(f"no validated {table} for {day_str(day)} in {folder}: run `funnelrank validate --date {day_str(day)}` first")
    return pl.scan_parquet(files)
