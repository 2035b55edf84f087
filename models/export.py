"""ONNX export of a trained MultiTaskNet, its parity check, and the serving bundle.

The torchrec EmbeddingBagCollection cannot be exported (KJT inputs), and nn.EmbeddingBag
exports as a slow ONNX Loop, so each table is copied into a plain ``nn.Embedding`` and
pooled with a masked sum over padded ids (Gather + ReduceSum; exact and fast with
``dynamo=True``). ONNX inputs:

* ``dense``: float32 [B, n_dense], raw (the model normalises inside);
* per sparse feature, named after it: kind="id" int64 [B] (0 is the padding row and is
  looked up like the EBC's length-1 bag does); kind="list" int64 [B, L] padded with -1
  after the real ids. Padding is -1, not 0, because a list may hold an explicit 0 (a null
  element) that the EBC does look up; an empty list pools to zeros.

Outputs: ``p_<view>`` for every task view of ``cfg.tasks`` (``features.config.task_views``;
the default funnel: ``p_click``, ``p_ctcvr``, ``p_cvr``) and ``score``, the ranking score =
product over the tasks of p[served view] ** score_exponent.

The bundle (see ``export_bundle``) is everything ``serving`` needs, in plain files. Its
spec records the tasks (name, served view, exponent), so the scorer needs no config. A
model trained on event logs gets the users/items snapshots and rolling aggregates the
scorer joins to a request; one trained on a feature table (``[table]``) gets none: it
scores rows that carry every feature column themselves.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from features.aggregates import daily_root, partition_days, rolling_defaults, rolling_features
from features.config import FeaturesConfig, FunnelConfig, TaskConfig, task_views
from features.contract import SNAPSHOT_TABLES, day_str, scan_validated
from features.errors import StageError
from features.examples import numeric_feature_expr, training_dir
from features.io import atomic_dir, sha256_file
from features.table_source import LIST_DELIMITER, prepare_table
from features.vocab import load_vocabulary
from models.loader import Batch, TrainingTableLoader, parquet_files
from models.nets import MultiTaskNet
from models.quiet import library_noise_silenced
from models.tracking import tracking_uri
from models.train import checkpoint_dir, run_key, training_window
from serving.bundle import BundleError, load_bundle
from serving.encoding import join_key_columns, pad_jagged
from serving.spec import (
    SCORE,
    SPEC_FILE,
    AggregateInput,
    AggregateKeySpec,
    BundleSpec,
    EventFeatures,
    NumericInput,
    ScoringLimits,
    SnapshotSpec,
    SparseInput,
    TaskOutput,
    aggregate_feature_names,
)

PARITY_TOLERANCE = 1e-5
PARITY_BATCH_SIZES = (1, 7, 1000, 4096)
PARITY_MIN_ROWS = 10_000
BUNDLE_FORMAT = 1
SNAPSHOT_KEY = {"users": "user_id", "items": "item_id"}


def output_names(tasks: Sequence[TaskConfig]) -> list[str]:
    """The ONNX model's outputs: ``p_<view>`` per task view, then ``score``."""
    return [f"p_{view}" for view in task_views(list(tasks))] + [SCORE]


def blend(probs: dict[str, torch.Tensor], tasks: Sequence[TaskConfig]) -> torch.Tensor:
    """The ranking score: product over ``tasks`` of p[served view] ** score_exponent."""
    score = torch.pow(probs[tasks[0].served_name], tasks[0].score_exponent)
    for t in tasks[1:]:
        score = score * torch.pow(probs[t.served_name], t.score_exponent)
    return score


class OnnxRanker(nn.Module):
    """MultiTaskNet with plain embeddings and padded-id inputs (see the module docstring)."""

    def __init__(self, model: MultiTaskNet, spec: FeaturesConfig, tasks: Sequence[TaskConfig]) -> None:
        super().__init__()
        by_name = {f.name: f for f in spec.sparse}
        if [f.name for f in spec.sparse] != model.sparse_names:
            raise StageError(f"model sparse features {model.sparse_names} differ from the spec's {[f.name for f in spec.sparse]}")
        if list(model.heads) != [t.name for t in tasks]:
            raise StageError(f"model task heads {list(model.heads)} differ from the config's tasks {[t.name for t in tasks]}")
        self.kinds = [by_name[n].kind for n in model.sparse_names]
        self.means = [by_name[n].pooling == "mean" for n in model.sparse_names]
        weights = {n: model.ebc.embedding_bags[n].weight.detach().clone().cpu() for n in model.sparse_names}
        self.tables = nn.ModuleList(nn.Embedding.from_pretrained(weights[n], freeze=True) for n in model.sparse_names)
        self.net = model  # its layers after the embeddings (its torchrec tables are not called)
        self.tasks = list(tasks)
        self.views = list(task_views(self.tasks))

    def forward(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        pooled = []
        for table, kind, mean, ids in zip(self.tables, self.kinds, self.means, sparse):
            if kind != "list":  # one id per row: id, bucket
                pooled.append(table(ids))
                continue
            mask = (ids >= 0).to(torch.float32).unsqueeze(-1)  # [B, L, 1]
            summed = (table(ids.clamp(min=0)) * mask).sum(dim=1)
            pooled.append(summed / mask.sum(dim=1).clamp(min=1.0) if mean else summed)
        probs = self.net.forward_from_embeddings(dense, pooled).probs
        return (*(probs[v] for v in self.views), blend(probs, self.tasks))


def to_onnx_module(model: MultiTaskNet, spec: FeaturesConfig, tasks: Sequence[TaskConfig]) -> OnnxRanker:
    """The exportable copy of a plain (not DMP-wrapped) model, in eval mode.

    A DistributedModelParallel model: load its plain state_dict (models.train._plain_state)
    into a fresh MultiTaskNet first; training already returns such a plain model.
    """
    if not isinstance(model, MultiTaskNet):
        raise StageError(f"export needs a plain MultiTaskNet, got {type(model).__name__}: load its plain state_dict into one")
    return OnnxRanker(model, spec, tasks).eval()


def input_names(spec: FeaturesConfig) -> list[str]:
    return ["dense", *[f.name for f in spec.sparse]]


def export_onnx(model: MultiTaskNet, spec: FeaturesConfig, tasks: Sequence[TaskConfig], path: Path) -> Path:
    """Write ``model`` as one self-contained ONNX file with dynamic batch and list length."""
    module = to_onnx_module(model, spec, tasks)
    batch = torch.export.Dim("batch", min=1)
    n = 4
    dense = torch.zeros(n, len(model.normalizer.mean))
    sparse = [torch.zeros(n, 3, dtype=torch.int64) if f.kind == "list" else torch.zeros(n, dtype=torch.int64) for f in spec.sparse]
    dims = [{0: batch, 1: torch.export.Dim(f"{f.name}_len", min=1)} if f.kind == "list" else {0: batch} for f in spec.sparse]
    # The exporter warns about operators this model never uses (torchvision's) and about
    # its own deprecations: noise in every nightly log. Parity (below) checks the result.
    with library_noise_silenced("torch.onnx._internal.exporter._registration"):
        program = torch.onnx.export(
            module,
            (dense, sparse),
            dynamo=True,
            input_names=input_names(spec),
            output_names=output_names(tasks),
            dynamic_shapes=({0: batch}, dims),
            optimize=True,
            verbose=False,
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(program.model_proto, str(path), save_as_external_data=False)
    return path


def onnx_inputs(batch: Batch, spec: FeaturesConfig) -> dict[str, np.ndarray]:
    """A loader batch as the ONNX model's feeds (lists padded with -1)."""
    per_key = batch.sparse.to_dict()
    feeds = {"dense": batch.dense.numpy().astype(np.float32, copy=False)}
    for f in spec.sparse:
        jt = per_key[f.name]
        values = jt.values().numpy().astype(np.int64, copy=False)
        feeds[f.name] = pad_jagged(jt.lengths().numpy(), values) if f.kind == "list" else values
    return feeds


@torch.no_grad()
def check_parity(
    model: MultiTaskNet, onnx_path: Path, batches: Sequence[Batch], spec: FeaturesConfig, tasks: Sequence[TaskConfig]
) -> dict:
    """Max |PyTorch - onnxruntime| per output over ``batches``; StageError above 1e-5."""
    model.eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = output_names(tasks)
    worst = dict.fromkeys(names, 0.0)
    sizes = []
    for batch in batches:
        out = model(batch.dense, batch.sparse)
        want = {f"p_{view}": p for view, p in out.probs.items()} | {SCORE: blend(out.probs, tasks)}
        got = dict(zip(names, session.run(names, onnx_inputs(batch, spec))))
        for name in names:
            worst[name] = max(worst[name], float(np.abs(got[name] - want[name].numpy()).max(initial=0.0)))
        sizes.append(len(batch))
    bad = {k: v for k, v in worst.items() if not v <= PARITY_TOLERANCE}
    if bad:
        detail = ", ".join(f"{k} max abs diff {v:.3g}" for k, v in bad.items())
        raise StageError(f"ONNX parity failed for {onnx_path} (tolerance {PARITY_TOLERANCE}): {detail} over batch sizes {sorted(set(sizes))}")
    return {"max_abs_diff": worst, "rows": int(sum(sizes)), "batch_sizes": sorted(set(sizes)), "tolerance": PARITY_TOLERANCE}


def parity_batches(cfg: FunnelConfig, files: Sequence[Path], min_rows: int = PARITY_MIN_ROWS) -> list[Batch]:
    """Real rows of ``files``: one batch of each size in PARITY_BATCH_SIZES, then batches
    of the largest size until ``min_rows`` rows (or the table's end)."""
    batches: list[Batch] = []
    for size in PARITY_BATCH_SIZES:
        loader = TrainingTableLoader(files, cfg.features.sparse, cfg.features.dense_names(), batch_size=size, shuffle=False,
                                     seed=cfg.seed, prefetch=0, labels=cfg.label_columns)
        for batch in loader:
            batches.append(batch)
            if size != PARITY_BATCH_SIZES[-1] or sum(len(b) for b in batches) >= min_rows:
                break
    return batches


# ---------------------------------------------------------------- the bundle

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


def serving_spec(cfg: FunnelConfig, vocab_versions: dict) -> BundleSpec:
    """What every bundle's spec.json holds: the model's inputs and outputs, the tasks and
    their score exponents, and how each input is encoded from raw columns (an events
    bundle gets its ``events`` from ``event_serving_spec`` once its features are written)."""
    spec = cfg.features
    dense: list[AggregateInput | NumericInput] = [
        AggregateInput(name, key.name)
        for key in spec.aggregate_keys for name in aggregate_feature_names(key.name, spec.windows_days)]
    dense += [NumericInput(f.name, f.table, f.column, f.transform) for f in spec.numeric]
    if [d.name for d in dense] != spec.dense_names():
        raise StageError(f"bundle dense features {[d.name for d in dense]} differ from the spec's {spec.dense_names()}")
    return BundleSpec(
        format=BUNDLE_FORMAT,
        source="events" if cfg.table is None else "table",
        inputs=tuple(input_names(spec)),
        outputs=tuple(output_names(cfg.tasks)),
        tasks=tuple(TaskOutput(t.name, t.served_name, t.score_exponent) for t in cfg.tasks),
        sparse=tuple(
            SparseInput(f.name, f.table, f.column, f.kind, f.capacity, f.oov_buckets, f.pooling, vocab_versions[f.name],
                        **({"boundaries": tuple(f.boundaries)} if f.kind == "bucket"
                           else {"vocab": f"vocab/{f.name}.parquet"}))
            for f in spec.sparse),
        dense=tuple(dense),
        scoring=ScoringLimits(cfg.scoring.max_candidates, cfg.scoring.max_body_bytes),
        # a list column of a CSV-born table may hold delimited ids (features.table_source)
        list_delimiter=LIST_DELIMITER if cfg.table is not None else None,
    )


def event_serving_spec(cfg: FunnelConfig, key_sources: dict[str, str], as_of: dt.date, snapshot_day: dt.date,
                       defaults: dict[str, dict[str, float]]) -> EventFeatures:
    """The spec.json entries of an event-log bundle: its aggregate keys, snapshots and the
    aggregates' values for a key with no history."""
    return EventFeatures(
        aggregate_keys=tuple(
            AggregateKeySpec(k.name, tuple(k.columns), {c: key_sources[c] for c in k.columns},
                             f"features/aggregates/{k.name}.parquet")
            for k in cfg.features.aggregate_keys),
        snapshots={t: SnapshotSpec(f"features/{t}.parquet", SNAPSHOT_KEY[t]) for t in SNAPSHOT_TABLES},
        features_as_of=as_of,
        snapshot_day=snapshot_day,
        defaults=defaults,
    )


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
    identifies the bundle by, see export_run). An event-log model's bundle also holds
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
            "parity": parity,
            "parity_files": [str(p) for p in parity_files],
            "inputs": inputs or {},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out_dir


# ---------------------------------------------------------------- the export stage

def bundle_dir(cfg: FunnelConfig, key: str) -> Path:
    return Path(cfg.state_dir) / "bundles" / key


def load_trained_model(cfg: FunnelConfig, warehouse: Path, run_date: dt.date | None,
                       key: str | None = None) -> tuple[MultiTaskNet, str | None]:
    """The best epoch's model of the finished training run for ``run_date`` (a ``[table]``
    source: None) and its MLflow run id; StageError naming the checkpoint and the command
    when training has not finished. ``key``: the run's key when the caller has it already
    (computing it hashes the training data's manifests, or a table's files)."""
    folder = checkpoint_dir(cfg, key or run_key(cfg, warehouse, run_date))
    what = "the table source" if run_date is None else day_str(run_date)
    date_flag = "" if run_date is None else f" --date {day_str(run_date)}"
    command = f"funnelrank train{date_flag}` (same --config and --warehouse)"
    last, best = folder / "last.pt", folder / "best.pt"
    if not last.is_file():
        raise StageError(f"no trained model for {what}: checkpoint {last} not found; run `{command} first")
    state = torch.load(last, map_location="cpu", weights_only=False)["state"]
    if not state.get("finished"):
        raise StageError(f"training for {what} has not finished ({last} is at epoch {state.get('epoch')} "
                         f"of {cfg.train.epochs}); run `{command} to resume it")
    if not best.is_file():
        raise StageError(f"training for {what} finished but its best checkpoint {best} is missing; "
                         f"delete {folder} and run `{command} again")
    n_dense = len(cfg.features.dense_names())
    # mean/std are buffers of the state_dict: placeholders here, the trained values load below.
    model = MultiTaskNet(cfg.features, cfg.model, cfg.tasks, np.zeros(n_dense, np.float32), np.ones(n_dense, np.float32))
    try:
        model.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["model"])
    except (RuntimeError, KeyError) as err:
        raise StageError(f"checkpoint {best} does not fit the configured model: {err}") from None
    return model.eval(), state.get("mlflow_run_id")


def model_sha256(model: nn.Module) -> str:
    """Hash of a model's state_dict (names and tensor bytes): identifies the weights exported."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _valid_bundle_with(folder: Path, inputs: dict) -> bool:
    """True when ``folder`` holds a bundle whose checksums verify and whose inputs are ``inputs``."""
    if not (folder / "manifest.json").is_file():
        return False
    try:
        return load_bundle(folder).manifest.get("inputs") == inputs
    except BundleError:
        return False


def log_bundle_to_mlflow(state_dir: Path, run_id: str, folder: Path, bundle_sha256: str) -> str:
    """Log the bundle folder as the artifacts ``bundle/`` of MLflow run ``run_id`` (once per
    bundle: the run's ``bundle.sha256`` tag records what was logged) and return its URI."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 - only this stage needs mlflow
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    client = MlflowClient(tracking_uri(state_dir))
    try:
        run = client.get_run(run_id)
        if run.data.tags.get("bundle.sha256") != bundle_sha256:
            client.log_artifacts(run_id, str(folder), "bundle")
            client.set_tag(run_id, "bundle.sha256", bundle_sha256)
    except MlflowException as err:
        raise StageError(f"cannot log bundle {folder} to MLflow run {run_id} at {tracking_uri(state_dir)}: {err}") from None
    return f"runs:/{run_id}/bundle"


def export_run(
    cfg: FunnelConfig, warehouse: Path, run_date: dt.date | None = None, model: MultiTaskNet | None = None,
    mlflow_run_id: str | None = None,
) -> dict:
    """The ``export`` stage of the nightly run for ``run_date``, or of a ``[table]`` source's
    training run (``run_date`` None).

    Exports the trained model (``model``, else the finished training run's best checkpoint
    and its MLflow run) into ``<state_dir>/bundles/<run key>/``, parity-checked on up to
    PARITY_MIN_ROWS real rows: of the run's validation day, with features as of
    ``run_date + 1`` (what the coming day's traffic sees); of a table source's test split.
    Skipped when that bundle exists, verifies and was built from the same run key and
    weights. The bundle is logged to the MLflow run under ``bundle/``
    (``runs:/<run_id>/bundle``, loadable by serving.bundle.load_bundle_from_mlflow); no
    MLflow run id: nothing is logged. Returns a summary.
    """
    warehouse = Path(warehouse)
    key = run_key(cfg, warehouse, run_date)
    if model is None:
        model, trained_run_id = load_trained_model(cfg, warehouse, run_date, key)
        mlflow_run_id = mlflow_run_id or trained_run_id
    inputs = {"run_key": key, "model_sha256": model_sha256(model)}
    if cfg.table is None:
        _, val_day = training_window(cfg, run_date)
        as_of = run_date + dt.timedelta(days=1)
        inputs["features_as_of"] = day_str(as_of)
        parity_files, parity_data = parquet_files(training_dir(warehouse, val_day)), day_str(val_day)
    else:
        as_of, val_day = None, None
        parity_files, parity_data = prepare_table(cfg, warehouse).files["test"], "the table's test split"
    folder = bundle_dir(cfg, key)
    skipped = _valid_bundle_with(folder, inputs)
    if not skipped:
        export_bundle(cfg, warehouse, model, folder, parity_files, as_of=as_of, inputs=inputs)
    bundle = load_bundle(folder)
    artifact_uri = log_bundle_to_mlflow(cfg.state_dir, mlflow_run_id, folder, bundle.sha256) if mlflow_run_id else None
    parity = bundle.manifest["parity"]
    return {
        "run_date": day_str(run_date) if run_date is not None else None,
        "run_key": inputs["run_key"],
        "bundle": str(folder),
        "bundle_sha256": bundle.sha256,
        "skipped": skipped,
        "validation_day": day_str(val_day) if val_day is not None else None,
        "parity_data": parity_data,  # what the parity rows are: the validation day, or the test split
        "parity_max_abs_diff": parity["max_abs_diff"],
        "parity_rows": parity["rows"],
        "mlflow_run_id": mlflow_run_id,
        "artifact_uri": artifact_uri,
    }
