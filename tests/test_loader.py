"""models.loader on real Parquet files: exact round trip, shuffling, shards, errors, threads."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from benchmarks.bench_loader import synthetic_training_table
from features.errors import StageError
from features.examples import ROW_GROUP_ROWS
from models.loader import Batch, TrainingTableLoader, parquet_files, rows_in
from pipeline.config import load_config

SPEC = load_config(Path(__file__).parents[1] / "configs" / "demo.toml").features
DENSE = SPEC.dense_names()
LIST_FEATURES = [f.name for f in SPEC.sparse if f.kind == "list"]


@pytest.fixture
def table_files(tmp_path: Path) -> tuple[list[Path], pa.Table]:
    """Two files (250 rows in row groups of 37, 180 rows in row groups of 50)."""
    parts = [
        synthetic_training_table(SPEC, 250, seed=1, users=30),
        synthetic_training_table(SPEC, 180, seed=2, users=30),
    ]
    paths = []
    for i, (part, group_rows) in enumerate(zip(parts, (37, 50), strict=True)):
        path = tmp_path / f"part-{i}.parquet"
        pq.write_table(part, path, row_group_size=group_rows)
        paths.append(path)
    return paths, pa.concat_tables(parts)


def _loader(files: list[Path], **kwargs) -> TrainingTableLoader:
    options = {"batch_size": 64, "shuffle": False, "seed": 3} | kwargs
    return TrainingTableLoader(files, SPEC.sparse, DENSE, **options)


def _collect(batches: list[Batch]) -> dict[str, np.ndarray]:
    """All batches concatenated: dense, labels, users and per feature (lengths, values)."""
    out = {
        "dense": np.concatenate([b.dense.numpy() for b in batches]),
        "click": np.concatenate([b.labels["click"].numpy() for b in batches]),
        "conversion": np.concatenate([b.labels["conversion"].numpy() for b in batches]),
        "user": np.concatenate([b.user.numpy() for b in batches]),
    }
    for feature in SPEC.sparse:
        jagged = [b.sparse[feature.name] for b in batches]
        out[f"{feature.name}.lengths"] = np.concatenate([j.lengths().numpy() for j in jagged])
        out[f"{feature.name}.values"] = np.concatenate([j.values().numpy() for j in jagged])
    return out


def _expected(table: pa.Table) -> dict[str, np.ndarray]:
    out = {
        "dense": np.stack([table.column(n).to_numpy() for n in DENSE], axis=1),
        "click": table.column("click").to_numpy().astype(np.float32),
        "conversion": table.column("conversion").to_numpy().astype(np.float32),
    }
    for feature in SPEC.sparse:
        column = table.column(feature.name)
        if feature.kind == "list":
            out[f"{feature.name}.lengths"] = pc.list_value_length(column).to_numpy()
            out[f"{feature.name}.values"] = pc.list_flatten(column).to_numpy()
        else:
            out[f"{feature.name}.lengths"] = np.ones(table.num_rows, dtype=np.int64)
            out[f"{feature.name}.values"] = column.to_numpy()
    return out


def _assert_same_rows(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_round_trip_without_shuffle_is_exact(table_files):
    files, table = table_files
    loader = _loader(files)
    batches = list(loader)

    assert len(batches) == len(loader) == 7  # 430 rows / 64
    assert [len(b) for b in batches] == [64] * 6 + [430 - 6 * 64]
    assert loader.rows == rows_in(files) == 430
    got = _collect(batches)
    want = _expected(table)
    assert (want["interests.lengths"] == 0).any(), "the table should have empty lists"
    assert (want["gender.values"] == 0).any(), "the table should have padding ids"
    _assert_same_rows(got, want)

    # user codes: rank of the raw id among the sorted distinct ids
    raw = table.column("raw_user_id").to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(got["user"], np.searchsorted(np.unique(raw), raw))


def test_batch_types_and_kjt_layout(table_files):
    files, _ = table_files
    batch = next(iter(_loader(files, batch_size=50)))
    assert batch.dense.dtype.is_floating_point and batch.dense.shape == (50, len(DENSE))
    assert batch.labels["click"].shape == batch.labels["conversion"].shape == batch.user.shape == (50,)
    assert batch.label_names == ("click", "conversion")
    kjt = batch.sparse
    assert kjt.keys() == [f.name for f in SPEC.sparse]
    assert kjt.stride() == 50
    assert str(kjt.values().dtype) == "torch.int64"
    lengths = kjt.lengths().numpy().reshape(len(SPEC.sparse), 50)  # key-major
    offsets = kjt.offsets().numpy()
    np.testing.assert_array_equal(np.diff(offsets), kjt.lengths().numpy())
    assert offsets[-1] == len(kjt.values())
    for i, feature in enumerate(SPEC.sparse):
        if feature.kind == "id":
            assert (lengths[i] == 1).all(), feature.name
    moved = batch.to("cpu")
    assert moved.sparse.keys() == kjt.keys() and len(moved) == 50


def test_shuffle_keeps_every_row_once_and_is_reproducible(table_files):
    files, table = table_files
    # a small buffer: several buffers per epoch, batches spanning two buffers
    loader = _loader(files, shuffle=True, shuffle_buffer_rows=90, batch_size=48)
    batches = list(loader)
    assert [len(b) for b in batches] == [48] * 8 + [430 - 8 * 48]
    got = _collect(batches)
    want = _expected(table)

    # dense values are random floats: the first column identifies a row
    order = np.argsort(want["dense"][:, 0])
    row_of = order[np.searchsorted(want["dense"][order, 0], got["dense"][:, 0])]
    assert sorted(row_of.tolist()) == list(range(table.num_rows)), "each row exactly once"
    assert not np.array_equal(row_of, np.arange(table.num_rows)), "shuffled"
    _assert_same_rows(got, _expected(table.take(row_of)))

    again = _collect(list(_loader(files, shuffle=True, shuffle_buffer_rows=90, batch_size=48)))
    np.testing.assert_array_equal(again["dense"], got["dense"])
    np.testing.assert_array_equal(again["interests.values"], got["interests.values"])

    loader.set_epoch(1)
    next_epoch = _collect(list(loader))
    assert not np.array_equal(next_epoch["dense"], got["dense"])
    other_seed = _collect(list(_loader(files, shuffle=True, shuffle_buffer_rows=90, batch_size=48, seed=4)))
    assert not np.array_equal(other_seed["dense"], got["dense"])


def test_drop_last_and_synchronous_mode(table_files):
    files, table = table_files
    loader = _loader(files, drop_last=True, prefetch=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    assert all(len(b) == 64 for b in batches)
    np.testing.assert_array_equal(_collect(batches)["dense"], _expected(table)["dense"][: 6 * 64])


def test_shards_are_disjoint_and_cover_the_table(table_files):
    files, table = table_files
    world = 3
    shards = [_collect(list(_loader(files, shard=(rank, world), shuffle=True, seed=5))) for rank in range(world)]
    keys = [s["dense"][:, 0] for s in shards]
    assert all(len(k) for k in keys)
    assert sum(len(k) for k in keys) == table.num_rows
    np.testing.assert_array_equal(np.sort(np.concatenate(keys)), np.sort(_expected(table)["dense"][:, 0]))
    assert sum(_loader(files, shard=(r, world)).rows for r in range(world)) == table.num_rows
    with pytest.raises(ValueError, match="shard"):
        _loader(files, shard=(3, 3))


def test_ranks_share_the_rows_of_a_single_row_group_evenly(tmp_path: Path):
    """A day's training table is one row group (ROW_GROUP_ROWS exceeds the rows of a demo
    day): the ranks split its rows, disjoint, covering it, at most one row apart."""
    table = synthetic_training_table(SPEC, 301, seed=4, users=30)
    path = tmp_path / "part-0.parquet"
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    for world in (2, 3):
        loaders = [
            _loader([path], shard=(rank, world), shuffle=True, shuffle_buffer_rows=50, seed=5) for rank in range(world)
        ]
        keys = [_collect(list(loader))["dense"][:, 0] for loader in loaders]
        assert max(map(len, keys)) - min(map(len, keys)) <= 1
        assert [loader.rows for loader in loaders] == list(map(len, keys))
        np.testing.assert_array_equal(np.sort(np.concatenate(keys)), np.sort(_expected(table)["dense"][:, 0]))
    # in order, rank 0's rows come first
    first = _collect(list(_loader([path], shard=(0, 2))))
    np.testing.assert_array_equal(first["dense"], _expected(table)["dense"][:150])


def test_missing_and_mistyped_columns_name_file_and_column(tmp_path: Path):
    table = synthetic_training_table(SPEC, 20, seed=0)
    missing = tmp_path / "missing.parquet"
    pq.write_table(table.drop_columns(["item_ctr_7d"]), missing)
    with pytest.raises(StageError, match=r"missing\.parquet.*missing column 'item_ctr_7d'"):
        _loader([missing])

    mistyped = tmp_path / "mistyped.parquet"
    index = table.column_names.index("interests")
    pq.write_table(table.set_column(index, "interests", pa.array(["a"] * 20)), mistyped)
    with pytest.raises(StageError, match=r"mistyped\.parquet.*'interests' has type string"):
        _loader([mistyped])

    with pytest.raises(StageError, match="no \\*.parquet files"):
        parquet_files(tmp_path / "nothing-here")


def test_table_without_user_ids_gets_minus_one(tmp_path: Path):
    path = tmp_path / "part-0.parquet"
    pq.write_table(synthetic_training_table(SPEC, 30, seed=0).drop_columns(["raw_user_id"]), path)
    assert (_collect(list(_loader([path])))["user"] == -1).all()


def test_worker_error_reaches_the_consumer(tmp_path: Path):
    table = synthetic_training_table(SPEC, 200, seed=0)
    path = tmp_path / "part-0.parquet"
    pq.write_table(table, path, row_group_size=50)
    loader = _loader([path], batch_size=10, prefetch=2)
    # after the footer was checked, replace the file with one whose labels have nulls
    clicks = pa.array(np.where(np.arange(200) == 120, None, 0), pa.int8())
    pq.write_table(table.set_column(table.column_names.index("click"), "click", clicks), path, row_group_size=50)
    seen = 0
    with pytest.raises(StageError, match=r"part-0\.parquet.*'click' has 1 null values in row group 2"):
        for _ in loader:
            seen += 1
    assert seen == 10  # the two clean row groups came through first
    assert not _prefetch_threads()


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "TrainingTableLoader-prefetch" and t.is_alive()]


def test_early_break_stops_the_worker(table_files):
    files, _ = table_files
    loader = _loader(files, batch_size=4, prefetch=1)
    for _ in loader:
        break
    gc.collect()
    assert not _prefetch_threads()

    iterator = iter(loader)
    next(iterator)
    assert _prefetch_threads()  # blocked on a full queue
    del iterator
    gc.collect()
    assert not _prefetch_threads()
