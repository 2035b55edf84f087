"""``funnelrank nightly``: the night's stages for one date, as a small DAG.

    validate -> features -> examples -> train -> evaluate -> export -> promote

Each stage is a plain function of the ``Night`` (config, warehouse, date, what earlier
stages produced) that returns its outputs, paired with a function naming its inputs.
After a stage finishes, ``<state_dir>/nightly/<date>/<stage>.json`` records a hash of
those inputs and the outputs; running the night again skips a stage whose inputs hash
the same (and whose outputs still exist), so a failed or killed night is resumed by the
same command: finished stages are skipped, the interrupted one starts over (``train``
resumes from its last epoch checkpoint), and the rest follow. ``--from STAGE`` forces a
stage and everything after it to run again.

A young warehouse (fewer mature days of data than ``train.window_days``) trains on the
days it has once there are ``train.min_window_days``; before that, ``train`` says why it
did not run and evaluate, export and promote are skipped, each with its line: the night
still succeeds.

The champion a night compares against and warm-starts from is fixed the first time the
night runs (``plan.json``), so rerunning a night after it promoted its own model gives
the same result. A lock file in the warehouse keeps two runs off one warehouse; the
kernel drops it when its process dies, even by kill -9.

MLflow: one parent run per night (``nightly-<date>``: per stage status, seconds and rows,
and the outcome) with the training and evaluation runs as its children.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from features.catalog import (
    lock_path,
    raw_dir,
    training_dir,
    training_manifest_path,
    validated_dir,
    warehouse_relative,
)
from features.contract import DAILY_TABLES, SNAPSHOT_TABLES, day_str
from features.errors import StageError, WarehouseLockedError
from features.io import atomic_write_json, sha256_dir
from pipeline.config import FunnelConfig

if TYPE_CHECKING:
    from models.nets import MultiTaskNet

STAGES = ("validate", "features", "examples", "train", "evaluate", "export", "promote")


@dataclass
class Night:
    cfg: FunnelConfig
    warehouse: Path
    run_date: dt.date
    parent_run_id: str | None = None
    plan: dict = field(default_factory=dict)  # {"champion": {"version", "run_id"} | None}, fixed at the first run
    outputs: dict[str, dict] = field(default_factory=dict)  # each finished stage's outputs
    candidate: MultiTaskNet | None = field(
        default=None, init=False, repr=False
    )  # the night's model, once trained or loaded
    _champion_weights: tuple | None = field(
        default=None, init=False, repr=False
    )  # (config, state_dict), downloaded once

    @property
    def records(self) -> Path:
        return Path(self.cfg.state_dir) / "nightly" / day_str(self.run_date)

    def champion(self):
        from pipeline.registry import Champion

        found = self.plan.get("champion")
        return Champion(found["version"], found["run_id"]) if found else None

    def champion_weights(self) -> tuple[FunnelConfig, dict]:
        """The pinned champion's training config and weights (downloaded once per night)."""
        from pipeline.registry import champion_weights

        if self._champion_weights is None:
            self._champion_weights = champion_weights(self.cfg, self.champion())
        return self._champion_weights

    def train_config(self) -> FunnelConfig:
        """The config the night's model was trained with (see ``with_window``)."""
        return with_window(self.cfg, self.outputs["train"]["window_days"])

    def trained_model(self) -> MultiTaskNet:
        """The night's candidate: the model train returned, else its best checkpoint."""
        if self.candidate is None:
            from pipeline.train_stage import load_trained_model

            self.candidate, _ = load_trained_model(self.train_config(), self.warehouse, self.run_date)
        return self.candidate


def with_window(cfg: FunnelConfig, window_days: int) -> FunnelConfig:
    """``cfg`` training on ``window_days`` mature days: a warm start trains on the newest
    ``nightly.fine_tune_days`` (plus the validation day) only."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"window_days": window_days})})


@dataclass(frozen=True)
class Stage:
    name: str
    # What the outputs depend on: equal inputs -> skipped. None: the stage always runs
    # and skips itself (it returns "skipped": True).
    inputs: Callable[[Night], dict] | None
    run: Callable[[Night], dict]  # outputs; "rows" and "detail" are printed, "paths" must exist to skip


# ---------------------------------------------------------------- inputs


def _partition_hashes(warehouse: Path, folders: list[Path]) -> dict[str, str]:
    return {warehouse_relative(warehouse, p): sha256_dir(p) for p in folders if p.is_dir()}


def _lookback(night: Night) -> list[dt.date]:
    lag = night.cfg.contract.maturity_lag_days
    return [night.run_date - dt.timedelta(days=n) for n in range(lag, 0, -1)]


def _config(night: Night, *sections: str) -> dict:
    dumped = night.cfg.model_dump(mode="json", by_alias=True)
    return {s: dumped[s] for s in sections}


def validate_inputs(night: Night) -> dict:
    wh, day = night.warehouse, night.run_date
    raw = [raw_dir(wh, t, day) for t in DAILY_TABLES] + [raw_dir(wh, t) for t in SNAPSHOT_TABLES]
    earlier = [validated_dir(wh, "impressions", d) for d in _lookback(night)]  # clicks are checked against these
    return {
        "partitions": _partition_hashes(wh, raw + earlier),
        "config": _config(night, "contract", "validate", "features"),
    }


def features_inputs(night: Night) -> dict:
    wh = night.warehouse
    days = [*_lookback(night), night.run_date]
    folders = [validated_dir(wh, t, d) for t in DAILY_TABLES for d in days]
    folders += [validated_dir(wh, t, night.run_date) for t in SNAPSHOT_TABLES]
    return {"partitions": _partition_hashes(wh, folders), "config": _config(night, "contract", "features")}


def train_inputs(night: Night) -> dict:
    from pipeline.train_stage import training_window

    days, val_day = training_window(night.cfg, night.run_date)  # the full window: a warm start reads a part of it
    tables = {day_str(d): _table_hash(night.warehouse, d) for d in [*days, val_day]}
    return {"tables": tables, "config": night.cfg.model_dump(mode="json", by_alias=True), "plan": night.plan}


def _table_hash(warehouse: Path, day: dt.date) -> str | None:
    path = training_manifest_path(warehouse, day)
    return json.loads(path.read_text())["content_sha256"] if path.exists() else None


def after(*stages: str) -> Callable[[Night], dict]:
    """Inputs of a stage that reads only what earlier stages of the night produced."""
    return lambda night: {
        "upstream": {s: night.outputs.get(s) for s in stages},
        "plan": night.plan,
        "config": night.cfg.model_dump(mode="json", by_alias=True),
    }


# ---------------------------------------------------------------- stages


def run_validate(night: Night) -> dict:
    from features.validate import validate_day

    report = validate_day(night.cfg, night.warehouse, night.run_date)
    tables = report.tables
    return {
        "rows": tables["impressions"].input_rows,
        "quarantined": sum(t.quarantined_rows for t in tables.values()),
        "detail": f"{sum(t.quarantined_rows for t in tables.values()):,} rows quarantined",
        "paths": [str(validated_dir(night.warehouse, t, night.run_date)) for t in DAILY_TABLES],
    }


def run_features(night: Night) -> dict:
    from features.daily_counters import build_daily_aggregates

    manifest = build_daily_aggregates(night.cfg, night.warehouse, night.run_date)
    return {
        "rows": manifest["impressions"],
        "detail": ", ".join(f"{k} {v:,} keys" for k, v in manifest["rows"].items()),
        "paths": list(manifest["outputs"].values()),
    }


def run_examples(night: Night) -> dict:
    from features.examples import build_training_table, mature_day

    day = mature_day(night.cfg, night.run_date)
    if not validated_dir(night.warehouse, "impressions", day).is_dir():
        return {
            "rows": 0,
            "detail": f"no validated impressions of the mature day {day} (before the data starts?): nothing to build",
        }
    manifest = build_training_table(night.cfg, night.warehouse, night.run_date)
    state = "unchanged (its own input hashes), kept" if manifest["skipped"] else "written"
    return {
        "rows": manifest["rows"]["rows_out"],
        "date": manifest["date"],
        "content_sha256": manifest["content_sha256"],
        "skipped": manifest["skipped"],
        "detail": f"training table of {manifest['date']} {state}",
        "paths": [str(training_dir(night.warehouse, dt.date.fromisoformat(manifest["date"])))],
    }


def warm_start_source(night: Night) -> tuple[int, dict | None, dict[str, str]]:
    """(window days, initial weights or None, MLflow tags saying what happened and why)."""
    from pipeline.registry import same_architecture

    cfg, champion = night.cfg, night.champion()
    full = cfg.train.window_days
    if not cfg.nightly.warm_start:
        return full, None, {"warm_start": "none", "warm_start_reason": "nightly.warm_start = false: full retrain"}
    if champion is None:
        return full, None, {"warm_start": "none", "warm_start_reason": "no champion yet: full training"}
    champion_cfg, state = night.champion_weights()
    if reason := same_architecture(champion_cfg, cfg):
        return (
            full,
            None,
            {"warm_start": "none", "warm_start_reason": f"champion v{champion.version} does not fit: {reason}"},
        )
    mode = "towers and gates only (shared layers frozen)" if cfg.nightly.freeze_shared else "all layers"
    return (
        cfg.nightly.fine_tune_days + 1,
        state,
        {
            "warm_start": "champion",
            "warm_start_version": str(champion.version),
            "warm_start_run_id": champion.run_id,
            "warm_start_reason": f"fine-tune {mode} on the newest {cfg.nightly.fine_tune_days} mature day(s)",
        },
    )


def run_train(night: Night) -> dict:
    from pipeline.train_stage import mature_days_of_data, train_run

    have = mature_days_of_data(night.cfg, night.warehouse, night.run_date)
    needed = min(night.cfg.train.min_window_days, night.cfg.train.window_days)
    if len(have) < needed:
        since = f" (from {have[0]})" if have else ""
        reason = f"{len(have)} mature day(s) of data so far{since}, training needs {needed} (train.min_window_days)"
        return {
            "skipped": True,
            "halt": f"no model tonight: {reason}",
            "rows": 0,
            "detail": f"{reason}; no model tonight",
        }
    window, initial, tags = warm_start_source(night)
    if len(have) < window:  # a young warehouse: the days there are
        window = len(have)
        tags = {**tags, "warm_start_reason": f"{tags['warm_start_reason']}; {window} mature day(s) of data so far"}
    cfg = with_window(night.cfg, window)
    result = train_run(
        cfg,
        night.warehouse,
        night.run_date,
        progress=True,
        initial_state=initial,
        freeze_shared=initial is not None and night.cfg.nightly.freeze_shared,
        parent_run_id=night.parent_run_id,
        extra_tags=tags,
    )
    night.candidate = result.model
    metric = night.cfg.early_stopping_metric
    return {
        "window_days": window,
        "run_key": result.run_key,
        "mlflow_run_id": result.mlflow_run_id,
        **tags,
        "best_epoch": result.best_epoch,
        "val": result.val_metrics,
        "rows": sum(
            json.loads(training_manifest_path(night.warehouse, d).read_text())["rows"]["rows_out"]
            for d in _window_days(cfg, night.run_date)
        ),
        "detail": f"{metric} {result.best_metric:.4f} after {result.epochs_run} epoch(s); {tags['warm_start_reason']}"
        + _calibration_detail(night.cfg, result.calibration),
        "paths": [str(result.checkpoint_dir / "best.pt")],
    }


def _calibration_detail(cfg: FunnelConfig, calibration: dict) -> str:
    """'; platt calibration (predicted / observed) click 1.312 -> 1.000, ctcvr ...' of the validation day."""
    metrics = calibration.get("metrics", {})
    served = [t.served_name for t in cfg.tasks if f"after/{t.served_name}_calibration" in metrics]
    if not served or cfg.model.calibration == "none":
        return ""
    return f"; {cfg.model.calibration} calibration (predicted / observed) " + ", ".join(
        f"{v} {metrics[f'before/{v}_calibration']:.3f} -> {metrics[f'after/{v}_calibration']:.3f}" for v in served
    )


def _window_days(cfg: FunnelConfig, run_date: dt.date) -> list[dt.date]:
    from pipeline.train_stage import training_window

    days, val_day = training_window(cfg, run_date)
    return [*days, val_day]


def run_evaluate(night: Night) -> dict:
    from pipeline.evaluate import champion_model, evaluate_models

    champion, net, note = night.champion(), None, "no champion yet"
    if champion is not None:
        net, note = champion_model(night.cfg, champion, *night.champion_weights())
    result = evaluate_models(
        night.cfg, night.warehouse, night.run_date, night.trained_model(), net, note, night.parent_run_id
    )
    cand, champ = result["candidate"], result["champion"]
    served = [t.served_name for t in night.cfg.tasks if not t.is_value]
    values = [f"{task}_{m}" for task in night.cfg.value_views() for m in ("gini", "rmse")]
    detail = "candidate " + ", ".join(f"{m} {cand[m]:.4f}" for m in [f"{v}_auc" for v in served] + values)
    if champ:
        detail += " | champion " + ", ".join(f"{champ[m]:.4f}" for m in [f"{v}_auc" for v in served] + values)
        detail += " | change " + ", ".join(
            [f"{cand[f'{v}_auc'] - champ[f'{v}_auc']:+.4f} ± {result['delta_auc_se'][v]:.4f}" for v in served]
            + [f"{cand[m] - champ[m]:+.4f}" for m in values]
        )
    else:
        detail += f" | {result['champion_note']}"
    return {**result, "detail": detail}


def run_export(night: Night) -> dict:
    from pipeline.export_stage import export_run

    summary = export_run(
        night.train_config(),
        night.warehouse,
        night.run_date,
        night.trained_model(),
        night.outputs["train"]["mlflow_run_id"],
    )
    worst = max(summary["parity_max_abs_diff"].values())
    return {
        **summary,
        "rows": summary["parity_rows"],
        "paths": [summary["bundle"]],
        "detail": f"bundle {summary['bundle']} (parity max |diff| {worst:.1e} on {summary['parity_rows']:,} rows)",
    }


def run_promote(night: Night) -> dict:
    from pipeline.registry import (
        current_champion,
        gate,
        gate_calibrations,
        register_candidate,
        set_champion,
        tag_version,
    )

    cfg, evaluation, train = night.cfg, night.outputs["evaluate"], night.outputs["train"]
    # delta_auc_se is absent from an evaluation recorded by an older funnelrank
    decision = gate(evaluation["candidate"], evaluation["champion"], cfg, evaluation.get("delta_auc_se"))
    days = _window_days(night.train_config(), night.run_date)
    tags = {
        "run_date": day_str(night.run_date),
        "eval_day": evaluation["eval_day"],
        "train_days": ",".join(map(day_str, days[:-1])),
        "warm_start": train["warm_start"],
        **{f"data.{day_str(d)}.sha256": _table_hash(night.warehouse, d) or "" for d in days},
        **{f"metric.{k}": f"{evaluation['candidate'][k]:.6f}" for k in (*cfg.gate_metrics, *gate_calibrations(cfg))},
    }
    version = register_candidate(cfg, train["mlflow_run_id"], night.outputs["export"]["artifact_uri"], tags)
    before = current_champion(cfg)
    if decision.promote:
        set_champion(cfg, version)
    tag_version(
        cfg,
        version,
        {
            "promotion": "champion" if decision.promote else "rejected",
            "promotion_reason": decision.reason,
            **decision.tags(),
        },
    )
    outcome = (
        f"v{version} promoted to champion"
        if decision.promote
        else f"v{version} not promoted, champion stays " + (f"v{before.version}" if before else "unset")
    )
    return {
        "version": version,
        "promoted": decision.promote,
        "rule": decision.rule,
        "reason": decision.reason,
        "rows": 0,
        "detail": f"{outcome}: {decision.reason}",
    }


DAG = (
    Stage("validate", validate_inputs, run_validate),
    Stage("features", features_inputs, run_features),
    Stage("examples", None, run_examples),  # build_training_table hashes its own inputs
    Stage("train", train_inputs, run_train),
    Stage("evaluate", after("train"), run_evaluate),
    Stage("export", after("train"), run_export),
    Stage("promote", after("train", "evaluate", "export"), run_promote),
)
assert tuple(s.name for s in DAG) == STAGES


# ---------------------------------------------------------------- the runner


@contextmanager
def warehouse_lock(warehouse: Path) -> Iterator[None]:
    """An exclusive flock on the warehouse's ``lock_path`` (released by the kernel when
    the process ends, however it ends)."""
    path = lock_path(warehouse)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise WarehouseLockedError(
                f"another run holds the lock {path} ({handle.read().strip() or 'holder unknown'})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _recorded(night: Night, stage: Stage, fingerprint: str) -> dict | None:
    path = night.records / f"{stage.name}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != fingerprint or not all(
        Path(p).exists() for p in record["outputs"].get("paths", [])
    ):
        return None
    return record["outputs"]


def _recorded_in_this_store(path: Path, store: str) -> dict | None:
    """A night's record of MLflow things (plan, parent run) when it was made with the
    tracking store in use now (records of older versions name none: theirs); else None."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("tracking_uri", store) == store else None


def _plan(night: Night) -> dict:
    """The night's plan; made again when the tracking store has changed since (a champion
    and runs of another store cannot be used), which reruns the stages after examples."""
    from models.tracking import tracking_uri
    from pipeline.registry import current_champion

    path, store = night.records / "plan.json", tracking_uri(night.cfg.state_dir)
    if (plan := _recorded_in_this_store(path, store)) is not None:
        return plan
    champion = current_champion(night.cfg)
    plan = {
        "champion": {"version": champion.version, "run_id": champion.run_id} if champion else None,
        "tracking_uri": store,
        "planned_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(path, plan)
    return plan


def _parent_run(night: Night):
    from models.tracking import RunTracker, tracking_uri

    path, store = night.records / "mlflow_run.json", tracking_uri(night.cfg.state_dir)
    run_id = (_recorded_in_this_store(path, store) or {}).get("run_id")
    tracker = RunTracker(
        night.cfg.state_dir,
        f"nightly-{day_str(night.run_date)}",
        {"stage": "nightly", "run_date": day_str(night.run_date), "warehouse": str(Path(night.warehouse).resolve())},
        run_id=run_id,
    )
    if run_id is None:
        atomic_write_json(path, {"run_id": tracker.run_id, "tracking_uri": store})
    return tracker


def run_night(
    cfg: FunnelConfig,
    warehouse: Path,
    run_date: dt.date,
    rerun_from: str | None = None,
    last: str = STAGES[-1],
    echo: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Run (or resume) the night of ``run_date`` up to stage ``last``, one line per stage
    through ``echo``; ``rerun_from`` forces that stage and the later ones to run again.
    Returns every stage's outputs."""
    night = Night(cfg, Path(warehouse), run_date)
    night.records.mkdir(parents=True, exist_ok=True)
    stages = DAG[: STAGES.index(last) + 1]
    forced = set(STAGES[STAGES.index(rerun_from) :]) if rerun_from else set()
    tracker, halted = None, None  # halted: why the stages after one that ended the night early do not run
    try:
        if any(s.name in ("train", "evaluate", "export", "promote") for s in stages):
            night.plan = _plan(night)
            tracker = _parent_run(night)
            night.parent_run_id = tracker.run_id
        for stage in stages:
            if halted:
                echo(f"{day_str(run_date)}  {stage.name:9s} {'skipped':8s} {0:>11,} rows {0.0:7.1f} s  {halted}")
                continue
            started = time.perf_counter()
            fingerprint = _fingerprint(stage.inputs(night)) if stage.inputs else None
            outputs = None if stage.name in forced or fingerprint is None else _recorded(night, stage, fingerprint)
            status = "skipped"
            if outputs is None:
                outputs = stage.run(night)
                status = "skipped" if outputs.get("skipped") else "done"
                atomic_write_json(
                    night.records / f"{stage.name}.json",
                    {
                        "stage": stage.name,
                        "fingerprint": fingerprint,
                        "outputs": outputs,
                        "seconds": round(time.perf_counter() - started, 3),
                        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    },
                )
            night.outputs[stage.name] = outputs
            halted = outputs.get("halt")
            seconds = time.perf_counter() - started
            echo(
                f"{day_str(run_date)}  {stage.name:9s} {status:8s} {outputs.get('rows', 0):>11,} rows "
                f"{seconds:7.1f} s  {outputs.get('detail', '')}"
            )
            if tracker is not None:
                tracker.client.set_tag(tracker.run_id, f"stage.{stage.name}", status)
                tracker.log_metrics(
                    {f"stage/{stage.name}/seconds": seconds, f"stage/{stage.name}/rows": outputs.get("rows", 0)}, 0
                )
    except BaseException as err:
        if tracker is not None:
            tracker.client.set_tag(tracker.run_id, "outcome", f"failed: {type(err).__name__}: {err}"[:5000])
            tracker.end("FAILED" if isinstance(err, Exception) else "KILLED")
        raise
    if tracker is not None:
        promote = night.outputs.get("promote")
        outcome = halted or (promote["detail"] if promote else f"stopped after {last}")
        tracker.client.set_tag(tracker.run_id, "outcome", outcome)
        tracker.end()
    return night.outputs


def run_nights(
    cfg: FunnelConfig,
    warehouse: Path,
    start: dt.date,
    end: dt.date,
    rerun_from: str | None = None,
    last: str = STAGES[-1],
    echo: Callable[[str], None] = print,
) -> dict[dt.date, dict[str, dict]]:
    """Backfill: the nights ``start`` .. ``end`` in order, under one warehouse lock."""
    if end < start:
        raise StageError(f"backfill end {end} is before its start {start}")
    results = {}
    with warehouse_lock(warehouse):
        for n in range((end - start).days + 1):
            day = start + dt.timedelta(days=n)
            results[day] = run_night(cfg, warehouse, day, rerun_from, last, echo)
    return results
