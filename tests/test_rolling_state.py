"""The persisted rolling state: advanced day by day it equals a recompute from the daily
partitions, and features read from it equal the join of ``rolling_features``."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from test_aggregates import (
    CFG,
    D0,
    D1,
    D2,
    DAYS,
    X,
    attach_rolling_features,
    base_events,
    build_world,
    click,
    column_codes,
    impressions_with_keys,
    key_hashes,
)
from test_labels import write_validated_days

from features.catalog import daily_dir, rolling_state_dir
from features.config import AggregateKey
from features.daily_counters import KEY_HASH_STEP, build_daily_aggregates
from features.errors import DataContractError
from features.io import write_parquet_dir
from features.rolling_features import rolling_defaults, rolling_features
from features.rolling_state import (
    STATE_FILE,
    _recomputed_state,
    rolling_state,
    state_features,
)
from features.snapshots import NULL_HASH
from pipeline.config import parse_config
from serving.encoding import _mix64, stable_hash

KEYS = CFG.features.aggregate_keys


def assert_same_state(got, expected) -> None:
    assert got.day == expected.day and got.windows == expected.windows
    assert np.array_equal(got.key_hash, expected.key_hash)
    assert len(got.counts) == len(expected.counts) == 3 * len(got.windows)
    assert all(np.array_equal(a, b) for a, b in zip(got.counts, expected.counts, strict=True))


def built(warehouse: Path, key: str, day: dt.date) -> str:
    return json.loads((rolling_state_dir(warehouse, key, day) / "manifest.json").read_text())["built"]


def test_advanced_state_equals_recompute_and_features_equal_the_join(tmp_path):
    build_world(tmp_path, *base_events())
    for key in KEYS:
        for day in DAYS:  # D0 (no history yet) is recomputed, every later day advanced
            state = rolling_state(CFG, tmp_path, key, day)
            assert_same_state(state, _recomputed_state(CFG, tmp_path, key, day))
            assert built(tmp_path, key.name, day) == ("recomputed" if day == D0 else "advanced")
        assert len(state.key_hash) > 0
        assert_same_state(rolling_state(CFG, tmp_path, key, X), state)  # read back as written

    # X's rows plus keys with a null column and a key never seen
    extra = pl.DataFrame(
        {"user_id": ["u1", None, "u7"], "item_id": ["i9", "i1", "i1"], "category_id": [None, "cat-i1", "cat-i1"]}
    )
    rows = pl.concat([impressions_with_keys(tmp_path, X).select(extra.columns).collect(), extra])
    codes = column_codes(rows, extra.columns)
    from_states = pl.concat(
        [state_features(CFG, key, rolling_state(CFG, tmp_path, key, X), codes) for key in KEYS], how="horizontal"
    )
    frames, defaults = rolling_features(CFG, tmp_path, X), rolling_defaults(CFG, tmp_path, X)
    expected = attach_rolling_features(rows.lazy(), CFG, frames, defaults).collect().select(from_states.columns)
    assert from_states.equals(expected)
    assert from_states["user_imps_7d"].to_list()[-3:] == [pytest.approx(np.log1p(5)), 0.0, 0.0]


def test_rewritten_daily_partition_forces_a_recompute(tmp_path):
    impressions, clicks, conversions = base_events()
    build_world(tmp_path, impressions, clicks, conversions)
    for day in (D2, X):
        rolling_state(CFG, tmp_path, KEYS[0], day)
    # A late click on D1 rewrites D1's partition: both states of D2 and X are stale.
    build_world(
        tmp_path, impressions, clicks + [click("a3", dt.datetime(2026, 11, 2, 9, 5, tzinfo=dt.UTC))], conversions
    )
    state = rolling_state(CFG, tmp_path, KEYS[0], X)
    assert built(tmp_path, KEYS[0].name, X) == "recomputed"
    assert_same_state(state, _recomputed_state(CFG, tmp_path, KEYS[0], X))
    assert state.totals["_clicks_7"] == 5


def test_damaged_state_file_is_rebuilt(tmp_path):
    build_world(tmp_path, *base_events())
    key = KEYS[2]
    good = rolling_state(CFG, tmp_path, key, X)
    path = rolling_state_dir(tmp_path, key.name, X) / STATE_FILE
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    damaged = table.set_column(
        1, table.schema.field(1), pa.array(np.zeros(table.num_rows, np.int64)).cast(table.schema.field(1).type)
    )
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, damaged.schema) as writer:
        writer.write_table(damaged)
    assert_same_state(rolling_state(CFG, tmp_path, key, X), good)


def test_gap_in_daily_history_raises_naming_the_day(tmp_path):
    build_world(tmp_path, *base_events())
    rolling_state(CFG, tmp_path, KEYS[1], D2)
    shutil.rmtree(daily_dir(tmp_path, "item", D1))
    with pytest.raises(DataContractError, match=r"daily aggregates of key 'item'.* for 2026-11-02 missing"):
        rolling_state(CFG, tmp_path, KEYS[1], X)


def test_old_states_are_pruned(tmp_path):
    build_world(tmp_path, *base_events())
    days = [X + dt.timedelta(days=n) for n in range(6)]  # no new daily partitions: windows drain
    write_validated_days(tmp_path, days, [])
    for day in days[:-1]:
        build_daily_aggregates(CFG, tmp_path, day)
    for day in days:
        rolling_state(CFG, tmp_path, KEYS[0], day)
    kept = sorted(p.name for p in (tmp_path / "features" / "rolling" / "user").iterdir())
    assert kept == [f"date={(days[-1] - dt.timedelta(days=n)).isoformat()}" for n in (1, 0)]


def write_daily(warehouse: Path, key: AggregateKey, day: dt.date, frame: pl.DataFrame) -> None:
    hashes = key_hashes(frame, key.columns)[0]
    write_parquet_dir(
        daily_dir(warehouse, key.name, day), frame.insert_column(1, pl.Series("key_hash", hashes, pl.UInt64)).to_arrow()
    )


def test_random_history_advanced_day_by_day_equals_recompute(tmp_path):
    # Keys appearing, vanishing and coming back; rows whose counts are all zero; windows
    # of several lengths; null key values. Daily partitions are written directly.
    data = CFG.model_dump(by_alias=True, mode="python")
    data["features"]["windows_days"] = [1, 3, 5]
    cfg = parse_config(data)
    key = AggregateKey(name="user_slot", columns=["user_id", "slot"])
    rng = np.random.default_rng(5)
    days = [D0 + dt.timedelta(days=n) for n in range(14)]
    for day in days:
        n = int(rng.integers(0, 60))
        frame = pl.DataFrame({
            "user_id": pl.Series([None if u == 0 else f"u{u}" for u in rng.integers(0, 30, n)], dtype=pl.String),
            "slot": rng.integers(0, 3, n),
            "imps": rng.integers(0, 3, n), "clicks": rng.integers(0, 2, n), "convs": rng.integers(0, 2, n),
            "conv_value": rng.random(n),
        }).unique(["user_id", "slot"], keep="first")  # fmt: skip
        write_daily(tmp_path, key, day, frame)
    sizes = []
    for day in [*days, days[-1] + dt.timedelta(days=1)]:
        state = rolling_state(cfg, tmp_path, key, day)
        assert_same_state(state, _recomputed_state(cfg, tmp_path, key, day))
        sizes.append(len(state.key_hash))
    assert built(tmp_path, key.name, days[-1]) == "advanced" and max(sizes) > 30


def test_key_hashes_are_stable_and_tell_null_from_empty():
    frame = pl.DataFrame({"user_id": ["u1", "", None, "u1"], "category_id": ["c1", "c1", "c1", None]})
    hashes, has_null = key_hashes(frame, ["user_id", "category_id"])
    assert has_null.tolist() == [False, False, True, True]
    assert len(set(hashes.tolist())) == 4  # "" and null differ
    u1, c1 = stable_hash(pa.array(["u1", "c1"]))
    expected = _mix64(_mix64(np.array([u1], np.uint64)) * KEY_HASH_STEP + np.array([c1], np.uint64))
    assert hashes[0] == expected[0]
    assert key_hashes(frame, ["user_id"])[0][2] == _mix64(np.array([NULL_HASH], np.uint64))[0]
    # integer key columns hash as their decimal text, like the vocabularies
    ints = key_hashes(pl.DataFrame({"slot": [3]}), ["slot"])[0]
    assert ints[0] == key_hashes(pl.DataFrame({"slot": ["3"]}), ["slot"])[0][0]


def test_counts_beyond_int32_stay_exact(tmp_path):
    key = AggregateKey(name="user", columns=["user_id"])
    big = 2**31 - 10
    for n, imps in enumerate([big, 100, 5]):
        frame = pl.DataFrame(
            {"user_id": ["u1", "u2"], "imps": [imps, 1], "clicks": [1, 0], "convs": [0, 0], "conv_value": [0.0, 0.0]}
        )
        write_daily(tmp_path, key, D0 + dt.timedelta(days=n), frame)
    for n in range(1, 4):
        state = rolling_state(CFG, tmp_path, key, D0 + dt.timedelta(days=n))
        assert_same_state(state, _recomputed_state(CFG, tmp_path, key, state.day))
    assert state.totals["_imps_28"] == big + 100 + 5 + 3
    assert built(tmp_path, "user", state.day) == "advanced"


def test_daily_partition_without_key_hash_is_named(tmp_path):
    build_world(tmp_path, *base_events())
    path = daily_dir(tmp_path, "user", D1)
    write_parquet_dir(path, pl.read_parquet(path).drop("key_hash").to_arrow())
    with pytest.raises(
        DataContractError,
        match=r"user/date=2026-11-02 has no key_hash column.*rerun `funnelrank features` for 2026-11-02",
    ):
        rolling_state(CFG, tmp_path, KEYS[0], X)
