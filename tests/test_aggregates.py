"""Daily event-time counters and rolling point-in-time features, incl. the leakage test."""

from __future__ import annotations

import datetime as dt
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_labels import CFG, ROOT, at, impression, write_validated_days

from features.catalog import daily_dir, scan_validated, validated_dir
from features.daily_counters import (
    build_daily_aggregates,
    combine_hashes,
    counters_by_key,
)
from features.errors import DataContractError
from features.labels import build_labels
from features.rolling_features import rolling_defaults, rolling_features
from features.snapshots import CodedColumn
from pipeline.cli import main
from pipeline.config import FunnelConfig, parse_config

D0 = dt.date(2026, 11, 1)
D1, D2, X = (D0 + dt.timedelta(days=n) for n in (1, 2, 3))
DAYS = [D0, D1, D2, X]
PRIOR = CFG.features.prior_strength


def click(impression_id: str, ts: dt.datetime) -> dict:
    return {"impression_id": impression_id, "ts": ts}


def conversion(impression_id: str, ts: dt.datetime, value: float) -> dict:
    return {"impression_id": impression_id, "ts": ts, "value": value}


def base_events() -> tuple[list[dict], list[dict], list[dict]]:
    impressions = [
        impression("a1", at(D0, 10), "u1", "i1"),
        impression("a2", at(D0, 23, 50), "u1", "i2"),
        impression("b1", at(D0, 12), "u2", "i1"),
        impression("a3", at(D1, 9), "u1", "i1"),
        impression("b2", at(D1, 9), "u2", "i2"),
        impression("a4", at(D2, 15), "u1", "i1"),
        impression("a6", at(D2, 23, 55), "u1", "i1"),
        impression("b3", at(D2, 15), "u2", "i1"),
        impression("a5", at(X, 10), "u1", "i1"),
        impression("b4", at(X, 10), "u2", "i2"),
        impression("c1", at(X, 11), "u3", "i2"),  # a user with no history
    ]
    clicks = [
        click("a1", at(D0, 10, 5)),
        click("a2", at(D1, 0, 5)),  # impression on D0, click on D1: counts on D1
        click("b2", at(D1, 9, 10)),
        click("a4", at(D2, 15, 1)),
    ]
    conversions = [conversion("a1", at(D0, 11), 2.0), conversion("b2", at(D2, 8), 3.0)]
    return impressions, clicks, conversions


def build_world(warehouse: Path, impressions: list[dict], clicks: list[dict], conversions: list[dict]) -> None:
    write_validated_days(warehouse, DAYS, impressions, clicks, conversions)
    for day in DAYS:
        build_daily_aggregates(CFG, warehouse, day)


def daily(warehouse: Path, key: str, day: dt.date) -> dict[tuple, tuple]:
    df = pl.read_parquet(daily_dir(warehouse, key, day)).drop("key_hash")
    n_keys = df.width - 4
    return {row[:n_keys]: row[n_keys:] for row in df.iter_rows()}


def impressions_with_keys(warehouse: Path, day: dt.date) -> pl.LazyFrame:
    items = scan_validated(warehouse, "items", day).select("item_id", "category_id")
    return scan_validated(warehouse, "impressions", day).join(items, on="item_id", how="left", maintain_order="left")


def column_codes(rows: pl.DataFrame, columns: list[str]) -> dict[str, CodedColumn]:
    """Each column of ``rows`` as a CodedColumn."""
    return {column: CodedColumn.encode(rows[column]) for column in columns}


def key_hashes(frame: pl.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the stable 64-bit hash of its key tuple (as in the daily partitions'
    ``key_hash``) and whether any key column is null."""
    coded = column_codes(frame, columns).values()
    has_null = np.zeros(frame.height, bool)
    for column in coded:
        has_null |= column.codes == column.null_code
    return combine_hashes([column.hashes[column.codes] for column in coded]), has_null


def attach_rolling_features(
    rows: pl.LazyFrame, cfg: FunnelConfig, frames: dict[str, pl.LazyFrame], defaults: dict[str, dict[str, float]]
) -> pl.LazyFrame:
    """The reference the rolling states are checked against: each key's ``rolling_features``
    left-joined onto ``rows`` (which must hold the key columns), keeping row order; rows
    without history get the defaults."""
    looked_up = [
        rows.select(key.columns)
        .join(frames[key.name], on=key.columns, how="left", maintain_order="left")
        .select(pl.col(name).fill_null(pl.lit(value, pl.Float32)) for name, value in defaults[key.name].items())
        for key in cfg.features.aggregate_keys
    ]
    return pl.concat([rows, *looked_up], how="horizontal")


def features_of_day(warehouse: Path, day: dt.date) -> pl.DataFrame:
    frames = rolling_features(CFG, warehouse, day)
    defaults = rolling_defaults(CFG, warehouse, day)
    return attach_rolling_features(impressions_with_keys(warehouse, day), CFG, frames, defaults).collect()


def test_daily_counters_by_event_time(tmp_path):
    build_world(tmp_path, *base_events())
    schema = pl.read_parquet_schema(daily_dir(tmp_path, "user", D0) / "part-0.parquet")
    assert schema == {
        "user_id": pl.String,
        "key_hash": pl.UInt64,
        "imps": pl.Int64,
        "clicks": pl.Int64,
        "convs": pl.Int64,
        "conv_value": pl.Float64,
    }
    user_d0 = pl.read_parquet(daily_dir(tmp_path, "user", D0))
    assert user_d0["key_hash"].to_list() == key_hashes(user_d0, ["user_id"])[0].tolist()
    assert daily(tmp_path, "user", D0) == {("u1",): (2, 1, 1, 2.0), ("u2",): (1, 0, 0, 0.0)}
    # a2 (shown on D0) is clicked on D1: D1's counter, although u1's D1 impression got no click
    assert daily(tmp_path, "user", D1) == {("u1",): (1, 1, 0, 0.0), ("u2",): (1, 1, 0, 0.0)}
    # b2's conversion happens on D2, a day after its click
    assert daily(tmp_path, "user", D2) == {("u1",): (2, 1, 0, 0.0), ("u2",): (1, 0, 1, 3.0)}
    # category_id comes from the items snapshot
    assert daily(tmp_path, "user_category", D1) == {
        ("u1", "cat-i1"): (1, 0, 0, 0.0),
        ("u1", "cat-i2"): (0, 1, 0, 0.0),
        ("u2", "cat-i2"): (1, 1, 0, 0.0),
    }
    assert daily(tmp_path, "item", D0) == {("i1",): (2, 1, 1, 2.0), ("i2",): (1, 0, 0, 0.0)}


def test_rolling_features_exact_values_for_a_known_user(tmp_path):
    build_world(tmp_path, *base_events())
    frames = rolling_features(CFG, tmp_path, X)
    user = frames["user"].collect()
    assert user.columns == [
        "user_id",
        *[n for n in CFG.features.dense_names() if n.startswith("user_") and "category" not in n],
    ]
    assert all(dtype == pl.Float32 for dtype in user.drop("user_id").dtypes)
    assert sorted(user["user_id"]) == ["u1", "u2"]
    u1 = user.filter(pl.col("user_id") == "u1").row(0, named=True)
    # 1 day (D2): u1 2 imps, 1 click, 0 convs; all keys 3 imps, 1 click, 1 conv
    # 7 and 28 days (D0..D2): u1 5 imps, 3 clicks, 1 conv; all keys 8 imps, 4 clicks, 2 convs
    expected = {
        "user_imps_1d": math.log1p(2),
        "user_clicks_1d": math.log1p(1),
        "user_convs_1d": 0.0,
        "user_ctr_1d": (1 + PRIOR / 3) / (2 + PRIOR),
        "user_cvr_1d": (0 + PRIOR * 1.0) / (1 + PRIOR),
    }
    for w in (7, 28):
        expected |= {
            f"user_imps_{w}d": math.log1p(5),
            f"user_clicks_{w}d": math.log1p(3),
            f"user_convs_{w}d": math.log1p(1),
            f"user_ctr_{w}d": (3 + PRIOR * 0.5) / (5 + PRIOR),
            f"user_cvr_{w}d": (1 + PRIOR * 0.5) / (3 + PRIOR),
        }
    for name, value in expected.items():
        assert u1[name] == pytest.approx(value, rel=1e-6), name

    defaults = rolling_defaults(CFG, tmp_path, X)["user"]
    assert defaults["user_ctr_1d"] == pytest.approx(1 / 3, rel=1e-6)
    assert defaults["user_cvr_7d"] == pytest.approx(0.5, rel=1e-6)
    assert defaults["user_imps_28d"] == 0.0
    joined = features_of_day(tmp_path, X)
    u3 = joined.filter(pl.col("user_id") == "u3").row(0, named=True)
    assert {n: u3[n] for n in defaults} == defaults  # no history: exactly the defaults


def test_no_leakage_from_the_rows_own_day(tmp_path):
    impressions, clicks, conversions = base_events()
    build_world(tmp_path, impressions, clicks, conversions)
    before = features_of_day(tmp_path, X)

    # More events on X itself, including a click on X for an impression of X - 1.
    same_day = [click("a5", at(X, 10, 1)), click("b4", at(X, 10, 2)), click("a6", at(X, 0, 5))]
    build_world(tmp_path, impressions, clicks + same_day, conversions + [conversion("a5", at(X, 12), 9.0)])
    assert daily(tmp_path, "user", X)[("u1",)] == (1, 2, 1, 9.0)  # X's own counters did change
    assert features_of_day(tmp_path, X).equals(before)

    # An event on X - 1 must show up in X's features.
    build_world(tmp_path, impressions, clicks + [click("b3", at(D2, 15, 10))], conversions)
    after = features_of_day(tmp_path, X)
    u2 = pl.col("user_id") == "u2"
    assert after.filter(u2)["user_clicks_1d"].item() == pytest.approx(math.log1p(1))
    assert before.filter(u2)["user_clicks_1d"].item() == 0.0
    assert after.filter(~u2).select("user_imps_7d").equals(before.filter(~u2).select("user_imps_7d"))


def test_daily_counters_sum_to_the_labels(tmp_path):
    rng = np.random.default_rng(CFG.seed)
    n, label_days = 900, [D0, D1, D2]
    start = dt.datetime.combine(D0, dt.time(), tzinfo=dt.UTC)
    shown = [
        start + offset for offset in np.sort(rng.integers(0, 3 * 86_400_000_000, n)).astype("timedelta64[us]").tolist()
    ]
    users = rng.integers(0, 15, n)
    impressions = [impression(f"m{i}", shown[i], f"u{users[i]}", f"i{rng.integers(0, 8)}") for i in range(n)]
    clicked = np.flatnonzero(rng.random(n) < 0.3)
    click_at = {i: shown[i] + dt.timedelta(minutes=float(rng.uniform(0, 40))) for i in clicked}
    clicks = [click(f"m{i}", ts) for i, ts in click_at.items()]
    conversions = [
        conversion(f"m{i}", click_at[i] + dt.timedelta(hours=float(rng.uniform(-1, 30))), float(rng.integers(1, 50)))
        for i in clicked
        if rng.random() < 0.5
    ]
    days = [D0 + dt.timedelta(days=k) for k in range(5)]  # labels of D2 need D3 and D4
    write_validated_days(tmp_path, days, impressions, clicks, conversions)
    for day in days:
        build_daily_aggregates(CFG, tmp_path, day)

    labels = (
        pl.concat([build_labels(CFG, tmp_path, d) for d in label_days])
        .lazy()
        .join(pl.concat([scan_validated(tmp_path, "impressions", d) for d in label_days]), on="impression_id")
    )
    from_labels = (
        labels.group_by("user_id")
        .agg(
            imps=pl.len().cast(pl.Int64),
            clicks=pl.col("click").sum().cast(pl.Int64),
            convs=pl.col("conversion").sum().cast(pl.Int64),
            conv_value=pl.col("conversion_value").sum(),
        )
        .sort("user_id")
        .collect()
    )
    assert from_labels["clicks"].sum() > 50 and from_labels["convs"].sum() > 20  # the test has teeth
    from_daily = (
        pl.concat([pl.scan_parquet(daily_dir(tmp_path, "user", d) / "*.parquet") for d in days])
        .group_by("user_id")
        .agg(pl.col("imps", "clicks", "convs", "conv_value").sum())
        .sort("user_id")
        .collect()
    )
    assert from_daily.drop("conv_value").equals(from_labels.drop("conv_value"))
    assert np.allclose(from_daily["conv_value"].to_numpy(), from_labels["conv_value"].to_numpy())

    # Rolled up on the day after the last one, the 7-day window holds everything.
    user = rolling_features(CFG, tmp_path, days[-1] + dt.timedelta(days=1))["user"].sort("user_id").collect()
    assert np.allclose(user["user_clicks_7d"].to_numpy(), np.log1p(from_labels["clicks"].to_numpy()), rtol=1e-6)


def test_gap_in_daily_history_raises_naming_the_day(tmp_path):
    build_world(tmp_path, *base_events())
    shutil.rmtree(daily_dir(tmp_path, "item", D1))
    with pytest.raises(DataContractError, match=r"daily aggregates of key 'item'.* for 2026-11-02 missing"):
        rolling_features(CFG, tmp_path, X)


def test_start_of_history_has_no_events(tmp_path):
    build_world(tmp_path, *base_events())
    frames = rolling_features(CFG, tmp_path, D0)
    assert frames["user_category"].collect().shape == (0, 2 + 5 * len(CFG.features.windows_days))
    one_day = rolling_features(CFG, tmp_path, D1)["user"].collect()
    assert sorted(one_day["user_id"]) == ["u1", "u2"]


def test_missing_earlier_validated_day_raises(tmp_path):
    write_validated_days(tmp_path, DAYS, *base_events())
    for table in ("impressions", "clicks", "conversions"):
        shutil.rmtree(validated_dir(tmp_path, table, D1))
    with pytest.raises(DataContractError, match="validated impressions for 2026-11-02 missing"):
        build_daily_aggregates(CFG, tmp_path, D2)


def test_unknown_key_column_is_named(tmp_path):
    write_validated_days(tmp_path, DAYS, *base_events())
    data = CFG.model_dump(by_alias=True, mode="python")
    data["features"]["aggregate_keys"] = [{"name": "user_colour", "columns": ["user_id", "colour"]}]
    with pytest.raises(DataContractError, match="'user_colour': column 'colour'"):
        build_daily_aggregates(parse_config(data), tmp_path, D0)


def test_features_cli_writes_partitions(tmp_path, capsys):
    write_validated_days(tmp_path, DAYS, *base_events())
    argv = [
        "features",
        "--config",
        str(ROOT / "configs" / "demo.toml"),
        "--warehouse",
        str(tmp_path),
        "--date",
        D1.isoformat(),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    # a line per aggregate key, then one per behaviour sequence (the demo's click history)
    names = [k.name for k in CFG.features.aggregate_keys] + [s.name for s in CFG.features.sequences]
    assert [line.split(":")[0] for line in out] == names
    for key in CFG.features.aggregate_keys:
        assert (daily_dir(tmp_path, key.name, D1) / "part-0.parquet").is_file()
    assert main([*argv[:-1], "2026-12-01"]) == 4  # no validated data for that day


@pytest.mark.parametrize("columns", [["user_id"], ["user_id", "category_id"], ["slot"], ["category_id", "slot"]])
def test_counters_by_key_equal_group_by(columns):
    # The code-based fast path against the straightforward definition, with null keys,
    # integer keys and wide key ranges (both of its renumbering branches).
    rng = np.random.default_rng(7)
    n = 20_000
    events = pl.DataFrame({
        "user_id": [f"u{x}" for x in rng.integers(0, 3_000, n)],
        "category_id": pl.Series([None if x == 0 else f"c{x}" for x in rng.integers(0, 9, n)], dtype=pl.String),
        "slot": rng.integers(-5, 10**9, n) // 10**6,
        "imps": rng.integers(0, 2, n), "clicks": rng.integers(0, 2, n), "convs": rng.integers(0, 2, n),
        "conv_value": rng.random(n),
    })  # fmt: skip
    expected = events.group_by(columns).agg(pl.col("imps", "clicks", "convs").sum(), pl.col("conv_value").sum())
    expected = expected.insert_column(
        len(columns), pl.Series("key_hash", key_hashes(expected, columns)[0], pl.UInt64)
    ).sort("key_hash")
    got = counters_by_key(events, columns, column_codes(events, columns))
    assert got.schema == expected.schema
    assert got.drop("conv_value").equals(expected.drop("conv_value"))
    assert np.allclose(got["conv_value"].to_numpy(), expected["conv_value"].to_numpy(), rtol=1e-12)
    assert counters_by_key(events.head(0), columns, column_codes(events.head(0), columns)).height == 0
