"""Behaviour sequences at serving time, on a real bundle with real onnxruntime: the bundled
histories, a request's fresh ``recent`` events in front of them (newest first,
deduplicated, truncated, encoded as candidates are), unknown users, the batch scorer's
``recent`` column, the 400s naming the field over real HTTP, and spec.json's sequences."""

from __future__ import annotations

import datetime as dt
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from bundle_fixture import CLICKED, ROOT, START, small_model, users_and_items
from serve_fixture import call, start_server, stop_server

from pipeline.bundle import export_bundle
from pipeline.cli import main
from serving.bundle import load_bundle
from serving.scorer import Scorer
from serving.spec import BundleError, BundleSpec

AS_OF = START + dt.timedelta(days=2)  # the newest training day: its users have histories up to 5 long
N = CLICKED.max_length
NAMES = ("clicked__item_id", "clicked__category_id", "clicked__age_days")


@pytest.fixture(scope="module")
def setup(tiny_warehouse, tmp_path_factory):
    cfg, files = tiny_warehouse
    tmp = tmp_path_factory.mktemp("sequence-serving")
    bundle = export_bundle(cfg, cfg.warehouse, small_model(cfg, files), tmp / "bundle", files, as_of=AS_OF)
    history = pq.read_table(bundle / "features" / "sequences" / "clicked.parquet")
    return cfg, files, bundle, Scorer(load_bundle(bundle)), history


def _full_history_user(history: pa.Table) -> tuple[str, pa.Table]:
    """A user with N bundled elements, and its elements (newest first)."""
    counts = pc.value_counts(history.column("key")).to_pylist()
    user = next(c["values"] for c in counts if c["counts"] == N)
    return user, history.filter(pc.equal(history.column("key"), user))


def _iso(day: dt.date, hour: int) -> str:
    return f"{day.isoformat()}T{hour:02d}:00:00Z"


def _sequence_feeds(feeds: dict) -> dict:
    return {name: feeds[name] for name in NAMES}


def _candidate_ids(scorer: Scorer, user: str, items: list[str]) -> tuple[list[int], list[int]]:
    """The item and category rows the scorer gives ``items`` as candidates."""
    _, feeds = scorer.request_feeds({"user_id": user, "candidates": [{"item_id": i} for i in items]})
    return feeds["item_id"].tolist(), feeds["category_id"].tolist()


def test_bundled_history_is_the_users_elements_as_of_the_day(setup):
    _, _, bundle, scorer, history = setup
    spec = load_bundle(bundle).spec.events.sequences
    assert [(q.name, q.event, q.key, q.max_length, q.max_age_days) for q in spec] == [
        ("clicked", "click", "user_id", N, 0)
    ]
    assert [(i.feature, i.source) for i in spec[0].items] == [("item_id", "item"), ("category_id", "items")]
    user, elements = _full_history_user(history)
    _, items = users_and_items(setup[0])
    _, feeds = scorer.request_feeds({"user_id": user, "candidates": [{"item_id": str(i)} for i in items[:7]]})
    for name in NAMES:
        assert feeds[name].shape == (7, N) and feeds[name].dtype == np.int64
        assert (feeds[name] == elements.column(name).to_numpy()).all(), name
    assert (feeds["clicked__age_days"] >= 1).all()
    ts = elements.column("ts").to_numpy()
    assert (np.diff(ts.astype(np.int64)) <= 0).all()  # newest first


def test_recent_events_go_in_front_newest_first_deduplicated_and_truncated(setup):
    cfg, _, _, scorer, history = setup
    user, elements = _full_history_user(history)
    _, items = users_and_items(cfg)
    a, b, c, d = (str(i) for i in items[10:14])
    newest = elements.column("item_id")[0].as_py()
    recent = [
        {"item_id": a, "event": "click", "ts": _iso(AS_OF, 10)},
        {"item_id": b, "event": "click", "ts": _iso(AS_OF, 12)},
        {"item_id": b, "event": "click", "ts": f"{AS_OF.isoformat()}T14:00:00+02:00"},  # the same time: once
        {"item_id": c, "event": "conversion", "ts": _iso(AS_OF, 13)},  # not a click: not in a click sequence
        {"item_id": d, "event": "click", "ts": _iso(AS_OF + dt.timedelta(days=3), 1)},  # later than the bundle
        # the bundle's newest element sent again: kept once
        {"item_id": newest, "event": "click", "ts": elements.column("ts")[0].as_py().isoformat()},
    ]
    request = {"user_id": user, "candidates": [{"item_id": str(i)} for i in items[:3]]}
    _, feeds = scorer.request_feeds(request | {"recent": recent})
    item_rows, category_rows = _candidate_ids(scorer, user, [d, b, a])  # encoded as candidates are
    bundled = {name: elements.column(name).to_numpy().tolist() for name in NAMES}
    want = {
        "clicked__item_id": item_rows + bundled["clicked__item_id"][:2],
        "clicked__category_id": category_rows + bundled["clicked__category_id"][:2],
        # events of the as-of day or later: age 1, the freshest age training knows
        "clicked__age_days": [1, 1, 1] + bundled["clicked__age_days"][:2],
    }
    for name in NAMES:
        assert feeds[name].shape == (3, N)  # truncated to N
        assert feeds[name].tolist() == [want[name]] * 3, name
    # without them: the bundled history alone; in another order: the same feeds
    _, plain = scorer.request_feeds(request)
    assert plain["clicked__item_id"][0].tolist() == bundled["clicked__item_id"]
    _, shuffled = scorer.request_feeds(request | {"recent": recent[::-1]})
    for name in NAMES:
        np.testing.assert_array_equal(shuffled[name], feeds[name])
    assert scorer.score(request | {"recent": recent}) != scorer.score(request)


def test_unknown_user_gets_an_empty_history_and_its_recent_events(setup):
    cfg, _, _, scorer, history = setup
    _, items = users_and_items(cfg)
    candidates = [{"item_id": str(i)} for i in items[:4]]
    _, feeds = scorer.request_feeds({"user_id": "nobody-at-all", "candidates": candidates})
    for name in NAMES:
        assert feeds[name].tolist() == [[-1]] * 4  # an empty history: a row of padding
    result = scorer.score({"user_id": "nobody-at-all", "candidates": candidates})
    assert len(result) == 4 and all(0.0 < r["p_click"] < 1.0 for r in result)

    # its fresh events are its whole history; an older one gets its age as of the bundle's day
    old = AS_OF - dt.timedelta(days=3)
    recent = [
        {"item_id": str(items[20]), "event": "click", "ts": _iso(old, 9)},
        {"item_id": "never-seen-item", "event": "click", "ts": _iso(AS_OF, 9)},
    ]
    _, feeds = scorer.request_feeds({"user_id": "nobody-at-all", "candidates": candidates, "recent": recent})
    item_rows, category_rows = _candidate_ids(scorer, "nobody-at-all", ["never-seen-item", str(items[20])])
    assert feeds["clicked__item_id"][0].tolist() == item_rows
    assert feeds["clicked__category_id"][0].tolist() == category_rows == [0, category_rows[1]]  # not in the snapshot
    assert feeds["clicked__age_days"][0].tolist() == [1, 3]


def test_max_age_days_leaves_older_elements_and_fresh_events_out(setup, tmp_path):
    cfg, files, _, _, _ = setup
    young = cfg.features.model_copy(update={"sequences": [CLICKED.model_copy(update={"max_age_days": 1})]})
    cfg = cfg.model_copy(update={"features": young})
    bundle = export_bundle(cfg, cfg.warehouse, small_model(cfg, files), tmp_path / "bundle", files, as_of=AS_OF)
    assert load_bundle(bundle).spec.events.sequences[0].max_age_days == 1
    history = pq.read_table(bundle / "features" / "sequences" / "clicked.parquet")
    assert history.num_rows and pc.all(pc.equal(history.column("clicked__age_days"), 1)).as_py()
    scorer = Scorer(load_bundle(bundle))
    _, items = users_and_items(cfg)
    recent = [
        {"item_id": str(items[20]), "event": "click", "ts": _iso(AS_OF - dt.timedelta(days=3), 9)},
        {"item_id": str(items[21]), "event": "click", "ts": _iso(AS_OF - dt.timedelta(days=1), 9)},
    ]
    request = {"user_id": "nobody-at-all", "candidates": [{"item_id": str(items[0])}], "recent": recent}
    _, feeds = scorer.request_feeds(request)
    assert feeds["clicked__item_id"].tolist() == [_candidate_ids(scorer, "nobody-at-all", [str(items[21])])[0]]
    assert feeds["clicked__age_days"].tolist() == [[1]]


def test_batch_recent_column_gives_the_request_inputs_and_scores(setup, tmp_path):
    cfg, _, bundle, scorer, history = setup
    user, _ = _full_history_user(history)
    _, items = users_and_items(cfg)
    recent = [
        {"item_id": str(items[30]), "event": "click", "ts": _iso(AS_OF, 8)},
        {"item_id": str(items[31]), "event": "click", "ts": _iso(AS_OF, 9)},
    ]
    request = {"user_id": user, "context": {"device": "ios"}, "candidates": [{"item_id": str(i)} for i in items[:6]]}
    _, want = scorer.request_feeds(request | {"recent": recent})
    table = scorer.request_table(request | {"recent": recent})
    assert pa.types.is_large_list(table.schema.field("recent").type)
    got = scorer.feeds(table)
    assert set(got) == set(want)
    for name, values in want.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)

    # the CLI: a Parquet column list<struct<item_id, event, ts>>, a null list = no events
    ts = pa.array([dt.datetime.fromisoformat(r["ts"]) for r in recent], pa.timestamp("us", tz="UTC"))
    events = pa.StructArray.from_arrays(
        [pa.array([r["item_id"] for r in recent]), pa.array(["click", "click"]), ts], names=["item_id", "event", "ts"]
    )
    column = pa.ListArray.from_arrays(pa.array([0, 2, 2], pa.int32()), events, mask=pa.array([False, True]))
    rows = pa.table({"user_id": [user, user], "item_id": [str(items[0])] * 2, "device": ["ios"] * 2, "recent": column})
    pq.write_table(rows, tmp_path / "rows.parquet")
    out = tmp_path / "scores.parquet"
    assert (
        main(["score", "--bundle", str(bundle), "--input", str(tmp_path / "rows.parquet"), "--output", str(out)]) == 0
    )
    scored = pq.read_table(out)
    with_recent = scorer.score(request | {"recent": recent, "candidates": [{"item_id": str(items[0])}]})[0]
    without = scorer.score(request | {"candidates": [{"item_id": str(items[0])}]})[0]
    assert scored.column("score").to_pylist() == pytest.approx([with_recent["score"], without["score"]], rel=1e-6)
    assert with_recent["score"] != without["score"]


OK_EVENT = {"item_id": "i", "event": "click", "ts": "2026-11-03T00:00:00Z"}


@pytest.mark.parametrize(
    ("recent", "message"),
    [
        ([None, [{"item_id": "i", "event": "click", "ts": None}]], r"row 1: recent\[0\]\.ts is null"),
        ([[OK_EVENT | {"event": "buy"}], None], r"row 0: recent\[0\]\.event must be one of"),
        ([[OK_EVENT, OK_EVENT | {"ts": "yesterday"}], []], r"row 0: recent\[1\]\.ts must be an ISO 8601 time"),
        ([[], [OK_EVENT | {"item_id": None}]], r"row 1: recent\[0\]\.item_id is null"),
        ([["i"], []], r"column 'recent' must be a list of structs"),
    ],
)
def test_a_bad_recent_column_names_the_row_and_field(setup, recent, message):
    rows = pa.table({"user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "recent": pa.array(recent)})
    with pytest.raises(ValueError, match=message):
        setup[3].feeds(rows)


def _serve_config(tmp_path, max_recent_events: int) -> str:
    """configs/demo.toml with [scoring] max_recent_events, as a --config path."""
    text = (ROOT / "configs" / "demo.toml").read_text()
    text = re.sub(r"^max_recent_events = .*\n", "", text, flags=re.MULTILINE)
    path = tmp_path / "serve.toml"
    key = f"max_recent_events = {max_recent_events}\n"
    path.write_text(re.sub(r"^\[scoring\].*\n", lambda m: m.group(0) + key, text, count=1, flags=re.MULTILINE))
    return str(path)


def test_http_rank_with_recent_events_and_400s_naming_the_field(setup, tmp_path):
    cfg, _, bundle, scorer, history = setup
    user, _ = _full_history_user(history)
    _, items = users_and_items(cfg)
    candidates = [{"item_id": str(i)} for i in items[:20]]
    good = [{"item_id": str(items[40 + k]), "event": "click", "ts": _iso(AS_OF, 8 + k)} for k in range(3)]
    proc, port = start_server(bundle, "--config", _serve_config(tmp_path, 3))
    headers = {"Content-Type": "application/json"}

    def rank(recent) -> tuple[int, dict]:
        body = json.dumps({"user_id": user, "candidates": candidates, "recent": recent}).encode()
        status, data = call(port, "POST", "/v1/rank", body, headers)
        return status, json.loads(data)

    try:
        status, result = rank(good)
        assert status == 200
        want = scorer.score({"user_id": user, "candidates": candidates, "recent": good})
        assert [r["item_id"] for r in result["items"]] == [r["item_id"] for r in want]
        assert [r["score"] for r in result["items"]] == pytest.approx([r["score"] for r in want], rel=1e-6)
        bad = [
            (good[:2] + [{"item_id": "x", "event": "click", "ts": "2026-11-03 10:00"}], 400, "recent[2].ts must be"),
            (good[:2] + [{"item_id": "x", "event": "click", "ts": 17}], 400, "recent[2].ts must be"),
            ([{"item_id": "x", "event": "purchase", "ts": good[0]["ts"]}], 400, "recent[0].event must be one of"),
            ([good[0], {"event": "click", "ts": good[0]["ts"]}], 400, "recent[1].item_id is missing"),
            ([{"item_id": "", "event": "click", "ts": good[0]["ts"]}], 400, "recent[0].item_id must be a non-empty"),
            (["click"], 400, "recent[0] must be an object"),
            ({"item_id": "x"}, 400, "recent must be a list"),
            (good + good[:1], 413, "recent has 4 events, above the limit of 3 (scoring.max_recent_events)"),
        ]
        for recent, code, message in bad:
            status, error = rank(recent)
            assert (status, message) == (code, message) and message in error["error"], error
        assert rank(good) == (200, result)  # still serving
    finally:
        stop_server(proc)


def test_spec_sequences_round_trip_and_bundles_without_them_load(setup, tmp_path):
    cfg, files, bundle, _, _ = setup
    spec = load_bundle(bundle).spec
    assert BundleSpec.from_dict(json.loads(spec.to_json())) == spec
    assert ("sequences[0].file", "features/sequences/clicked.parquet") in spec.files()
    broken = json.loads(spec.to_json())
    broken["sequences"][0]["items"][1]["feature"] = "interests"  # a list feature
    with pytest.raises(BundleError, match=r"key 'sequences\[0\]\.items\[1\]\.feature' names 'interests'"):
        BundleSpec.from_dict(broken)
    broken = json.loads(spec.to_json())
    broken["sequences"][0]["event"] = "view"
    with pytest.raises(BundleError, match=r"key 'sequences\[0\]\.event' must be one of"):
        BundleSpec.from_dict(broken)

    # a model without sequences (as every bundle before them): no sequence inputs, no files
    plain_cfg = cfg.model_copy(update={"features": cfg.features.model_copy(update={"sequences": []})})
    plain = export_bundle(plain_cfg, cfg.warehouse, small_model(plain_cfg, files), tmp_path / "plain", files)
    raw = json.loads((plain / "spec.json").read_text())
    assert raw["sequences"] == [] and not (plain / "features" / "sequences").exists()
    del raw["sequences"]  # a bundle from before sequences has no such key
    assert BundleSpec.from_dict(raw).events.sequences == ()
    scorer = Scorer(load_bundle(plain))
    _, items = users_and_items(cfg)
    request = {"user_id": "u1", "candidates": [{"item_id": str(i)} for i in items[:5]]}
    recent = [{"item_id": str(items[1]), "event": "click", "ts": _iso(AS_OF, 9)}]
    assert scorer.score(request | {"recent": recent}) == scorer.score(request)  # nothing to put them in front of
    assert not any(name.startswith("clicked__") for name in scorer.request_feeds(request)[1])
