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

Outputs: ``p_click``, ``p_cvr``, ``p_ctcvr`` and ``score`` = p_click^a * p_ctcvr^b
(``cfg.scoring``).

The bundle (see ``export_bundle``) is everything ``serving`` needs, in plain files.
"""

from __future__ import annotations

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
from features.config import AGGREGATE_METRICS, FeaturesConfig, FunnelConfig, ScoringConfig
from features.contract import SNAPSHOT_TABLES, day_str, scan_validated
from features.errors import StageError
from features.examples import numeric_feature_expr, training_dir
from features.io import atomic_dir, sha256_file
from features.vocab import load_vocabulary
from models.loader import Batch, TrainingTableLoader, parquet_files
from models.nets import MultiTaskNet
from models.quiet import library_noise_silenced
from models.tracking import tracking_uri
from models.train import run_key, training_window
from serving.bundle import BundleError, load_bundle
from serving.encoding import join_key_columns, pad_jagged

OUTPUTS = ("p_click", "p_cvr", "p_ctcvr", "score")
PARITY_TOLERANCE = 1e-5
PARITY_BATCH_SIZES = (1, 7, 1000, 4096)
PARITY_MIN_ROWS = 10_000
BUNDLE_FORMAT = 1
SNAPSHOT_KEY = {"users": "user_id", "items": "item_id"}


class OnnxRanker(nn.Module):
    """MultiTaskNet with plain embeddings and padded-id inputs (see the module docstring)."""

    def __init__(self, model: MultiTaskNet, spec: FeaturesConfig, scoring: ScoringConfig) -> None:
        super().__init__()
        by_name = {f.name: f for f in spec.sparse}
        if [f.name for f in spec.sparse] != model.sparse_names:
            raise StageError(f"model sparse features {model.sparse_names} differ from the spec's {[f.name for f in spec.sparse]}")
        self.kinds = [by_name[n].kind for n in model.sparse_names]
        self.means = [by_name[n].pooling == "mean" for n in model.sparse_names]
        weights = {n: model.ebc.embedding_bags[n].weight.detach().clone().cpu() for n in model.sparse_names}
        self.tables = nn.ModuleList(nn.Embedding.from_pretrained(weights[n], freeze=True) for n in model.sparse_names)
        self.normalizer = model.normalizer
        self.cross = model.cross
        self.backbone = model.backbone
        self.heads = model.heads
        self.a = scoring.click_exponent
        self.b = scoring.conversion_exponent

    def forward(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        pooled = []
        for table, kind, mean, ids in zip(self.tables, self.kinds, self.means, sparse):
            if kind == "id":
                pooled.append(table(ids))
                continue
            mask = (ids >= 0).to(torch.float32).unsqueeze(-1)  # [B, L, 1]
            summed = (table(ids.clamp(min=0)) * mask).sum(dim=1)
            pooled.append(summed / mask.sum(dim=1).clamp(min=1.0) if mean else summed)
        x = self.cross(torch.cat([*pooled, self.normalizer(dense)], dim=1))
        hidden, _ = self.backbone(x)
        p_click = torch.sigmoid(self.heads["click"](hidden["click"]).squeeze(-1))
        p_cvr = torch.sigmoid(self.heads["conversion"](hidden["conversion"]).squeeze(-1))
        p_ctcvr = p_click * p_cvr
        return p_click, p_cvr, p_ctcvr, blend(p_click, p_ctcvr, self.a, self.b)


def blend(p_click: torch.Tensor, p_ctcvr: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return torch.pow(p_click, a) * torch.pow(p_ctcvr, b)


def to_onnx_module(model: MultiTaskNet, spec: FeaturesConfig, scoring: ScoringConfig) -> OnnxRanker:
    """The exportable copy of a plain (not DMP-wrapped) model, in eval mode.

    A DistributedModelParallel model: load its plain state_dict (models.train._plain_state)
    into a fresh MultiTaskNet first; training already returns such a plain model.
    """
    if not isinstance(model, MultiTaskNet):
        raise StageError(f"export needs a plain MultiTaskNet, got {type(model).__name__}: load its plain state_dict into one")
    return OnnxRanker(model, spec, scoring).eval()


def input_names(spec: FeaturesConfig) -> list[str]:
    return ["dense", *[f.name for f in spec.sparse]]


def export_onnx(model: MultiTaskNet, spec: FeaturesConfig, scoring: ScoringConfig, path: Path) -> Path:
    """Write ``model`` as one self-contained ONNX file with dynamic batch and list length."""
    module = to_onnx_module(model, spec, scoring)
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
            output_names=list(OUTPUTS),
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
    model: MultiTaskNet, onnx_path: Path, batches: Sequence[Batch], spec: FeaturesConfig, scoring: ScoringConfig
) -> dict:
    """Max |PyTorch - onnxruntime| per output over ``batches``; StageError above 1e-5."""
    model.eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = dict.fromkeys(OUTPUTS, 0.0)
    sizes = []
    for batch in batches:
        out = model(batch.dense, batch.sparse)
        want = dict(zip(OUTPUTS, (out.p_click, out.p_cvr, out.p_ctcvr, blend(out.p_click, out.p_ctcvr, scoring.click_exponent, scoring.conversion_exponent))))
        got = dict(zip(OUTPUTS, session.run(list(OUTPUTS), onnx_inputs(batch, spec))))
        for name in OUTPUTS:
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
        loader = TrainingTableLoader(files, cfg.features.sparse, cfg.features.dense_names(), batch_size=size, shuffle=False, seed=cfg.seed, prefetch=0)
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


def serving_spec(cfg: FunnelConfig, key_sources: dict[str, str], vocab_versions: dict, as_of: dt.date, snapshot_day: dt.date) -> dict:
    spec = cfg.features
    # Same construction and order as FeaturesConfig.dense_names.
    dense = [
        {"name": f"{key.name}_{metric}_{w}d", "source": "aggregate", "key": key.name}
        for key in spec.aggregate_keys for w in spec.windows_days for metric in AGGREGATE_METRICS
    ]
    dense += [{"name": f.name, "source": f.table, "column": f.column, "transform": f.transform} for f in spec.numeric]
    if [d["name"] for d in dense] != spec.dense_names():
        raise StageError(f"bundle dense features {[d['name'] for d in dense]} differ from the spec's {spec.dense_names()}")
    return {
        "format": BUNDLE_FORMAT,
        "inputs": input_names(spec),
        "outputs": list(OUTPUTS),
        "sparse": [
            {"name": f.name, "table": f.table, "column": f.column, "kind": f.kind, "capacity": f.capacity,
             "oov_buckets": f.oov_buckets, "pooling": f.pooling, "vocab": f"vocab/{f.name}.parquet", "vocab_version": vocab_versions[f.name]}
            for f in spec.sparse
        ],
        "dense": dense,
        "aggregate_keys": [
            {"name": k.name, "columns": list(k.columns), "sources": {c: key_sources[c] for c in k.columns}, "file": f"features/aggregates/{k.name}.parquet"}
            for k in spec.aggregate_keys
        ],
        "snapshots": {t: {"file": f"features/{t}.parquet", "key": SNAPSHOT_KEY[t]} for t in SNAPSHOT_TABLES},
        "scoring": cfg.scoring.model_dump(mode="json"),
        "features_as_of": day_str(as_of),
        "snapshot_day": day_str(snapshot_day),
    }


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
    ``vocab/<feature>.parquet`` (current versions), ``features/users.parquet`` and
    ``features/items.parquet`` (the newest validated snapshots up to ``as_of``, encoded),
    ``features/aggregates/<key>.parquet`` (``key`` string + the key's rolling features as
    of the start of ``as_of``, by default the day after the newest daily aggregates, i.e.
    what a row of the coming day would see in training; spec.json's ``defaults`` hold the values
    for a key with no history), ``spec.json`` and ``manifest.json`` (sha256 of every
    other file, versions, parity, and ``inputs``: what the caller identifies the bundle by,
    see export_run). Logging to MLflow is the caller's job.
    """
    warehouse = Path(warehouse)
    spec = cfg.features
    for f in spec.sparse:
        if f.kind == "list" and f.table == "impressions":
            raise StageError(f"sparse feature {f.name!r}: list features of the impressions table (request context) are not supported by the scorer")
    vocab_versions = {f.name: load_vocabulary(warehouse, f).version for f in spec.sparse}
    if as_of is None:
        newest = [_latest_day(daily_root(warehouse, k.name), f"daily aggregates of {k.name!r}") for k in spec.aggregate_keys]
        as_of = max(newest) + dt.timedelta(days=1) if newest else _latest_day(warehouse / "validated" / "users", "validated users")
    snapshot_day = _latest_day(warehouse / "validated" / "users", "validated users", until=as_of)
    request_columns = set(scan_validated(warehouse, "impressions", _latest_day(warehouse / "validated" / "impressions", "validated impressions")).collect_schema())
    key_sources = _key_sources(cfg, warehouse, request_columns, snapshot_day)
    serving = serving_spec(cfg, key_sources, vocab_versions, as_of, snapshot_day)

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        onnx_path = export_onnx(model, spec, cfg.scoring, tmp / "model.onnx")
        parity = check_parity(model, onnx_path, parity_batches(cfg, parity_files), spec, cfg.scoring)
        for f in spec.sparse:
            vocab = load_vocabulary(warehouse, f, vocab_versions[f.name])
            (tmp / "vocab").mkdir(exist_ok=True)
            pq.write_table(vocab.table, tmp / "vocab" / f"{f.name}.parquet", compression="zstd")
        (tmp / "features" / "aggregates").mkdir(parents=True)
        for table in SNAPSHOT_TABLES:
            key_columns = {c for c, s in key_sources.items() if s == table}
            pq.write_table(_encode_snapshot(cfg, warehouse, table, snapshot_day, key_columns, vocab_versions), tmp / "features" / f"{table}.parquet", compression="zstd")
        frames = rolling_features(cfg, warehouse, as_of)
        defaults = rolling_defaults(cfg, warehouse, as_of)
        for key in spec.aggregate_keys:
            rolled = frames[key.name].collect().to_arrow()
            names = [n for n in rolled.column_names if n not in key.columns]
            keys = join_key_columns([rolled.column(c) for c in key.columns])
            table = pa.table({"key": keys, **{n: rolled.column(n) for n in names}}).filter(keys.is_valid())
            pq.write_table(table, tmp / "features" / "aggregates" / f"{key.name}.parquet", compression="zstd")
        serving["defaults"] = defaults
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


# ---------------------------------------------------------------- the export stage

def checkpoint_dir(cfg: FunnelConfig, warehouse: Path, run_date: dt.date) -> Path:
    """Where ``funnelrank train --date run_date`` keeps its checkpoints (models/train.py)."""
    return Path(cfg.state_dir) / "checkpoints" / run_key(cfg, warehouse, run_date)


def bundle_dir(cfg: FunnelConfig, warehouse: Path, run_date: dt.date) -> Path:
    return Path(cfg.state_dir) / "bundles" / run_key(cfg, warehouse, run_date)


def load_trained_model(cfg: FunnelConfig, warehouse: Path, run_date: dt.date) -> tuple[MultiTaskNet, str | None]:
    """The best epoch's model of the finished training run for ``run_date`` and its MLflow
    run id; StageError naming the checkpoint and the command when training has not finished."""
    folder = checkpoint_dir(cfg, warehouse, run_date)
    command = f"funnelrank train --date {day_str(run_date)}` (same --config and --warehouse)"
    last, best = folder / "last.pt", folder / "best.pt"
    if not last.is_file():
        raise StageError(f"no trained model for {day_str(run_date)}: checkpoint {last} not found; run `{command} first")
    state = torch.load(last, map_location="cpu", weights_only=False)["state"]
    if not state.get("finished"):
        raise StageError(f"training for {day_str(run_date)} has not finished ({last} is at epoch {state.get('epoch')} "
                         f"of {cfg.train.epochs}); run `{command} to resume it")
    if not best.is_file():
        raise StageError(f"training for {day_str(run_date)} finished but its best checkpoint {best} is missing; "
                         f"delete {folder} and run `{command} again")
    n_dense = len(cfg.features.dense_names())
    # mean/std are buffers of the state_dict: placeholders here, the trained values load below.
    model = MultiTaskNet(cfg.features, cfg.model, np.zeros(n_dense, np.float32), np.ones(n_dense, np.float32))
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
    cfg: FunnelConfig, warehouse: Path, run_date: dt.date, model: MultiTaskNet | None = None, mlflow_run_id: str | None = None
) -> dict:
    """The ``export`` stage of the nightly run for ``run_date``.

    Exports the trained model (``model``, else the finished training run's best checkpoint
    and its MLflow run) into ``<state_dir>/bundles/<run key>/``, parity-checked on up to
    PARITY_MIN_ROWS rows of the run's validation day, with features as of ``run_date + 1``
    (what the coming day's traffic sees). Skipped when that bundle exists, verifies and was
    built from the same run key and weights. The bundle is logged to the MLflow run under
    ``bundle/`` (``runs:/<run_id>/bundle``, loadable by serving.bundle.load_bundle_from_mlflow);
    no MLflow run id: nothing is logged. Returns a summary.
    """
    warehouse = Path(warehouse)
    if model is None:
        model, trained_run_id = load_trained_model(cfg, warehouse, run_date)
        mlflow_run_id = mlflow_run_id or trained_run_id
    _, val_day = training_window(cfg, run_date)
    as_of = run_date + dt.timedelta(days=1)
    inputs = {"run_key": run_key(cfg, warehouse, run_date), "model_sha256": model_sha256(model), "features_as_of": day_str(as_of)}
    folder = bundle_dir(cfg, warehouse, run_date)
    skipped = _valid_bundle_with(folder, inputs)
    if not skipped:
        export_bundle(cfg, warehouse, model, folder, parquet_files(training_dir(warehouse, val_day)), as_of=as_of, inputs=inputs)
    bundle = load_bundle(folder)
    artifact_uri = log_bundle_to_mlflow(cfg.state_dir, mlflow_run_id, folder, bundle.sha256) if mlflow_run_id else None
    parity = bundle.manifest["parity"]
    return {
        "run_date": day_str(run_date),
        "run_key": inputs["run_key"],
        "bundle": str(folder),
        "bundle_sha256": bundle.sha256,
        "skipped": skipped,
        "validation_day": day_str(val_day),
        "parity_max_abs_diff": parity["max_abs_diff"],
        "parity_rows": parity["rows"],
        "mlflow_run_id": mlflow_run_id,
        "artifact_uri": artifact_uri,
    }
