"""Labels from hand-built validated partitions: window edges, late events, immature days."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from features.catalog import validated_dir
from features.contract import TS
from features.errors import DataContractError
from features.io import write_parquet_dir
from features.labels import build_labels
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CFG = load_config(ROOT / "configs" / "demo.toml")  # click window 30 min, attribution 24 h
D = dt.date(2026, 11, 3)
US = dt.timedelta(microseconds=1)

SCHEMAS = {
    "impressions": pa.schema(
        [
            ("impression_id", pa.string()),
            ("ts", TS),
            ("user_id", pa.string()),
            ("item_id", pa.string()),
            ("device", pa.string()),
            ("slot", pa.int64()),
        ]
    ),
    "clicks": pa.schema([("impression_id", pa.string()), ("ts", TS)]),
    "conversions": pa.schema([("impression_id", pa.string()), ("ts", TS), ("value", pa.float64())]),
    "users": pa.schema(
        [
            ("user_id", pa.string()),
            ("age_bucket", pa.string()),
            ("gender", pa.string()),
            ("city", pa.string()),
            ("interests", pa.list_(pa.string())),
        ]
    ),
    "items": pa.schema(
        [
            ("item_id", pa.string()),
            ("category_id", pa.string()),
            ("brand_id", pa.string()),
            ("shop_id", pa.string()),
            ("price", pa.float64()),
        ]
    ),
}


def at(day: dt.date, hour: int, minute: int = 0, second: int = 0) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=dt.UTC)


def impression(impression_id: str, ts: dt.datetime, user_id: str = "u1", item_id: str = "i1") -> dict:
    return {
        "impression_id": impression_id,
        "ts": ts,
        "user_id": user_id,
        "item_id": item_id,
        "device": "ios",
        "slot": 1,
    }


def write_validated_days(
    warehouse: Path,
    days: list[dt.date],
    impressions: list[dict],
    clicks: list[dict] = (),
    conversions: list[dict] = (),
    users: list[dict] | None = None,
    items: list[dict] | None = None,
) -> None:
    """Write every table's validated partition for each of ``days``; events go to the
    partition of their ts's UTC day (days without events get an empty partition)."""
    rows = {"impressions": impressions, "clicks": clicks, "conversions": conversions}
    snapshots = {
        "users": users
        if users is not None
        else [
            {"user_id": u, "age_bucket": "25-34", "gender": "f", "city": "c1", "interests": ["a"]}
            for u in sorted({r["user_id"] for r in impressions})
        ],
        "items": items
        if items is not None
        else [
            {"item_id": i, "category_id": f"cat-{i}", "brand_id": "b", "shop_id": "s", "price": 1.0}
            for i in sorted({r["item_id"] for r in impressions})
        ],
    }
    for day in days:
        for table, events in rows.items():
            on_day = [r for r in events if r["ts"].date() == day]
            write_parquet_dir(validated_dir(warehouse, table, day), pa.Table.from_pylist(on_day, schema=SCHEMAS[table]))
        for table, snapshot in snapshots.items():
            write_parquet_dir(
                validated_dir(warehouse, table, day), pa.Table.from_pylist(snapshot, schema=SCHEMAS[table])
            )


def label_world(warehouse: Path) -> None:
    late = at(D, 23, 50)
    impressions = [
        impression("edge_in", at(D, 10)),
        impression("edge_out", at(D, 10)),
        impression("before", at(D, 10)),
        impression("late", late),
        impression("multi", at(D, 12)),
        impression("no_click", at(D, 12)),
        impression("click_only", at(D, 12)),
        impression("second_click", at(D, 12)),
    ]
    clicks = [
        {"impression_id": "edge_in", "ts": at(D, 10, 30)},  # exactly at the window end
        {"impression_id": "edge_out", "ts": at(D, 10, 30) + US},
        {"impression_id": "before", "ts": at(D, 9, 59)},
        {"impression_id": "late", "ts": late + dt.timedelta(minutes=20)},  # next day's partition
        {"impression_id": "multi", "ts": at(D, 12, 5)},
        {"impression_id": "multi", "ts": at(D, 12, 20)},
        {"impression_id": "click_only", "ts": at(D, 12, 10)},
        {"impression_id": "second_click", "ts": at(D, 12)},
        {"impression_id": "second_click", "ts": at(D, 12, 29)},
    ]
    late_click = late + dt.timedelta(minutes=20)
    conversions = [
        {
            "impression_id": "late",
            "ts": late_click + dt.timedelta(hours=24),
            "value": 5.0,
        },  # two days later, at the edge
        {"impression_id": "late", "ts": late_click + dt.timedelta(hours=24) + US, "value": 7.0},
        {"impression_id": "multi", "ts": at(D, 12, 4), "value": 100.0},  # before the first click
        {"impression_id": "multi", "ts": at(D, 12, 10), "value": 2.0},
        {"impression_id": "multi", "ts": at(D, 13), "value": 3.0},
        {"impression_id": "no_click", "ts": at(D, 12, 30), "value": 9.0},
        # within 24 h of the second click but not of the first: not attributed
        {"impression_id": "second_click", "ts": at(D, 12, 10) + dt.timedelta(hours=24), "value": 4.0},
    ]
    days = [D + dt.timedelta(days=n) for n in range(3)]
    write_validated_days(warehouse, days, impressions, clicks, conversions)


def labels_by_id(df: pl.DataFrame) -> dict[str, tuple[int, int, float]]:
    assert df.schema == pl.Schema(
        {"impression_id": pl.String, "click": pl.Int8, "conversion": pl.Int8, "conversion_value": pl.Float64}
    )
    return {r[0]: r[1:] for r in df.iter_rows()}


def test_labels_window_edges_late_events_and_attribution(tmp_path):
    label_world(tmp_path)
    assert CFG.contract.maturity_lag_days == 2
    got = labels_by_id(build_labels(CFG, tmp_path, D))
    assert got == {
        "edge_in": (1, 0, 0.0),
        "edge_out": (0, 0, 0.0),
        "before": (0, 0, 0.0),
        "late": (1, 1, 5.0),
        "multi": (1, 1, 5.0),
        "no_click": (0, 0, 0.0),
        "click_only": (1, 0, 0.0),
        "second_click": (1, 0, 0.0),
    }


def test_labels_keep_impression_order(tmp_path):
    label_world(tmp_path)
    ids = build_labels(CFG, tmp_path, D)["impression_id"].to_list()
    written = pl.read_parquet(validated_dir(tmp_path, "impressions", D))["impression_id"].to_list()
    assert ids == written


@pytest.mark.parametrize(
    ("table", "missing"), [("conversions", D + dt.timedelta(days=2)), ("clicks", D + dt.timedelta(days=1))]
)
def test_immature_day_raises_naming_table_and_day(tmp_path, table, missing):
    label_world(tmp_path)
    for f in validated_dir(tmp_path, table, missing).glob("*.parquet"):
        f.unlink()
    with pytest.raises(DataContractError, match=rf"validated {table} for {missing.isoformat()} missing"):
        build_labels(CFG, tmp_path, D)


def test_allow_immature_counts_what_has_arrived(tmp_path):
    label_world(tmp_path)
    for f in validated_dir(tmp_path, "conversions", D + dt.timedelta(days=2)).glob("*.parquet"):
        f.unlink()
    got = labels_by_id(build_labels(CFG, tmp_path, D, allow_immature=True))
    assert got["late"] == (1, 0, 0.0)
    assert got["multi"] == (1, 1, 5.0)


def test_conversions_without_value_column_are_worth_zero(tmp_path):
    label_world(tmp_path)
    day = D + dt.timedelta(days=2)
    no_value = pl.read_parquet(validated_dir(tmp_path, "conversions", day)).drop("value")
    write_parquet_dir(validated_dir(tmp_path, "conversions", day), no_value.to_arrow())
    assert labels_by_id(build_labels(CFG, tmp_path, D))["late"] == (1, 1, 0.0)
