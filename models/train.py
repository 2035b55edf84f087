"""The training loop: fit the multi-task network on a run's training tables, epoch by
epoch: train -> validate -> save.

What a run reads (``TrainingData``: the training and validation tables and tags naming
them) is chosen by the pipeline (``pipeline.train_stage``): the window of mature days
before a run date, or a ``[table]`` source's train and val splits. ``run_key`` names the
run from its config, warehouse and data hashes: its checkpoint folder
(``models.checkpoint``), so changed inputs start afresh and the same command resumes.

Sparse parameters live in one torchrec EmbeddingBagCollection wrapped by
``DistributedModelParallel`` (DMP) with FBGEMM's fused optimiser applied inside the
backward (row-wise Adagrad or Adam): no dense embedding gradients are ever materialised.
Dense parameters (and the uncertainty weights) use AdamW. With bf16 autocast on CUDA
(``train.mixed_precision``) the dense layers run in bf16; losses are taken in float32.

One process or many (``models.distributed``): under torchrun each rank reads its own
contiguous share of the training and validation tables' rows (whatever their row groups:
models.loader). ``train.batch_size`` is the global batch: each of N ranks takes batch_size / N rows per step, so a run's
optimisation does not depend on how many ranks share it. Ranks whose shard runs out
first start it again, so all ranks take the same number of steps (every step is a
collective); validation repeats batches the same way but drops their output. Metrics are
computed on all ranks' predictions (all-gathered). Only rank 0 writes checkpoints and
talks to MLflow; the other ranks wait at a barrier. On the CPU, the same seed, data and
world size give identical weights.

A step whose loss is not finite (a learning rate too large, values that overflow) stops
the run with StageError naming the epoch, the step and the task, before the epoch is
saved: ``last.pt`` keeps the last good epoch and the MLflow run is marked FAILED. The
losses are looked at where the loop synchronises anyway (every ``train.log_every_steps``
and at the end of an epoch), so the check costs no device sync per step.

Negative down-sampling (``train.negative_sampling_rate``) and row weights
(``train.sample_weight``) apply to the training rows only (``models.loader``); validation
reads every row and the model's served probabilities add the sampling correction. When the
last epoch is done, the best epoch's calibrators are fitted on the validation day
(``models.calibration``) and stored in ``best.pt``; the run logs each view's AUC, logloss,
calibration and ECE before and after (``calibration/before/...``, ``calibration/after/...``)
and its ``best/`` metrics are the calibrated model's.

Two hooks for the nightly pipeline: ``initial_state`` warm-starts a new run from another
model's plain state_dict (``models.checkpoint.warm_start``), ``freeze_shared`` trains
only the towers, heads and gates.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.optimizers import in_backward_optimizer_filter

from features.errors import StageError
from models.balancing import LossWeighting, pcgrad, shared_task_gradients, training_loss
from models.calibration import fit_calibration
from models.checkpoint import (
    checkpoint_dir,
    load_resumable,
    save_resumable,
    warm_start,
    write_checkpoint,
)
from models.config import TrainConfig, TrainingConfig
from models.distributed import (
    average_gradients,
    barrier,
    broadcast_from_rank0,
    distribute,
    init_process_group,
    local_device,
    plain_state,
    reduce_values,
    this_rank,
    world_size,
)
from models.loader import Batch, TrainingTableLoader, table_loader
from models.nets import EMBEDDING_PREFIXES, MultiTaskNet, dense_stats, value_bases
from models.predict import (
    fixed_steps,
    forward,
    gather_predictions,
    predict,
    prediction_labels,
    validation_metrics,
    view_curves,
)
from models.relatedness import GradientRelatedness
from models.tracking import (
    RunTracker,
    flatten,
    git_commit,
    plot_gate_usage,
    plot_loss_curves,
    plot_reliability,
    plot_roc,
    to_toml,
    tracking_uri,
)
from serving.spec import value_output

HIGHER_IS_BETTER = ("_auc", "_gauc", "_gini")  # metric name suffixes; logloss, ece, rmse, mae: lower is better
CALIBRATION_REPORT = ("_auc", "_logloss", "_calibration", "_ece")  # the metrics compared before / after calibrating


@dataclass(frozen=True)
class TrainingData:
    """What a training run reads: its files, and tags that name the data (MLflow, run key)."""

    name: str  # the run date, or "table" for a user's own table
    train_files: list[Path]
    val_files: list[Path]
    tags: dict[str, str]
    vocab_versions: dict  # the vocabulary versions the tables were encoded with (per day, or for the table)


@dataclass
class TrainResult:
    run_key: str
    checkpoint_dir: Path  # holds last.pt (resume) and best.pt (best epoch's plain state_dict)
    model: MultiTaskNet  # unsharded, with the best epoch's weights
    best_epoch: int
    best_metric: float
    epochs_run: int
    val_metrics: dict[str, float]  # of the best epoch, once finished with its calibrators fitted (as served)
    history: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    # method, fitted parameters per task, metrics before / after (see _calibrated); {} for an unfinished run
    calibration: dict = field(default_factory=dict)


def run_key(cfg: TrainingConfig, warehouse: Path, data: TrainingData) -> str:
    """Checkpoint folder name: the data's name and a hash of the whole config, the
    warehouse, the MLflow store (a checkpoint names its run there) and the data's hashes
    (its ``data.*`` tags), so changed inputs start afresh."""
    identity = {
        "config": cfg.run_identity(),
        "warehouse": str(Path(warehouse).resolve()),
        "tracking_uri": tracking_uri(cfg.state_dir),
        "data": {k: v for k, v in data.tags.items() if k.startswith("data.")},
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{data.name}-{digest[:12]}"


def dense_optimizer(params, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW at the config's dense rate and weight decay for ``params`` (tensors or groups).

    Fused: one kernel over every tensor. PyTorch's default on the CPU is a Python loop of
    small ops per tensor: 1.75 ms a step against 0.32 ms fused for MMoE on Census (24
    tensors), about 7% of its training step."""
    return torch.optim.AdamW(params, lr=tcfg.dense_lr, weight_decay=tcfg.weight_decay, fused=True)


def dense_learning_rate(tcfg: TrainConfig, step: int, total_steps: int) -> float:
    """The dense optimiser's rate at ``step`` (0-based) of ``total_steps``: constant, or a
    cosine decay from ``train.dense_lr`` to 0 over the whole run. A function of the step
    alone, so a resumed run continues the same schedule."""
    if tcfg.lr_schedule == "constant":
        return tcfg.dense_lr
    return tcfg.dense_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


# ---------------------------------------------------------------- the loop


def train_model(
    cfg: TrainingConfig,
    warehouse: Path,
    data: TrainingData,
    *,
    max_epochs: int | None = None,
    progress: bool = True,
    initial_state: Mapping[str, torch.Tensor] | None = None,
    freeze_shared: bool = False,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train (or resume) the run on ``data`` (of ``warehouse``: part of the run's key);
    ``max_epochs`` stops early without finishing the run (as a kill would), e.g. to test
    resumption.

    ``initial_state``: a plain state_dict to start from when there is no checkpoint to
    resume (see :func:`models.checkpoint.warm_start`). ``freeze_shared``: embeddings and
    the shared experts / bottom get no updates (embedding learning rate 0, shared dense
    layers left out of AdamW); the towers, heads and gates train. ``parent_run_id`` makes
    the MLflow run its child; ``extra_tags`` are added to the run's tags. Under torchrun
    every rank calls this and gets the same result; rank 0 alone writes checkpoints and
    talks to MLflow."""
    device = _join_training(cfg)
    key = run_key(cfg, warehouse, data)
    ckpt_dir = checkpoint_dir(cfg, key)
    resuming = (ckpt_dir / "last.pt").exists()
    trainer = _build_trainer(cfg, data, device, None if resuming else initial_state, freeze_shared)
    state = trainer.resume(ckpt_dir / "last.pt") if resuming else _fresh_state()
    tracker = _open_tracker(cfg, key, data, state, parent_run_id, extra_tags)

    last_epoch = cfg.train.epochs if max_epochs is None else min(cfg.train.epochs, max_epochs)
    with _progress_bar(progress) as bar:
        while not state["finished"] and state["epoch"] < last_epoch:
            epoch = state["epoch"]
            try:
                train_stats = trainer.train_epoch(state, bar, tracker)
            except NonFiniteLoss as err:
                if tracker is not None:
                    tracker.end("FAILED")
                kept = f"{ckpt_dir / 'last.pt'} keeps epoch {epoch}" if epoch else "no epoch finished, none is saved"
                raise StageError(f"{err}; {kept}") from None
            val, pred = trainer.validate()
            record = trainer.epoch_record(epoch, train_stats, val, pred)
            improved = _end_epoch(cfg, state, record, val, tracker)
            trainer.save(ckpt_dir, state, improved, val, pred)

    return _finish(trainer, data, key, ckpt_dir, state, tracker)


def _join_training(cfg: TrainingConfig) -> torch.device:
    """Check the config fits this device and job, join the process group, set threads and
    the seed; return this rank's device."""
    tcfg = cfg.train
    device = local_device()
    if tcfg.sparse_optimizer == "adam" and device.type == "cpu":
        raise StageError(
            "train.sparse_optimizer = 'adam' needs a CUDA device: FBGEMM's fused CPU embedding "
            "kernels support row-wise Adagrad only; use 'rowwise_adagrad'"
        )
    init_process_group(cfg.state_dir, device)
    world = world_size()
    if tcfg.batch_size % world:
        raise StageError(
            f"train.batch_size = {tcfg.batch_size} is the global batch and must split evenly over "
            f"the {world} ranks of this job"
        )
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(tcfg.threads or max(1, (os.cpu_count() or 1) // local_ranks))
    torch.manual_seed(cfg.seed)
    return device


def _fresh_state() -> dict:
    """The loop's state before the first epoch (saved in last.pt, restored on resume)."""
    return {
        "epoch": 0,
        "step": 0,
        "best": None,
        "best_epoch": -1,
        "bad_epochs": 0,
        "history": [],
        "finished": False,
        "mlflow_run_id": None,
    }


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        disable=not enabled or this_rank() != 0,
    )


def _open_tracker(
    cfg: TrainingConfig,
    key: str,
    data: TrainingData,
    state: dict,
    parent_run_id: str | None,
    extra_tags: Mapping[str, str] | None,
) -> RunTracker | None:
    """Rank 0's MLflow run of an unfinished training (a resumed one reopens its own; the
    first opening logs the config as params); the run id is shared with every rank."""
    tracker = None
    if this_rank() == 0 and not state["finished"]:
        tags = {"stage": "train", "run_key": key, **data.tags}
        if commit := git_commit():
            tags["git_commit"] = commit
        if parent_run_id is not None:
            tags["mlflow.parentRunId"] = parent_run_id
        tags.update(extra_tags or {})
        tracker = RunTracker(cfg.state_dir, f"train-{data.name}", tags, run_id=state["mlflow_run_id"])
        if state["mlflow_run_id"] is None:
            state["mlflow_run_id"] = tracker.run_id
            tracker.log_params(flatten(cfg.model_dump(mode="json")))
    state["mlflow_run_id"] = broadcast_from_rank0(state["mlflow_run_id"])
    return tracker


def _end_epoch(
    cfg: TrainingConfig, state: dict, record: dict, val: dict[str, float], tracker: RunTracker | None
) -> bool:
    """Record the epoch, move early stopping on; True when it is the best epoch so far
    (the same on every rank: metrics come from gathered predictions)."""
    done = record["epoch"]  # epochs finished, this one included
    state["history"].append(record)
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, done)
    metric = cfg.early_stopping_metric
    improved = _is_better(metric, val[metric], state["best"])
    if improved:
        state.update(best=val[metric], best_epoch=done, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    state["epoch"] = done
    state["finished"] = done >= cfg.train.epochs or state["bad_epochs"] >= cfg.train.patience
    return improved


def _is_better(metric: str, value: float, best: float | None) -> bool:
    if not np.isfinite(value):
        return False
    return best is None or (value > best if metric.endswith(HIGHER_IS_BETTER) else value < best)


def _finish(
    trainer: Trainer, data: TrainingData, key: str, ckpt_dir: Path, state: dict, tracker: RunTracker | None
) -> TrainResult:
    """The best epoch's model, unsharded; a finished run's MLflow artifacts (rank 0)."""
    cfg = trainer.cfg
    metric = cfg.early_stopping_metric
    if state["best_epoch"] < 0:
        raise StageError(f"training {key} produced no finite validation {metric} on {data.val_files}")
    best = torch.load(ckpt_dir / "best.pt", weights_only=False, map_location="cpu")
    result_model = MultiTaskNet(cfg.features, cfg.model, cfg.tasks, trainer.mean, trainer.std)
    result_model.load_state_dict(best["model"])
    result_model.eval()
    if state["finished"] and "calibration" not in best:  # fitted once, after the last epoch
        if this_rank() == 0:
            whole_val = table_loader(cfg, data.val_files, batch_size=cfg.train.batch_size, shuffle=False)
            best = _calibrated(cfg, result_model, best, predict(result_model, whole_val, torch.device("cpu")))
            write_checkpoint(ckpt_dir / "best.pt", best)
        barrier()
        best = torch.load(ckpt_dir / "best.pt", weights_only=False, map_location="cpu")
        result_model.load_state_dict(best["model"])
    if tracker is not None:
        if state["finished"]:
            whole_val = table_loader(cfg, data.val_files, batch_size=cfg.train.batch_size, shuffle=False)
            _log_final_artifacts(
                tracker,
                cfg,
                data,
                state["history"],
                best,
                predict(result_model, whole_val, torch.device("cpu")),
                ckpt_dir,
            )
        tracker.end("FINISHED" if state["finished"] else "KILLED")
    barrier()
    return TrainResult(
        key,
        ckpt_dir,
        result_model,
        state["best_epoch"],
        state["best"],
        state["epoch"],
        best["val"],
        state["history"],
        state["mlflow_run_id"],
        best.get("calibration", {}),
    )


def _calibrated(cfg: TrainingConfig, model: MultiTaskNet, best: dict, pred: dict[str, np.ndarray]) -> dict:
    """The best checkpoint with ``model``'s calibrators fitted (in place) on ``pred``, its
    predictions of the validation day: the calibrated weights, the calibrated model's
    validation metrics as ``val`` and ``calibration``: the method, what was fitted per task,
    and each view's AUC, logloss, calibration and ECE before and after."""
    logits = {t.name: pred[f"logit_{t.name}"] for t in cfg.tasks}
    labels = prediction_labels(pred)
    fitted = fit_calibration(model.served, logits, labels)
    served = {f"p_{view}": p for view, p in model.served.of_logits(logits).items()}
    served |= {value_output(task): e for task, e in model.served.values_of_logits(logits).items()}
    before = validation_metrics(cfg, pred)
    after = validation_metrics(cfg, {**pred, **served})
    compared = {
        f"{when}/{k}": v
        for when, metrics in (("before", before), ("after", after))
        for k, v in metrics.items()
        if k.endswith(CALIBRATION_REPORT)
    }
    report = {"method": cfg.model.calibration, "tasks": fitted, "metrics": compared}
    return {**best, "model": model.state_dict(), "val": after, "calibration": report}


def _log_final_artifacts(
    tracker: RunTracker,
    cfg: TrainingConfig,
    data: TrainingData,
    history: list[dict],
    best: dict,
    pred: dict[str, np.ndarray],
    ckpt_dir: Path,
) -> None:
    """Config, vocab versions, plots (loss, ROC, reliability, gates) and the best checkpoint."""
    tracker.client.log_text(tracker.run_id, to_toml(cfg.model_dump(by_alias=True)), "config.toml")
    if data.vocab_versions:
        tracker.log_dict(data.vocab_versions, "vocab_versions.json")
    curves = view_curves(cfg, pred)
    tracker.log_figure(plot_loss_curves(history), "plots/loss_curves.png")
    tracker.log_figure(plot_roc(curves), "plots/roc.png")
    tracker.log_figure(plot_reliability(curves), "plots/reliability.png")
    if best.get("gate_usage"):
        tracker.log_figure(plot_gate_usage(best["gate_usage"]), "plots/gate_usage.png")
    tracker.log_metrics({f"best/{k}": v for k, v in best["val"].items()}, best["epoch"])
    calibration = best.get("calibration", {})
    fitted = {
        f"calibration/{task}_{name}": value
        for task, params in calibration.get("tasks", {}).items()
        for name, value in params.items()
        if isinstance(value, float)
    }
    tracker.log_metrics({**{f"calibration/{k}": v for k, v in calibration.get("metrics", {}).items()}, **fitted}, 0)
    tracker.log_file(ckpt_dir / "best.pt", "checkpoint")


# ---------------------------------------------------------------- one epoch


class NonFiniteLoss(ArithmeticError):
    """A training step's loss is inf or NaN (the message names the epoch, step and task)."""


@dataclass
class Trainer:
    """The parts of one training run: the (sharded) model, its optimisers and loaders."""

    cfg: TrainingConfig
    device: torch.device
    amp: bool  # bf16 autocast of the dense layers (CUDA only)
    net: MultiTaskNet  # the module inside ``model``
    model: DistributedModelParallel
    weighting: LossWeighting
    dense_opt: torch.optim.AdamW
    train_loader: TrainingTableLoader
    val_loader: TrainingTableLoader
    train_steps: int  # every rank takes as many (see fixed_steps)
    val_steps: int
    mean: np.ndarray  # the dense statistics of the training files
    std: np.ndarray
    shared_dense: list[torch.nn.Parameter]  # the backbone's shared dense parameters that train (pcgrad's)
    relatedness: GradientRelatedness
    pcgrad_order: torch.Generator  # pcgrad's task order: seeded from the run seed and the step

    def resume(self, last: Path) -> dict:
        """Restore a killed run from its ``last.pt``; the loop's state."""
        return load_resumable(last, self.model, self.weighting, self.dense_opt)

    def train_epoch(self, state: dict, bar: Progress, tracker: RunTracker | None) -> dict[str, float]:
        """One pass over the training rows; the speed and the mean losses over all ranks."""
        epoch, world = state["epoch"], world_size()
        self.train_loader.set_epoch(epoch)
        self.model.train()
        task = bar.add_task(f"epoch {epoch + 1}/{self.cfg.train.epochs}", total=self.train_steps, info="")
        sums: dict[str, torch.Tensor] = {}
        unchecked: list[dict[str, torch.Tensor]] = []  # the loss parts of the steps since the last finiteness check
        rows, started = 0, time.perf_counter()
        for done, (batch, _) in enumerate(fixed_steps(self.train_loader, self.train_steps), 1):
            batch = batch.to(self.device, non_blocking=True)
            parts = self.step(batch, state["step"])
            unchecked.append(parts)
            state["step"] += 1
            rows += len(batch)
            for k, v in parts.items():  # kept on the device: no sync per step
                sums[k] = sums.get(k, 0.0) + v.double() * len(batch)
            bar.update(task, advance=1)
            if state["step"] % self.cfg.train.log_every_steps == 0:
                self.check_finite(unchecked, epoch, done)
                unchecked = []
                speed = rows * world / (time.perf_counter() - started)
                _log_step(bar, task, tracker, parts, self.weighting.step_metrics(), state["step"], speed)
        self.check_finite(unchecked, epoch, self.train_steps)
        totals = reduce_values([rows, *(float(v) for v in sums.values())], self.device)  # over all ranks
        return {
            "train/samples_per_s": totals[0] / (time.perf_counter() - started),
            # the mean loss parts per row and pcgrad's mean projections per step
            **{
                f"train/{k}" if k == "pcgrad_projections" else f"train/loss_{k}": v / totals[0]
                for k, v in zip(sums, totals[1:], strict=True)
            },
        }

    def step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step on ``batch`` (the run's ``step``-th); its loss parts and,
        with pcgrad, ``pcgrad_projections``. How the balancing methods use per-task
        gradients is ``models.balancing``'s docstring."""
        cfg, mcfg = self.cfg, self.cfg.model
        out = forward(self.model, batch, self.amp)
        total, losses, parts = training_loss(
            out,
            batch.labels,
            cfg.tasks,
            mcfg.conversion_head,
            self.weighting,
            self.net.backbone.penalty(),
            mcfg.soft_sharing_strength,
            batch.weight,
        )
        self.dense_opt.zero_grad(set_to_none=True)
        surgery = mcfg.loss_weighting == "pcgrad" and bool(self.shared_dense)
        measure = cfg.train.relatedness_every_steps > 0 and step % cfg.train.relatedness_every_steps == 0
        task_grads = None
        if surgery or measure:
            task_losses = [losses[t] for t in self.weighting.names]
            task_grads = shared_task_gradients(task_losses, self.shared_dense or [out.features])
            if measure:
                self.relatedness.add(task_grads)
        if mcfg.loss_weighting == "gradnorm":
            last = [p for p in self.net.backbone.last_shared_layer() if p.requires_grad]
            self.weighting.gradnorm_backward(losses, last or [out.features])
        total.backward()  # also updates the embedding rows (fused optimiser); DDP averages dense gradients
        if surgery:
            self.pcgrad_order.manual_seed(cfg.seed * 1_000_003 + step)  # a function of the step: resumes alike
            combined, parts["pcgrad_projections"] = pcgrad(
                task_grads * self.weighting.fixed[:, None], self.pcgrad_order
            )
            write_gradients(self.shared_dense, combined)
        average_gradients(self.weighting.parameters())
        for group in self.dense_opt.param_groups:
            group["lr"] = dense_learning_rate(cfg.train, step, cfg.train.epochs * self.train_steps) * group["lr_scale"]
        self.dense_opt.step()
        self.weighting.renormalise()
        self.weighting.observe(losses)
        return parts

    def check_finite(self, steps: list[dict[str, torch.Tensor]], epoch: int, done: int) -> None:
        """NonFiniteLoss naming the first of ``steps`` (the loss parts of the epoch's steps
        up to its ``done``-th) whose loss is not finite on any rank, on every rank.

        One isfinite over the steps' totals and one sync per call: a total is finite only
        when every part of it is (a zero weight times inf is NaN). A collective: every rank
        calls it after the same steps."""
        names = list(steps[0]) if steps else []
        all_finite = len(steps) * len(names)
        first = all_finite  # step index x parts + part index of the first non-finite part
        if steps and not bool(torch.isfinite(torch.stack([p["total"] for p in steps])).all()):
            i = next(i for i, p in enumerate(steps) if not torch.isfinite(p["total"]))
            first = i * len(names) + next(j for j, v in enumerate(steps[i].values()) if not torch.isfinite(v))
        first = int(reduce_values([first], self.device, dist.ReduceOp.MIN)[0])
        if first == all_finite:
            return
        i, j = divmod(first, len(names))
        part = names[j]
        if part in self.weighting.names:
            what = f"the loss of task {part!r}"
        elif part == "penalty":
            what = "the backbone's penalty (model.soft_sharing_strength)"
        else:
            weights = ", ".join(f"{t} {w:.3g}" for t, w in self.weighting.weights().items())
            what = f"the weighted total loss (task weights {weights})"
        raise NonFiniteLoss(
            f"{what} is not finite at epoch {epoch + 1}, step {done - len(steps) + i + 1} of "
            f"{self.train_steps}: lower train.dense_lr / train.sparse_lr or look for huge values in "
            f"the training table"
        )

    def validate(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """(metrics, predictions) of the validation table, all ranks' rows."""
        pred = gather_predictions(predict(self.model, self.val_loader, self.device, self.val_steps, self.amp))
        return validation_metrics(self.cfg, pred), pred

    def epoch_record(
        self, epoch: int, train_stats: dict[str, float], val: dict[str, float], pred: dict[str, np.ndarray]
    ) -> dict[str, float]:
        """The epoch's line of the history: training speed and losses, task weights, the
        tasks' gradient relatedness (``models.relatedness``), validation metrics, and for
        mmoe / ple each task's expert usage and gate entropy."""
        return {
            "epoch": epoch + 1,
            **train_stats,
            **{f"train/task_weight_{t}": w for t, w in self.weighting.weights().items()},
            **{f"train/{k}": v for k, v in self.relatedness.epoch_metrics().items()},
            **{f"val/{k}": v for k, v in val.items()},
            **{
                f"val/{k}_expert{e}": float(w)
                for k, g in pred.items()
                if k.startswith("gate_")
                for e, w in enumerate(g)
            },
            **{f"val/gate_{k}": float(v) for k, v in pred.items() if k.startswith("entropy_")},
        }

    def save(
        self, ckpt_dir: Path, state: dict, improved: bool, val: dict[str, float], pred: dict[str, np.ndarray]
    ) -> None:
        """The epoch's checkpoints: ``best.pt`` when it ``improved``, ``last.pt`` always. A
        collective (sharded state is gathered); rank 0 writes, every rank waits for it."""
        model_state = plain_state(self.model)
        if improved and this_rank() == 0:
            write_checkpoint(
                ckpt_dir / "best.pt",
                {
                    "model": model_state,
                    "epoch": state["epoch"],
                    "val": val,
                    "gate_usage": {k.removeprefix("gate_"): g for k, g in pred.items() if k.startswith("gate_")},
                },
            )
        save_resumable(ckpt_dir / "last.pt", model_state, self.model, self.weighting, self.dense_opt, state)
        barrier()


def _log_step(
    bar: Progress,
    task: TaskID,
    tracker: RunTracker | None,
    parts: dict[str, torch.Tensor],
    balancing: dict[str, torch.Tensor],
    step: int,
    samples_per_s: float,
) -> None:
    """Every ``train.log_every_steps``: the step's loss on the bar; in MLflow its losses
    (``train/step_loss_<part>``), the balancing's task weights and gradnorm ratios
    (``train/step_<name>``, ``LossWeighting.step_metrics``) and pcgrad's projections
    (``train/step_pcgrad_projections``)."""
    logged = {f"train/step_loss_{k}": float(v) for k, v in parts.items() if k != "pcgrad_projections"}
    bar.update(task, info=f"loss {logged['train/step_loss_total']:.4f}  {samples_per_s:,.0f} samples/s")
    if tracker is not None:
        logged |= {f"train/step_{k}": float(v) for k, v in balancing.items()}
        if "pcgrad_projections" in parts:
            logged["train/step_pcgrad_projections"] = float(parts["pcgrad_projections"])
        tracker.log_metrics(logged, step)


def _build_trainer(
    cfg: TrainingConfig,
    data: TrainingData,
    device: torch.device,
    initial_state: Mapping[str, torch.Tensor] | None,
    freeze_shared: bool,
) -> Trainer:
    """The model (seeded on the CPU, alike on every rank; its tables go into the shards),
    its optimisers and this rank's loaders."""
    tcfg, mcfg, spec = cfg.train, cfg.model, cfg.features
    rank, world = this_rank(), world_size()
    dense_names = spec.dense_names()
    mean, std = dense_stats(data.train_files, dense_names)
    net = MultiTaskNet(spec, mcfg, cfg.tasks, mean, std)
    if initial_state is not None:
        warm_start(net, initial_state)
    else:
        net.heads.start_values(value_bases(data.train_files, cfg.tasks))
    net.served.start_training(tcfg.negative_sampling_rate)
    net = net.to(device)
    if freeze_shared:
        for p in net.backbone.shared_parameters():
            p.requires_grad_(False)
    weighting = LossWeighting(mcfg, cfg.tasks).to(device)
    model = distribute(net, tcfg, device, freeze_embeddings=freeze_shared)
    if world > 1:
        model.init_data_parallel()  # DDP over the dense layers that train
    dense_params = [
        p
        for name, p in in_backward_optimizer_filter(model.named_parameters())
        if p.requires_grad and not (freeze_shared and name.startswith(EMBEDDING_PREFIXES))
    ]  # data-parallel tables
    weights = {"params": list(weighting.parameters()), "weight_decay": 0.0, "lr_scale": weighting.lr_scale}
    dense_opt = dense_optimizer([{"params": dense_params, "lr_scale": 1.0}, weights], tcfg)
    mine = dict(batch_size=tcfg.batch_size // world, shard=(rank, world), pin_memory=device.type == "cuda")
    train_loader = table_loader(
        cfg,
        data.train_files,
        shuffle=True,
        shuffle_buffer_rows=tcfg.shuffle_buffer_rows,
        negative_sampling_rate=tcfg.negative_sampling_rate,
        weight=tcfg.sample_weight,
        **mine,
    )
    val_loader = table_loader(cfg, data.val_files, shuffle=False, **mine)
    train_steps, val_steps = _steps_per_epoch(train_loader, val_loader, device)
    amp = tcfg.mixed_precision and device.type == "cuda"
    return Trainer(
        cfg,
        device,
        amp,
        net,
        model,
        weighting,
        dense_opt,
        train_loader,
        val_loader,
        train_steps,
        val_steps,
        mean,
        std,
        [p for p in net.backbone.shared_parameters() if p.requires_grad],
        GradientRelatedness(weighting.names),
        torch.Generator(),
    )


def write_gradients(params: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Set the gradients of ``params`` from one flat vector (in their order)."""
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()


def _steps_per_epoch(train: TrainingTableLoader, val: TrainingTableLoader, device: torch.device) -> tuple[int, int]:
    """Training and validation steps every rank takes: the most batches any rank's shard has."""
    most = reduce_values([len(train), len(val)], device, dist.ReduceOp.MAX)
    fewest = reduce_values([len(train), len(val)], device, dist.ReduceOp.MIN)
    for (name, loader), n in zip((("training", train), ("validation", val)), fewest, strict=True):
        if n == 0:
            raise StageError(
                f"the {name} table {[str(f) for f in loader.files]} has fewer rows than the "
                f"{world_size()} ranks of this job: every rank needs one"
            )
    return int(most[0]), int(most[1])
