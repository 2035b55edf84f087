"""The ``export`` stage: the trained model of a run as a serving bundle, logged to its MLflow run."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from torch import nn

from features.catalog import scan_validated
from features.contract import day_str
from features.examples import training_dir
from features.io import sha256_file
from features.table_source import parquet_source, prepare_table, split_inputs
from models.loader import parquet_files
from models.nets import MultiTaskNet
from models.train import run_key
from pipeline.bundle import bundle_dir, export_bundle, precision_suffix
from pipeline.config import FunnelConfig
from pipeline.registry import EXAMPLE_ROWS, log_bundle_to_mlflow
from pipeline.train_stage import load_trained_model, training_data, training_window
from serving.bundle import BundleError, load_bundle


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


def export_run(
    cfg: FunnelConfig,
    warehouse: Path,
    run_date: dt.date | None = None,
    model: MultiTaskNet | None = None,
    mlflow_run_id: str | None = None,
) -> dict:
    """The ``export`` stage of the nightly run for ``run_date``, or of a ``[table]`` source's
    training run (``run_date`` None).

    Exports the trained model (``model``, else the finished training run's best checkpoint
    and its MLflow run) into ``<state_dir>/bundles/<run key>/`` (``<run key>-int8/`` with
    ``export.quantize = "int8"``: see pipeline.bundle.export_bundle), parity-checked on up to
    models.export.PARITY_MIN_ROWS real rows: of the run's validation day, with features as of
    ``run_date + 1`` (what the coming day's traffic sees); of a table source's test split.
    A parity failure (an output above the tolerance, or inf or NaN in either runtime) is a
    StageError: no bundle is written, nothing is logged.
    Skipped when that bundle exists, verifies and was built from the same run key and
    weights. The bundle is logged to the MLflow run as a pyfunc model under ``bundle/``
    (``bundle-int8/``; ``runs:/<run_id>/bundle``: ``mlflow.pyfunc.load_model`` runs it, and
    serving.bundle.load_bundle_from_mlflow loads the bundle in it), with an input example
    from the validation day's impressions (a table's test split); no MLflow run id:
    nothing is logged. Returns a summary.
    """
    warehouse = Path(warehouse)
    key = run_key(cfg, warehouse, training_data(cfg, warehouse, run_date))
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
    if cfg.export.quantize != "none":
        inputs["quantize"] = cfg.export.quantize
    folder = bundle_dir(cfg, key)
    skipped = _valid_bundle_with(folder, inputs)
    if not skipped:
        export_bundle(cfg, warehouse, model, folder, parity_files, as_of=as_of, inputs=inputs)
    bundle = load_bundle(folder)
    artifact_uri = None
    if mlflow_run_id:
        rows = _example_source(cfg, warehouse, val_day)
        artifact = f"bundle{precision_suffix(cfg)}"
        artifact_uri = log_bundle_to_mlflow(cfg.state_dir, mlflow_run_id, folder, bundle.sha256, rows, artifact)
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
        "quantization": bundle.manifest.get("quantization"),
        "mlflow_run_id": mlflow_run_id,
        "artifact_uri": artifact_uri,
    }


def _example_source(cfg: FunnelConfig, warehouse: Path, val_day: dt.date | None) -> pa.Table:
    """Raw rows the scorer takes, for the logged model's input example: the first rows of the
    validation day's validated impressions, or of a table source's test split file."""
    if cfg.table is None:
        return scan_validated(warehouse, "impressions", val_day).head(EXAMPLE_ROWS).collect().to_arrow()
    test = split_inputs(cfg.table)["test"]
    source = parquet_source(test, sha256_file(test), warehouse)
    return pa.Table.from_batches([next(pq.ParquetFile(source).iter_batches(batch_size=EXAMPLE_ROWS))])
