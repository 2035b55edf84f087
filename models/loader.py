"""Training-table loader: Parquet -> dense tensor + KeyedJaggedTensor + labels.

The training table (written by ``features.examples``) has one column per sparse feature
(Int64 ids for kind="id", List(Int64) for kind="list"), the List(Int64) columns of the
behaviour sequences (``sequence_columns``: element ids and ages, keys of the same
KeyedJaggedTensor after the sparse features), the float dense columns of
``FeaturesConfig.dense_names()``, the 0/1 label columns of the tasks (``click`` and
``conversion`` from event logs; a user's own table names its own), a value task's numeric
label (``value_labels``, e.g. ``conversion_value``: finite and >= 0) and the raw user id
``raw_user_id`` (features.examples cannot call it ``user_id``: a sparse feature may).

Batches are built from Arrow buffers with numpy only, never row by row:
- a block of row groups is turned into numpy arrays once: the dense columns as one
  row-major float32 matrix, the single-id features as one row-major int64 matrix,
  each list feature as (offsets, values) straight from the ListArray;
- a batch is a gather of rows from that block (an index array when shuffling, a slice
  otherwise); list rows are gathered by computing their value positions from the offsets;
- the KeyedJaggedTensor gets all keys in one go in torchrec's key-major layout.

Shuffling is two-level, both seeded by (seed, epoch): the order of row groups, then a
permutation of an in-memory buffer of at least ``shuffle_buffer_rows`` rows. Rows that do
not fill a last batch of one buffer start the next batch, so every row is yielded exactly
once per epoch and only the epoch's final batch can be short.

A single-id feature always has length 1, also for the padding index 0: row 0 of an
embedding table is a real (padding) row, so the pooled output keeps the same meaning for
every example. An empty list has length 0.

Negative down-sampling (``negative_sampling_rate`` r < 1, training loaders only): each row
group keeps every positive of ``sampled_label`` (the first task's label) and each negative
whose seeded uniform draw is below r. The draws are seeded by (seed, file, row group) and
the row's place in its group, never by the epoch, the shuffle or the shard: every epoch and
any number of ranks see the same kept rows, so the batches per epoch are known up front
(counted from the label column alone). The correction of the model's output is the model's
(``models.calibration``).

``weight`` (``train.sample_weight``): a SQL expression over the table's columns, evaluated
per row group (polars, vectorised), finite and >= 0; ``Batch.weight`` carries it.

``Batch.user`` is a per-loader integer code of the raw user id (column ``raw_user_id``) for
GAUC: its rank among the sorted distinct user ids of all the loader's files (the same for
every rank of a sharded run and every epoch); -1 for a null id or when the table has no
such column.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.config import EVENT_LABELS, SparseFeature
from features.errors import StageError
from models.config import TrainingConfig

USER_COLUMN = "raw_user_id"  # the raw user id (a sparse feature may be named user_id)
_WEIGHT = "__sample_weight"  # the computed sample weight, a column of the tables read
_SAMPLING_STREAM = 0x5A4D  # keeps the sampling draws apart from other uses of the seed


@dataclass
class Batch:
    dense: torch.Tensor  # float32 [B, n_dense]
    sparse: KeyedJaggedTensor  # keys = sparse feature names in spec order
    label_matrix: torch.Tensor  # float32 [B, n_labels], columns in ``label_names`` order
    label_names: tuple[str, ...]
    user: torch.Tensor  # int64 [B], per-loader code of raw_user_id; -1 if absent
    weight: torch.Tensor | None = None  # float32 [B], each row's loss weight (train.sample_weight)

    def __len__(self) -> int:
        return self.dense.shape[0]

    @property
    def labels(self) -> dict[str, torch.Tensor]:
        """Label column name -> float32 [B] (views of ``label_matrix``)."""
        return {name: self.label_matrix[:, i] for i, name in enumerate(self.label_names)}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(torch.device(device), non_blocking=non_blocking),
            label_matrix=self.label_matrix.to(device, non_blocking=non_blocking),
            label_names=self.label_names,
            user=self.user.to(device, non_blocking=non_blocking),
            weight=None if self.weight is None else self.weight.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            label_matrix=self.label_matrix.pin_memory(),
            label_names=self.label_names,
            user=self.user.pin_memory(),
            weight=None if self.weight is None else self.weight.pin_memory(),
        )


def parquet_files(directory: Path) -> list[Path]:
    """The Parquet parts of one training-table day folder, sorted by name."""
    files = sorted(Path(directory).glob("*.parquet"))
    if not files:
        raise StageError(f"no *.parquet files in training table folder {directory}")
    return files


def rows_in(files: Sequence[Path]) -> int:
    """Total rows of ``files`` from their Parquet footers (no data read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


@dataclass(frozen=True)
class _RowGroup:
    """Rows ``start`` .. ``start + rows`` of row group ``index`` of ``file`` (a whole
    group, or the part of it in a rank's share)."""

    file: Path
    index: int
    rows: int
    start: int = 0


@dataclass
class _Block:
    """Rows of the training table as numpy arrays (see the module docstring)."""

    dense: np.ndarray  # float32 [N, n_dense], row-major
    ids: np.ndarray  # int64 [N, n_id_features], row-major
    list_offsets: list[np.ndarray]  # per list feature: int64 [N + 1], positions into list_values
    list_values: list[np.ndarray]  # per list feature: int64
    labels: np.ndarray  # float32 [N, n_labels], row-major
    user: np.ndarray  # int64 [N]
    weight: np.ndarray | None  # float32 [N], or None without train.sample_weight

    def __len__(self) -> int:
        return len(self.user)


def _check_schema(
    path: Path,
    schema: pa.Schema,
    sparse: Sequence[SparseFeature],
    sequence_columns: Sequence[str],
    dense_names: Sequence[str],
    labels: Sequence[str],
    value_labels: Sequence[str] = (),
) -> None:
    """Raise StageError naming the file and column for a missing or mistyped column."""

    def column_type(name: str, wanted: str) -> pa.DataType:
        if name not in schema.names:
            raise StageError(f"training table {path}: missing column '{name}' ({wanted})")
        return schema.field(name).type

    def bad(name: str, wanted: str, got: pa.DataType) -> StageError:
        return StageError(f"training table {path}: column '{name}' has type {got}, expected {wanted}")

    lists = [f.name for f in sparse if f.kind == "list"] + list(sequence_columns)
    for feature in sparse:
        if feature.kind != "list":  # id, bucket
            t = column_type(feature.name, "integer ids")
            if not pa.types.is_integer(t):
                raise bad(feature.name, "integer ids", t)
    for name in lists:
        t = column_type(name, "list of integers")
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_integer(t.value_type):
            raise bad(name, "list of integers", t)
    for name in dense_names:
        t = column_type(name, "float")
        if not pa.types.is_floating(t):
            raise bad(name, "float", t)
    for name in labels:
        if name in value_labels:
            t = column_type(name, "numeric value label")
            if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
                raise bad(name, "numeric value label (integer or float)", t)
            continue
        t = column_type(name, "0/1 label")
        if not (pa.types.is_integer(t) or pa.types.is_boolean(t)):
            raise bad(name, "0/1 label (integer or bool)", t)
    if USER_COLUMN in schema.names:
        t = schema.field(USER_COLUMN).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise bad(USER_COLUMN, "string", t)


def _check_values(name: str, values: np.ndarray) -> None:
    """StageError naming value label column ``name`` when a value is not finite or negative
    (null reads as NaN): a value task's loss takes log1p or a log of them."""
    bad = ~(np.isfinite(values) & (values >= 0.0))
    if bad.any():
        shown = ", ".join(map(repr, np.unique(values[bad])[:5].tolist()))
        raise StageError(
            f"training table: value label column {name!r} has {int(bad.sum()):,} values that are negative, null or "
            f"not finite (e.g. {shown}); a value task learns values >= 0"
        )


def _numpy(column: pa.ChunkedArray, dtype: type) -> np.ndarray:
    """One column as a numpy array of ``dtype`` (zero-copy for a single chunk of that type)."""
    if column.num_chunks == 1:
        array = column.chunk(0).to_numpy(zero_copy_only=False)
    else:
        array = column.to_numpy()
    return array.astype(dtype, copy=False)


def _fill_columns(out: np.ndarray, columns: Sequence[np.ndarray], rows_per_step: int = 16_384) -> None:
    """Write 1-D ``columns`` side by side into the row-major matrix ``out``.

    Done a few thousand rows at a time so the strided writes stay in cache: ~6x faster
    than writing one whole column after the other.
    """
    for start in range(0, out.shape[0], rows_per_step):
        stop = start + rows_per_step
        for j, column in enumerate(columns):
            out[start:stop, j] = column[start:stop]


def _gather_list(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of a list column as new (offsets from 0, values), vectorised."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    # position of each output value: its row's start in the source + its rank within the row
    positions = np.arange(new_offsets[-1], dtype=np.int64) + np.repeat(starts - new_offsets[:-1], lengths)
    return new_offsets, np.take(values, positions)


def _rows(order: np.ndarray | None, start: int, stop: int) -> np.ndarray | slice:
    """Rows start..stop of a block read in ``order`` (None: file order)."""
    return slice(start, stop) if order is None else order[start:stop]


def _take(block: _Block, rows: np.ndarray | slice) -> _Block:
    """A sub-block: a slice gives views (no copy), an index array gathers (np.take: about
    2.5x faster than fancy indexing for row gathers)."""
    if isinstance(rows, slice):
        offsets = [o[rows.start : rows.stop + 1] for o in block.list_offsets]
        values = block.list_values
    else:
        gathered = [_gather_list(o, v, rows) for o, v in zip(block.list_offsets, block.list_values, strict=True)]
        offsets = [o for o, _ in gathered]
        values = [v for _, v in gathered]

    def pick(array: np.ndarray) -> np.ndarray:
        return array[rows] if isinstance(rows, slice) else np.take(array, rows, axis=0)

    return _Block(
        dense=pick(block.dense),
        ids=pick(block.ids),
        list_offsets=offsets,
        list_values=values,
        labels=pick(block.labels),
        user=pick(block.user),
        weight=None if block.weight is None else pick(block.weight),
    )


def _list_parts(block: _Block) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per list feature: (lengths, values) of exactly the block's rows."""
    return [(np.diff(o), v[o[0] : o[-1]]) for o, v in zip(block.list_offsets, block.list_values, strict=True)]


def _list_parts_of(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, values) of an Arrow list column, from its offsets (no per-row work)."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    return np.diff(offsets), array.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]


def _concat_lists(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several (lengths, values) pieces as one (offsets from 0, int64 values)."""
    lengths = np.concatenate([p[0] for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, np.concatenate([p[1] for p in parts], dtype=np.int64)


def _concat(blocks: Sequence[_Block]) -> _Block:
    parts_per_block = [_list_parts(b) for b in blocks]
    lists = [_concat_lists([parts[k] for parts in parts_per_block]) for k in range(len(blocks[0].list_offsets))]
    return _Block(
        dense=np.concatenate([b.dense for b in blocks]),
        ids=np.concatenate([b.ids for b in blocks]),
        list_offsets=[offsets for offsets, _ in lists],
        list_values=[values for _, values in lists],
        labels=np.concatenate([b.labels for b in blocks]),
        user=np.concatenate([b.user for b in blocks]),
        weight=None if blocks[0].weight is None else np.concatenate([b.weight for b in blocks]),
    )


class TrainingTableLoader:
    """Iterable over :class:`Batch` es of a training table (see the module docstring).

    ``shard=(rank, world)`` keeps the rank's contiguous share of the rows (files and row
    groups in order; rank r of N takes rows [r * n / N, (r + 1) * n / N) of n), so the
    ranks' shards are disjoint, cover the table and differ by at most one row, however few
    row groups it has (a row group on a boundary is read by both ranks, each keeping its
    part). Batches are built in a background
    thread, ``prefetch`` ahead (0: build them in the caller's thread). Iterating twice
    gives the same batches; call :meth:`set_epoch` for a new shuffle.
    ``negative_sampling_rate``, ``sampled_label`` (default: the first label) and ``weight``:
    see the module docstring.
    """

    def __init__(
        self,
        files: Sequence[Path],
        sparse: Sequence[SparseFeature],
        dense_names: Sequence[str],
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch: int = 0,
        shuffle_buffer_rows: int = 1 << 20,
        prefetch: int = 4,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
        pin_memory: bool = False,
        labels: Sequence[str] = EVENT_LABELS,
        value_labels: Sequence[str] = (),
        sequence_columns: Sequence[str] = (),
        negative_sampling_rate: float = 1.0,
        sampled_label: str | None = None,
        weight: str | None = None,
    ) -> None:
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        if not 0.0 < negative_sampling_rate <= 1.0:
            raise ValueError(f"negative_sampling_rate must be in (0, 1], got {negative_sampling_rate}")
        if batch_size < 1 or prefetch < 0:
            raise ValueError(f"batch_size must be >= 1 and prefetch >= 0, got {batch_size}, {prefetch}")
        if not files:
            raise StageError("training table loader got no files")
        self.files = [Path(f) for f in files]
        self.sparse = list(sparse)
        self.dense_names = list(dense_names)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.prefetch = prefetch
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.sequence_columns = list(sequence_columns)
        self.keys = [f.name for f in self.sparse] + self.sequence_columns
        self.label_names = tuple(dict.fromkeys(labels))
        if stray := [v for v in value_labels if v not in self.label_names]:
            raise ValueError(f"value_labels {stray} are not among the labels {self.label_names}")
        self.value_labels = tuple(value_labels)
        self.negative_sampling_rate = negative_sampling_rate
        self.sampled_label = sampled_label or self.label_names[0]
        if self.sampled_label not in self.label_names:
            raise ValueError(f"sampled_label {self.sampled_label!r} is not one of the labels {self.label_names}")
        self.weight = weight
        self._weight_expression = None
        weight_columns: list[str] = []
        if weight is not None:
            from models.config import sample_weight_expression

            self._weight_expression = sample_weight_expression(weight).cast(float)
            weight_columns = self._weight_expression.meta.root_names()
        self._id_features = [f.name for f in self.sparse if f.kind != "list"]  # one id per row: id, bucket
        self._list_features = [f.name for f in self.sparse if f.kind == "list"] + self.sequence_columns

        row_groups: list[_RowGroup] = []  # every non-empty row group, whole
        self._has_user = True
        for path in self.files:
            try:
                parquet = pq.ParquetFile(path)
            except (OSError, pa.ArrowInvalid) as err:
                raise StageError(f"cannot read training table file {path}: {err}") from None
            _check_schema(
                path,
                parquet.schema_arrow,
                self.sparse,
                self.sequence_columns,
                self.dense_names,
                self.label_names,
                self.value_labels,
            )
            if missing := [c for c in weight_columns if c not in parquet.schema_arrow.names]:
                raise StageError(
                    f"training table {path}: no column {', '.join(map(repr, missing))} for the sample weight "
                    f"{weight!r} (train.sample_weight)"
                )
            self._has_user &= USER_COLUMN in parquet.schema_arrow.names
            meta = parquet.metadata
            row_groups += [
                _RowGroup(path, i, meta.row_group(i).num_rows)
                for i in range(meta.num_row_groups)
                if meta.row_group(i).num_rows > 0
            ]
        self._row_groups = _share(row_groups, rank, world)
        self._file_index = {path: i for i, path in enumerate(self.files)}
        self._columns = list(
            dict.fromkeys(
                self.keys
                + self.dense_names
                + list(self.label_names)
                + ([USER_COLUMN] if self._has_user else [])
                + weight_columns
            )
        )
        self._user_dictionary: pa.Array | None = None
        self._user_lock = threading.Lock()
        self.source_rows = sum(g.rows for g in self._row_groups)  # of this shard, before negative sampling
        self._kept_rows = self.source_rows if negative_sampling_rate == 1.0 else self._count_kept_rows()

    @property
    def rows(self) -> int:
        """Rows of this loader's shard that it yields per epoch (kept by the negative sampling)."""
        return self._kept_rows

    def _count_kept_rows(self) -> int:
        """The rows the negative sampling keeps, from the sampled label column alone."""
        kept, files = 0, {}
        for group in self._row_groups:
            if group.file not in files:
                files[group.file] = pq.ParquetFile(group.file)
            labels = files[group.file].read_row_group(group.index, columns=[self.sampled_label])
            kept += int(self._kept(group, labels.column(0).slice(group.start, group.rows)).sum())
        return kept

    def _kept(self, group: _RowGroup, labels: pa.ChunkedArray) -> np.ndarray:
        """Which of ``group``'s rows the negative sampling keeps: every positive of the sampled
        label, each negative whose draw is below the rate. The draws follow the row's place in
        the whole row group (seeded by seed, file and group), so a group cut between two ranks
        draws the same numbers on both."""
        rng = np.random.default_rng([self.seed, _SAMPLING_STREAM, self._file_index[group.file], group.index])
        draws = rng.random(group.start + group.rows)[group.start :]
        return (_numpy(labels, np.float32) > 0) | (draws < self.negative_sampling_rate)

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        if self.prefetch == 0:
            yield from self._batches()
            return
        yield from _prefetched(self._batches, self.prefetch)

    # -- reading -------------------------------------------------------------------------

    def _user_codes_dictionary(self) -> pa.Array:
        """Sorted distinct user ids of all files (built once, on first use)."""
        with self._user_lock:
            if self._user_dictionary is None:
                distinct = [
                    pc.unique(pq.read_table(f, columns=[USER_COLUMN]).column(0).combine_chunks()) for f in self.files
                ]
                merged = pc.unique(pa.chunked_array(distinct).combine_chunks().drop_null())
                self._user_dictionary = pc.take(merged, pc.sort_indices(merged))
            return self._user_dictionary

    def _read_table(self, group: _RowGroup, parquet: pq.ParquetFile) -> pa.Table:
        """The group's rows (the negative sampling's kept ones) with the sample weight, if any,
        as the column ``_WEIGHT``."""
        table = parquet.read_row_group(group.index, columns=self._columns).slice(group.start, group.rows)  # zero-copy
        for name in self.keys + self.dense_names + list(self.label_names):
            if table.column(name).null_count:
                raise StageError(
                    f"training table {group.file}: column '{name}' has {table.column(name).null_count} "
                    f"null values in row group {group.index}"
                )
        if self._weight_expression is not None:
            table = table.append_column(_WEIGHT, pa.array(self._weights(table, group), type=pa.float32()))
        if self.negative_sampling_rate < 1.0:
            table = table.filter(pa.array(self._kept(group, table.column(self.sampled_label))))
        return table

    def _weights(self, table: pa.Table, group: _RowGroup) -> np.ndarray:
        """The sample weight of each row of ``table``: StageError naming the file and row group
        when the expression fails on its columns or a weight is null, negative or not finite."""
        import polars as pl

        where = f"training table {group.file}, row group {group.index}: sample weight {self.weight!r}"
        try:
            weights = pl.from_arrow(table.select(self._weight_expression.meta.root_names())).select(
                self._weight_expression
            )
        except pl.exceptions.PolarsError as err:
            raise StageError(f"{where} (train.sample_weight) cannot be computed: {err}") from None
        values = weights.to_series().to_numpy().astype(np.float64)
        if bad := int(np.count_nonzero(~(np.isfinite(values) & (values >= 0)))):
            raise StageError(f"{where} (train.sample_weight) is null, negative or not finite on {bad:,} rows")
        return values

    def _block(self, tables: list[pa.Table]) -> _Block:
        """Numpy arrays of several row groups' tables: one copy into the batch-friendly
        layout, filled table by table so Arrow's buffers are read zero-copy."""
        n = sum(t.num_rows for t in tables)
        dense = np.empty((n, len(self.dense_names)), dtype=np.float32)
        ids = np.empty((n, len(self._id_features)), dtype=np.int64)
        labels = np.empty((n, len(self.label_names)), dtype=np.float32)
        start = 0
        for table in tables:
            stop = start + table.num_rows
            _fill_columns(dense[start:stop], [_numpy(table.column(name), np.float32) for name in self.dense_names])
            _fill_columns(ids[start:stop], [_numpy(table.column(name), np.int64) for name in self._id_features])
            _fill_columns(labels[start:stop], [_numpy(table.column(name), np.float32) for name in self.label_names])
            start = stop
        for name in self.value_labels:
            _check_values(name, labels[:, self.label_names.index(name)])
        lists = [_concat_lists([_list_parts_of(t.column(name)) for t in tables]) for name in self._list_features]
        if self._has_user:
            dictionary = self._user_codes_dictionary()
            codes = [pc.fill_null(pc.index_in(t.column(USER_COLUMN), value_set=dictionary), -1) for t in tables]
            user = np.concatenate([_numpy(c, np.int64) for c in codes])
        else:
            user = np.full(n, -1, dtype=np.int64)
        weight = None
        if self._weight_expression is not None:
            weight = np.concatenate([_numpy(t.column(_WEIGHT), np.float32) for t in tables])
        return _Block(
            dense=dense,
            ids=ids,
            list_offsets=[offsets for offsets, _ in lists],
            list_values=[values for _, values in lists],
            labels=labels,
            user=user,
            weight=weight,
        )

    def _blocks(self, rng: np.random.Generator) -> Iterator[_Block]:
        """Blocks of whole row groups, each of >= shuffle_buffer_rows rows (except the last)
        when shuffling, one row group each otherwise."""
        order = rng.permutation(len(self._row_groups)) if self.shuffle else range(len(self._row_groups))
        min_rows = self.shuffle_buffer_rows if self.shuffle else 1
        open_files: dict[Path, pq.ParquetFile] = {}
        pending: list[pa.Table] = []
        pending_rows = 0
        for position, i in enumerate(order):
            group = self._row_groups[i]
            if group.file not in open_files:
                open_files[group.file] = pq.ParquetFile(group.file)
            pending.append(self._read_table(group, open_files[group.file]))
            pending_rows += pending[-1].num_rows
            if pending_rows >= min_rows or position == len(order) - 1:
                block = self._block(pending)
                # hold neither the decoded tables while the block is used, nor the block
                # while the next tables are read
                pending.clear()
                pending_rows = 0
                yield block
                del block

    def _batches(self) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.epoch])
        size = self.batch_size
        carry: _Block | None = None  # rows of the previous block that did not fill a batch
        for block in self._blocks(rng):
            n = len(block)
            order = rng.permutation(n) if self.shuffle else None
            pos = 0
            if carry is not None:
                pos = min(size - len(carry), n)
                carry = _concat([carry, _take(block, _rows(order, 0, pos))])
                if len(carry) == size:
                    yield self._batch(carry)
                    carry = None
            while n - pos >= size:
                yield self._batch(_take(block, _rows(order, pos, pos + size)))
                pos += size
            if pos < n:
                carry = _take(block, _rows(order, pos, n))
            del block, order  # free this buffer before the next one is read
        if carry is not None and not self.drop_last:
            yield self._batch(carry)

    def _batch(self, block: _Block) -> Batch:
        lists = dict(zip(self._list_features, _list_parts(block), strict=True))
        ids = dict(zip(self._id_features, block.ids.T, strict=True))  # key-major rows
        n = len(block)
        ones = np.ones(n, dtype=np.int64)
        values = [ids[k] if k in ids else lists[k][1] for k in self.keys]
        lengths = [ones if k in ids else lists[k][0] for k in self.keys]
        sparse = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
            stride=n,
        )
        batch = Batch(
            dense=torch.from_numpy(np.ascontiguousarray(block.dense)),
            sparse=sparse,
            label_matrix=torch.from_numpy(np.ascontiguousarray(block.labels)),
            label_names=self.label_names,
            user=torch.from_numpy(np.ascontiguousarray(block.user)),
            weight=None if block.weight is None else torch.from_numpy(np.ascontiguousarray(block.weight)),
        )
        return batch.pin_memory() if self.pin_memory else batch


def table_loader(
    cfg: TrainingConfig, files: Sequence[Path], batch_size: int, shuffle: bool, **options
) -> TrainingTableLoader:
    """A loader of ``files`` reading the run config's columns (sparse features, sequences,
    dense features, labels) with its seed; ``options`` as TrainingTableLoader takes them."""
    spec = cfg.features
    return TrainingTableLoader(
        files,
        spec.sparse,
        spec.dense_names(),
        batch_size,
        shuffle,
        options.pop("seed", cfg.seed),
        labels=cfg.label_columns,
        value_labels=cfg.value_label_columns,
        sequence_columns=spec.sequence_columns(),
        **options,
    )


def _share(groups: Sequence[_RowGroup], rank: int, world: int) -> list[_RowGroup]:
    """Rank ``rank`` of ``world``'s contiguous share of the rows of ``groups`` (whole row
    groups): the groups inside it, and the parts of the (at most two) it cuts."""
    total = sum(g.rows for g in groups)
    first, last = total * rank // world, total * (rank + 1) // world
    mine, offset = [], 0
    for g in groups:
        lo, hi = max(first, offset), min(last, offset + g.rows)
        if lo < hi:
            mine.append(_RowGroup(g.file, g.index, hi - lo, lo - offset))
        offset += g.rows
    return mine


class _WorkerError:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def _prefetched(produce, depth: int) -> Iterator[Batch]:
    """Run the generator function ``produce`` in a thread, ``depth`` items ahead.

    An exception in the thread is re-raised in the consumer; when the consumer stops early
    (break, exception, garbage collection) the thread is told to stop and joined.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in produce():
                if not put(item):
                    return
            put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises
            put(_WorkerError(err))

    worker = threading.Thread(target=work, name="TrainingTableLoader-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _WorkerError):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()
