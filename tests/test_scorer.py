"""The torch-free scorer: bundle verification, features equal to training's, predictions
equal to PyTorch's, OOV and defaults, score == score_table, the CLI, no heavy imports."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from bundle_fixture import START, small_model, users_and_items
from import_blocker import run_blocked

from features.catalog import validated_dir
from features.config import TaskConfig
from features.io import sha256_file
from models.loader import table_loader
from pipeline.bundle import export_bundle
from pipeline.cli import main
from serving.bundle import BundleError, load_bundle
from serving.scorer import Scorer
from serving.spec import TaskOutput

TRAIN_DAY = START + dt.timedelta(days=2)  # the newest training table (maturity lag 1)


@pytest.fixture(scope="module")
def setup(tiny_warehouse, tmp_path_factory):
    cfg, files = tiny_warehouse
    tmp = tmp_path_factory.mktemp("scorer")
    model = small_model(cfg, files)
    bundle = export_bundle(cfg, cfg.warehouse, model, tmp / "bundle", files)
    # Features as of the training day: serving must then rebuild that day's training rows.
    as_of_train = export_bundle(cfg, cfg.warehouse, model, tmp / "bundle_train_day", files, as_of=TRAIN_DAY)
    return cfg, model, files, bundle, as_of_train, tmp


def _request_rows(cfg, day) -> pa.Table:
    imps = pq.read_table(validated_dir(cfg.warehouse, "impressions", day))
    return imps.select(["impression_id", "user_id", "item_id", "device", "slot"])


def test_serving_rebuilds_the_training_rows_and_predictions(setup):
    cfg, model, files, _, bundle_path, _ = setup
    scorer = Scorer(load_bundle(bundle_path))
    training = pq.read_table(files[0])
    rows = _request_rows(cfg, TRAIN_DAY)
    rows = rows.take(pc.index_in(training.column("impression_id"), rows.column("impression_id")))
    feeds = scorer.feeds(rows)
    assert "bucket" in {f.kind for f in cfg.features.sparse}  # price_bucket (bundle_fixture)
    for f in cfg.features.sparse:
        if f.kind != "list":
            np.testing.assert_array_equal(feeds[f.name], training.column(f.name).to_numpy(), err_msg=f.name)
        else:
            want = training.column(f.name).to_pylist()
            got = [[int(v) for v in row if v >= 0] for row in feeds[f.name]]
            assert got == want, f.name
    dense = np.column_stack([training.column(n).to_numpy() for n in cfg.features.dense_names()])
    np.testing.assert_allclose(feeds["dense"], dense, rtol=0, atol=1e-6)
    # Behaviour sequences: the bundle's histories as of day L give day L's sequence columns,
    # newest first, padded with -1 after the elements.
    (seq,) = cfg.features.sequences  # clicked (bundle_fixture)
    lengths = np.array([len(x) for x in training.column(seq.column_names[0]).to_pylist()])
    assert {0, 1, seq.max_length - 1, seq.max_length} <= set(lengths.tolist())
    for name in seq.column_names:
        values = feeds[name]
        assert values.dtype == np.int64 and values.shape == (rows.num_rows, seq.max_length), name
        filled = values >= 0
        np.testing.assert_array_equal(filled.sum(axis=1), lengths, err_msg=name)
        assert (np.diff(filled.astype(np.int8), axis=1) <= 0).all(), name  # padding after the elements only
        assert values[filled].tolist() == pc.list_flatten(training.column(name)).to_pylist(), name

    # End to end: the scorer's probabilities equal the PyTorch model's on the training rows
    # (its sequences included).
    scored = scorer.score_table(rows)
    (batch,) = list(table_loader(cfg, files, batch_size=100_000, shuffle=False, prefetch=0))
    assert set(seq.column_names) <= set(batch.sparse.keys())
    with torch.no_grad():
        out = model(batch.dense, batch.sparse)
    np.testing.assert_allclose(scored.column("p_click").to_numpy(), out.probs["click"].numpy(), atol=1e-5)
    np.testing.assert_allclose(scored.column("p_conversion").to_numpy(), out.probs["ctcvr"].numpy(), atol=1e-5)
    assert scored.column("p_click").to_numpy().std() > 1e-3


def test_unknown_user_and_item_get_oov_ids_and_default_features(setup):
    cfg, _, _, bundle_path, _, _ = setup
    scorer = Scorer(load_bundle(bundle_path))
    spec = {f.name: f for f in cfg.features.sparse}
    _, items = users_and_items(cfg)
    rows = pa.table({"user_id": ["nobody-1", "nobody-1"], "item_id": ["no-such-item", items[0]]})
    feeds = scorer.feeds(rows)
    for name, value in (("user_id", feeds["user_id"][0]), ("item_id", feeds["item_id"][0])):
        assert spec[name].capacity < value <= spec[name].capacity + spec[name].oov_buckets
    assert 0 < feeds["item_id"][1] <= spec["item_id"].capacity  # a known item keeps its row
    for name in ("category_id", "brand_id", "shop_id"):  # item not in the snapshot: padding
        assert feeds[name][0] == 0 and feeds[name][1] > 0
    assert feeds["age_bucket"].tolist() == [0, 0] and (feeds["interests"] == -1).all()
    assert feeds["device"].tolist() == [0, 0] and feeds["slot"].tolist() == [0, 0]  # absent context: padding
    names = cfg.features.dense_names()
    defaults = load_bundle(bundle_path).spec.events.defaults
    for key in ("user", "item", "user_category"):  # row 0: no history for any key
        for name, value in defaults[key].items():
            assert feeds["dense"][0, names.index(name)] == np.float32(value), name
    assert feeds["dense"][0, names.index("price")] == 0.0 and feeds["dense"][1, names.index("price")] > 0.0
    result = scorer.score({"user_id": "nobody-1", "candidates": [{"item_id": "no-such-item"}]})
    assert len(result) == 1 and 0.0 < result[0]["p_click"] < 1.0


def test_score_is_sorted_and_equals_score_table(setup):
    cfg, _, _, bundle_path, _, _ = setup
    scorer = Scorer(load_bundle(bundle_path))
    users, items = users_and_items(cfg)
    candidates = [str(i) for i in items[:50]] + ["unseen-item"]
    request = {
        "user_id": str(users[3]),
        "context": {"device": "ios", "slot": 2},
        "candidates": [{"item_id": i} for i in candidates],
    }
    ranked = scorer.score(request)
    assert sorted(r["item_id"] for r in ranked) == sorted(candidates)
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 10
    table = scorer.score_table(
        pa.table(
            {
                "user_id": [str(users[3])] * len(candidates),
                "item_id": candidates,
                "device": ["ios"] * len(candidates),
                "slot": [2] * len(candidates),
            }
        )
    )
    by_item = {r["item_id"]: r for r in ranked}
    for item, p_click, p_conv, score in zip(
        *(table.column(c).to_pylist() for c in ("item_id", "p_click", "p_conversion", "score")), strict=True
    ):
        assert (by_item[item]["p_click"], by_item[item]["p_conversion"], by_item[item]["score"]) == (
            p_click,
            p_conv,
            score,
        )
        assert score == pytest.approx(p_click * p_conv, rel=1e-5)  # exponents 1, 1
    # the context matters: another slot changes the scores
    other = scorer.score(request | {"context": {"device": "ios", "slot": 7}})
    assert {r["item_id"]: r["score"] for r in other} != {r["item_id"]: r["score"] for r in ranked}
    # context values are cached per request path: a repeat, slot "2" as text (ids are keyed by
    # their text), and slot 7 asked again each give what they gave the first time
    assert scorer.score(request) == ranked
    assert scorer.score(request | {"context": {"device": "ios", "slot": "2"}}) == ranked
    assert scorer.score(request | {"context": {"device": "ios", "slot": 7}}) == other
    assert scorer.score(request | {"context": {"device": None, "slot": 2}}) == scorer.score(
        request | {"context": {"slot": 2}}
    )


def test_tampered_missing_and_extra_files_are_refused(setup, tmp_path):
    bundle_path = setup[3]
    for case in ("tampered", "missing", "extra"):
        copy = tmp_path / case
        shutil.copytree(bundle_path, copy)
        if case == "tampered":
            data = bytearray((copy / "features" / "users.parquet").read_bytes())
            data[len(data) // 2] ^= 0x01
            (copy / "features" / "users.parquet").write_bytes(bytes(data))
            match = r"checksum mismatch for .*features/users.parquet"
        elif case == "missing":
            (copy / "vocab" / "item_id.parquet").unlink()
            match = r"vocab/item_id.parquet listed in manifest.json is missing"
        else:
            (copy / "model2.onnx").write_bytes(b"x")
            match = r"model2.onnx is not listed in manifest.json"
        with pytest.raises(BundleError, match=match):
            load_bundle(copy)
    with pytest.raises(BundleError, match="bundle folder not found"):
        load_bundle(tmp_path / "nowhere")


def test_cli_score_writes_parquet(setup, tmp_path, capsys):
    cfg, _, _, bundle_path, _, _ = setup
    rows = _request_rows(cfg, START + dt.timedelta(days=3)).drop_columns(["impression_id"])
    pq.write_table(rows, tmp_path / "candidates.parquet")
    out = tmp_path / "out" / "scores.parquet"
    assert (
        main(
            [
                "score",
                "--bundle",
                str(bundle_path),
                "--input",
                str(tmp_path / "candidates.parquet"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    scored = pq.read_table(out)
    assert scored.num_rows == rows.num_rows
    assert scored.column_names == [*rows.column_names, "p_click", "p_conversion", "score"]
    expected = Scorer(load_bundle(bundle_path)).score_table(rows)
    assert scored.column("score").equals(expected.column("score"))
    assert not list(out.parent.glob(".tmp-*"))
    # a bad input names the missing column; a bad bundle names the file
    pq.write_table(rows.drop_columns(["item_id"]), tmp_path / "bad.parquet")
    assert (
        main(["score", "--bundle", str(bundle_path), "--input", str(tmp_path / "bad.parquet"), "--output", str(out)])
        == 3
    )
    assert "no column 'item_id'" in capsys.readouterr().err


def test_score_table_in_worker_threads_equals_one_call(setup):
    """Chunks scored by several threads come back whole and in order."""
    from serving.scorer import BATCH_CHUNK_ROWS

    cfg, _, _, bundle_path, _, _ = setup
    rows = _request_rows(cfg, START + dt.timedelta(days=3))
    rows = pa.concat_tables([rows] * (2 * BATCH_CHUNK_ROWS // rows.num_rows + 1))  # > 2 chunks, the last one short
    scorer = Scorer(load_bundle(bundle_path))
    one, threaded = scorer.score_table(rows), scorer.score_table(rows, workers=3)
    assert threaded.num_rows == rows.num_rows > 2 * BATCH_CHUNK_ROWS
    assert threaded.equals(one)


def test_scoring_runs_without_torch_polars_or_mlflow(setup):
    cfg, _, _, bundle_path, _, _ = setup
    users, items = users_and_items(cfg)
    code = f"""
    from serving.bundle import load_bundle
    from serving.scorer import Scorer
    scorer = Scorer(load_bundle({str(bundle_path)!r}))
    candidates = [{{"item_id": i}} for i in {[str(i) for i in items[:20]]!r}]
    ranked = scorer.score({{"user_id": {str(users[0])!r}, "context": {{"device": "ios"}}, "candidates": candidates}})
    assert len(ranked) == 20, ranked
    assert not leaked_modules(), leaked_modules()
    print("scored", ranked[0]["score"])
    """
    res = run_blocked(code)
    assert res.returncode == 0, res.stderr
    expected = Scorer(load_bundle(bundle_path)).score(
        {
            "user_id": str(users[0]),
            "context": {"device": "ios"},
            "candidates": [{"item_id": str(i)} for i in items[:20]],
        }
    )
    assert res.stdout.strip() == f"scored {expected[0]['score']}"


def test_user_missing_from_the_snapshot_keeps_its_id_and_history(setup, tmp_path):
    """A user absent from the users snapshot but with history: its vocab id and every
    aggregate keyed by its id (user, user x category) are found by the id string; only its
    attributes fall back to padding. The request path gives the table path's inputs."""
    _, _, _, bundle_path, _, _ = setup
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_path, copy)
    history = pq.read_table(copy / "features" / "aggregates" / "user_category.parquet").column("key")[0].as_py()
    gone, category = history.split("\x1f")
    users_file = copy / "features" / "users.parquet"
    users = pq.read_table(users_file)
    pq.write_table(users.filter(pc.not_equal(users.column("user_id"), gone)), users_file)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["features/users.parquet"] = sha256_file(users_file)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    full, partial = Scorer(load_bundle(bundle_path)), Scorer(load_bundle(copy))
    assert gone not in partial.inputs.snapshots["users"].row_of and gone in full.inputs.snapshots["users"].row_of

    items = pq.read_table(copy / "features" / "items.parquet")
    same_category = pc.equal(pc.cast(items.column("raw:category_id"), pa.string()), category)
    item_ids = (
        items.column("item_id").filter(same_category).to_pylist()[:5]
        + items.column("item_id").to_pylist()[:5]
        + ["unseen"]
    )
    rows = pa.table({"user_id": [gone] * len(item_ids), "item_id": item_ids, "device": ["ios"] * len(item_ids)})
    want, got = full.feeds(rows), partial.feeds(rows)
    defaults = full.spec.events.defaults
    names = list(defaults["user"]) + list(defaults["user_category"])
    columns = [[d.name for d in full.spec.dense].index(n) for n in names]
    np.testing.assert_array_equal(got["user_id"], want["user_id"])
    np.testing.assert_array_equal(got["dense"][:, columns], want["dense"][:, columns])
    defaults = np.array([defaults[k][n] for k in ("user", "user_category") for n in defaults[k]], np.float32)
    assert (got["dense"][:5, columns] != defaults).any()  # real history, not defaults
    assert (got["age_bucket"] == 0).all() and (want["age_bucket"] > 0).all()
    np.testing.assert_array_equal(got["item_id"], want["item_id"])

    _, request_feeds = partial.request_feeds(
        {"user_id": gone, "context": {"device": "ios"}, "candidates": [{"item_id": i} for i in item_ids]}
    )
    assert set(request_feeds) == set(got)
    for name, values in got.items():
        np.testing.assert_array_equal(request_feeds[name], values, err_msg=name)


def test_tasks_name_the_results_and_their_exponents_blend_the_score(setup, tmp_path):
    """Renamed tasks with other exponents: the ONNX score is the product of the served
    probabilities raised to them, and the scorer returns p_<task name> per task."""
    cfg, _, files, _, _, _ = setup
    tasks = [
        TaskConfig(name="ctr", label="click", score_exponent=0.5),
        TaskConfig(
            name="purchase",
            label="conversion",
            after="ctr",
            joint_name="ctcvr",
            conditional_name="cvr",
            score_exponent=2.0,
        ),
    ]
    cfg = cfg.model_copy(update={"tasks": tasks})
    bundle = load_bundle(export_bundle(cfg, cfg.warehouse, small_model(cfg, files), tmp_path / "bundle", files))
    assert bundle.spec.tasks == (TaskOutput("ctr", "ctr", 0.5), TaskOutput("purchase", "ctcvr", 2.0))
    assert set(bundle.manifest["parity"]["max_abs_diff"]) == {"p_ctr", "p_ctcvr", "p_cvr", "score"}
    scorer = Scorer(bundle)
    users, items = users_and_items(cfg)
    rows = pa.table({"user_id": [str(users[2])] * 40, "item_id": [str(i) for i in items[:40]]})
    scored = scorer.score_table(rows)
    assert scored.column_names == ["user_id", "item_id", "p_ctr", "p_purchase", "score"]
    p_ctr, p_purchase, score = (scored.column(c).to_numpy() for c in ("p_ctr", "p_purchase", "score"))
    np.testing.assert_allclose(score, np.sqrt(p_ctr) * p_purchase**2, rtol=1e-5)
    assert (p_purchase < p_ctr).all()  # the joint probability P(ctr and purchase)
    ranked = scorer.score({"user_id": str(users[2]), "candidates": [{"item_id": str(i)} for i in items[:40]]})
    assert list(ranked[0]) == ["item_id", "p_ctr", "p_purchase", "score"]
    assert [r["score"] for r in ranked] == sorted(score.tolist(), reverse=True)


def test_bundle_from_before_configurable_tasks_serves_the_funnel(setup, tmp_path):
    """A spec.json without ``tasks`` (bundles exported before they were configurable) is
    the click -> conversion funnel: the same results as today's bundle."""
    cfg, _, _, bundle_path, _, _ = setup
    copy = tmp_path / "old"
    shutil.copytree(bundle_path, copy)
    spec = json.loads((copy / "spec.json").read_text())
    del spec["tasks"], spec["source"]
    (copy / "spec.json").write_text(json.dumps(spec))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["spec.json"] = sha256_file(copy / "spec.json")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    users, items = users_and_items(cfg)
    request = {
        "user_id": str(users[4]),
        "context": {"device": "ios"},
        "candidates": [{"item_id": str(i)} for i in items[:25]],
    }
    old = Scorer(load_bundle(copy))
    assert old.result_names == ("p_click", "p_conversion", "score")
    assert old.score(request) == Scorer(load_bundle(bundle_path)).score(request)


def test_a_spec_json_missing_a_key_is_refused_naming_it(setup, tmp_path):
    _, _, _, bundle_path, _, _ = setup
    copy = tmp_path / "broken"
    shutil.copytree(bundle_path, copy)
    spec = json.loads((copy / "spec.json").read_text())
    del spec["sparse"][2]["oov_buckets"]
    (copy / "spec.json").write_text(json.dumps(spec))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["spec.json"] = sha256_file(copy / "spec.json")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"{copy / 'spec.json'}: key 'sparse\[2\]\.oov_buckets' is missing"):
        load_bundle(copy)
