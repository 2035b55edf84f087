"""The ``train`` stage: what a run trains on, the training, and the model it leaves.

Event logs: L = run_date - contract.maturity_lag_days is the newest mature day. The model
trains on days L - window_days + 1 .. L - 1 and validates (early stopping, metrics) on L,
so ``train.window_days`` >= 2. A ``[table]`` source: on its train split, validated on its
val split, both prepared first when their inputs changed. The loop itself, checkpoints
and resumption are ``models.train``'s.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import torch

from features.catalog import partition_days, validated_root
from features.contract import day_str
from features.errors import StageError
from features.examples import mature_day, stale_training_tables, training_dir
from features.table_source import prepare_table
from models.checkpoint import checkpoint_dir
from models.distributed import barrier, init_process_group, local_device, this_rank
from models.loader import parquet_files
from models.nets import MultiTaskNet
from models.train import TrainingData, TrainResult, run_key, train_model
from pipeline.config import FunnelConfig


def training_window(cfg: FunnelConfig, run_date: dt.date) -> tuple[list[dt.date], dt.date]:
    """(training days, validation day) of the nightly run for ``run_date``."""
    last = mature_day(cfg, run_date)
    first = last - dt.timedelta(days=cfg.train.window_days - 1)
    return [first + dt.timedelta(days=i) for i in range((last - first).days)], last


def mature_days_of_data(cfg: FunnelConfig, warehouse: Path, run_date: dt.date) -> list[dt.date]:
    """The days of the night's full training window (``train.window_days``, the validation
    day last) on or after the first day of data (the first validated impressions): fewer
    than the window on a young warehouse."""
    days, val_day = training_window(cfg, run_date)
    first = min(partition_days(validated_root(warehouse, "impressions")), default=None)
    return [d for d in [*days, val_day] if first is not None and d >= first]


def training_data(cfg: FunnelConfig, warehouse: Path, run_date: dt.date | None) -> TrainingData:
    """Event logs: the window of mature days before ``run_date`` (the newest validates).
    A ``[table]`` source: its train and val splits, prepared first when their inputs changed
    (``run_date`` is not used)."""
    if cfg.table is not None:
        # under torchrun rank 0 writes the tables; the others then find them ready
        prepared = prepare_table(cfg, warehouse) if this_rank() == 0 else None
        barrier()
        prepared = prepared or prepare_table(cfg, warehouse)
        tags = {
            "source": "table",
            **{
                f"data.{split}.sha256": ",".join(info["content_sha256"].values())
                for split, info in prepared.manifest["splits"].items()
            },
        }
        return TrainingData(
            "table", prepared.files["train"], prepared.files["val"], tags, prepared.manifest["vocab_versions"]
        )
    if run_date is None:
        raise StageError("training on event logs needs a run date (--date)")
    train_days, val_day = training_window(cfg, run_date)
    if stale := stale_training_tables(warehouse, [*train_days, val_day]):
        raise StageError(
            f"training tables built from data that changed since: {'; '.join(stale)}; run `funnelrank "
            f"examples` for them again (the night of a table's date + the maturity lag) first"
        )
    tags = {
        "run_date": day_str(run_date),
        "train_days": ",".join(map(day_str, train_days)),
        "val_day": day_str(val_day),
        **_data_tags(warehouse, [*train_days, val_day]),
    }
    versions = {
        day: m["vocab_versions"]
        for day, m in _manifests(warehouse, [*train_days, val_day]).items()
        if "vocab_versions" in m
    }
    train_files = [f for day in train_days for f in parquet_files(training_dir(warehouse, day))]
    return TrainingData(day_str(run_date), train_files, parquet_files(training_dir(warehouse, val_day)), tags, versions)


def _manifests(warehouse: Path, days: list[dt.date]) -> dict[str, dict]:
    out = {}
    for day in days:
        path = training_dir(warehouse, day) / "manifest.json"
        if path.exists():
            out[day_str(day)] = json.loads(path.read_text())
    return out


def _data_tags(warehouse: Path, days: list[dt.date]) -> dict[str, str]:
    """Content hashes of the training tables, from their manifests (when present)."""
    return {
        f"data.{day}.sha256": m["content_sha256"]
        for day, m in _manifests(warehouse, days).items()
        if "content_sha256" in m
    }


def train_run(cfg: FunnelConfig, warehouse: Path, run_date: dt.date | None, **options) -> TrainResult:
    """Train (or resume) the run for ``run_date`` (a ``[table]`` source: None); ``options``
    are ``models.train.train_model``'s. Joins the job's process group first, so that under
    torchrun rank 0 alone prepares a table source."""
    init_process_group(cfg.state_dir, local_device())
    return train_model(cfg, warehouse, training_data(cfg, warehouse, run_date), **options)


def load_trained_model(
    cfg: FunnelConfig, warehouse: Path, run_date: dt.date | None, key: str | None = None
) -> tuple[MultiTaskNet, str | None]:
    """The best epoch's model of the finished training run for ``run_date`` (a ``[table]``
    source: None) and its MLflow run id; StageError naming the checkpoint and the command
    when training has not finished. ``key``: the run's key when the caller has it already
    (computing it reads the training tables' manifests; a table source is prepared first)."""
    folder = checkpoint_dir(cfg, key or run_key(cfg, warehouse, training_data(cfg, warehouse, run_date)))
    what = "the table source" if run_date is None else day_str(run_date)
    date_flag = "" if run_date is None else f" --date {day_str(run_date)}"
    command = f"funnelrank train{date_flag}` (same --config and --warehouse)"
    last, best = folder / "last.pt", folder / "best.pt"
    if not last.is_file():
        raise StageError(f"no trained model for {what}: checkpoint {last} not found; run `{command} first")
    state = torch.load(last, map_location="cpu", weights_only=False)["state"]
    if not state.get("finished"):
        raise StageError(
            f"training for {what} has not finished ({last} is at epoch {state.get('epoch')} "
            f"of {cfg.train.epochs}); run `{command} to resume it"
        )
    if not best.is_file():
        raise StageError(
            f"training for {what} finished but its best checkpoint {best} is missing; "
            f"delete {folder} and run `{command} again"
        )
    n_dense = len(cfg.features.dense_names())
    # mean/std are buffers of the state_dict: placeholders here, the trained values load below.
    model = MultiTaskNet(
        cfg.features, cfg.model, cfg.tasks, np.zeros(n_dense, np.float32), np.ones(n_dense, np.float32)
    )
    try:
        model.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["model"])
    except (RuntimeError, KeyError) as err:
        raise StageError(f"checkpoint {best} does not fit the configured model: {err}") from None
    return model.eval(), state.get("mlflow_run_id")
