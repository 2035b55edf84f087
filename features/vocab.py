"""Append-only vocabularies, one per sparse id or list feature of the spec (a kind = "bucket"
feature has none: its configured boundaries, ``Buckets``, stand in).

An id keeps its index forever, so yesterday's embedding rows stay valid for a warm start:

* index 0 is padding (null values); admitted ids get 1..capacity in order of admission;
* counts are cumulative over the nights applied; an id is admitted the night its count
  reaches ``min_count``, while capacity allows. Ids admitted the same night are ordered by
  count (descending) then key, so the order never depends on row order;
* every other id maps to an OOV bucket by ``serving.encoding.stable_hash`` (the scorer
  uses the same function, so offline and online encodings agree).

On disk, per feature::

    <warehouse>/vocab/<feature>/v000001.parquet   key string, index int64 (0: not admitted), count int64
    <warehouse>/vocab/<feature>/manifest.json     current version, versions (day, sizes, sha256),
                                                  applied days -> version after that day

A version is written each night the content changes; old versions are kept (an old bundle
or a warm start can read them). Applying a day that was already applied changes nothing
and returns the version that day produced, so rerunning a night never double-counts.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.catalog import vocab_manifest_path, vocab_version_path
from features.config import SparseFeature
from features.errors import StageError
from features.io import atomic_write_bytes, atomic_write_json, sha256_file
from features.snapshots import CodedColumn
from serving.encoding import (
    as_strings,
    bucket_ids,
    encode_ids,
    encode_list_ids,
    list_elements,
)

VOCAB_SCHEMA = pa.schema([("key", pa.large_string()), ("index", pa.int64()), ("count", pa.int64())])


@dataclass(frozen=True)
class Vocabulary:
    """One version of a feature's vocabulary (every id seen, admitted or not)."""

    name: str
    capacity: int
    oov_buckets: int
    version: int  # 0: nothing applied yet (empty)
    table: pa.Table  # VOCAB_SCHEMA: admitted rows first by index, then the rest by key
    admitted_keys: pa.LargeStringArray = field(init=False, repr=False)
    admitted_indices: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        index = self.table.column("index").to_numpy()
        admitted = index > 0
        object.__setattr__(self, "admitted_keys", as_strings(self.table.column("key")).filter(pa.array(admitted)))
        object.__setattr__(self, "admitted_indices", index[admitted])

    @property
    def size(self) -> int:
        """Admitted ids (in-vocabulary rows in use, at most capacity)."""
        return len(self.admitted_indices)

    @property
    def num_embeddings(self) -> int:
        return 1 + self.capacity + self.oov_buckets

    def encode(self, values: pa.Array | pa.ChunkedArray | CodedColumn) -> np.ndarray:
        """Embedding rows (int64) of an id column (a coded one: once per distinct value)."""
        if isinstance(values, CodedColumn):
            return np.append(self.encode(as_strings(values.values)), 0)[values.codes]  # null: padding
        return encode_ids(values, self.admitted_keys, self.admitted_indices, self.capacity, self.oov_buckets)

    def encode_list(self, values: pa.Array | pa.ChunkedArray) -> pa.LargeListArray:
        """Embedding rows of a list column (offsets kept)."""
        return encode_list_ids(values, self.admitted_keys, self.admitted_indices, self.capacity, self.oov_buckets)


@dataclass(frozen=True)
class Buckets:
    """What stands in for a vocabulary for a kind = "bucket" feature: its boundaries come
    from the config, so nothing is learned from the data or stored (version 0)."""

    name: str
    boundaries: tuple[float, ...]
    version: int = 0

    def encode(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Embedding rows (int64) of a numeric column."""
        return bucket_ids(values, self.boundaries)


def read_manifest(warehouse: Path, name: str) -> dict:
    """The feature's vocabulary manifest; an empty one when none was written yet."""
    path = vocab_manifest_path(warehouse, name)
    if not path.exists():
        return {"feature": name, "current_version": 0, "versions": [], "applied_days": {}}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"vocabulary manifest {path} is unreadable: {err}") from None


def load_vocabulary(warehouse: Path, feature: SparseFeature, version: int | None = None) -> Vocabulary | Buckets:
    """A version of ``feature``'s vocabulary (default: the current one; 0: empty)."""
    if feature.kind == "bucket":
        return Buckets(feature.name, tuple(feature.boundaries))
    if version is None:
        version = read_manifest(warehouse, feature.name)["current_version"]
    if version == 0:
        return Vocabulary(feature.name, feature.capacity, feature.oov_buckets, 0, VOCAB_SCHEMA.empty_table())
    path = vocab_version_path(warehouse, feature.name, version)
    if not path.exists():
        raise StageError(f"vocabulary {feature.name!r} version {version} not found: {path}")
    table = pq.read_table(path, schema=VOCAB_SCHEMA)
    return Vocabulary(feature.name, feature.capacity, feature.oov_buckets, version, table)


def day_counts(
    values: pa.Array | pa.ChunkedArray | CodedColumn, kind: str, weights: np.ndarray | None = None
) -> tuple[pa.Array, np.ndarray]:
    """Distinct keys of a column and how often each occurs (list columns flattened, nulls
    dropped). ``weights``: how many rows each value stands for (default 1 each). A
    dictionary-encoded or coded column is counted from its codes without rehashing."""
    if isinstance(values, CodedColumn):
        return as_strings(values.values), np.bincount(values.codes, minlength=values.null_code + 1)[:-1].astype(
            np.int64
        )
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if kind == "list":
        lengths, values = list_elements(values)
        weights = None if weights is None else np.repeat(weights, lengths)
    if not pa.types.is_dictionary(values.type):
        values = pc.dictionary_encode(as_strings(values))
    valid = values.is_valid().to_numpy(zero_copy_only=False)
    codes = pc.fill_null(values.indices, 0).to_numpy(zero_copy_only=False)[valid]
    counts = np.bincount(codes, weights=None if weights is None else weights[valid], minlength=len(values.dictionary))
    return as_strings(values.dictionary), counts.round().astype(np.int64)


def merge_counts(previous: pa.Table, keys: pa.Array, counts: np.ndarray, feature: SparseFeature) -> pa.Table:
    """The next vocabulary content: cumulative counts plus this night's admissions."""
    old = pl.from_arrow(previous)
    day = (
        pl.DataFrame({"key": pl.Series(keys, dtype=pl.String), "day_count": counts})
        .filter(pl.col("day_count") > 0)
        .group_by("key")
        .agg(pl.col("day_count").sum())
    )
    merged = (
        old.join(day, on="key", how="full", coalesce=True)
        .with_columns(
            pl.col("index").fill_null(0),
            (pl.col("count").fill_null(0) + pl.col("day_count").fill_null(0)).alias("count"),
        )
        .drop("day_count")
    )
    n_admitted = int((merged["index"] > 0).sum())
    if n_admitted > feature.capacity:
        raise StageError(
            f"vocabulary {feature.name!r} already holds {n_admitted} ids, above features.sparse capacity "
            f"{feature.capacity}: capacity can grow, never shrink"
        )
    admit = (
        merged.filter((pl.col("index") == 0) & (pl.col("count") >= feature.min_count))
        .sort(["count", "key"], descending=[True, False])
        .head(feature.capacity - n_admitted)
        .select("key", (pl.int_range(1, pl.len() + 1, dtype=pl.Int64) + n_admitted).alias("new_index"))
    )
    merged = (
        merged.join(admit, on="key", how="left")
        .with_columns(pl.coalesce("new_index", "index").alias("index"))
        .select("key", "index", "count")
    )
    # Stable layout: admitted by index, then the rest by key (same content -> same bytes).
    admitted = merged.filter(pl.col("index") > 0).sort("index")
    rest = merged.filter(pl.col("index") == 0).sort("key")
    return pl.concat([admitted, rest]).to_arrow().cast(VOCAB_SCHEMA)


def update_vocabulary(
    warehouse: Path,
    feature: SparseFeature,
    day: dt.date,
    values: pa.Array | pa.ChunkedArray | CodedColumn,
    weights: np.ndarray | None = None,
) -> Vocabulary | Buckets:
    """Apply one day's values of ``feature`` and return the vocabulary to encode that day with
    (a bucket feature: its Buckets, nothing written). ``weights``: how many rows each value
    stands for (a snapshot row: the impressions joined to it), default 1 each.

    Idempotent per day: a day already applied returns the version it produced, untouched.
    The version file is written before the manifest that points to it, both atomically, so
    a run killed in between rewrites the same file on rerun.
    """
    if feature.kind == "bucket":  # nothing to apply
        return load_vocabulary(warehouse, feature)
    manifest = read_manifest(warehouse, feature.name)
    day_s = day.isoformat()
    if day_s in manifest["applied_days"]:
        return load_vocabulary(warehouse, feature, manifest["applied_days"][day_s])
    current = load_vocabulary(warehouse, feature, manifest["current_version"])
    table = merge_counts(current.table, *day_counts(values, feature.kind, weights), feature)
    version = current.version
    if not table.equals(current.table):
        version += 1
        path = vocab_version_path(warehouse, feature.name, version)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        n_admitted = int(np.count_nonzero(table.column("index").to_numpy()))
        manifest["versions"].append(
            {
                "version": version,
                "file": path.name,
                "day": day_s,
                "admitted": n_admitted,
                "keys": table.num_rows,
                "sha256": sha256_file(path),
            }
        )
    manifest.update(
        current_version=version,
        capacity=feature.capacity,
        oov_buckets=feature.oov_buckets,
        min_count=feature.min_count,
        num_embeddings=feature.num_embeddings,
    )
    manifest["applied_days"][day_s] = version
    atomic_write_json(vocab_manifest_path(warehouse, feature.name), manifest)
    # The table just written (or unchanged), without reading it back.
    return Vocabulary(feature.name, feature.capacity, feature.oov_buckets, version, table)
