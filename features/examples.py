"""The training table (the ``examples`` stage): one row per valid impression of a mature day.

The nightly run for D builds day L = D - ``contract.maturity_lag_days``: validated
impressions of L joined (left, in impression order) with the users / items snapshots
accepted on L (by row position, features.snapshots), the labels of L (features.labels)
and, per aggregate key, the rolling point-in-time features as of the start of L, looked
up in the key's rolling state (features.rolling_state: advanced by one day from the previous
night's state, or recomputed from the daily partitions when there is none; in a second
thread, as it needs none of L's rows). Which raw column feeds which feature comes from
``cfg.features`` only.

Columns of ``<warehouse>/training/date=L/part-0.parquet``, in this order:

* ``impression_id`` string, ``ts`` timestamp[us, UTC], ``raw_user_id`` string (the raw
  user id, for per-user GAUC; it is not called ``user_id`` because a sparse feature may
  carry that name);
* labels: ``click``, ``conversion`` Int8, ``conversion_value`` Float64;
* sparse features, named as in the spec: Int64 embedding rows (kind=id) or
  List(Int64) (kind=list), encoded with the vocabularies after applying day L's ids;
  Int64 bucket rows of a number (kind=bucket, serving.encoding.bucket_ids);
* behaviour sequences (features.sequences), per sequence S of the spec: per carried
  feature F a List(Int64) ``S__F`` (serving.spec.sequence_column) of embedding rows
  encoded with F's vocabulary, then a List(Int32) ``S__age_days`` of each element's age;
  newest first, the key's events strictly before L (its state as of the start of L);
* dense features, Float32, in ``cfg.features.dense_names()`` order.

Null handling: a null id encodes to 0 (padding), a null list to an empty list (so does a
sequence of a key without events before L); a key with no history gets
``rolling_defaults`` (log1p(0) = 0 counts, the global smoothed rates);
a numeric feature that is null or NaN (e.g. an item missing from the snapshot) becomes
0.0 after its transform (``log1p`` clips negatives to 0 first; serving.encoding.numeric_values).
A dense value that is not finite after its transform (a raw inf, a number beyond float32's
range) would train a NaN model: the stage fails naming the column and the day
(``check_finite_dense``; exit 4, the raw data's fault).

Rerun safety: ``manifest.json`` (written inside the same atomic folder as the data) holds
the sha256 of every input partition and of the spec; a rerun with the same inputs is
skipped. Vocabularies apply each day once, so a rerun after a kill encodes with the same
vocabulary versions and writes the same bytes; a rolling state is written before the table
and read back on rerun only while the daily partitions it summed are unchanged. A sequence
state of L (features.sequences, caught up first when missing or stale) is an input too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from features.catalog import (
    DATA_FILE,
    daily_dir,
    daily_features_root,
    daily_root,
    holds_data,
    report_path,
    scan_validated,
    sequence_state_dir,
    sequence_states_root,
    training_dir,
    training_manifest_path,
    validated_dir,
    warehouse_relative,
)
from features.config import EVENT_LABELS, EVENT_VALUE_LABELS, DataConfig, SparseFeature
from features.contract import SNAPSHOT_TABLES, day_str
from features.daily_counters import stale_daily_aggregates
from features.errors import DataContractError, StageError
from features.io import (
    atomic_dir,
    changed_folders,
    record_sha256,
    recorded_sha256,
    sha256_dir,
)
from features.labels import build_labels
from features.rolling_state import RollingState, rolling_state, state_features
from features.sequences import SequenceState, sequence_columns, sequence_state
from features.snapshots import (
    SNAPSHOT_JOIN_KEY,
    JoinedRows,
    join_snapshots,
    snapshot_scans,
)
from features.vocab import load_vocabulary, update_vocabulary
from serving.encoding import NumericTransform, numeric_values
from serving.spec import sequence_age_column, sequence_column

ID_COLUMNS = ("impression_id", "ts", "raw_user_id")
LABEL_COLUMNS = (*EVENT_LABELS, *EVENT_VALUE_LABELS)
# A row group is the loader's unit of reading and shuffling: 128k rows x ~60 columns is
# ~30 MB decoded, large enough for efficient zstd column chunks and few seeks, small
# enough that a loader holds a handful in memory and shuffles across them.
ROW_GROUP_ROWS = 131_072


def mature_day(cfg: DataConfig, run_date: dt.date) -> dt.date:
    """The day whose labels are final on the nightly run for ``run_date``."""
    return run_date - dt.timedelta(days=cfg.contract.maturity_lag_days)


def spec_sha256(cfg: DataConfig) -> str:
    """Hash of the config sections that decide the table's content (a sequence's encoder
    settings do not; a spec without sequences hashes as before they existed)."""
    features = cfg.features.model_dump(mode="json", exclude={"sequences": {"__all__": {"encoder", "attention_heads"}}})
    if not features["sequences"]:
        del features["sequences"]
    spec = {"features": features, "contract": cfg.contract.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def input_partitions(cfg: DataConfig, warehouse: Path, day: dt.date) -> list[Path]:
    """Every partition the table of ``day`` reads (those that exist)."""
    warehouse = Path(warehouse)
    lag = cfg.contract.maturity_lag_days
    paths = [validated_dir(warehouse, t, day) for t in ("impressions", *SNAPSHOT_TABLES)]
    paths += [
        validated_dir(warehouse, "clicks", day + dt.timedelta(days=n)) for n in range(cfg.contract.click_lag_days + 1)
    ]
    paths += [validated_dir(warehouse, "conversions", day + dt.timedelta(days=n)) for n in range(lag + 1)]
    history = [day - dt.timedelta(days=n) for n in range(1, max(cfg.features.windows_days) + 1)]
    paths += [daily_dir(warehouse, key.name, d) for key in cfg.features.aggregate_keys for d in history]
    paths += [sequence_state_dir(warehouse, seq.name, day) for seq in cfg.features.sequences]
    return [p for p in paths if holds_data(p)]


def input_hashes(cfg: DataConfig, warehouse: Path, partitions: list[Path]) -> dict[str, str]:
    """sha256 per input partition (``input_partitions``; path relative to the warehouse) and of the spec."""
    hashes = {warehouse_relative(warehouse, p): sha256_dir(p) for p in partitions}
    return {"spec": spec_sha256(cfg), **hashes}


def stale_training_tables(warehouse: Path, days: list[dt.date]) -> list[str]:
    """The training tables of ``days`` built from partitions that changed since (a day
    validated again, its aggregates rebuilt) or from daily aggregates that are stale
    themselves, each with what changed. Tables without recorded inputs pass.

    A sequence state that is gone is no change: the features stage prunes states a few
    days after writing them (features.sequences), while a training window spans weeks."""
    hashed: dict[str, str | None] = {}
    stale = []
    for day in days:
        manifest = _read_manifest(training_manifest_path(warehouse, day)) or {}
        recorded = {p: sha for p, sha in manifest.get("inputs", {}).items() if p != "spec"}
        changed = [
            f"{p} {why}"
            for p, why in changed_folders(warehouse, recorded, hashed).items()
            if not (why == "is gone" and (warehouse / p).is_relative_to(sequence_states_root(warehouse)))
        ]
        daily = [p for p in (warehouse / p for p in recorded) if p.is_relative_to(daily_features_root(warehouse))]
        changed += stale_daily_aggregates(warehouse, daily, hashed)
        if changed:
            stale.append(f"{day_str(day)} ({'; '.join(changed)})")
    return stale


def validate_counts(warehouse: Path, day: dt.date) -> dict | None:
    """The impressions counts of ``day``'s validate report (None when there is no report)."""
    path = report_path(warehouse, "validate", day)
    if not path.exists():
        return None
    try:
        table = json.loads(path.read_text())["tables"]["impressions"]
        return {
            "input_rows": int(table["input_rows"]),
            "valid_rows": int(table["valid_rows"]),
            "quarantined_rows": int(table["quarantined_rows"]),
        }
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StageError(f"validate report {path} has no readable impressions counts: {err!r}") from None


def _snapshot_columns(cfg: DataConfig, schemas: dict[str, pl.Schema]) -> dict[str, list[str]]:
    """Which columns to take from each table: the spec's own columns from their declared
    table; aggregate-key columns from the first of impressions, users, items holding them."""
    spec = cfg.features
    wanted: dict[str, list[str]] = {t: spec.columns_of(t) for t in schemas}
    for key in spec.aggregate_keys:
        for col in key.columns:
            if not any(col in cols for cols in wanted.values()):
                table = next((t for t in schemas if col in schemas[t]), None)
                if table is None:
                    raise DataContractError(
                        f"aggregate key {key.name!r}: column {col!r} is in none of the validated {', '.join(schemas)}"
                    )
                wanted[table].append(col)
    seen: dict[str, str] = {}
    for table, cols in wanted.items():
        for col in cols:
            if col in seen and col != SNAPSHOT_JOIN_KEY.get(table):
                raise StageError(
                    f"column {col!r} is read from both {seen[col]} and {table}: rename one in the feature spec's "
                    "source data"
                )
            seen.setdefault(col, table)
            if col not in schemas[table]:
                raise DataContractError(f"validated {table} has no column {col!r} (named by the feature spec)")
    return wanted


def day_rows(cfg: DataConfig, warehouse: Path, day: dt.date) -> JoinedRows:
    """The validated impressions of ``day`` (the columns the spec reads) joined to the users /
    items snapshots accepted that day (features.snapshots)."""
    frames = {t: scan_validated(warehouse, t, day) for t in ("impressions", *SNAPSHOT_TABLES)}
    wanted = _snapshot_columns(cfg, {t: f.collect_schema() for t, f in frames.items()})
    base = ["impression_id", "ts", "user_id", "item_id"]
    table_of = dict.fromkeys(base, "impressions")
    for table, cols in wanted.items():
        table_of.update({c: table for c in cols if c not in table_of})
    scans = snapshot_scans(warehouse, day, table_of)
    impressions, *snapshots = pl.collect_all(
        [frames["impressions"].select(*dict.fromkeys(base + wanted["impressions"])), *scans.values()]
    )
    return join_snapshots(impressions, table_of, dict(zip(scans, snapshots, strict=True)), warehouse, day)


def rolling_states(cfg: DataConfig, warehouse: Path, day: dt.date, inputs: dict[str, str]) -> dict[str, RollingState]:
    """Every aggregate key's rolling state as of the start of ``day`` (``inputs``: the input
    hashes, which hold the daily partitions')."""
    states = {}
    for key in cfg.features.aggregate_keys:
        prefix = warehouse_relative(warehouse, daily_root(warehouse, key.name)) + "/"
        daily_sha = {path: sha for path, sha in inputs.items() if path.startswith(prefix)}
        states[key.name] = rolling_state(cfg, warehouse, key, day, daily_sha)
    return states


def rolled_columns(cfg: DataConfig, rows: JoinedRows, states: dict[str, RollingState]) -> pl.DataFrame:
    """Every aggregate key's dense features of ``rows``, looked up in the keys' states."""
    keys = cfg.features.aggregate_keys
    coded = {column: rows.coded(column) for key in keys for column in key.columns}
    return pl.concat(
        [pl.DataFrame(), *(state_features(cfg, key, states[key.name], coded) for key in keys)], how="horizontal"
    )


def numeric_feature_expr(column: str, transform: NumericTransform) -> pl.Expr:
    """``column`` as its dense feature (Float32), by the scorer's own rule
    (serving.encoding.numeric_values), a whole column per call."""
    return (
        pl.col(column)
        .cast(pl.Float64)
        .map_batches(
            lambda values: pl.Series(values.name, numeric_values(values.to_arrow(), transform)),
            return_dtype=pl.Float32,
            is_elementwise=True,
        )
    )


def check_finite_dense(cfg: DataConfig, raw: pl.DataFrame, dense: pl.DataFrame, where: str) -> None:
    """``dense`` (the dense features of ``where``'s rows, in a training table's order)
    holds no inf or NaN. DataContractError for a numeric feature, naming its raw column (in
    ``raw``) and some of the raw values; StageError for an aggregate feature (counts and
    smoothed rates of a valid config are finite)."""
    counts = dense.select(pl.all().is_finite().not_().sum()).row(0, named=True)
    bad = [name for name, n in counts.items() if n]
    if not bad:
        return
    name, also = bad[0], f" (also: {', '.join(bad[1:])})" if bad[1:] else ""
    n = f"{counts[name]:,} of {dense.height:,} rows"
    feature = next((f for f in cfg.features.numeric if f.name == name), None)
    if feature is None:
        raise StageError(f"{where}: aggregate feature {name!r} is not finite in {n}{also}")
    values = raw.get_column(feature.column).filter(dense.get_column(name).is_finite().not_())
    shown = ", ".join(map(repr, values.unique(maintain_order=True).head(5).to_list()))
    raise DataContractError(
        f"{where}: {feature.table} column {feature.column!r} gives feature {name!r} (transform "
        f"{feature.transform}) values that are not finite in {n}, from raw values {shown}: "
        f"fix or null them (null and NaN mean missing){also}"
    )


def _encode_sparse(warehouse: Path, feature: SparseFeature, day: dt.date, rows: JoinedRows) -> tuple[pa.Array, int]:
    """Apply the day's ids to the feature's vocabulary, then encode them with it."""
    if feature.kind == "bucket":  # numbers, not ids: no vocabulary to apply
        buckets = load_vocabulary(warehouse, feature)
        values = rows.column(feature.column).to_arrow()
        try:
            return pa.array(buckets.encode(values), pa.int64()), buckets.version
        except TypeError as err:
            raise DataContractError(
                f"feature {feature.name!r} (kind bucket): validated {feature.table} column "
                f"{feature.column!r} of {day_str(day)}: {err}"
            ) from None
    if feature.kind == "list":
        # Encoded per row of its table; a snapshot row counts once per impression joined to it.
        values, source_rows = rows.source(feature.column)
        weights = None if source_rows is None else np.bincount(source_rows, minlength=len(values))
        vocab = update_vocabulary(warehouse, feature, day, values.to_arrow(), weights)
        encoded = vocab.encode_list(values.to_arrow())
        return (encoded if source_rows is None else encoded.take(pa.array(source_rows))), vocab.version
    # Codes into the distinct values give both the day's counts and the values to look up.
    ids = rows.coded(feature.column)
    vocab = update_vocabulary(warehouse, feature, day, ids)
    return pa.array(vocab.encode(ids), pa.int64()), vocab.version


def training_schema(cfg: DataConfig) -> pa.Schema:
    """The schema every training table of this spec has."""
    spec = cfg.features
    fields = [
        pa.field("impression_id", pa.large_string()),
        pa.field("ts", pa.timestamp("us", tz="UTC")),
        pa.field("raw_user_id", pa.large_string()),
        pa.field("click", pa.int8()),
        pa.field("conversion", pa.int8()),
        pa.field("conversion_value", pa.float64()),
    ]
    fields += [pa.field(f.name, pa.large_list(pa.int64()) if f.kind == "list" else pa.int64()) for f in spec.sparse]
    for seq in spec.sequences:
        fields += [pa.field(sequence_column(seq.name, f), pa.large_list(pa.int64())) for f in seq.items]
        fields.append(pa.field(sequence_age_column(seq.name), pa.large_list(pa.int32())))
    fields += [pa.field(name, pa.float32()) for name in spec.dense_names()]
    return pa.schema(fields)


def write_training_file(frame: pl.DataFrame, path: Path) -> None:
    """Write a training table's rows as one Parquet file, in ROW_GROUP_ROWS row groups."""
    # polars writes the columns in parallel: ~2x faster than pyarrow's writer here.
    frame.write_parquet(path, compression="zstd", compression_level=1, row_group_size=ROW_GROUP_ROWS)


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_training_table(cfg: DataConfig, warehouse: Path, run_date: dt.date) -> dict:
    """Write the training table of the mature day of ``run_date``; return its manifest
    (with ``skipped: True`` when an identical table from the same inputs is already there)."""
    started = time.perf_counter()
    warehouse = Path(warehouse)
    day = mature_day(cfg, run_date)
    target = training_dir(warehouse, day)
    timings: dict[str, float] = {}
    # Read (or caught up) before listing the inputs, which hold the states' partitions.
    sequences: dict[str, SequenceState] = {
        seq.name: sequence_state(cfg, warehouse, seq, day) for seq in cfg.features.sequences
    }
    timings["sequence_states"] = time.perf_counter() - started
    partitions = input_partitions(cfg, warehouse, day)
    daily = [p for p in partitions if p.is_relative_to(daily_features_root(warehouse))]
    if stale := stale_daily_aggregates(warehouse, daily):
        raise StageError(
            f"training table of {day_str(day)}: the daily aggregates {'; '.join(stale)} were counted "
            f"from data validated again since: run `funnelrank features` for their dates (or their "
            f"nights) first"
        )
    inputs = input_hashes(cfg, warehouse, partitions)
    timings["hash_inputs"] = time.perf_counter() - started - timings["sequence_states"]

    previous = _read_manifest(training_manifest_path(warehouse, day))
    if (
        previous
        and previous.get("inputs") == inputs
        and (target / DATA_FILE).exists()
        and recorded_sha256(target / DATA_FILE) == previous.get("content_sha256")
    ):
        return previous | {"skipped": True}

    t = time.perf_counter()
    # The rolling states depend on the daily partitions only: they advance in a second
    # thread while this one joins (numpy and polars release the GIL in their loops).
    with ThreadPoolExecutor(1) as pool:
        states = pool.submit(rolling_states, cfg, warehouse, day, inputs)
        rows = day_rows(cfg, warehouse, day)
        labels = build_labels(cfg, warehouse, day, impressions=rows.rows)
        timings["join"] = time.perf_counter() - t
        t = time.perf_counter()
        spec = cfg.features
        columns: dict[str, pa.Array | pa.ChunkedArray] = {}
        ids = rows.rows.select("impression_id", "ts", pl.col("user_id").alias("raw_user_id")).hstack(
            labels.drop("impression_id").get_columns()
        )
        columns.update(zip(ids.columns, ids.to_arrow().columns, strict=True))
        vocab_versions: dict[str, int] = {}
        for feature in spec.sparse:
            columns[feature.name], vocab_versions[feature.name] = _encode_sparse(warehouse, feature, day, rows)
        timings["vocab_encode"] = time.perf_counter() - t
        t = time.perf_counter()
        for seq in spec.sequences:
            columns.update(sequence_columns(cfg, warehouse, seq, sequences[seq.name], rows, vocab_versions))
        timings["sequences"] = time.perf_counter() - t
        t = time.perf_counter()
        rolled = rolled_columns(cfg, rows, states.result())
    timings["rolling"] = time.perf_counter() - t

    t = time.perf_counter()
    raw = pl.DataFrame([rows.column(column) for column in dict.fromkeys(f.column for f in spec.numeric)])
    numeric = raw.select(numeric_feature_expr(f.column, f.transform).alias(f.name) for f in spec.numeric)
    dense = pl.concat([numeric, rolled], how="horizontal").select(spec.dense_names())
    check_finite_dense(cfg, raw, dense, f"training table of {day_str(day)}")
    dense = dense.to_arrow()
    columns.update(zip(dense.column_names, dense.columns, strict=True))
    schema = training_schema(cfg)
    table = pa.table([columns[f.name] for f in schema], schema=schema)
    del rows, columns, dense, ids, rolled, raw

    with atomic_dir(target) as tmp:
        write_training_file(pl.from_arrow(table), tmp / DATA_FILE)
        content_sha = record_sha256(tmp / DATA_FILE)
        timings["write"] = time.perf_counter() - t
        manifest = {
            "stage": "examples",
            "run_date": day_str(run_date),
            "date": day_str(day),
            "file": DATA_FILE,
            "rows": _reconcile(warehouse, day, table.num_rows),
            "row_group_rows": ROW_GROUP_ROWS,
            "schema": {f.name: str(f.type) for f in schema},
            "columns": {
                "ids": list(ID_COLUMNS),
                "labels": list(LABEL_COLUMNS),
                "sparse": [f.name for f in spec.sparse],
                "dense": spec.dense_names(),
                "sequences": {seq.name: seq.column_names for seq in spec.sequences},
            },
            "content_sha256": content_sha,
            "inputs": inputs,
            "vocab_versions": vocab_versions,
            "timings_s": {k: round(v, 4) for k, v in timings.items()}
            | {"total": round(time.perf_counter() - started, 4)},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest | {"skipped": False}


def _reconcile(warehouse: Path, day: dt.date, rows_out: int) -> dict:
    """Row counts: impressions in = rows out + quarantined (from the validate report)."""
    n_valid = scan_validated(warehouse, "impressions", day).select(pl.len()).collect().item()
    if rows_out != n_valid:
        raise StageError(
            f"training table of {day_str(day)} has {rows_out} rows for {n_valid} validated impressions in "
            f"{validated_dir(warehouse, 'impressions', day)}"
        )
    report = validate_counts(warehouse, day)
    if report is None:
        return {"impressions_in": n_valid, "rows_out": rows_out, "quarantined": None, "validate_report": None}
    if report["input_rows"] != rows_out + report["quarantined_rows"]:
        raise StageError(
            f"counts do not reconcile for {day_str(day)}: validate report {report_path(warehouse, 'validate', day)} "
            "has "
            f"{report['input_rows']} impressions in and {report['quarantined_rows']} quarantined, training table "
            f"has {rows_out} rows"
        )
    return {
        "impressions_in": report["input_rows"],
        "rows_out": rows_out,
        "quarantined": report["quarantined_rows"],
        "validate_report": warehouse_relative(warehouse, report_path(warehouse, "validate", day)),
    }
