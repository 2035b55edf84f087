"""ONNX export: parity with PyTorch on real training rows for every backbone, a broken
model caught by the parity check, and the bundle's files and manifest."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from bundle_fixture import small_model

from features.errors import StageError
from features.io import sha256_file
from models.export import check_parity, export_onnx
from models.loader import table_loader
from models.nets import BACKBONES
from pipeline.bundle import export_bundle


@pytest.fixture(scope="module")
def warehouse(tiny_warehouse, tmp_path_factory):
    cfg, files = tiny_warehouse
    return cfg, files, tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def edge_case_table(warehouse):
    """The newest training table with edge cases forced into its first rows: empty
    interest lists, lists holding the padding id 0, and padding ids of id features."""
    cfg, files, tmp = warehouse
    table = pq.read_table(files[0])
    n = table.num_rows
    interests = table.column("interests").to_pylist()
    for i in range(0, 40, 4):
        interests[i] = []
        interests[i + 1] = [0, interests[i + 1][0] if interests[i + 1] else 3]
        interests[i + 2] = [0]
    table = table.set_column(
        table.schema.get_field_index("interests"), "interests", pa.array(interests, pa.large_list(pa.int64()))
    )
    padded = np.arange(n) % 9 == 0
    for name in ("item_id", "city", "slot"):
        column = pc.if_else(pa.array(padded), 0, table.column(name))
        table = table.set_column(table.schema.get_field_index(name), name, column)
    path = tmp / "edge" / "part-0.parquet"
    path.parent.mkdir()
    pq.write_table(table, path, row_group_size=1500)
    assert any(len(x) == 0 for x in interests) and any(0 in x for x in interests)
    return path


def _batches(cfg, path, sizes=(1, 7, 1000)):
    out = []
    for size in sizes:
        loader = table_loader(cfg, [path], batch_size=size, shuffle=False, seed=0, prefetch=0)
        out += list(loader)[:3]
    return out


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_parity_every_backbone_on_real_rows(warehouse, edge_case_table, backbone):
    cfg, files, tmp = warehouse
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone": backbone})})
    model = small_model(cfg, files)
    path = export_onnx(model, cfg.features, cfg.tasks, tmp / f"{backbone}.onnx")
    batches = _batches(cfg, edge_case_table)
    result = check_parity(model, path, batches, cfg.features, cfg.tasks)
    assert sorted(result["batch_sizes"]) == [1, 7, 1000]
    assert result["rows"] == sum(len(b) for b in batches)
    assert all(v <= 1e-5 for v in result["max_abs_diff"].values()), result
    # the outputs really vary (a constant model would pass any parity check)
    import onnxruntime as ort

    from models.export import onnx_inputs

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    p_click = session.run(["p_click"], onnx_inputs(batches[-1], cfg.features))[0]
    assert p_click.std() > 1e-3


def test_broken_onnx_fails_parity_naming_the_output(warehouse, edge_case_table):
    cfg, files, tmp = warehouse
    model = small_model(cfg, files)
    path = export_onnx(model, cfg.features, cfg.tasks, tmp / "broken.onnx")
    proto = onnx.load(str(path))
    table = next(t for t in proto.graph.initializer if list(t.dims)[:1] == [cfg.features.sparse[1].num_embeddings])
    weights = onnx.numpy_helper.to_array(table).copy()
    weights += 0.05
    table.CopyFrom(onnx.numpy_helper.from_array(weights, table.name))
    onnx.save(proto, str(path))
    with pytest.raises(StageError, match=r"ONNX parity failed .*p_click max abs diff"):
        check_parity(model, path, _batches(cfg, edge_case_table, sizes=(7, 1000)), cfg.features, cfg.tasks)


def test_a_nan_model_fails_parity_naming_the_outputs(warehouse, edge_case_table):
    cfg, files, tmp = warehouse
    model = small_model(cfg, files)
    with torch.no_grad():
        model.heads["click"].bias.fill_(float("nan"))  # what a diverged training leaves: NaN weights
    path = export_onnx(model, cfg.features, cfg.tasks, tmp / "nan.onnx")
    batches = _batches(cfg, edge_case_table, sizes=(7, 1000))
    rows = sum(len(b) for b in batches)
    with pytest.raises(StageError) as err:
        check_parity(model, path, batches, cfg.features, cfg.tasks)
    # p_cvr (the conversion head given a click) does not read the click head
    assert (
        f"ONNX parity failed for {path}: outputs not finite: p_click in PyTorch ({rows:,} of {rows:,} rows), "
        f"p_click in onnxruntime ({rows:,} of {rows:,} rows), p_ctcvr in PyTorch"
    ) in str(err.value)
    assert "score in onnxruntime" in str(err.value) and "p_cvr" not in str(err.value)


def test_bundle_files_manifest_and_spec(warehouse):
    cfg, files, tmp = warehouse
    model = small_model(cfg, files)
    bundle = export_bundle(cfg, cfg.warehouse, model, tmp / "bundle", files)
    manifest = json.loads((bundle / "manifest.json").read_text())
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    vocabs = {f"vocab/{f.name}.parquet" for f in cfg.features.sparse if f.kind != "bucket"}
    assert vocabs | {"model.onnx", "spec.json", "features/users.parquet", "features/items.parquet"} <= on_disk
    assert {f"features/sequences/{q.name}.parquet" for q in cfg.features.sequences} <= on_disk
    assert "vocab/price_bucket.parquet" not in on_disk  # a bucket feature's boundaries are in spec.json
    for name, digest in manifest["files"].items():
        assert sha256_file(bundle / name) == digest
    assert set(manifest["versions"]) == {"funnelrank", "torch", "onnx", "onnxruntime"}
    assert manifest["parity"]["rows"] == pq.ParquetFile(files[0]).metadata.num_rows + 1 + 7 + 1000
    assert max(manifest["parity"]["max_abs_diff"].values()) <= 1e-5
    spec = json.loads((bundle / "spec.json").read_text())
    assert [d["name"] for d in spec["dense"]] == cfg.features.dense_names()
    assert spec["inputs"] == ["dense", *[f.name for f in cfg.features.sparse], *cfg.features.sequence_columns()]
    assert [(f["name"], f["boundaries"]) for f in spec["sparse"] if f["kind"] == "bucket"] == [
        ("price_bucket", [20.0, 40.0, 80.0, 160.0]),
        ("slot_bucket", [2.0, 5.0]),
    ]
    assert spec["source"] == "events" and spec["outputs"] == ["p_click", "p_ctcvr", "p_cvr", "score"]
    assert spec["tasks"] == [
        {"name": "click", "served": "click", "score_exponent": 1.0},
        {"name": "conversion", "served": "ctcvr", "score_exponent": 1.0},
    ]
    assert spec["aggregate_keys"][2]["sources"] == {"user_id": "request", "category_id": "items"}
    assert set(spec["defaults"]) == {k.name for k in cfg.features.aggregate_keys}
    assert not list(tmp.glob(".tmp-*"))  # written atomically, nothing left behind
