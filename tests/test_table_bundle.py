"""Bundles of a model trained on a feature table ([table] source): trained for one epoch
on a small hand-made table, exported (parity on the test split, logged to the training's
MLflow run), scored by the torch-free scorer from the raw columns exactly as the torch
model scores the prepared rows; tampering refused; `funnelrank score` on it; ranking
requests (in process and over HTTP) refused with a clear error."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from features.errors import StageError
from features.table_source import prepare_table
from models.loader import TrainingTableLoader
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.export_stage import export_run
from pipeline.train_stage import train_run
from serving.bundle import BundleError, load_bundle
from serving.http import HttpServer, listen
from serving.scorer import BatchOnlyError, Scorer
from serving.service import RankingService

ROWS = {"train": 3000, "val": 600, "test": 700}
PRICE_BOUNDARIES = [5.0, 10.0, 20.0, 40.0]


def _split(rng: np.random.Generator, n: int, test: bool) -> pa.Table:
    """Rows with a learnable signal; the test split also holds ids train never saw, null
    ids, null and empty lists and null numbers."""
    users = rng.integers(0, 200, n)
    items = rng.integers(0, 150, n)
    tags = [[f"t{t}" for t in rng.integers(0, 20, rng.integers(0, 4))] for _ in range(n)]
    price = rng.gamma(2.0, 10.0, n)
    age = rng.integers(18, 80, n).astype(np.float64)
    logit = np.sin(users) + np.cos(items) + 0.02 * (age - 50)
    clicked = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    bought = (rng.random(n) < 1 / (1 + np.exp(-(0.5 * np.cos(users) - np.log1p(price) / 2)))).astype(np.int64)
    item_ids: list[str | None] = [f"i{k}" for k in items]
    price_values: list[float | None] = price.tolist()
    if test:
        users[:50] = rng.integers(1000, 1100, 50)  # unseen users
        for k in range(50, 80):
            item_ids[k] = f"new-{k}"  # unseen items
        for k in range(80, 90):
            item_ids[k], tags[k], price_values[k] = None, None, None
        for k in range(90, 100):
            tags[k] = ["t3", "never-seen", "t3"]
    return pa.table(
        {
            "user": pa.array(users, pa.int64()),
            "item": pa.array(item_ids, pa.string()),
            "tags": pa.array(tags, pa.list_(pa.string())),
            "price": pa.array(price_values, pa.float64()),
            "age": age,
            "clicked": clicked,
            "bought": bought,
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A table-source config over Parquet files in tmp, trained for one epoch (MLflow store
    under its state dir), and its raw test rows."""
    tmp = tmp_path_factory.mktemp("table_bundle")
    rng = np.random.default_rng(5)
    paths = {}
    for split, n in ROWS.items():
        paths[split] = tmp / f"{split}.parquet"
        pq.write_table(_split(rng, n, split == "test"), paths[split])
    cfg = parse_config(
        {
            "seed": 3,
            "warehouse": str(tmp / "warehouse"),
            "state_dir": str(tmp / "state"),
            "table": {**{s: str(p) for s, p in paths.items()}, "user_column": "user"},
            "features": {
                "sparse": [
                    {
                        "name": "user_id",
                        "table": "table",
                        "column": "user",
                        "dim": 8,
                        "capacity": 300,
                        "oov_buckets": 4,
                    },
                    {
                        "name": "item_id",
                        "table": "table",
                        "column": "item",
                        "dim": 8,
                        "capacity": 200,
                        "oov_buckets": 4,
                    },
                    {
                        "name": "tags",
                        "table": "table",
                        "column": "tags",
                        "kind": "list",
                        "dim": 4,
                        "capacity": 30,
                        "oov_buckets": 2,
                        "pooling": "mean",
                    },
                    {
                        "name": "price_bucket",
                        "table": "table",
                        "column": "price",
                        "kind": "bucket",
                        "boundaries": PRICE_BOUNDARIES,
                        "dim": 4,
                    },
                ],
                "numeric": [
                    {"name": "price", "table": "table", "column": "price", "transform": "log1p"},
                    {"name": "age", "table": "table", "column": "age"},
                ],
            },
            "tasks": [
                {"name": "click", "label": "clicked"},
                {"name": "purchase", "label": "bought", "score_exponent": 0.5},
            ],
            "model": {"expert_dims": [16, 8], "tower_dims": [4], "n_experts": 2},
            "train": {"epochs": 1, "batch_size": 256, "threads": 2},
        }
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store is <state_dir>/mlflow.db
        with pytest.raises(StageError, match=r"no trained model for the table source: .*run `funnelrank train` "):
            export_run(cfg, cfg.warehouse)
        result = train_run(cfg, cfg.warehouse, None, progress=False)
        summary = export_run(cfg, cfg.warehouse)
        again = export_run(cfg, cfg.warehouse)
    return cfg, result, summary, again, pq.read_table(paths["test"])


def test_export_checks_parity_on_the_test_split_and_logs_the_bundle(trained):
    cfg, result, summary, again, raw = trained
    assert set(summary["parity_max_abs_diff"]) == {"p_click", "p_purchase", "score"}
    assert max(summary["parity_max_abs_diff"].values()) <= 1e-5
    n = ROWS["test"]
    assert summary["parity_rows"] == 1 + 7 + n + n  # batches of 1, 7, 1000 (the whole split), 4096 (the whole split)
    assert summary["parity_data"] == "the table's test split" and summary["run_date"] is None
    assert summary["run_key"] == result.run_key
    assert summary["artifact_uri"] == f"runs:/{result.mlflow_run_id}/bundle"
    assert again["skipped"] and again["bundle_sha256"] == summary["bundle_sha256"]

    bundle = load_bundle(summary["bundle"])
    files = set(bundle.manifest["files"])
    assert files == {"model.onnx", "spec.json", "vocab/user_id.parquet", "vocab/item_id.parquet", "vocab/tags.parquet"}
    assert bundle.manifest["parity_files"] == [str(f) for f in prepare_table(cfg, cfg.warehouse).files["test"]]
    spec = json.loads((bundle.path / "spec.json").read_text())
    assert spec["source"] == "table" and "snapshots" not in spec and "aggregate_keys" not in spec
    assert [(f["name"], f["column"], f["kind"], f.get("vocab"), f.get("boundaries")) for f in spec["sparse"]] == [
        ("user_id", "user", "id", "vocab/user_id.parquet", None),
        ("item_id", "item", "id", "vocab/item_id.parquet", None),
        ("tags", "tags", "list", "vocab/tags.parquet", None),
        ("price_bucket", "price", "bucket", None, PRICE_BOUNDARIES),
    ]
    assert [(d["name"], d["column"], d["transform"]) for d in spec["dense"]] == [
        ("price", "price", "log1p"),
        ("age", "age", "none"),
    ]
    assert spec["tasks"] == [
        {"name": "click", "served": "click", "score_exponent": 1.0},
        {"name": "purchase", "served": "purchase", "score_exponent": 0.5},
    ]
    assert bundle.spec.source == "table" and bundle.spec.events is None and bundle.spec.list_delimiter == "|"

    from mlflow.tracking import MlflowClient

    from models.tracking import tracking_uri

    client = MlflowClient(tracking_uri(cfg.state_dir))
    assert client.get_run(result.mlflow_run_id).data.tags["bundle.sha256"] == bundle.sha256
    logged = {a.path for a in client.list_artifacts(result.mlflow_run_id, "bundle")}
    # an MLflow pyfunc model around the bundle (tests/test_mlflow_model.py runs one)
    assert {"bundle/MLmodel", "bundle/requirements.txt", "bundle/code", "bundle/artifacts"} <= logged


def test_score_table_on_raw_rows_equals_the_torch_model_on_prepared_rows(trained):
    cfg, result, summary, _, raw = trained
    scorer = Scorer(load_bundle(summary["bundle"]))
    assert scorer.required_columns == ("user", "item", "tags", "price", "age")

    # the inputs are the prepared test table's columns, row for row
    prepared = pq.read_table(prepare_table(cfg, cfg.warehouse).files["test"][0])
    feeds = scorer.feeds(raw)
    for name in ("user_id", "item_id"):
        np.testing.assert_array_equal(feeds[name], prepared.column(name).to_numpy(), err_msg=name)
    assert [[int(v) for v in row if v >= 0] for row in feeds["tags"]] == prepared.column("tags").to_pylist()
    np.testing.assert_array_equal(feeds["price_bucket"], prepared.column("price_bucket").to_numpy())
    price = raw.column("price").to_numpy(zero_copy_only=False)
    want = [
        0 if np.isnan(p) else 1 + sum(p >= b for b in PRICE_BOUNDARIES) for p in price
    ]  # a boundary starts its bucket
    assert feeds["price_bucket"].tolist() == want and set(want) == {0, 1, 2, 3, 4, 5}
    np.testing.assert_array_equal(
        feeds["dense"], np.column_stack([prepared.column(n).to_numpy() for n in ("price", "age")])
    )
    capacity = {f.name: f.capacity for f in cfg.features.sparse}
    assert (feeds["user_id"][:50] > capacity["user_id"]).all() and (feeds["item_id"][50:80] > capacity["item_id"]).all()
    assert (feeds["item_id"][80:90] == 0).all() and (feeds["dense"][80:90, 0] == 0).all()

    scored = scorer.score_table(raw)
    assert scored.column_names == [*raw.column_names, "p_click", "p_purchase", "score"]
    loader = TrainingTableLoader(
        prepare_table(cfg, cfg.warehouse).files["test"],
        cfg.features.sparse,
        cfg.features.dense_names(),
        batch_size=10_000,
        shuffle=False,
        seed=0,
        prefetch=0,
        labels=["clicked", "bought"],
    )
    (batch,) = list(loader)
    with torch.no_grad():
        out = result.model.eval()(batch.dense, batch.sparse)
    p_click, p_purchase, score = (scored.column(c).to_numpy() for c in ("p_click", "p_purchase", "score"))
    np.testing.assert_allclose(p_click, out.probs["click"].numpy(), atol=1e-5)
    np.testing.assert_allclose(p_purchase, out.probs["purchase"].numpy(), atol=1e-5)
    np.testing.assert_allclose(score, p_click * np.sqrt(p_purchase), rtol=1e-5)
    assert p_click.std() > 1e-3

    # ids as strings instead of integers, lists as delimited text (a CSV-born table): same rows
    as_text = raw.set_column(0, "user", pc.cast(raw.column("user"), pa.string()))
    delimited = pc.binary_join(raw.column("tags"), "|")
    as_text = as_text.set_column(
        2, "tags", pc.if_else(pc.equal(pc.list_value_length(raw.column("tags")), 0), " ", delimited)
    )
    again = scorer.score_table(as_text)
    assert again.column("score").equals(scored.column("score"))


def test_ranking_requests_and_bad_inputs_are_refused_clearly(trained, tmp_path):
    _, _, summary, _, raw = trained
    scorer = Scorer(load_bundle(summary["bundle"]))
    with pytest.raises(BatchOnlyError, match=r"trained on a feature table .* scores rows in batch"):
        scorer.score({"user_id": "1", "candidates": [{"item_id": "i1"}]})
    with pytest.raises(ValueError, match=r"no column 'tags' \(feature 'tags'"):
        scorer.score_table(raw.drop_columns(["tags"]))
    with pytest.raises(ValueError, match=r"column 'age' \(feature 'age'\) must hold numbers"):
        scorer.score_table(raw.set_column(4, "age", pa.array(["old"] * raw.num_rows)))
    for huge in (np.inf, 1e39):  # inf, or finite but beyond float32: never a model input
        ages = pa.array(np.full(raw.num_rows, huge))
        with pytest.raises(ValueError, match=r"column 'age' \(feature 'age'\) is not finite as a model input"):
            scorer.score_table(raw.set_column(4, "age", ages))
    with pytest.raises(ValueError, match=r"column 'item' \(feature 'item_id'\)"):
        scorer.score_table(raw.set_column(1, "item", pa.array(np.ones(raw.num_rows))))

    copy = tmp_path / "tampered"
    shutil.copytree(summary["bundle"], copy)
    data = bytearray((copy / "vocab" / "item_id.parquet").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "vocab" / "item_id.parquet").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for .*vocab/item_id.parquet"):
        load_bundle(copy)

    async def rank_over_http() -> tuple[int, dict]:
        server = HttpServer(RankingService(summary["bundle"]))
        port = await server.start(listen("127.0.0.1", 0))

        def post() -> tuple[int, dict]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            body = json.dumps({"user_id": "1", "candidates": [{"item_id": "i1"}]})
            conn.request("POST", "/v1/rank", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())

        try:
            return await asyncio.get_running_loop().run_in_executor(None, post)
        finally:
            await server.stop()

    status, body = asyncio.run(rank_over_http())
    assert status == 501 and "scores rows in batch" in body["error"]


def test_cli_score_writes_the_table_scores(trained, tmp_path, capsys):
    _, _, summary, _, raw = trained
    rows = tmp_path / "rows.parquet"
    pq.write_table(raw.drop_columns(["clicked", "bought"]), rows)
    out = tmp_path / "out" / "scores.parquet"
    assert main(["score", "--bundle", summary["bundle"], "--input", str(rows), "--output", str(out)]) == 0
    assert f"scored {raw.num_rows:,} rows" in capsys.readouterr().out
    scored = pq.read_table(out)
    expected = Scorer(load_bundle(summary["bundle"])).score_table(pq.read_table(rows))
    assert scored.column_names == ["user", "item", "tags", "price", "age", "p_click", "p_purchase", "score"]
    assert scored.equals(expected)
    pq.write_table(raw.drop_columns(["price"]), tmp_path / "bad.parquet")
    assert (
        main(["score", "--bundle", summary["bundle"], "--input", str(tmp_path / "bad.parquet"), "--output", str(out)])
        == 3
    )
    assert "no column 'price'" in capsys.readouterr().err
