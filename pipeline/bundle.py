"""The serving bundle: a trained model and the warehouse data the scorer needs, in plain files.

The bundle (see ``export_bundle``) is everything ``serving`` needs, in plain files. Its
spec records the tasks (name, served view, exponent), so the scorer needs no config. A
model trained on event logs gets the users/items snapshots and rolling aggregates the
scorer joins to a request; one trained on a feature table (``[table]``) gets none: it
scores rows that carry every feature column themselves. The model itself is converted
and parity-checked by ``models.export``.
"""

from __future__ import annotations

import dataclasses
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

from features.catalog import (
    daily_root,
    newest_partition_day,
    scan_validated,
    validated_root,
)
from features.contract import SNAPSHOT_TABLES
from features.daily_counters import key_column_sources
from features.errors import StageError
from features.examples import numeric_feature_expr
from features.io import atomic_dir, sha256_file
from features.rolling_features import rolled_features
from features.sequences import key_sequences, sequence_state
from features.table_source import LIST_DELIMITER
from features.vocab import load_vocabulary
from models.export import (
    QUANTIZED_OPS,
    check_parity,
    check_quantization,
    export_onnx,
    input_names,
    output_names,
    parity_batches,
    quantization_report,
    quantize_int8,
)
from models.nets import MultiTaskNet
from pipeline.config import FunnelConfig
from serving.bundle import MANIFEST, SIGNATURE, manifest_signature, signing_key
from serving.encoding import join_key_columns
from serving.spec import (
    SPEC_FILE,
    AggregateInput,
    AggregateKeySpec,
    BundleSpec,
    EventFeatures,
    NumericInput,
    ScoringLimits,
    SequenceItem,
    SequenceSpec,
    SnapshotSpec,
    SparseInput,
    TaskOutput,
    aggregate_feature_names,
)

BUNDLE_FORMAT = 1
QUANTIZATION_MIN_ROWS = 1 << 62  # an int8 model is measured on every row of the parity files
SNAPSHOT_KEY = {"users": "user_id", "items": "item_id"}


def precision_suffix(cfg: FunnelConfig) -> str:
    """What a quantised bundle's names end with (``-int8``; none for float32), so a run's
    float32 and int8 bundles (folders, MLflow artifacts) live side by side."""
    return "" if cfg.export.quantize == "none" else f"-{cfg.export.quantize}"


def bundle_dir(cfg: FunnelConfig, key: str) -> Path:
    return Path(cfg.state_dir) / "bundles" / f"{key}{precision_suffix(cfg)}"


def _encode_snapshot(
    cfg: FunnelConfig, warehouse: Path, table: str, day: dt.date, key_columns: set[str], vocab_versions: dict
) -> pa.Table:
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
        columns[f"sparse:{f.name}"] = (
            vocab.encode_list(values) if f.kind == "list" else pa.array(vocab.encode(values), pa.int64())
        )
    for f in spec.numeric:
        if f.table == table:
            columns[f"dense:{f.name}"] = (
                frame.select(numeric_feature_expr(f.column, f.transform)).to_series().to_arrow()
            )
    for col in sorted(key_columns):
        if col != key:
            columns[f"raw:{col}"] = frame[col].to_arrow()
    return pa.table(columns)


def serving_spec(cfg: FunnelConfig, vocab_versions: dict) -> BundleSpec:
    """What every bundle's spec.json holds: the model's inputs and outputs, the tasks and
    their score exponents, and how each input is encoded from raw columns (an events
    bundle gets its ``events`` from ``event_serving_spec`` once its features are written)."""
    spec = cfg.features
    dense: list[AggregateInput | NumericInput] = [
        AggregateInput(name, key.name)
        for key in spec.aggregate_keys
        for name in aggregate_feature_names(key.name, spec.windows_days)
    ]
    dense += [NumericInput(f.name, f.table, f.column, f.transform) for f in spec.numeric]
    if [d.name for d in dense] != spec.dense_names():
        raise StageError(f"bundle dense features {[d.name for d in dense]} differ from the spec's {spec.dense_names()}")
    return BundleSpec(
        format=BUNDLE_FORMAT,
        source="events" if cfg.table is None else "table",
        inputs=tuple(input_names(spec)),
        outputs=tuple(output_names(cfg.tasks)),
        tasks=tuple(TaskOutput(t.name, t.served_name, t.score_exponent, t.kind) for t in cfg.tasks),
        sparse=tuple(
            SparseInput(
                f.name,
                f.table,
                f.column,
                f.kind,
                f.capacity,
                f.oov_buckets,
                f.pooling,
                vocab_versions[f.name],
                **({"boundaries": tuple(f.boundaries)} if f.kind == "bucket" else {"vocab": f"vocab/{f.name}.parquet"}),
            )
            for f in spec.sparse
        ),
        dense=tuple(dense),
        scoring=ScoringLimits(**cfg.scoring.model_dump()),
        # a list column of a CSV-born table may hold delimited ids (features.table_source)
        list_delimiter=LIST_DELIMITER if cfg.table is not None else None,
    )


def event_serving_spec(
    cfg: FunnelConfig,
    key_sources: dict[str, str],
    as_of: dt.date,
    snapshot_day: dt.date,
    defaults: dict[str, dict[str, float]],
) -> EventFeatures:
    """The spec.json entries of an event-log bundle: its aggregate keys, snapshots, the
    aggregates' values for a key with no history and its behaviour sequences."""
    sparse = {f.name: f for f in cfg.features.sparse}
    sequences = tuple(
        SequenceSpec(
            name=seq.name,
            event=seq.event,
            key=seq.key,
            # the first carried feature is the element's item id (features.config checks it)
            items=tuple(
                SequenceItem(name, "item" if j == 0 else sparse[name].table, sparse[name].column)
                for j, name in enumerate(seq.items)
            ),
            max_length=seq.max_length,
            max_age_days=seq.max_age_days,
            file=f"features/sequences/{seq.name}.parquet",
        )
        for seq in cfg.features.sequences
    )
    return EventFeatures(
        aggregate_keys=tuple(
            AggregateKeySpec(
                k.name,
                tuple(k.columns),
                {c: key_sources[c] for c in k.columns},
                f"features/aggregates/{k.name}.parquet",
            )
            for k in cfg.features.aggregate_keys
        ),
        snapshots={t: SnapshotSpec(f"features/{t}.parquet", SNAPSHOT_KEY[t]) for t in SNAPSHOT_TABLES},
        features_as_of=as_of,
        snapshot_day=snapshot_day,
        defaults=defaults,
        sequences=sequences,
    )


def _event_feature_days(
    cfg: FunnelConfig, warehouse: Path, as_of: dt.date | None
) -> tuple[dt.date, dt.date, dict[str, str]]:
    """(features as of, snapshot day, aggregate-key column sources) of an event-log bundle."""
    spec = cfg.features
    for f in spec.sparse:
        if f.kind == "list" and f.table == "impressions":
            raise StageError(
                f"sparse feature {f.name!r}: list features of the impressions table (request context) are not "
                "supported by the scorer"
            )
    if as_of is None:
        newest = [
            newest_partition_day(daily_root(warehouse, k.name), f"daily aggregates of {k.name!r}")
            for k in spec.aggregate_keys
        ]
        users = validated_root(warehouse, "users")
        as_of = max(newest) + dt.timedelta(days=1) if newest else newest_partition_day(users, "validated users")
    snapshot_day = newest_partition_day(validated_root(warehouse, "users"), "validated users", until=as_of)
    impressions_day = newest_partition_day(validated_root(warehouse, "impressions"), "validated impressions")
    request_columns = scan_validated(warehouse, "impressions", impressions_day).collect_schema().names()
    # at serving time an impressions column comes with the request
    sources = key_column_sources(spec.aggregate_keys, warehouse, snapshot_day, request_columns)
    return as_of, snapshot_day, {c: "request" if t == "impressions" else t for c, t in sources.items()}


def _write_event_features(
    cfg: FunnelConfig,
    warehouse: Path,
    out: Path,
    key_sources: dict[str, str],
    snapshot_day: dt.date,
    as_of: dt.date,
    vocab_versions: dict,
) -> dict:
    """Write the encoded users/items snapshots, the aggregates' rolling features and each
    behaviour sequence's elements per user (``features.sequences.key_sequences`` of the
    state as of ``as_of``, items attributes from the bundled items snapshot, as the
    candidates') under ``out/features``; return the aggregates' defaults (a key with no history)."""
    (out / "features" / "aggregates").mkdir(parents=True)
    for table in SNAPSHOT_TABLES:
        key_columns = {c for c, s in key_sources.items() if s == table}
        pq.write_table(
            _encode_snapshot(cfg, warehouse, table, snapshot_day, key_columns, vocab_versions),
            out / "features" / f"{table}.parquet",
            compression="zstd",
        )
    frames, defaults = rolled_features(cfg, warehouse, as_of)
    for key in cfg.features.aggregate_keys:
        rolled = frames[key.name].collect().to_arrow()
        names = [n for n in rolled.column_names if n not in key.columns]
        keys = join_key_columns([rolled.column(c) for c in key.columns])
        table = pa.table({"key": keys, **{n: rolled.column(n) for n in names}}).filter(keys.is_valid())
        pq.write_table(table, out / "features" / "aggregates" / f"{key.name}.parquet", compression="zstd")
    if cfg.features.sequences:
        (out / "features" / "sequences").mkdir()
        items = scan_validated(warehouse, "items", snapshot_day).collect()
    for seq in cfg.features.sequences:
        state = sequence_state(cfg, warehouse, seq, as_of)
        pq.write_table(
            key_sequences(cfg, warehouse, seq, state, items, vocab_versions),
            out / "features" / "sequences" / f"{seq.name}.parquet",
            compression="zstd",
        )
    return defaults


def _versions() -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {
        "funnelrank": version("funnelrank"),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }


def _quantize(cfg: FunnelConfig, float_path: Path, path: Path, parity_files: Sequence[Path]) -> dict:
    """Quantise the float32 model at ``float_path`` into ``path`` (export.quantize), measured
    against it on every row of ``parity_files`` (the validation day, or a table's test
    split); StageError beyond export.max_auc_drop or export.max_calibration_change.
    Returns what the manifest records: the method and the measurement."""
    quantize_int8(float_path, path)
    batches = parity_batches(cfg, parity_files, min_rows=QUANTIZATION_MIN_ROWS)
    report = quantization_report(float_path, path, batches, cfg.features, cfg.tasks)
    check_quantization(report, cfg.export.max_auc_drop, cfg.export.max_calibration_change)
    return {
        "precision": cfg.export.quantize,
        "method": "onnxruntime dynamic quantisation: int8 weights per channel, uint8 activations per batch",
        "ops": list(QUANTIZED_OPS),
        "float32_sha256": sha256_file(float_path),
        "bounds": {
            "max_auc_drop": cfg.export.max_auc_drop,
            "max_calibration_change": cfg.export.max_calibration_change,
        },
        **report,
    }


def export_bundle(
    cfg: FunnelConfig,
    warehouse: Path,
    model: MultiTaskNet,
    out_dir: Path,
    parity_files: Sequence[Path],
    as_of: dt.date | None = None,
    inputs: dict | None = None,
) -> Path:
    """Write the serving bundle to ``out_dir`` atomically and return it.

    Contents: ``model.onnx`` (checked for parity on real rows of ``parity_files`` first;
    with ``export.quantize = "int8"`` the float32 model so checked is then quantised,
    measured against it on every row of ``parity_files`` and refused beyond the export
    bounds, see ``_quantize``; the manifest's ``quantization`` records it),
    ``vocab/<feature>.parquet`` (current versions), ``spec.json`` and ``manifest.json``
    (sha256 of every other file, versions, parity, and ``inputs``: what the caller
    identifies the bundle by, see ``export_stage.export_run``), and ``manifest.sig`` (its
    HMAC-SHA256) when ``FUNNELRANK_BUNDLE_KEY`` is set (serving.bundle checks it). An
    event-log model's bundle also holds ``features/users.parquet`` and
    ``features/items.parquet`` (the newest validated snapshots up to ``as_of``, encoded)
    and ``features/aggregates/<key>.parquet`` (``key`` string + the key's rolling features
    as of the start of ``as_of``, by default the day after the newest daily aggregates,
    i.e. what a row of the coming day would see in training; spec.json's ``defaults`` hold
    the values for a key with no history), and ``features/sequences/<name>.parquet`` per
    behaviour sequence (each user's elements as of the start of ``as_of``, encoded, as a
    training row of that day gets them). A ``[table]`` model's bundle has no snapshots
    (``as_of`` is not used): its rows carry every feature. Logging to MLflow is the
    caller's job.
    """
    warehouse = Path(warehouse)
    spec = cfg.features
    vocab_versions = {f.name: load_vocabulary(warehouse, f).version for f in spec.sparse}
    serving = serving_spec(cfg, vocab_versions)
    if cfg.table is None:
        as_of, snapshot_day, key_sources = _event_feature_days(cfg, warehouse, as_of)

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        quantize = cfg.export.quantize != "none"
        onnx_path = export_onnx(model, spec, cfg.tasks, tmp / ("model.float32.onnx" if quantize else "model.onnx"))
        parity = check_parity(model, onnx_path, parity_batches(cfg, parity_files), spec, cfg.tasks)
        quantization = None
        if quantize:
            quantization = _quantize(cfg, onnx_path, tmp / "model.onnx", parity_files)
            onnx_path.unlink()
        (tmp / "vocab").mkdir()
        for f in spec.sparse:
            if f.kind != "bucket":  # a bucket feature's boundaries are in spec.json
                vocab = load_vocabulary(warehouse, f, vocab_versions[f.name])
                pq.write_table(vocab.table, tmp / "vocab" / f"{f.name}.parquet", compression="zstd")
        if cfg.table is None:
            defaults = _write_event_features(cfg, warehouse, tmp, key_sources, snapshot_day, as_of, vocab_versions)
            events = event_serving_spec(cfg, key_sources, as_of, snapshot_day, defaults)
            serving = dataclasses.replace(serving, events=events)
        (tmp / SPEC_FILE).write_text(serving.to_json())
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": BUNDLE_FORMAT,
            "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "files": files,
            "versions": _versions(),
            "vocab_versions": vocab_versions,
            "parity": parity,  # of the float32 model against PyTorch
            "parity_files": [str(p) for p in parity_files],
            "quantization": quantization,  # None: model.onnx is the float32 model
            "inputs": inputs or {},
        }
        manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        if (key := signing_key()) is not None:
            (tmp / SIGNATURE).write_bytes(manifest_signature(manifest_bytes, key) + b"\n")
    return out_dir
