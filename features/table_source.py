"""The user's own feature table (``[table]`` source) as training tables: no event logs.

``prepare_table`` reads the table named by ``cfg.table`` (three files, or one file split
by a column), checks it, and writes per split ``<warehouse>/table/<split>/part-0.parquet``
in the column format of the event path's training tables (features.examples), so
``models.loader.TrainingTableLoader`` reads them unchanged:

* ``raw_user_id`` large_string, from ``table.user_column`` (for GAUC); absent without one;
* one Int8 0/1 column per task label, named ``task.label_column``;
* sparse features, named as in the spec: Int64 embedding rows (kind=id) or
  List(Int64) (kind=list), encoded with vocabularies built from the train split only;
* dense features, Float32, in ``cfg.features.dense_names()`` order, transformed by
  ``features.examples.numeric_feature_expr``.

Inputs: Parquet is read directly. CSV (``.csv`` or ``.csv.gz``) is converted once to
Parquet, cached under ``<warehouse>/table/source/<sha256 of the CSV>/`` (types inferred
from the whole file; an empty cell is null). A list feature read from a CSV string column
holds its ids separated by ``LIST_DELIMITER`` (``3|17|42``; an empty cell is an empty
list); from Parquet it is a list column of integer or string ids.

Vocabularies: the table is one dataset, not a sequence of days, so the train split's ids
are applied as the single day ``TABLE_DAY``; val/test ids unseen in train encode to OOV
buckets. A rebuild (changed inputs or spec) starts the table features' vocabularies
afresh from version 1, since the old ids belong to another dataset; a vocabulary that
holds event-log days is never touched (use a separate warehouse for a table source).

A feature value that is not finite after its transform (a raw inf, a number beyond
float32's range) is refused naming the file, split and column
(``features.examples.check_finite_dense``): it would train a NaN model.

Rows whose label is null go to ``<warehouse>/table/quarantine/<split>/`` (with a
``reason``) and are counted in the manifest: rows in = rows out + quarantined.

Rerun safety: ``<warehouse>/table/manifest.json`` (written last, atomically) holds the
sha256 of every input file, of the spec (features, tasks, table section) and of every
written file; a rerun with the same inputs and intact outputs is skipped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from features.catalog import (
    DATA_FILE,
    table_csv_dir,
    table_dir,
    table_manifest_path,
    table_quarantine_dir,
    table_split_dir,
    vocab_dir,
)
from features.config import DataConfig, SparseFeature, TableSourceConfig, repeated
from features.errors import DataContractError, StageError
from features.examples import check_finite_dense, numeric_feature_expr
from features.io import atomic_dir, atomic_write_json, sha256_file, write_parquet_dir
from features.vocab import Buckets, Vocabulary, read_manifest, update_vocabulary
from serving.encoding import as_strings

SPLITS = ("train", "val", "test")
# The one "day" a table source's vocabularies are built on (the train split's ids): fixed,
# so a rerun applies the same day again and gets the same versions.
TABLE_DAY = dt.date(1970, 1, 1)
LIST_DELIMITER = "|"  # separates the ids of a list feature in a CSV cell
REASON = "reason"
BAD_VALUES_SHOWN = 5
# models.loader.USER_COLUMN, the loader's GAUC grouping column (not imported: the features
# stages never load torch).
USER_COLUMN = "raw_user_id"
# Smaller than the event path's row groups: a torchrun job needs a row group per rank in
# every split, and a user's table may be small (Census-Income val: 19,952 rows -> 2).
TABLE_ROW_GROUP_ROWS = 16_384
ID_TYPES = (pl.String, pl.Categorical)  # besides integers: ids are keyed by their text


@dataclass(frozen=True)
class PreparedTable:
    files: dict[str, list[Path]]  # split -> its training-table Parquet files
    manifest: dict
    skipped: bool  # True: the tables from the same inputs were already there


def spec_sha256(cfg: DataConfig) -> str:
    """Hash of the config sections that decide the tables' content."""
    spec = {
        "features": cfg.features.model_dump(mode="json"),
        "tasks": [t.model_dump(mode="json") for t in cfg.tasks],
        "table": cfg.table.model_dump(mode="json") if cfg.table else None,
        "table_day": TABLE_DAY.isoformat(),
        "list_delimiter": LIST_DELIMITER,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def split_inputs(source: TableSourceConfig) -> dict[str, Path]:
    """The input file of each split (the same file for all three with a split column)."""
    if source.path is not None:
        return {split: source.path for split in SPLITS}
    return {"train": source.train, "val": source.val, "test": source.test}


def is_csv(path: Path) -> bool:
    return path.name.lower().endswith((".csv", ".csv.gz"))


def header_names(path: Path) -> list[str]:
    """Column names of a CSV header or a Parquet schema, duplicates kept."""
    try:
        if is_csv(path):
            return pa_csv.open_csv(path).schema.names
        return pq.read_schema(path).names
    except (OSError, pa.ArrowInvalid) as err:
        raise DataContractError(f"cannot read table file {path}: {err}") from None


def check_unique_header(path: Path, names: list[str]) -> None:
    if dupes := repeated(names):
        raise DataContractError(
            f"table file {path}: column {dupes[0]!r} is named {names.count(dupes[0])} times in the header"
            + (f" (also repeated: {', '.join(map(repr, dupes[1:]))})" if dupes[1:] else "")
        )


def parquet_source(path: Path, sha256: str, warehouse: Path) -> Path:
    """``path`` itself for Parquet; for CSV its Parquet copy (converted once, by content)."""
    if not is_csv(path):
        return path
    target = table_csv_dir(warehouse, sha256)
    if not (target / DATA_FILE).exists():
        try:
            frame = pl.read_csv(path, infer_schema_length=None)
        except (pl.exceptions.PolarsError, OSError) as err:
            raise DataContractError(f"cannot read CSV table {path}: {err}") from None
        with atomic_dir(target) as tmp:
            frame.write_parquet(tmp / DATA_FILE, compression="zstd")
    return target / DATA_FILE


def needed_columns(cfg: DataConfig) -> list[str]:
    """Input columns the spec reads: features, labels, the user column, the split column."""
    source = cfg.table
    cols = [*cfg.features.columns_of("table"), *cfg.label_columns]
    cols += [c for c in (source.user_column, source.split_column) if c is not None]
    return list(dict.fromkeys(cols))


def check_columns(cfg: DataConfig, path: Path, names: list[str]) -> None:
    """Every column the spec names is in the file, and no label is also a feature."""
    check_unique_header(path, names)
    source = cfg.table
    wanted = [(f.column, f"feature {f.name!r}") for f in (*cfg.features.sparse, *cfg.features.numeric)]
    wanted += [(t.label_column, f"label of task {t.name!r}") for t in cfg.tasks]
    wanted += [
        (c, f"table.{key}")
        for key, c in (("user_column", source.user_column), ("split_column", source.split_column))
        if c
    ]
    for column, used_by in wanted:
        if column not in names:
            raise DataContractError(f"table file {path}: no column {column!r} ({used_by})")
    features = {f.column: f.name for f in (*cfg.features.sparse, *cfg.features.numeric)}
    for t in cfg.tasks:
        if t.label_column in features:
            raise DataContractError(
                f"table file {path}: column {t.label_column!r} is the label of task {t.name!r} "
                f"and also feature {features[t.label_column]!r}'s input: a label cannot be a feature"
            )


def read_splits(cfg: DataConfig, inputs: dict[str, Path], sources: dict[str, Path]) -> dict[str, pl.DataFrame]:
    """The needed columns of each split's rows, in file order."""
    source = cfg.table
    columns = needed_columns(cfg)
    if source.split_column is None:
        return {split: pl.read_parquet(sources[split], columns=columns) for split in SPLITS}
    path = inputs["train"]
    frame = pl.read_parquet(sources["train"], columns=columns)
    value = pl.col(source.split_column).cast(pl.String)
    wanted = [source.split_values[s] for s in SPLITS]
    other = frame.filter(value.is_null() | ~value.is_in(wanted))
    if other.height:
        seen = other.get_column(source.split_column).cast(pl.String).value_counts(sort=True)
        shown = ", ".join(f"{v!r} ({n:,} rows)" for v, n in seen.head(BAD_VALUES_SHOWN).iter_rows())
        raise DataContractError(
            f"table file {path}: {other.height:,} rows of split column {source.split_column!r} "
            f"match none of split_values {wanted}: {shown}"
        )
    return {split: frame.filter(value == source.split_values[split]) for split in SPLITS}


def _is_id_type(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype in ID_TYPES


def check_types(cfg: DataConfig, path: Path, schema: pl.Schema) -> None:
    """Ids are integers or strings (lists of them), numerics and labels are numbers."""
    for f in cfg.features.sparse:
        dtype = schema[f.column]
        if f.kind == "bucket" and not (dtype.is_numeric() or dtype == pl.Boolean):
            raise DataContractError(
                f"table file {path}: column {f.column!r} (feature {f.name!r}, kind bucket) has type {dtype}, "
                "expected numbers"
            )
        if f.kind == "id" and not _is_id_type(dtype):
            raise DataContractError(
                f"table file {path}: column {f.column!r} (feature {f.name!r}) has type {dtype}, expected integer or "
                "string ids"
            )
        # a list: a list column, or a CSV string of delimited ids
        if f.kind == "list" and not (dtype == pl.String or (isinstance(dtype, pl.List) and _is_id_type(dtype.inner))):
            raise DataContractError(
                f"table file {path}: column {f.column!r} (feature {f.name!r}) has type {dtype}, "
                f"expected a list of integer or string ids (or '{LIST_DELIMITER}'-separated ids)"
            )
    user = cfg.table.user_column
    if user is not None and not _is_id_type(schema[user]):
        raise DataContractError(
            f"table file {path}: user column {user!r} has type {schema[user]}, expected integer or string ids"
        )
    for f in cfg.features.numeric:
        if not (schema[f.column].is_numeric() or schema[f.column] == pl.Boolean):
            raise DataContractError(
                f"table file {path}: column {f.column!r} (feature {f.name!r}) has type {schema[f.column]}, expected "
                "numbers"
            )
    for t in cfg.tasks:
        if not (schema[t.label_column].is_numeric() or schema[t.label_column] == pl.Boolean):
            raise DataContractError(
                f"table file {path}: label column {t.label_column!r} (task {t.name!r}) has type "
                f"{schema[t.label_column]}, expected {'numbers' if t.is_value else '0/1'}"
            )


def check_labels(cfg: DataConfig, path: Path, split: str, frame: pl.DataFrame) -> None:
    """Every non-null label is 0 or 1, a value task's a finite number >= 0 (null labels are
    quarantined, not errors)."""
    for t in cfg.tasks:
        label = pl.col(t.label_column).cast(pl.Float64)
        wrong = label.is_nan() | label.is_infinite() | (label < 0.0) if t.is_value else (label != 0.0) & (label != 1.0)
        bad = frame.filter(label.is_not_null() & wrong).get_column(t.label_column)
        if len(bad):
            shown = ", ".join(map(repr, bad.unique(maintain_order=True).head(BAD_VALUES_SHOWN).to_list()))
            wanted = "finite numbers >= 0" if t.is_value else "0/1"
            raise DataContractError(
                f"table file {path} ({split} split): label column {t.label_column!r} (task {t.name!r}) "
                f"has {len(bad):,} rows that are not {wanted}, e.g. {shown}"
            )


def quarantine_null_labels(cfg: DataConfig, frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows with every label, rows with a null label + ``reason``)."""
    reason = pl.lit(None, dtype=pl.String)
    for t in reversed(cfg.tasks):  # the first task's null label names the reason
        reason = (
            pl.when(pl.col(t.label_column).is_null()).then(pl.lit(f"null label {t.label_column}")).otherwise(reason)
        )
    frame = frame.with_columns(reason.alias(REASON))
    good = frame.filter(pl.col(REASON).is_null()).drop(REASON)
    return good, frame.filter(pl.col(REASON).is_not_null())


def sparse_values(feature: SparseFeature, frame: pl.DataFrame) -> pa.Array:
    """The feature's raw ids as Arrow: a list column for kind=list (a CSV string split on
    LIST_DELIMITER; an empty cell is an empty list)."""
    column = pl.col(feature.column)
    if feature.kind == "list" and frame.schema[feature.column] == pl.String:
        ids = pl.element().str.strip_chars()
        column = column.str.split(LIST_DELIMITER).list.eval(ids.filter(ids != ""))
    return frame.select(column).to_arrow().column(0).combine_chunks()


def table_schema(cfg: DataConfig) -> pa.Schema:
    """The schema of every split's training table (``raw_user_id`` only with a user column)."""
    spec = cfg.features
    fields = [pa.field(USER_COLUMN, pa.large_string())] if cfg.table.user_column else []
    fields += [pa.field(t.label_column, pa.float64() if t.is_value else pa.int8()) for t in cfg.tasks]
    fields += [pa.field(f.name, pa.large_list(pa.int64()) if f.kind == "list" else pa.int64()) for f in spec.sparse]
    fields += [pa.field(name, pa.float32()) for name in spec.dense_names()]
    if dupes := repeated([f.name for f in fields]):
        raise StageError(
            f"training table columns must be unique; repeated: {', '.join(dupes)} "
            "(a feature named like a label column or like raw_user_id): rename the feature"
        )
    return pa.schema(fields)


def encode_split(
    cfg: DataConfig, frame: pl.DataFrame, vocabs: dict[str, Vocabulary | Buckets], schema: pa.Schema, where: str
) -> pa.Table:
    """One split's rows (labels all present) as a training table of ``schema``; ``where``
    names the rows in errors."""
    columns: dict[str, pa.Array] = {}
    if cfg.table.user_column:
        columns[USER_COLUMN] = as_strings(frame.get_column(cfg.table.user_column).to_arrow())
    labels = frame.select(pl.col(t.label_column).cast(pl.Float64 if t.is_value else pl.Int8) for t in cfg.tasks)
    labels = labels.to_arrow()
    columns.update(zip(labels.column_names, labels.columns, strict=True))
    for f in cfg.features.sparse:
        values = sparse_values(f, frame)
        if f.kind == "list":
            columns[f.name] = vocabs[f.name].encode_list(values)
        elif f.kind == "bucket":
            columns[f.name] = pa.array(vocabs[f.name].encode(values), pa.int64())
        else:  # one lookup per distinct id
            columns[f.name] = pa.array(vocabs[f.name].encode(pc.dictionary_encode(as_strings(values))), pa.int64())
    numeric = {f.name: numeric_feature_expr(f.column, f.transform).alias(f.name) for f in cfg.features.numeric}
    dense = frame.select(numeric[name] for name in cfg.features.dense_names())
    check_finite_dense(cfg, frame, dense, where)
    dense = dense.to_arrow()
    columns.update(zip(dense.column_names, dense.columns, strict=True))
    return pa.table([columns[f.name] for f in schema], schema=schema)


def reset_vocabularies(warehouse: Path, cfg: DataConfig) -> None:
    """Remove the table features' vocabularies before a rebuild (see the module docstring)."""
    for f in cfg.features.sparse:
        days = read_manifest(warehouse, f.name)["applied_days"]
        if set(days) - {TABLE_DAY.isoformat()}:
            raise StageError(
                f"vocabulary {vocab_dir(warehouse, f.name)} holds event-log days ({', '.join(sorted(days)[:3])}, ...): "
                "a table source needs a warehouse of its own"
            )
        shutil.rmtree(vocab_dir(warehouse, f.name), ignore_errors=True)


def _previous(warehouse: Path, inputs: dict, spec_sha: str) -> dict | None:
    """The manifest of tables built from exactly these inputs, if they are all intact."""
    root = table_dir(warehouse)
    try:
        manifest = json.loads(table_manifest_path(warehouse).read_text())
    except (OSError, ValueError):
        return None
    try:
        if manifest["spec_sha256"] != spec_sha or {s: manifest["splits"][s]["input"] for s in SPLITS} != inputs:
            return None
    except (KeyError, TypeError):
        return None
    for split in SPLITS:
        for name, sha in manifest["splits"][split]["content_sha256"].items():
            if not (root / name).exists() or sha256_file(root / name) != sha:
                return None
    return manifest


def _files(root: Path, manifest: dict) -> dict[str, list[Path]]:
    return {split: [root / name for name in manifest["splits"][split]["content_sha256"]] for split in SPLITS}


def prepare_table(cfg: DataConfig, warehouse: Path) -> PreparedTable:
    """Write the train/val/test training tables of ``cfg.table`` (see the module docstring)."""
    if cfg.table is None:
        raise StageError("the config has no [table] section: prepare_table needs a table source")
    warehouse = Path(warehouse)
    root = table_dir(warehouse)
    paths = split_inputs(cfg.table)
    for split, path in paths.items():
        if not path.is_file():
            raise DataContractError(f"table {split} file {path} is missing or not a file")
    sha = {path: sha256_file(path) for path in set(paths.values())}
    inputs = {split: {"path": str(path), "sha256": sha[path]} for split, path in paths.items()}
    spec_sha = spec_sha256(cfg)
    if previous := _previous(warehouse, inputs, spec_sha):
        return PreparedTable(_files(root, previous), previous, skipped=True)

    schema = table_schema(cfg)
    for path in dict.fromkeys(paths.values()):
        check_columns(cfg, path, header_names(path))
    sources = {split: parquet_source(path, sha[path], warehouse) for split, path in paths.items()}
    frames = read_splits(cfg, paths, sources)
    splits: dict[str, dict] = {}
    good: dict[str, pl.DataFrame] = {}
    for split in SPLITS:
        frame, path = frames[split], paths[split]
        if frame.height == 0:
            where = (
                f" with {cfg.table.split_column} = {cfg.table.split_values[split]!r}" if cfg.table.split_column else ""
            )
            raise DataContractError(f"table {split} split is empty: no rows in {path}{where}")
        check_types(cfg, path, frame.schema)
        check_labels(cfg, path, split, frame)
        good[split], quarantined = quarantine_null_labels(cfg, frame)
        if good[split].height == 0:
            raise DataContractError(
                f"table {split} split has no row with every label in {path}: all {frame.height:,} rows have a null "
                "label"
            )
        quarantine = table_quarantine_dir(warehouse, split)
        if quarantined.height:
            write_parquet_dir(quarantine, quarantined.to_arrow(), row_group_size=TABLE_ROW_GROUP_ROWS)
        else:
            shutil.rmtree(quarantine, ignore_errors=True)
        splits[split] = {
            "input": inputs[split],
            "rows_in": frame.height,
            "rows_out": good[split].height,
            "quarantined": quarantined.height,
        }

    reset_vocabularies(warehouse, cfg)
    vocabs = {
        f.name: update_vocabulary(warehouse, f, TABLE_DAY, sparse_values(f, good["train"])) for f in cfg.features.sparse
    }
    for split in SPLITS:
        table = encode_split(cfg, good[split], vocabs, schema, f"table file {paths[split]} ({split} split)")
        write_parquet_dir(table_split_dir(warehouse, split), table, row_group_size=TABLE_ROW_GROUP_ROWS)
        name = f"{split}/{DATA_FILE}"
        splits[split]["content_sha256"] = {name: sha256_file(root / name)}

    manifest = {
        "stage": "table",
        "spec_sha256": spec_sha,
        "vocab_day": TABLE_DAY.isoformat(),
        "vocab_versions": {name: v.version for name, v in vocabs.items()},
        "row_group_rows": TABLE_ROW_GROUP_ROWS,
        "schema": {f.name: str(f.type) for f in schema},
        "columns": {
            "user": USER_COLUMN if cfg.table.user_column else None,
            "labels": cfg.label_columns,
            "sparse": [f.name for f in cfg.features.sparse],
            "dense": cfg.features.dense_names(),
        },
        "splits": splits,
    }
    atomic_write_json(table_manifest_path(warehouse), manifest)
    return PreparedTable(_files(root, manifest), manifest, skipped=False)
