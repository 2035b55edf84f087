"""The serving bundle: a trained model and the warehouse data the scorer needs, in plain files.

The bundle (see ``export_bundle``) is everything ``serving`` needs, in plain files. Its
spec records the tasks (name, served view, exponent), so the scorer needs no config. A
model trained on event logs gets the users/items snapshots and rolling aggregates the
scorer joins to a request; one trained on a feature table (``[table]``) gets none: it
scores rows that carry every feature column themselves. The model itself is converted
and parity-checked by ``models.export``.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from features.aggregates import daily_root, partition_days, rolling_defaults, rolling_features
from features.config import AGGREGATE_METRICS
from features.contract import SNAPSHOT_TABLES, day_str, scan_validated
from features.errors import StageError
from features.examples import numeric_feature_expr
from features.io import atomic_dir, sha256_file
from features.table_source import LIST_DELIMITER
from features.vocab import load_vocabulary
from models.export import check_parity, export_onnx, input_names, output_names, parity_batches
from models.nets import MultiTaskNet
from pipeline.config import FunnelConfig
from serving.encoding import join_key_columns

BUNDLE_FORMAT = 1
SNAPSHOT_KEY = {"users": "user_id", "items": "item_id"}


def bundle_dir(cfg: FunnelConfig, key: str) -> Path:
    return Path(cfg.state_dir) / "bundles" / key


def _latest_day(folder: Path, what: str, until: dt.date | None = None) -> dt.date:
    days = {d for d in partition_days(folder) if until is None or d <= until}
    if not days:
        raise StageError(f"no {what} partitions in {folder}" + (f" up to {day_str(until)}" if until else ""))
    return max(days)


def _encode_snapshot(cfg: FunnelConfig, warehouse: Path, table: str, day: dt.date, key_columns: set[str], vocab_versions: dict) -> pa.Table:
    """The users/items snapshot of ``day`` as the scorer reads it: the key, each sparse
    feature of the table encoded (``sparse:<name>``), each numeric feature transformed
    (``dense:<name>``), and raw columns used by aggregate keys (``raw:<column>``)."""
    spec = cfg.features
    key = SNAPSHOT_KEY[table]
    frame = scan_validated(warehouse, table, day).collect()
    columns: dict[str, pa.Array] = {key: pa.array(frame[key].to_arrow(), pa.large_string())}
    for f in spec.sparse:
        if f.table != table:
            continue
        vocab = load_vocabulary(warehouse, f, vocab_versions[f.name])
        values = frame[f.column].to_arrow()
        columns[f"sparse:{f.name}"] = vocab.encode_list(values) if f.kind == "list" else pa.array(vocab.encode(values), pa.int64())
    for f in spec.numeric:
        if f.table == table:
            columns[f"dense:{f.name}"] = frame.select(numeric_feature_expr(f.column, f.transform)).to_series().to_arrow()
    for col in sorted(key_columns):
        if col != key:
            columns[f"raw:{col}"] = frame[col].to_arrow()
    return pa.table(columns)


def _key_sources(cfg: FunnelConfig, warehouse: Path, request_columns: set[str], snapshot_day: dt.date) -> dict[str, str]:
    """Where each aggregate-key column comes from at serving time: the request (an
    impressions column), else the users or items snapshot (as features.aggregates does)."""
    schemas = {t: scan_validated(warehouse, t, snapshot_day).collect_schema() for t in SNAPSHOT_TABLES}
    sources = {}
    for key in cfg.features.aggregate_keys:
        for col in key.columns:
            source = "request" if col in request_columns else next((t for t in SNAPSHOT_TABLES if col in schemas[t]), None)
            if source is None:
                raise StageError(f"aggregate key {key.name!r}: column {col!r} is neither a request column nor in the users/items snapshot")
            sources[col] = source
    return sources


def serving_spec(cfg: FunnelConfig, vocab_versions: dict) -> dict:
    """What every bundle's spec.json holds: the model's inputs and outputs, the tasks and
    their score exponents, and how each input is encoded from raw columns."""
    spec = cfg.features
    # Same construction and order as FeaturesConfig.dense_names.
    dense = [
        {"name": f"{key.name}_{metric}_{w}d", "source": "aggregate", "key": key.name}
        for key in spec.aggregate_keys for w in spec.windows_days for metric in AGGREGATE_METRICS
    ]
    dense += [{"name": f.name, "source": f.table, "column": f.column, "transform": f.transform} for f in spec.numeric]
    if [d["name"] for d in dense] != spec.dense_names():
        raise StageError(f"bundle dense features {[d['name'] for d in dense]} differ from the spec's {spec.dense_names()}")
    serving = {
        "format": BUNDLE_FORMAT,
        "source": "events" if cfg.table is None else "table",
        "inputs": input_names(spec),
        "outputs": output_names(cfg.tasks),
        "tasks": [{"name": t.name, "served": t.served_name, "score_exponent": t.score_exponent} for t in cfg.tasks],
        "sparse": [
            {"name": f.name, "table": f.table, "column": f.column, "kind": f.kind, "capacity": f.capacity,
             "oov_buckets": f.oov_buckets, "pooling": f.pooling, "vocab_version": vocab_versions[f.name],
             **({"boundaries": f.boundaries} if f.kind == "bucket" else {"vocab": f"vocab/{f.name}.parquet"})}
            for f in spec.sparse
        ],
        "dense": dense,
        "scoring": cfg.scoring.model_dump(mode="json"),
    }
    if cfg.table is not None:  # a list column of a CSV-born table may hold delimited ids (features.table_source)
        serving["list_delimiter"] = LIST_DELIMITER
    return serving


def event_serving_spec(cfg: FunnelConfig, key_sources: dict[str, str], as_of: dt.date, snapshot_day: dt.date) -> dict:
    """The spec.json entries of an event-log bundle: its aggregate keys and snapshots."""
    return {
        "aggregate_keys": [
            {"name": k.name, "columns": list(k.columns), "sources": {c: key_sources[c] for c in k.columns}, "file": f"features/aggregates/{k.name}.parquet"}
            for k in cfg.features.aggregate_keys
        ],
        "snapshots": {t: {"file": f"features/{t}.parquet", "key": SNAPSHOT_KEY[t]} for t in SNAPSHOT_TABLES},
        "features_as_of": day_str(as_of),
        "snapshot_day": day_str(snapshot_day),
    }


def _event_feature_days(cfg: FunnelConfig, warehouse: Path, as_of: dt.date | None) -> tuple[dt.date, dt.date, dict[str, str]]:
    """(features as of, snapshot day, aggregate-key column sources) of an event-log bundle."""
    spec = cfg.features
    for f in spec.sparse:
        if f.kind == "list" and f.table == "impressions":
            raise StageError(f"sparse feature {f.name!r}: list features of the impressions table (request context) are not supported by the scorer")
    if as_of is None:
        newest = [_latest_day(daily_root(warehouse, k.name), f"daily aggregates of {k.name!r}") for k in spec.aggregate_keys]
        as_of = max(newest) + dt.timedelta(days=1) if newest else _latest_day(warehouse / "validated" / "users", "validated users")
    snapshot_day = _latest_day(warehouse / "validated" / "users", "validated users", until=as_of)
    request_columns = set(scan_validated(warehouse, "impressions", _latest_day(warehouse / "validated" / "impressions", "validated impressions")).collect_schema())
    return as_of, snapshot_day, _key_sources(cfg, warehouse, request_columns, snapshot_day)


def _write_event_features(cfg: FunnelConfig, warehouse: Path, out: Path, key_sources: dict[str, str], snapshot_day: dt.date,
                          as_of: dt.date, vocab_versions: dict) -> dict:
    """Write the encoded users/items snapshots and the aggregates' rolling features under
    ``out/features``; return the aggregates' defaults (a key with no history)."""
    (out / "features" / "aggregates").mkdir(parents=True)
    for table in SNAPSHOT_TABLES:
        key_columns = {c for c, s in key_sources.items() if s == table}
        pq.write_table(_encode_snapshot(cfg, warehouse, table, snapshot_day, key_columns, vocab_versions), out / "features" / f"{table}.parquet", compression="zstd")
    frames = rolling_features(cfg, warehouse, as_of)
    for key in cfg.features.aggregate_keys:
        rolled = frames[key.name].collect().to_arrow()
        names = [n for n in rolled.column_names if n not in key.columns]
        keys = join_key_columns([rolled.column(c) for c in key.columns])
        table = pa.table({"key": keys, **{n: rolled.column(n) for n in names}}).filter(keys.is_valid())
        pq.write_table(table, out / "features" / "aggregates" / f"{key.name}.parquet", compression="zstd")
    return rolling_defaults(cfg, warehouse, as_of)


def _versions() -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {"funnelrank": version("funnelrank"), "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}


def export_bundle(
    cfg: FunnelConfig, warehouse: Path, model: MultiTaskNet, out_dir: Path, parity_files: Sequence[Path], as_of: dt.date | None = None,
    inputs: dict | None = None,
) -> Path:
    """Write the serving bundle to ``out_dir`` atomically and return it.

    Contents: ``model.onnx`` (checked for parity on real rows of ``parity_files`` first),
    ``vocab/<feature>.parquet`` (current versions), ``spec.json`` and ``manifest.json``
    (sha256 of every other file, versions, parity, and ``inputs``: what the caller
    identifies the bundle by, see ``export_stage.export_run``). An event-log model's bundle also holds
    ``features/users.parquet`` and ``features/items.parquet`` (the newest validated
    snapshots up to ``as_of``, encoded) and ``features/aggregates/<key>.parquet`` (``key``
    string + the key's rolling features as of the start of ``as_of``, by default the day
    after the newest daily aggregates, i.e. what a row of the coming day would see in
    training; spec.json's ``defaults`` hold the values for a key with no history). A
    ``[table]`` model's bundle has no snapshots (``as_of`` is not used): its rows carry
    every feature. Logging to MLflow is the caller's job.
    """
    warehouse = Path(warehouse)
    spec = cfg.features
    vocab_versions = {f.name: load_vocabulary(warehouse, f).version for f in spec.sparse}
    serving = serving_spec(cfg, vocab_versions)
    if cfg.table is None:
        as_of, snapshot_day, key_sources = _event_feature_days(cfg, warehouse, as_of)
        serving |= event_serving_spec(cfg, key_sources, as_of, snapshot_day)

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        onnx_path = export_onnx(model, spec, cfg.tasks, tmp / "model.onnx")
        parity = check_parity(model, onnx_path, parity_batches(cfg, parity_files), spec, cfg.tasks)
        (tmp / "vocab").mkdir()
        for f in spec.sparse:
            if f.kind != "bucket":  # a bucket feature's boundaries are in spec.json
                vocab = load_vocabulary(warehouse, f, vocab_versions[f.name])
                pq.write_table(vocab.table, tmp / "vocab" / f"{f.name}.parquet", compression="zstd")
        if cfg.table is None:
            serving["defaults"] = _write_event_features(cfg, warehouse, tmp, key_sources, snapshot_day, as_of, vocab_versions)
        (tmp / "spec.json").write_text(json.dumps(serving, indent=2, sort_keys=True) + "\n")
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": BUNDLE_FORMAT,
            "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "files": files,
            "versions": _versions(),
            "vocab_versions": vocab_versions,
            "parity": parity,
            "parity_files": [str(p) for p in parity_files],
            "inputs": inputs or {},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out_dir
