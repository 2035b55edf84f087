"""The training table (features/examples.py) on a small hand-built warehouse.

Days D1..D3 hold impressions; D4 holds only the late click/conversion events of D3. The
contract windows (30 min click, 60 min attribution) give a maturity lag of one day, so
the run of D3 builds D2 and the run of D4 builds D3. Expected values below are worked
out by hand from the events listed in ``build_warehouse``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bundle_fixture import tiny_config

from features.catalog import (
    report_path,
    rolling_state_dir,
    rolling_state_root,
    training_dir,
    validated_dir,
)
from features.contract import TS
from features.daily_counters import build_daily_aggregates
from features.errors import DataContractError
from features.examples import (
    build_training_table,
    stale_training_tables,
    training_schema,
)
from features.io import atomic_write_json, write_parquet_dir
from features.synthetic import generate_logs
from models.tracking import to_toml
from pipeline.cli import main
from pipeline.config import load_config, parse_config
from serving.encoding import stable_hash

D1, D2, D3, D4 = (dt.date(2026, 5, d) for d in (1, 2, 3, 4))
PRIOR = 20.0

CONFIG = """
seed = 3
[contract]
click_window_minutes = 30
attribution_window_hours = 1

[features]
windows_days = [1, 2]
prior_strength = 20.0

[[features.aggregate_keys]]
name = "user"
columns = ["user_id"]

[[features.aggregate_keys]]
name = "user_category"
columns = ["user_id", "category_id"]

[[features.sparse]]
name = "user_id"
table = "impressions"
column = "user_id"
capacity = 2
min_count = 2
oov_buckets = 3

[[features.sparse]]
name = "item_id"
table = "impressions"
column = "item_id"
capacity = 10

[[features.sparse]]
name = "category_id"
table = "items"
column = "category_id"
capacity = 10

[[features.sparse]]
name = "slot"
table = "impressions"
column = "slot"
capacity = 10

[[features.sparse]]
name = "interests"
table = "users"
column = "interests"
kind = "list"
capacity = 10

[[features.numeric]]
name = "price"
table = "items"
column = "price"
transform = "log1p"
"""


def at(day: dt.date, hh: int, mm: int) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hh, mm), tzinfo=dt.UTC)


def write(warehouse: Path, table: str, day: dt.date, data: dict, schema: pa.Schema) -> None:
    write_parquet_dir(validated_dir(warehouse, table, day), pa.table(data, schema=schema))


IMPRESSIONS = pa.schema(
    [
        ("impression_id", pa.string()),
        ("ts", TS),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("slot", pa.int64()),
    ]
)
EVENTS = pa.schema([("impression_id", pa.string()), ("ts", TS)])
CONVERSIONS = pa.schema([("impression_id", pa.string()), ("ts", TS), ("value", pa.float64())])
USERS = pa.schema([("user_id", pa.string()), ("interests", pa.list_(pa.string()))])
ITEMS = pa.schema([("item_id", pa.string()), ("category_id", pa.string()), ("price", pa.float64())])

# (impression_id, hour, minute, user, item, slot) per day
DAY_IMPRESSIONS = {
    D1: [("1a", 10, 0, "u1", "i1", 1), ("1b", 11, 0, "u1", "i2", 2), ("1c", 12, 0, "u2", "i1", 1)],
    D2: [("2a", 10, 0, "u1", "i1", 1), ("2b", 11, 0, "u2", "i2", 3), ("2c", 12, 0, "u3", "i3", 1)],
    D3: [
        ("3a", 23, 20, "u1", "i1", 2),
        ("3b", 9, 0, "u2", "i2", 1),
        ("3c", 9, 30, "u4", "i1", 1),
        ("3d", 10, 0, "u1", "i3", 1),
    ],
}
CLICKS = {D1: [("1a", 10, 1)], D2: [], D3: [("3a", 23, 30)], D4: []}
CONVS = {D1: [("1a", 10, 30, 5.0)], D2: [], D3: [], D4: [("3a", 0, 10, 7.0)]}


def build_warehouse(warehouse: Path) -> None:
    users = {"user_id": ["u1", "u2", "u3"], "interests": [["x", "y"], None, ["y"]]}
    items = {"item_id": ["i1", "i2", "i3"], "category_id": ["c1", "c2", "c1"], "price": [9.0, 0.0, None]}
    for day in (D1, D2, D3, D4):
        rows = DAY_IMPRESSIONS.get(day, [])
        write(
            warehouse,
            "impressions",
            day,
            {
                "impression_id": [r[0] for r in rows],
                "ts": [at(day, r[1], r[2]) for r in rows],
                "user_id": [r[3] for r in rows],
                "item_id": [r[4] for r in rows],
                "slot": [r[5] for r in rows],
            },
            IMPRESSIONS,
        )
        write(
            warehouse,
            "clicks",
            day,
            {"impression_id": [c[0] for c in CLICKS[day]], "ts": [at(day, c[1], c[2]) for c in CLICKS[day]]},
            EVENTS,
        )
        write(
            warehouse,
            "conversions",
            day,
            {
                "impression_id": [c[0] for c in CONVS[day]],
                "ts": [at(day, c[1], c[2]) for c in CONVS[day]],
                "value": [c[3] for c in CONVS[day]],
            },
            CONVERSIONS,
        )
        write(warehouse, "users", day, users, USERS)
        write(warehouse, "items", day, items, ITEMS)
    # D3's validate report: one impression was quarantined
    atomic_write_json(
        report_path(warehouse, "validate", D3),
        {"tables": {"impressions": {"input_rows": 5, "valid_rows": 4, "quarantined_rows": 1}}},
    )


@pytest.fixture()
def setup(tmp_path):
    cfg_path = tmp_path / "test.toml"
    cfg_path.write_text(CONFIG)
    warehouse = tmp_path / "wh"
    cfg = load_config(cfg_path, {"warehouse": str(warehouse)})
    build_warehouse(warehouse)
    for day in (D1, D2):
        build_daily_aggregates(cfg, warehouse, day)
    return cfg, warehouse, cfg_path


def read(warehouse: Path, day: dt.date) -> dict:
    return pq.read_table(training_dir(warehouse, day) / "part-0.parquet").to_pydict()


def oov(value: str, capacity: int, buckets: int) -> int:
    return capacity + 1 + int(stable_hash(pa.array([value]))[0]) % buckets


def test_two_nights_exact_rows(setup):
    cfg, warehouse, _ = setup
    assert cfg.contract.maturity_lag_days == 1
    m2 = build_training_table(cfg, warehouse, D3)
    assert m2["date"] == "2026-05-02" and not m2["skipped"]
    # D2 alone: u1, u2, u3 seen once each; min_count 2 admits none of them yet
    t2 = read(warehouse, D2)
    assert t2["user_id"] == [oov("u1", 2, 3), oov("u2", 2, 3), oov("u3", 2, 3)]
    # interests on D2: y twice, x once -> y=1, x=2 (count desc, then key)
    assert t2["interests"] == [[2, 1], [], [1]]

    m3 = build_training_table(cfg, warehouse, D4)
    t3 = read(warehouse, D3)
    assert t3["impression_id"] == ["3a", "3b", "3c", "3d"]
    assert t3["raw_user_id"] == ["u1", "u2", "u4", "u1"]
    # cumulative counts after D3: u1 3, u2 2 (admitted in that order), u3 1, u4 1 -> OOV
    assert t3["user_id"] == [1, 2, oov("u4", 2, 3), 1]
    # interests keep D2's indices; u2 (null list) and u4 (not in the snapshot) -> []
    assert t3["interests"] == [[2, 1], [], [], [2, 1]]
    # item / category / slot admitted in D2 by count desc then key: i1,i2,i3 tie -> by key
    assert t3["item_id"] == [1, 2, 1, 3]
    assert t3["category_id"] == [1, 2, 1, 1]  # D2: c1 (i1, i3) twice, c2 once
    assert t3["slot"] == [3, 1, 1, 1]  # D2: "1" twice, "3" once -> 1, 2; D3 appends "2" -> 3
    # labels: 3a clicked at 23:30 and converted the next day at 00:10 (value 7)
    assert (t3["click"], t3["conversion"], t3["conversion_value"]) == ([1, 0, 0, 0], [1, 0, 0, 0], [7.0, 0.0, 0.0, 0.0])
    # price: log1p(9) for i1, log1p(0) for i2, null price of i3 -> 0
    assert t3["price"] == pytest.approx([math.log(10), 0.0, math.log(10), 0.0], rel=1e-6)

    # rolled features of 3a (user u1 as of the start of D3); D2 had no click at all
    g_ctr_2d, g_cvr_2d = 1 / 6, 1 / 1  # D1+D2: 6 impressions, 1 click, 1 conversion
    row = {k: v[0] for k, v in t3.items()}
    assert row["user_imps_1d"] == pytest.approx(math.log1p(1))
    assert row["user_ctr_1d"] == 0.0 and row["user_cvr_1d"] == 0.0
    assert row["user_imps_2d"] == pytest.approx(math.log1p(3))
    assert row["user_clicks_2d"] == pytest.approx(math.log1p(1))
    assert row["user_ctr_2d"] == pytest.approx((1 + PRIOR * g_ctr_2d) / (3 + PRIOR), rel=1e-6)
    assert row["user_cvr_2d"] == pytest.approx((1 + PRIOR * g_cvr_2d) / (1 + PRIOR), rel=1e-6)
    assert row["user_category_imps_2d"] == pytest.approx(math.log1p(2))  # u1 x c1: 1a, 2a
    assert row["user_category_ctr_2d"] == pytest.approx((1 + PRIOR * g_ctr_2d) / (2 + PRIOR), rel=1e-6)
    # u4 has no history: zero counts, the global rates
    u4 = {k: v[2] for k, v in t3.items()}
    assert u4["user_imps_2d"] == 0.0 and u4["user_ctr_2d"] == pytest.approx(g_ctr_2d, rel=1e-6)
    assert u4["user_category_cvr_2d"] == pytest.approx(g_cvr_2d, rel=1e-6)
    assert m3["vocab_versions"]["user_id"] == 2 and m2["vocab_versions"]["user_id"] == 1


def test_schema_counts_and_manifest(setup):
    cfg, warehouse, _ = setup
    build_training_table(cfg, warehouse, D3)
    manifest = build_training_table(cfg, warehouse, D4)
    table = pq.read_table(training_dir(warehouse, D3) / "part-0.parquet")
    assert table.schema.equals(training_schema(cfg))
    dense = [f.name for f in table.schema if f.type == pa.float32()]
    assert dense == cfg.features.dense_names()
    assert table.schema.field("user_id").type == pa.int64()
    assert table.schema.field("interests").type == pa.large_list(pa.int64())
    assert all(table.column(c).null_count == 0 for c in table.column_names)
    # impressions in = rows out + quarantined
    assert manifest["rows"] == {
        "impressions_in": 5,
        "rows_out": 4,
        "quarantined": 1,
        "validate_report": "reports/validate/date=2026-05-03.json",
    }
    assert manifest["schema"]["interests"] == "large_list<item: int64>"
    on_disk = json.loads((training_dir(warehouse, D3) / "manifest.json").read_text())
    assert on_disk["content_sha256"] == manifest["content_sha256"]
    assert "validated/conversions/date=2026-05-04" in manifest["inputs"]
    assert "features/daily/user/date=2026-05-02" in manifest["inputs"]
    # no report for D2: counts come from the validated partition alone
    m2 = json.loads((training_dir(warehouse, D2) / "manifest.json").read_text())
    assert m2["rows"]["quarantined"] is None and m2["rows"]["rows_out"] == 3


def test_rerun_skips_and_rebuild_after_kill_is_identical(setup, tmp_path):
    cfg, warehouse, _ = setup
    first = build_training_table(cfg, warehouse, D3)
    again = build_training_table(cfg, warehouse, D3)
    assert again["skipped"] and again["content_sha256"] == first["content_sha256"]
    # a run killed after the vocabulary update (output missing): same bytes on rerun
    shutil.rmtree(training_dir(warehouse, D3 - dt.timedelta(days=1)))
    rebuilt = build_training_table(cfg, warehouse, D3)
    assert not rebuilt["skipped"] and rebuilt["content_sha256"] == first["content_sha256"]
    assert rebuilt["vocab_versions"] == first["vocab_versions"]
    # a fresh warehouse with the same inputs gives the same bytes
    other = tmp_path / "other"
    build_warehouse(other)
    for day in (D1, D2):
        build_daily_aggregates(cfg, other, day)
    assert build_training_table(cfg, other, D3)["content_sha256"] == first["content_sha256"]
    # changed input -> rebuilt, with the new price
    items = {"item_id": ["i1", "i2", "i3"], "category_id": ["c1", "c2", "c1"], "price": [99.0, 0.0, None]}
    write(warehouse, "items", D2, items, ITEMS)
    build_daily_aggregates(cfg, warehouse, D2)  # counted from the items of D2: stale until rebuilt
    changed = build_training_table(cfg, warehouse, D3)
    assert not changed["skipped"] and changed["content_sha256"] != first["content_sha256"]
    assert read(warehouse, D2)["price"][0] == pytest.approx(math.log(100), rel=1e-6)


def test_bucket_features_encode_snapshot_numbers_and_name_a_text_column(setup):
    cfg, warehouse, _ = setup
    bucket = {"name": "price_bucket", "table": "items", "column": "price", "kind": "bucket", "boundaries": [1.0, 9.0]}
    data = cfg.model_dump(by_alias=True)
    data["features"]["sparse"].append(bucket)
    bucketed = parse_config(data)
    build_training_table(bucketed, warehouse, D3)
    rows = read(warehouse, D2)  # items i1 9.0 (a boundary: the bucket above), i2 0.0, i3 null (padding)
    assert rows["price_bucket"] == [{"i1": 3, "i2": 1, "i3": 0}[item] for item in ("i1", "i2", "i3")]
    data["features"]["sparse"][-1] = bucket | {"name": "category_bucket", "column": "category_id"}
    with pytest.raises(
        DataContractError,
        match=r"feature 'category_bucket' \(kind bucket\): validated items column "
        r"'category_id' of 2026-05-02: bucketised values must be numbers",
    ):
        build_training_table(parse_config(data), warehouse, D3)


def test_immature_day_is_refused(setup):
    cfg, warehouse, _ = setup
    shutil.rmtree(validated_dir(warehouse, "conversions", D4))
    with pytest.raises(DataContractError, match="conversions"):
        build_training_table(cfg, warehouse, D4)


def test_cli_examples(setup, capsys):
    _, warehouse, cfg_path = setup
    args = ["examples", "--config", str(cfg_path), "--warehouse", str(warehouse), "--date", D3.isoformat()]
    assert main(args) == 0
    assert "2026-05-02" in capsys.readouterr().out
    assert (training_dir(warehouse, D2) / "part-0.parquet").exists()
    assert main(args) == 0
    assert "skipped" in capsys.readouterr().out


def test_next_night_advances_the_rolling_state_to_the_same_table(setup):
    cfg, warehouse, _ = setup
    build_training_table(cfg, warehouse, D3)  # first night: the states of D2 are recomputed
    advanced = build_training_table(cfg, warehouse, D4)  # next night: advanced by one day
    state_manifest = json.loads((rolling_state_dir(warehouse, "user_category", D3) / "manifest.json").read_text())
    assert state_manifest["built"] == "advanced" and state_manifest["rows"] > 0
    # Without any state the night recomputes them: the same table, byte for byte.
    for key in cfg.features.aggregate_keys:
        shutil.rmtree(rolling_state_root(warehouse, key.name))
    shutil.rmtree(training_dir(warehouse, D3))
    recomputed = build_training_table(cfg, warehouse, D4)
    assert (
        json.loads((rolling_state_dir(warehouse, "user_category", D3) / "manifest.json").read_text())["built"]
        == "recomputed"
    )
    assert recomputed["content_sha256"] == advanced["content_sha256"]


def test_a_day_validated_again_makes_what_was_derived_from_it_stale_until_rebuilt(tmp_path, capsys):
    """validate + features + examples, then day 0's raw rows change and it is validated
    again: its aggregates (and day 1's, which attribute day 1's clicks to day 0's
    impressions) no longer describe the validated rows, so examples refuses them, and
    train the table built from them, until features runs again."""
    base = tiny_config(tmp_path)
    cfg = base.model_copy(update={"generate": base.generate.model_copy(update={"days": 3, "impressions_per_day": 400})})
    config = tmp_path / "cfg.toml"
    config.write_text(to_toml(cfg.model_dump(by_alias=True)))
    generate_logs(cfg, cfg.warehouse, progress=False)
    days = [str(cfg.generate.start_date + dt.timedelta(days=i)) for i in range(3)]

    def run(*args: str) -> int:
        return main([*args, "--config", str(config)])

    for day in days:
        assert run("validate", "--date", day) == 0 and run("features", "--date", day) == 0
    assert run("examples", "--date", days[2]) == 0  # the table of day 1 (maturity lag 1)
    table = training_dir(cfg.warehouse, dt.date.fromisoformat(days[1]))
    first = json.loads((table / "manifest.json").read_text())["content_sha256"]

    raw = cfg.warehouse / "raw" / "impressions" / f"date={days[0]}" / "part-0.parquet"
    pq.write_table(pq.read_table(raw).slice(0, 300), raw)  # day 0 loses 100 impressions
    assert run("validate", "--date", days[0]) == 0
    capsys.readouterr()
    assert run("examples", "--date", days[2]) == 3
    err = capsys.readouterr().err
    for key in ("user", "item", "user_category"):  # the table of day 1 reads the aggregates of day 0
        stale = rf"features/daily/{key}/date={days[0]} \([^)]*validated/impressions/date={days[0]} changed"
        assert re.search(stale, err)
    assert stale_training_tables(cfg.warehouse, [dt.date.fromisoformat(days[1])])  # what train checks

    assert run("features", "--date", days[0]) == 0 and run("features", "--date", days[1]) == 0
    assert run("examples", "--date", days[2]) == 0
    assert json.loads((table / "manifest.json").read_text())["content_sha256"] != first
    assert not stale_training_tables(cfg.warehouse, [dt.date.fromisoformat(days[1])])


@pytest.mark.parametrize(
    ("price", "transform", "shown"),
    [
        (math.inf, "log1p", "inf"),
        (1e39, "none", "1e+39"),  # finite, but beyond float32: inf in the table
    ],
)
def test_a_price_that_is_not_finite_as_a_feature_fails_the_day_naming_column_and_day(
    setup, capsys, price, transform, shown
):
    cfg, warehouse, cfg_path = setup
    items = {"item_id": ["i1", "i2", "i3"], "category_id": ["c1", "c2", "c1"], "price": [price, 0.0, None]}
    write(warehouse, "items", D2, items, ITEMS)
    cfg_path.write_text(CONFIG.replace('transform = "log1p"', f'transform = "{transform}"'))
    args = ["examples", "--config", str(cfg_path), "--warehouse", str(warehouse), "--date", D3.isoformat()]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert (
        f"funnelrank examples: training table of 2026-05-02: items column 'price' gives feature 'price' (transform "
        f"{transform}) values that are not finite in 1 of 3 rows, from raw values {shown}"
    ) in err
    assert not training_dir(warehouse, D2).exists()
