"""Behaviour sequences (features/sequences.py): worked out by hand on a small warehouse,
the per-user state (incremental, trusted, atomic), no leakage from the row's day or later
on a synthetic world, determinism, and the config's checks.

The hand-built world: impressions on D1..D5, D6 holds the late events of D5. The 30 min
click window and 1 h attribution give a maturity lag of one day, so the night of D builds
the training table of D - 1 and the features stage of D writes the states as of D + 1.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tomllib
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_config import demo_dict
from test_examples import (
    CONFIG,
    CONVERSIONS,
    EVENTS,
    IMPRESSIONS,
    ITEMS,
    USERS,
    at,
    write,
)
from test_examples import build_warehouse as build_examples_warehouse

import features.daily_counters
import features.examples
import features.sequences
from features.catalog import (
    DATA_FILE,
    daily_dir,
    sequence_state_dir,
    sequence_state_root,
    training_dir,
    validated_dir,
)
from features.config import SequenceFeature
from features.daily_counters import build_daily_aggregates
from features.examples import build_training_table, mature_day
from features.io import write_parquet_dir
from features.sequences import day_events, sequence_state
from features.synthetic import generate_logs
from features.validate import validate_day
from features.vocab import load_vocabulary
from pipeline.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
D1, D2, D3, D4, D5, D6 = (dt.date(2026, 5, d) for d in range(1, 7))

SEQUENCES = """
[[features.sequences]]
name = "clicked"
items = ["item_id", "category_id", "slot"]
max_length = 3

[[features.sequences]]
name = "bought"
event = "conversion"
items = ["item_id"]
max_age_days = 2
"""
CFG = parse_config(tomllib.loads(CONFIG + SEQUENCES))

# (impression_id, hour, minute, user, item, slot) per day
DAY_IMPRESSIONS = {
    D1: [
        ("1a", 10, 0, "u1", "i1", 1),
        ("1b", 11, 0, "u1", "i2", 2),
        ("1c", 12, 0, "u2", "i3", 1),
        ("1d", 13, 0, "u1", "i4", 3),
    ],
    D2: [("2a", 9, 0, "u1", "i3", 3), ("2b", 9, 0, "u1", "i4", 1), ("2c", 23, 50, "u2", "i1", 2)],
    D3: [("3a", 10, 0, "u1", "i2", 1), ("3b", 10, 0, "u3", "i1", 1)],
    D4: [("4a", 8, 0, "u1", "i1", 2), ("4b", 8, 0, "u2", "i2", 1)],
    D5: [("5a", 12, 0, "u1", "i3", 1), ("5b", 12, 0, "u9", "i1", 1), ("5c", 23, 59, "u2", "i4", 2)],
}
# 1d's click comes after the 30 min window: no click. 2a and 2b are clicked at the same
# time (newest first ties: impression_id). 2c's click is on D3, 5c's on D6.
CLICKS = {
    D1: [("1a", 10, 5), ("1b", 11, 10), ("1c", 12, 1), ("1d", 13, 40)],
    D2: [("2a", 9, 5), ("2b", 9, 5)],
    D3: [("2c", 0, 10), ("3a", 10, 2)],
    D4: [("4a", 8, 1), ("4b", 8, 30)],
    D5: [("5a", 12, 0)],
    D6: [("5c", 0, 5)],
}
CONVS = {D1: [("1b", 11, 40, 5.0)], D3: [("3a", 10, 30, 2.0)], D4: [("4b", 9, 0, 1.0)]}
ITEM_CATEGORY = {"i1": "c1", "i2": "c2", "i3": "c1", "i4": "c3"}


def build_world(warehouse: Path, clicks: dict = CLICKS) -> None:
    users = {"user_id": ["u1", "u2", "u3"], "interests": [["x"], None, ["y"]]}
    items = {"item_id": list(ITEM_CATEGORY), "category_id": list(ITEM_CATEGORY.values()), "price": [1.0, 2.0, 3.0, 4.0]}
    for day in (D1, D2, D3, D4, D5, D6):
        rows = DAY_IMPRESSIONS.get(day, [])
        write(warehouse, "impressions", day, {
            "impression_id": [r[0] for r in rows], "ts": [at(day, r[1], r[2]) for r in rows],
            "user_id": [r[3] for r in rows], "item_id": [r[4] for r in rows], "slot": [r[5] for r in rows],
        }, IMPRESSIONS)  # fmt: skip
        write_clicks(warehouse, day, clicks.get(day, []))
        convs = CONVS.get(day, [])
        write(warehouse, "conversions", day, {
            "impression_id": [c[0] for c in convs], "ts": [at(day, c[1], c[2]) for c in convs],
            "value": [c[3] for c in convs],
        }, CONVERSIONS)  # fmt: skip
        write(warehouse, "users", day, users, USERS)
        write(warehouse, "items", day, items, ITEMS)


def write_clicks(warehouse: Path, day: dt.date, clicks: list[tuple]) -> None:
    ids, ts = [c[0] for c in clicks], [at(day, c[1], c[2]) for c in clicks]
    write(warehouse, "clicks", day, {"impression_id": ids, "ts": ts}, EVENTS)


def run_nights(cfg, warehouse: Path, nights: list[dt.date]) -> dict[dt.date, dict]:
    """features of each night's date, then the training table of its mature day (as the
    nightly run does); returns the training manifests by mature day."""
    manifests = {}
    for night in nights:
        build_daily_aggregates(cfg, warehouse, night)
        if mature_day(cfg, night) >= D1:
            manifests[mature_day(cfg, night)] = build_training_table(cfg, warehouse, night)
    return manifests


def sequences_by_user(warehouse: Path, day: dt.date, name: str) -> dict[str, list[list[int]]]:
    """Per raw user: the sequence's lists (each carried feature's, then the ages), the same
    on every row of the user."""
    columns = [c for c in pq.read_schema(training_dir(warehouse, day) / DATA_FILE).names if c.startswith(f"{name}__")]
    table = pl.read_parquet(training_dir(warehouse, day) / DATA_FILE).select("raw_user_id", *columns)
    found = {}
    for user, group in table.group_by("raw_user_id"):
        lists = [group[c].to_list() for c in columns]
        assert all(rows == rows[:1] * len(rows) for rows in lists), f"{name} differs between the rows of {user[0]}"
        found[user[0]] = [rows[0] for rows in lists]
    return found


def encoded(warehouse: Path, manifest: dict, feature: str, raw: list) -> list[int]:
    spec = next(f for f in CFG.features.sparse if f.name == feature)
    values = pa.array(raw, pa.int64() if feature == "slot" else pa.large_string())
    return load_vocabulary(warehouse, spec, manifest["vocab_versions"][feature]).encode(values).tolist()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    warehouse = tmp_path_factory.mktemp("sequences")
    build_world(warehouse)
    return warehouse, run_nights(CFG, warehouse, [D1, D2, D3, D4, D5, D6])


# (item, slot, age) per element, newest first, per user and mature day
CLICKED = {
    D2: {"u1": [("i2", 2, 1), ("i1", 1, 1)], "u2": [("i3", 1, 1)]},
    D3: {"u1": [("i3", 3, 1), ("i4", 1, 1), ("i2", 2, 2)], "u3": []},
    D4: {"u1": [("i2", 1, 1), ("i3", 3, 2), ("i4", 1, 2)], "u2": [("i1", 2, 1), ("i3", 1, 3)]},
    D5: {"u1": [("i1", 2, 1), ("i2", 1, 2), ("i3", 3, 3)], "u2": [("i2", 1, 1), ("i1", 2, 2), ("i3", 1, 4)], "u9": []},
}
# conversions no older than two days: (item, age)
BOUGHT = {
    D2: {"u1": [("i2", 1)], "u2": []},
    D3: {"u1": [("i2", 2)], "u3": []},
    D4: {"u1": [("i2", 1)], "u2": []},
    D5: {"u1": [("i2", 2)], "u2": [("i2", 1)], "u9": []},
}


@pytest.mark.parametrize("day", [D2, D3, D4, D5])
def test_sequences_hold_the_last_events_strictly_before_the_day(world, day):
    # Newest first, truncated to the newest 3 clicks; a click after midnight belongs to
    # the next day; an unclicked user and a new user get empty lists; conversions older
    # than max_age_days drop out.
    warehouse, manifests = world
    manifest = manifests[day]
    clicked, bought = sequences_by_user(warehouse, day, "clicked"), sequences_by_user(warehouse, day, "bought")
    assert set(clicked) == set(bought) == set(CLICKED[day]) == set(BOUGHT[day])
    for user, elements in CLICKED[day].items():
        items, slots, ages = [e[0] for e in elements], [e[1] for e in elements], [e[2] for e in elements]
        categories = [ITEM_CATEGORY[i] for i in items]
        assert clicked[user] == [
            encoded(warehouse, manifest, "item_id", items),
            encoded(warehouse, manifest, "category_id", categories),
            encoded(warehouse, manifest, "slot", slots),
            ages,
        ], (day, user)
    for user, elements in BOUGHT[day].items():
        items, ages = [e[0] for e in elements], [e[1] for e in elements]
        assert bought[user] == [encoded(warehouse, manifest, "item_id", items), ages], (day, user)


def test_history_and_candidate_items_share_embedding_rows(world):
    warehouse, _ = world
    table = pl.read_parquet(training_dir(warehouse, D5) / DATA_FILE)
    # u1's row of D5 shows i3, which u1 clicked on D2 (the oldest of its three clicks)
    row = table.filter(pl.col("impression_id") == "5a")
    assert row["clicked__item_id"][0][-1] == row["item_id"][0] != 0
    assert all(0 not in ids for ids in table["clicked__item_id"].to_list())


def test_first_day_of_history_has_only_empty_sequences(world):
    warehouse, manifests = world
    table = pl.read_parquet(training_dir(warehouse, D1) / DATA_FILE)
    assert table.height == 4
    assert set(manifests[D1]["columns"]["sequences"]) == {"clicked", "bought"}
    lengths = table.select(pl.col(c).list.len() for c in CFG.features.sequences[0].column_names + ["bought__age_days"])
    assert lengths.sum().row(0) == (0,) * lengths.width


def test_schema_of_the_sequence_columns(world):
    warehouse, manifests = world
    schema = pq.read_schema(training_dir(warehouse, D4) / DATA_FILE)
    names = [
        "clicked__item_id",
        "clicked__category_id",
        "clicked__slot",
        "clicked__age_days",
        "bought__item_id",
        "bought__age_days",
    ]
    assert names == [n for n in schema.names if "__" in n]
    assert schema.field("clicked__slot").type == pa.large_list(pa.int64())
    assert schema.field("bought__age_days").type == pa.large_list(pa.int32())
    assert manifests[D4]["columns"]["sequences"]["clicked"] == names[:4]


def state_files(warehouse: Path, name: str, day: dt.date) -> dict[str, bytes]:
    folder = sequence_state_dir(warehouse, name, day)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_features_stage_adds_one_day_to_the_previous_state(tmp_path, monkeypatch):
    build_world(tmp_path)
    run_nights(CFG, tmp_path, [D1, D2, D3, D4])
    read = []
    for module in (features.daily_counters, features.sequences):
        monkeypatch.setattr(
            module,
            "day_activity",
            lambda cfg, wh, day, carried, real=module.day_activity: read.append(day) or real(cfg, wh, day, carried),
        )
    manifest = build_daily_aggregates(CFG, tmp_path, D5)
    assert read == [D5]  # the day's activity, read once for the counters and both sequences; no older day
    assert manifest["rows"]["clicked"] == 2
    assert manifest["outputs"]["clicked"] == str(sequence_state_dir(tmp_path, "clicked", D6))
    state = json.loads((sequence_state_dir(tmp_path, "clicked", D6) / "manifest.json").read_text())
    assert sorted(state["inputs"]) == sorted(
        f"validated/{t}/date={d}"
        for t in ("impressions", "clicks", "conversions")
        for d in ("2026-05-04", "2026-05-05")
    )
    # u1 had 3 clicks, gets 1 (5a) and keeps 3; u2 had 3, gets none (5c's click is on D6)
    assert (state["users"], state["elements"]) == (2, 6)
    assert state["reconciliation"] == {
        "previous_users": 2,
        "previous_elements": 6,
        "events_added": 1,
        "elements_dropped": 1,
    }
    previous = json.loads((sequence_state_dir(tmp_path, "clicked", D5) / "manifest.json").read_text())
    assert state["previous_sha256"] == previous["content_sha256"]
    # the states the mature days still need are kept, older ones deleted
    assert sorted(p.name for p in sequence_state_root(tmp_path, "clicked").iterdir()) == [
        "date=2026-05-04",
        "date=2026-05-05",
        "date=2026-05-06",
    ]


def table_bytes(warehouse: Path, day: dt.date) -> bytes:
    return (training_dir(warehouse, day) / DATA_FILE).read_bytes()


def test_a_killed_write_leaves_the_previous_state_and_the_rerun_finishes_it(tmp_path, monkeypatch):
    uninterrupted = tmp_path / "uninterrupted"
    build_world(uninterrupted)
    run_nights(CFG, uninterrupted, [D1, D2, D3, D4, D5])
    killed = tmp_path / "killed"
    build_world(killed)
    run_nights(CFG, killed, [D1, D2, D3, D4])
    before = state_files(killed, "clicked", D5)

    def killed_while_writing(path):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(features.sequences, "record_sha256", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        build_daily_aggregates(CFG, killed, D5)
    assert state_files(killed, "clicked", D5) == before
    assert sorted(p.name for p in sequence_state_root(killed, "clicked").iterdir()) == [
        "date=2026-05-03",
        "date=2026-05-04",
        "date=2026-05-05",
    ]  # no half-written state, no temporary folder
    monkeypatch.undo()
    run_nights(CFG, killed, [D5])
    for name in ("clicked", "bought"):
        assert state_files(killed, name, D6) == state_files(uninterrupted, name, D6)
    assert table_bytes(killed, D4) == table_bytes(uninterrupted, D4)


def test_a_rewritten_partition_rebuilds_the_states_built_on_it(tmp_path):
    build_world(tmp_path)
    manifests = run_nights(CFG, tmp_path, [D1, D2, D3, D4, D5])
    before = sequences_by_user(tmp_path, D4, "clicked")["u1"][0]
    assert before == encoded(tmp_path, manifests[D4], "item_id", ["i2", "i3", "i4"])
    # D3's clicks are validated again without 3a's (u1, i2): states D4 (which added D3's
    # events), D5 and D6 (built on it) are stale
    clicks = CLICKS | {D3: [("2c", 0, 10)]}
    write_clicks(tmp_path, D3, clicks[D3])
    build_daily_aggregates(CFG, tmp_path, D3)  # D3's counters are stale too: examples refuses them until rerun
    rebuilt = build_training_table(CFG, tmp_path, D5)
    assert not rebuilt["skipped"]
    assert sequences_by_user(tmp_path, D4, "clicked")["u1"] == [
        encoded(tmp_path, rebuilt, "item_id", ["i3", "i4", "i2"]),
        encoded(tmp_path, rebuilt, "category_id", ["c1", "c3", "c2"]),
        encoded(tmp_path, rebuilt, "slot", [3, 1, 2]),
        [2, 2, 3],
    ]
    fresh = tmp_path / "fresh"
    build_world(fresh, clicks)
    run_nights(CFG, fresh, [D1, D2, D3, D4, D5])
    run_nights(CFG, tmp_path, [D5])
    assert state_files(tmp_path, "clicked", D6) == state_files(fresh, "clicked", D6)


def test_a_damaged_state_is_rebuilt_and_a_changed_length_rebuilds_from_the_start(tmp_path):
    build_world(tmp_path)
    run_nights(CFG, tmp_path, [D1, D2, D3, D4, D5])
    seq = CFG.features.sequences[0]
    good = sequence_state(CFG, tmp_path, seq, D5).elements
    (sequence_state_dir(tmp_path, "clicked", D5) / DATA_FILE).write_bytes(b"not parquet")
    assert sequence_state(CFG, tmp_path, seq, D5).elements.equals(good)
    # max_length 1 cannot be read off states truncated at 3: every day is replayed
    shorter = seq.model_copy(update={"max_length": 1})
    state = sequence_state(CFG, tmp_path, shorter, D5).elements
    assert state.group_by("key").len().sort("key")["len"].to_list() == [1, 1]
    assert state["item_id"].to_list() == ["i1", "i2"]


# ---------------------------------------------------------------- a synthetic world

SYNTHETIC = {
    "seed": 5,
    "generate": {
        "start_date": dt.date(2026, 11, 1),
        "days": 4,
        "users": 200,
        "items": 80,
        "impressions_per_day": 3000,
        "categories": 6,
        "brands": 20,
        "shops": 30,
        "cities": 8,
    },
    "contract": {"attribution_window_hours": 1},
    "features": {"windows_days": [1, 2]},
}
SYNTHETIC_SEQUENCES = [
    SequenceFeature(name="clicked", items=["item_id", "category_id", "brand_id"], max_length=5),
    SequenceFeature(name="bought", event="conversion", items=["item_id", "shop_id"]),
]


def synthetic_config(warehouse: Path, sequences: list[SequenceFeature] = SYNTHETIC_SEQUENCES):
    cfg = load_config(ROOT / "configs" / "demo.toml", SYNTHETIC)
    features = cfg.features.model_copy(update={"sequences": sequences})
    return cfg.model_copy(update={"warehouse": warehouse, "features": features})


def synthetic_days(cfg) -> list[dt.date]:
    return [cfg.generate.start_date + dt.timedelta(days=n) for n in range(cfg.generate.days)]


def validated_world(cfg) -> None:
    generate_logs(cfg, cfg.warehouse, progress=False)
    for day in synthetic_days(cfg):
        validate_day(cfg, cfg.warehouse, day)


def feature_nights(cfg) -> None:
    for day in synthetic_days(cfg):
        build_daily_aggregates(cfg, cfg.warehouse, day)
        if mature_day(cfg, day) >= cfg.generate.start_date:
            build_training_table(cfg, cfg.warehouse, day)


def sequence_frame(cfg, day: dt.date) -> pl.DataFrame:
    names = [n for seq in cfg.features.sequences for n in seq.column_names]
    return pl.read_parquet(training_dir(cfg.warehouse, day) / DATA_FILE, columns=["impression_id", *names])


def more_events_from(warehouse: Path, day: dt.date, last: dt.date) -> None:
    """Every impression of day's users on ``day`` and later gets a click a minute after it
    and a conversion five minutes after that (each in the partition of its own day)."""
    days = [day + dt.timedelta(days=n) for n in range((last - day).days + 1)]
    users = pl.read_parquet(validated_dir(warehouse, "impressions", day) / DATA_FILE)["user_id"].unique()
    shown = pl.concat([pl.read_parquet(validated_dir(warehouse, "impressions", d) / DATA_FILE) for d in days])
    shown = shown.filter(pl.col("user_id").is_in(users.implode()))
    for table, delay in (("clicks", dt.timedelta(minutes=1)), ("conversions", dt.timedelta(minutes=6))):
        added = shown.select("impression_id", (pl.col("ts") + delay).alias("ts"), pl.lit(1.0).alias("value"))
        for d in days:
            old = pl.read_parquet(validated_dir(warehouse, table, d) / DATA_FILE)
            new = added.filter(pl.col("ts").dt.date() == d).select(old.columns)
            merged = pl.concat([old, new], how="vertical_relaxed")
            write_parquet_dir(validated_dir(warehouse, table, d), merged.to_arrow())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The same synthetic world twice, and once with more clicks and conversions from the
    day L (the third day) on for L's users; and the bytes of each one's training tables as
    first written, by day."""
    root = tmp_path_factory.mktemp("synthetic")
    worlds = {name: synthetic_config(root / name) for name in ("a", "b", "perturbed")}
    written = {}
    for name, cfg in worlds.items():
        validated_world(cfg)
        if name == "perturbed":
            days = synthetic_days(cfg)
            more_events_from(cfg.warehouse, days[2], days[-1])
        feature_nights(cfg)
        written[name] = {
            d: (training_dir(cfg.warehouse, d) / DATA_FILE).read_bytes()
            for d in synthetic_days(cfg)
            if (training_dir(cfg.warehouse, d) / DATA_FILE).exists()
        }
    return worlds, written


def test_events_of_the_day_and_later_do_not_reach_its_rows(synthetic, monkeypatch):
    a, perturbed = synthetic[0]["a"], synthetic[0]["perturbed"]
    day = synthetic_days(a)[2]
    same = sequence_frame(a, day)
    assert same.select(pl.col("clicked__item_id").list.len().sum()).item() > 200  # histories to compare
    assert same.equals(sequence_frame(perturbed, day))
    labels = [pl.read_parquet(training_dir(cfg.warehouse, day) / DATA_FILE)["click"].sum() for cfg in (a, perturbed)]
    assert labels[1] > labels[0] + 100  # the perturbation is real: day L's rows have many more clicks
    # A leaky variant that reads the state as of the next day (events of L included) fails the same check.
    real = features.sequences.sequence_state
    monkeypatch.setattr(
        features.examples, "sequence_state", lambda cfg, wh, seq, d: real(cfg, wh, seq, d + dt.timedelta(days=1))
    )
    leaky = []
    for cfg in (a, perturbed):
        shutil.rmtree(training_dir(cfg.warehouse, day))
        build_training_table(cfg, cfg.warehouse, day + dt.timedelta(days=cfg.contract.maturity_lag_days))
        leaky.append(sequence_frame(cfg, day))
    assert not leaky[0].equals(leaky[1])


def test_pruned_states_leave_the_training_tables_fresh(synthetic):
    """The features stage keeps a few days of states; a training window spans more days,
    and its older tables must not count as stale for the states that are gone."""
    cfg = synthetic[0]["a"]
    days = [d for d in synthetic_days(cfg) if (training_dir(cfg.warehouse, d) / DATA_FILE).exists()]
    assert not sequence_state_dir(cfg.warehouse, "clicked", days[0]).exists()  # pruned
    assert features.examples.stale_training_tables(cfg.warehouse, days) == []
    # a state that is still there and changed does count
    kept = min(p for p in sequence_state_root(cfg.warehouse, "clicked").iterdir())
    kept_day = dt.date.fromisoformat(kept.name.removeprefix("date="))
    assert kept_day in days
    original = (kept / DATA_FILE).read_bytes()
    try:
        (kept / DATA_FILE).write_bytes(original + b"x")
        assert features.examples.stale_training_tables(cfg.warehouse, [kept_day])
    finally:
        (kept / DATA_FILE).write_bytes(original)


def test_same_seed_same_bytes(synthetic):
    worlds, written = synthetic
    assert len(written["a"]) == 3 and written["a"] == written["b"]
    lengths = sequence_frame(worlds["b"], max(written["b"]))["clicked__item_id"].list.len()
    assert lengths.min() == 0 and lengths.max() == 5  # new users and truncated histories


def test_day_events_are_the_counters_clicks_and_conversions(synthetic):
    # Summed over the users, each day's events are the daily counters' clicks and conversions.
    cfg = synthetic[0]["a"]
    for day in synthetic_days(cfg):
        counters = pl.read_parquet(daily_dir(cfg.warehouse, "user", day) / DATA_FILE)
        for seq, metric in zip(cfg.features.sequences, ("clicks", "convs"), strict=True):
            assert day_events(cfg, cfg.warehouse, seq, day).height == counters[metric].sum()


def test_a_spec_without_sequences_writes_the_bytes_it_wrote_before(tmp_path):
    # sha256 of the tables of tests/test_examples.py's warehouse written by the integration
    # branch before sequences existed (commit 120f25d)
    build_examples_warehouse(tmp_path)
    cfg = parse_config(tomllib.loads(CONFIG))
    for day in (dt.date(2026, 5, 1), dt.date(2026, 5, 2), dt.date(2026, 5, 3)):
        build_daily_aggregates(cfg, tmp_path, day)
    before = {
        "2026-05-02": "1cdf9569a2a1da40201879ee40d8b3e360f0f990e393d05c34bddc684c484a44",
        "2026-05-03": "3c22f79873d0b4eb0c393a4214ad4d85860d8d7e8e9a7635b18a2e88b5164d8c",
    }
    for run_date in (dt.date(2026, 5, 3), dt.date(2026, 5, 4)):
        manifest = build_training_table(cfg, tmp_path, run_date)
        assert manifest["content_sha256"] == before[manifest["date"]]
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["daily", "rolling"]


# ---------------------------------------------------------------- the config


def with_sequence(**sequence):
    def edit(data: dict) -> None:
        data["features"]["sequences"] = [{"name": "clicked", "items": ["item_id", "category_id"]} | sequence]

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (with_sequence(name="1clicked"), "features.sequences[0].name: String should match pattern"),
        (with_sequence(event="view"), "features.sequences[0].event: Input should be 'click' or 'conversion'"),
        (with_sequence(max_length=0), "features.sequences[0].max_length: Input should be greater than or equal to 1"),
        (
            with_sequence(max_length=1001),
            "features.sequences[0].max_length: Input should be less than or equal to 1000",
        ),
        (with_sequence(max_age_days=-1), "features.sequences[0].max_age_days"),
        (with_sequence(items=[]), "features.sequences[0].items: List should have at least 1 item"),
        (with_sequence(colour="red"), "features.sequences[0].colour: unknown key"),
        (with_sequence(items=["item_id", "nope"]), "features.sequences[0].items[1]: 'nope' is not a sparse feature"),
        (
            with_sequence(items=["category_id"]),
            "features.sequences[0].items[0]: 'category_id' reads column 'category_id'; the first carried "
            "feature must be the candidate item's id",
        ),
        (
            with_sequence(items=["item_id", "interests"]),
            "features.sequences[0].items[1]: 'interests' is a kind 'list' feature",
        ),
        (
            with_sequence(items=["item_id", "city"]),
            "features.sequences[0].items[1]: 'city' is a kind 'id' feature of table 'users'",
        ),
        (with_sequence(items=["item_id", "category_id", "item_id"]), "features.sequences[0].items: repeated item_id"),
        (with_sequence(name="user"), "features.sequences[0].name: 'user' is already a feature or column name"),
        (with_sequence(name="user_ctr_7d"), "features.sequences[0].name: 'user_ctr_7d' is already"),
        (
            with_sequence(key="city"),
            "features.sequences[0].key: 'city' must be user_id or the column of a feature of table",
        ),
        (with_sequence(encoder="gru"), "features.sequences[0].encoder"),
        (
            with_sequence(encoder="attention", attention_heads=5),
            "features.sequences[0].attention_heads: 5 does not divide 24, the carried features' dims",
        ),
    ],
)
def test_bad_sequence_config_names_the_key(edit, message):
    data = demo_dict()
    edit(data)
    with pytest.raises(ConfigError) as err:
        parse_config(data, "bad.toml")
    assert message in str(err.value)


def test_sequence_columns_may_not_collide():
    data = demo_dict()
    data["features"]["sequences"] = [{"name": "clicked", "items": ["item_id"]}] * 2
    with pytest.raises(ConfigError, match=r"features.sequences\[1\].name: 'clicked' is already"):
        parse_config(data, "bad.toml")
    data["features"]["sequences"] = [{"name": "a", "items": ["item_id"]}]
    data["features"]["sparse"].append({"name": "a__age_days", "table": "items", "column": "brand_id"})
    with pytest.raises(ConfigError, match=r"features.sequences\[0\]: its column 'a__age_days' is already"):
        parse_config(data, "bad.toml")


def test_defaults_and_a_valid_sequence():
    data = demo_dict()
    data["features"]["sequences"] = [{"name": "clicked", "items": ["item_id", "category_id", "device"]}]
    seq = parse_config(data).features.sequences[0]
    defaults = (seq.event, seq.key, seq.max_length, seq.max_age_days, seq.encoder, seq.attention_heads)
    assert defaults == ("click", "user_id", 50, 0, "din", 1)
    assert seq.column_names == ["clicked__item_id", "clicked__category_id", "clicked__device", "clicked__age_days"]
    without = demo_dict()
    del without["features"]["sequences"]
    assert parse_config(without).features.sequences == []  # none unless configured
