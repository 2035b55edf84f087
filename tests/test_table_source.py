"""features/table_source.py: the user's own feature table as training tables.

The census part prepares the real Census-Income files once (configs/census.toml) and reads
them with the training loader; the rest uses small hand-made CSV / Parquet tables.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.catalog import table_dir, table_manifest_path, table_quarantine_dir
from features.errors import DataContractError, StageError
from features.table_source import (
    TABLE_DAY,
    TABLE_ROW_GROUP_ROWS,
    USER_COLUMN,
    prepare_table,
    table_schema,
)
from features.vocab import load_vocabulary, read_manifest, update_vocabulary
from models import loader as loader_module
from models.loader import TrainingTableLoader
from pipeline.config import load_config, parse_config
from serving.encoding import oov_index, stable_hash

REPO = Path(__file__).resolve().parents[1]
CENSUS_CONFIG = REPO / "configs" / "census.toml"
CENSUS_ROWS = {"train": 59_857, "val": 19_952, "test": 19_953}


# -- the census table ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    """configs/census.toml prepared once; its table paths are relative to the repo root."""
    relative = load_config(CENSUS_CONFIG)
    paths = {split: REPO / getattr(relative.table, split) for split in CENSUS_ROWS}
    if not all(p.is_file() for p in paths.values()):
        pytest.skip(f"census files not found beside the repo: {paths['train']}")
    cfg = load_config(CENSUS_CONFIG, overrides={"table": {s: str(p) for s, p in paths.items()}})
    warehouse = tmp_path_factory.mktemp("census")
    return cfg, warehouse, paths, prepare_table(cfg, warehouse)


def test_census_rows_reconcile(census):
    cfg, _, paths, prepared = census
    assert not prepared.skipped
    for split, rows in CENSUS_ROWS.items():
        counts = prepared.manifest["splits"][split]
        assert (counts["rows_in"], counts["rows_out"], counts["quarantined"]) == (rows, rows, 0)
        assert counts["input"]["path"] == str(paths[split])
        assert sum(pq.ParquetFile(f).metadata.num_rows for f in prepared.files[split]) == rows
        meta = pq.ParquetFile(prepared.files[split][0]).metadata
        assert meta.row_group(0).num_rows == min(rows, TABLE_ROW_GROUP_ROWS) and meta.num_row_groups >= 2
        assert pq.read_schema(prepared.files[split][0]) == table_schema(cfg)
    assert set(prepared.manifest["vocab_versions"]) == {f.name for f in cfg.features.sparse}


def test_census_tables_load_in_the_training_loader(census):
    cfg, _, paths, prepared = census
    labels = [t.label_column for t in cfg.tasks]
    loader = TrainingTableLoader(
        prepared.files["train"],
        sparse=cfg.features.sparse,
        dense_names=cfg.features.dense_names(),
        batch_size=1024,
        shuffle=False,
        seed=cfg.seed,
        prefetch=0,
        labels=labels,
    )
    batch = next(iter(loader))
    source = pl.read_csv(paths["train"], n_rows=1024)
    assert len(batch) == 1024 and batch.label_names == ("income", "marital status")
    np.testing.assert_array_equal(
        batch.labels["marital status"].numpy(), source["marital status"].to_numpy().astype(np.float32)
    )
    np.testing.assert_array_equal(batch.labels["income"].numpy(), source["income"].to_numpy().astype(np.float32))
    columns = [f.column for f in cfg.features.numeric]
    np.testing.assert_allclose(batch.dense.numpy(), source.select(columns).to_numpy().astype(np.float32))
    assert batch.sparse.keys() == [f.name for f in cfg.features.sparse]
    assert (batch.sparse.lengths() == 1).all() and (batch.sparse.values() >= 1).all()
    assert (batch.user == -1).all()  # no user column: GAUC has no groups
    assert USER_COLUMN == loader_module.USER_COLUMN


def test_census_second_prepare_skips(census):
    cfg, warehouse, _, prepared = census
    again = prepare_table(cfg, warehouse)
    assert again.skipped
    assert again.files == prepared.files and again.manifest == prepared.manifest


def test_census_val_ids_unseen_in_train_map_to_oov(census):
    cfg, warehouse, paths, prepared = census
    train, val = pl.read_csv(paths["train"]), pl.read_csv(paths["val"])
    encoded = pq.read_table(prepared.files["val"][0])
    unseen_rows = 0
    for f in cfg.features.sparse:
        unseen = ~val[f.column].is_in(train[f.column].unique().implode()).to_numpy()
        codes = encoded.column(f.name).to_numpy()
        unseen_rows += int(unseen.sum())
        assert (codes[unseen] > f.capacity).all() and (codes[~unseen] <= f.capacity).all() and (codes >= 1).all()
        vocab = load_vocabulary(warehouse, f)
        assert vocab.size == train[f.column].n_unique()  # built from train only
    assert unseen_rows > 0  # the val split does hold ids train never saw


# -- small hand-made tables ---------------------------------------------------------------


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


TRAIN_CSV = """
user,item,tags,price,click,buy
u1,a,x|y,1.0,1,0
u2,a,y,3.0,0,0
u1,b,,0.0,1,1
u3,,x| z ,-2.0,0,0
"""
VAL_CSV = """
user,item,tags,price,click,buy
u1,a,x,1.0,1,0
u4,c,w|x,2.0,0,1
"""
TEST_CSV = """
user,item,tags,price,click,buy
u2,b,y,5.0,0,0
"""


def tiny_config(table: dict, labels: tuple[str, str] = ("click", "buy"), extra_sparse: list[dict] | None = None):
    sparse = [
        {"name": "item_id", "table": "table", "column": "item", "capacity": 10, "oov_buckets": 3},
        {"name": "tags", "table": "table", "column": "tags", "kind": "list", "capacity": 10, "oov_buckets": 2},
        *(extra_sparse or []),
    ]
    return parse_config(
        {
            "table": {k: str(v) if isinstance(v, Path) else v for k, v in table.items()} | {"user_column": "user"},
            "features": {
                "sparse": sparse,
                "numeric": [{"name": "price", "table": "table", "column": "price", "transform": "log1p"}],
            },
            "tasks": [{"name": "click", "label": labels[0]}, {"name": "purchase", "label": labels[1]}],
            "train": {"early_stopping_metric": "purchase_auc"},
        }
    )


@pytest.fixture
def csv_files(tmp_path):
    return {
        split: write_csv(tmp_path / f"{split}.csv", text)
        for split, text in (("train", TRAIN_CSV), ("val", VAL_CSV), ("test", TEST_CSV))
    }


def test_csv_tables_encode_ids_lists_dense_labels_and_users(tmp_path, csv_files):
    cfg = tiny_config(csv_files)
    warehouse = tmp_path / "wh"
    prepared = prepare_table(cfg, warehouse)
    train, val = (pl.read_parquet(prepared.files[s]) for s in ("train", "val"))
    # train "a" twice (index 1), then "b" (2); a null id is padding 0
    assert train["item_id"].to_list() == [1, 1, 2, 0]
    item = cfg.features.sparse[0]
    assert val["item_id"].to_list() == [
        1,
        int(oov_index(stable_hash(pa.array(["c"])), item.capacity, item.oov_buckets)[0]),
    ]
    # tags: x 2, y 2 (index 1 and 2 by key), z 1 (3); an empty cell is an empty list; spaces trimmed
    assert train["tags"].to_list() == [[1, 2], [2], [], [1, 3]]
    tags = cfg.features.sparse[1]
    assert val["tags"].to_list() == [
        [1],
        [int(oov_index(stable_hash(pa.array(["w"])), tags.capacity, tags.oov_buckets)[0]), 1],
    ]
    assert val["tags"][1][0] > tags.capacity
    np.testing.assert_allclose(train["price"].to_numpy(), np.log1p([1.0, 3.0, 0.0, 0.0]).astype(np.float32))
    assert train[USER_COLUMN].to_list() == ["u1", "u2", "u1", "u3"]
    assert train["click"].dtype == pl.Int8 and train["buy"].to_list() == [0, 0, 1, 0]
    assert pq.read_schema(prepared.files["test"][0]) == table_schema(cfg)

    # the loader reads them; raw_user_id gives GAUC codes
    loader = TrainingTableLoader(
        prepared.files["train"],
        sparse=cfg.features.sparse,
        dense_names=cfg.features.dense_names(),
        batch_size=4,
        shuffle=False,
        seed=0,
        prefetch=0,
        labels=["click", "buy"],
    )
    batch = next(iter(loader))
    assert batch.user.tolist() == [0, 1, 0, 2]
    assert batch.labels["buy"].tolist() == [0.0, 0.0, 1.0, 0.0]

    # the CSV was converted once, cached by its content hash
    sources = sorted((warehouse / "table" / "source").iterdir())
    assert [p.name for p in sources] == sorted({prepared.manifest["splits"][s]["input"]["sha256"] for s in csv_files})
    vocab = read_manifest(warehouse, "item_id")
    assert vocab["applied_days"] == {TABLE_DAY.isoformat(): 1}


def test_rerun_skips_and_changed_input_rebuilds(tmp_path, csv_files):
    cfg = tiny_config(csv_files)
    warehouse = tmp_path / "wh"
    first = prepare_table(cfg, warehouse)
    assert prepare_table(cfg, warehouse).skipped
    write_csv(csv_files["train"], TRAIN_CSV.replace("u2,a,y", "u2,c,y"))
    changed = prepare_table(cfg, warehouse)
    assert not changed.skipped
    assert (
        changed.manifest["splits"]["train"]["input"]["sha256"] != first.manifest["splits"]["train"]["input"]["sha256"]
    )
    # a rebuild starts the vocabulary afresh from the new train split: "c" is now in it
    assert changed.manifest["vocab_versions"]["item_id"] == 1
    assert pl.read_parquet(changed.files["val"])["item_id"].to_list() == [1, 3]
    # a damaged output is rebuilt too
    changed.files["test"][0].write_bytes(b"not parquet")
    assert not prepare_table(cfg, warehouse).skipped


def test_parquet_with_split_column(tmp_path):
    table = pa.table(
        {
            "user": pa.array([10, 11, 10, 12, 13], pa.int64()),
            "item": pa.array([5, 5, 6, 7, 6], pa.int64()),
            "tags": pa.array([[1, 2], [2], None, [9], [1]], pa.list_(pa.int64())),
            "price": pa.array([1.0, None, 2.0, 3.0, 4.0]),
            "click": pa.array([True, False, True, False, True]),
            "buy": pa.array([1, 0, 0, 1, 1], pa.int8()),
            "part": ["tr", "tr", "va", "te", "tr"],
        }
    )
    pq.write_table(table, tmp_path / "all.parquet")
    cfg = tiny_config(
        {
            "path": tmp_path / "all.parquet",
            "split_column": "part",
            "split_values": {"train": "tr", "val": "va", "test": "te"},
        }
    )
    prepared = prepare_table(cfg, tmp_path / "wh")
    rows = {s: prepared.manifest["splits"][s]["rows_out"] for s in ("train", "val", "test")}
    assert rows == {"train": 3, "val": 1, "test": 1}
    train = pl.read_parquet(prepared.files["train"])
    assert train["item_id"].to_list() == [1, 1, 2]  # 5 twice, then 6 (int ids keyed by their text)
    assert train["tags"].to_list() == [[1, 2], [2], [1]]
    assert train["price"].to_list() == pytest.approx([np.log1p(1.0), 0.0, np.log1p(4.0)])
    assert train["click"].to_list() == [1, 0, 1] and train[USER_COLUMN].to_list() == ["10", "11", "13"]
    assert pl.read_parquet(prepared.files["val"])["item_id"].to_list() == [2]


def test_null_labels_are_quarantined_and_counted(tmp_path, csv_files):
    write_csv(
        csv_files["train"],
        TRAIN_CSV.replace("u2,a,y,3.0,0,0", "u2,a,y,3.0,,0").replace("u3,,x| z ,-2.0,0,0", "u3,,x| z ,-2.0,0,"),
    )
    warehouse = tmp_path / "wh"
    prepared = prepare_table(tiny_config(csv_files), warehouse)
    counts = prepared.manifest["splits"]["train"]
    assert (counts["rows_in"], counts["rows_out"], counts["quarantined"]) == (4, 2, 2)
    quarantined = pl.read_parquet(table_quarantine_dir(warehouse, "train"))
    assert quarantined["user"].to_list() == ["u2", "u3"]
    assert quarantined["reason"].to_list() == ["null label click", "null label buy"]
    assert pl.read_parquet(prepared.files["train"])[USER_COLUMN].to_list() == ["u1", "u1"]
    assert not table_quarantine_dir(warehouse, "val").exists()


@pytest.mark.parametrize(
    ("split", "text", "message"),
    [
        ("val", VAL_CSV.replace("price", "cost"), r"val\.csv: no column 'price' \(feature 'price'\)"),
        ("test", TEST_CSV.replace(",buy", ",bought"), r"test\.csv: no column 'buy' \(label of task 'purchase'\)"),
        (
            "train",
            TRAIN_CSV.replace("u2,a,y,3.0,0,0", "u2,a,y,3.0,2,0").replace("u3,,x| z ,-2.0,0,0", "u3,,x| z ,-2.0,-1,0"),
            r"train\.csv \(train split\): label column 'click' \(task 'click'\) has 2 rows that are not 0/1, e\.g\. "
            r"2, -1",
        ),
        (
            "val",
            VAL_CSV.replace("user,item,tags", "user,item,item"),
            r"val\.csv: column 'item' is named 2 times in the header",
        ),
        ("val", "user,item,tags,price,click,buy\n", r"table val split is empty: no rows in .*val\.csv"),
        ("train", TRAIN_CSV.replace(",click,", ",clic,"), r"train\.csv: no column 'click'"),
        (
            "val",
            VAL_CSV.replace("u4,c,w|x,2.0", "u4,c,w|x,inf"),
            r"val\.csv \(val split\): table column 'price' gives "
            r"feature 'price' \(transform log1p\) values that are not finite in 1 of 2 rows, from raw values inf",
        ),
    ],
)
def test_bad_tables_name_file_and_column(tmp_path, csv_files, split, text, message):
    write_csv(csv_files[split], text)
    with pytest.raises(DataContractError, match=message):
        prepare_table(tiny_config(csv_files), tmp_path / "wh")


def test_bucket_feature_encodes_numbers_and_refuses_a_text_column(tmp_path, csv_files):
    bucket = {"name": "price_bucket", "table": "table", "column": "price", "kind": "bucket", "boundaries": [0.0, 2.0]}
    prepared = prepare_table(tiny_config(csv_files, extra_sparse=[bucket]), tmp_path / "wh")
    # train prices 1.0, 3.0, 0.0, -2.0 (a boundary starts its bucket); no vocabulary is written for it
    assert pl.read_parquet(prepared.files["train"])["price_bucket"].to_list() == [2, 3, 2, 1]
    assert not (tmp_path / "wh" / "vocab" / "price_bucket").exists()
    with pytest.raises(
        DataContractError,
        match=r"train\.csv: column 'item' \(feature 'item_bucket', kind bucket\) has type String, expected numbers",
    ):
        prepare_table(
            tiny_config(csv_files, extra_sparse=[bucket | {"name": "item_bucket", "column": "item"}]), tmp_path / "wh2"
        )


def test_label_used_as_feature_is_refused(tmp_path, csv_files):
    cfg = tiny_config(csv_files, extra_sparse=[{"name": "clicked", "table": "table", "column": "click"}])
    with pytest.raises(
        DataContractError, match=r"train\.csv: column 'click' is the label of task 'click' and also feature 'clicked'"
    ):
        prepare_table(cfg, tmp_path / "wh")


def test_split_values_matching_no_split_are_refused(tmp_path):
    frame = pl.read_csv(TRAIN_CSV.strip().encode()).with_columns(pl.Series("part", ["train", "holdout", "val", "test"]))
    frame.write_parquet(tmp_path / "all.parquet")
    cfg = tiny_config({"path": tmp_path / "all.parquet", "split_column": "part"})
    with pytest.raises(
        DataContractError,
        match=r"all\.parquet: 1 rows of split column 'part' match none of split_values "
        r"\['train', 'val', 'test'\]: 'holdout' \(1 rows\)",
    ):
        prepare_table(cfg, tmp_path / "wh")


def test_missing_input_file_is_named(tmp_path, csv_files):
    cfg = tiny_config(csv_files | {"test": tmp_path / "nope.csv.gz"})
    with pytest.raises(DataContractError, match=r"table test file .*nope\.csv\.gz is missing or not a file"):
        prepare_table(cfg, tmp_path / "wh")


def test_manifest_is_written_atomically_as_json(tmp_path, csv_files):
    warehouse = tmp_path / "wh"
    prepared = prepare_table(tiny_config(csv_files), warehouse)
    on_disk = json.loads(table_manifest_path(warehouse).read_text())
    assert on_disk == prepared.manifest
    assert not [p for p in table_dir(warehouse).iterdir() if p.name.startswith(".tmp-")]


def test_vocabulary_with_event_days_is_never_reset(tmp_path, csv_files):
    cfg = tiny_config(csv_files)
    warehouse = tmp_path / "wh"
    update_vocabulary(warehouse, cfg.features.sparse[0], dt.date(2026, 5, 1), pa.array(["a", "b"]))
    with pytest.raises(
        StageError,
        match=r"vocab/item_id holds event-log days \(2026-05-01, \.\.\.\): a table source needs a warehouse of its own",
    ):
        prepare_table(cfg, warehouse)
    assert read_manifest(warehouse, "item_id")["applied_days"] == {"2026-05-01": 1}
