"""The ``train`` stage: fit the multi-task network on the window of mature days.

Window: L = run_date - contract.maturity_lag_days is the newest mature day. The model
trains on days L - window_days + 1 .. L - 1 and validates (early stopping, metrics) on L,
so ``train.window_days`` >= 2.

Sparse parameters live in one torchrec EmbeddingBagCollection sharded table-wise by
``DistributedModelParallel`` in this one process (world size 1; gloo + CPU, or nccl +
CUDA when a GPU is present) with FBGEMM's fused optimiser applied inside the backward
(row-wise Adagrad or Adam): no dense embedding gradients are ever materialised. Dense
parameters (and the uncertainty weights) use AdamW.

Each epoch ends with a validation pass and an atomic checkpoint under
``<state_dir>/checkpoints/<run key>/`` (model incl. sharded tables, both optimisers' state,
torch RNG, epoch, best metric, history, MLflow run id); running the same command again
after a kill resumes from it. On the CPU, the same seed and data give identical weights.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from features.config import FunnelConfig, TrainConfig
from features.contract import day_str
from features.errors import StageError
from features.examples import mature_day, training_dir
from features.io import atomic_write_bytes
from models.loader import Batch, TrainingTableLoader, parquet_files
from models.losses import LossWeighting, task_losses, training_loss
from models.metrics import task_metrics
from models.nets import TASKS, MultiTaskNet, dense_stats
from models.tracking import (RunTracker, flatten, git_commit, plot_gate_usage, plot_loss_curves, plot_reliability,
                             plot_roc, to_toml)

HIGHER_IS_BETTER = {"click_auc", "click_gauc", "cvr_auc", "ctcvr_auc"}


@dataclass
class TrainResult:
    run_key: str
    checkpoint_dir: Path  # holds last.pt (resume) and best.pt (best epoch's plain state_dict)
    model: MultiTaskNet  # unsharded, with the best epoch's weights
    best_epoch: int
    best_metric: float
    epochs_run: int
    val_metrics: dict[str, float]  # of the best epoch
    history: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None


def training_window(cfg: FunnelConfig, run_date: dt.date) -> tuple[list[dt.date], dt.date]:
    """(training days, validation day) of the nightly run for ``run_date``."""
    last = mature_day(cfg, run_date)
    first = last - dt.timedelta(days=cfg.train.window_days - 1)
    return [first + dt.timedelta(days=i) for i in range((last - first).days)], last


def run_key(cfg: FunnelConfig, warehouse: Path, run_date: dt.date) -> str:
    """Checkpoint folder name: the run date and a hash of the whole config, the warehouse
    and the window's data hashes (from the manifests), so changed inputs start afresh."""
    train_days, val_day = training_window(cfg, run_date)
    identity = {"config": cfg.model_dump(mode="json"), "warehouse": str(Path(warehouse).resolve()),
                "data": _data_tags(warehouse, [*train_days, val_day])}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{day_str(run_date)}-{digest[:12]}"


# ---------------------------------------------------------------- distributed set-up

def _init_process_group(state_dir: Path, device: torch.device) -> None:
    """World size 1, rendezvous through a fresh FileStore under the state dir (no ports)."""
    if dist.is_initialized():
        return
    path = Path(state_dir).resolve() / "dist" / f"store-{os.getpid()}-{time.time_ns()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.FileStore(str(path), 1), rank=0, world_size=1)


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with sharded tables as whole tensors (world size 1: one shard each)."""
    out = {}
    for k, v in module.state_dict().items():
        if hasattr(v, "local_shards"):
            (shard,) = v.local_shards()
            v = shard.tensor
        out[k] = v.detach().clone().cpu()
    return out


def _load_plain_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a plain state_dict into a (possibly sharded) module, in place."""
    with torch.no_grad():
        for k, v in module.state_dict().items():
            target = v.local_shards()[0].tensor if hasattr(v, "local_shards") else v
            target.copy_(state[k])


def distribute(model: MultiTaskNet, tcfg: TrainConfig, device: torch.device) -> DistributedModelParallel:
    """Shard the EBC table-wise with the sparse optimiser fused into its backward."""
    sparse_opt = (RowWiseAdagrad, {"lr": tcfg.sparse_lr}) if tcfg.sparse_optimizer == "rowwise_adagrad" \
        else (torch.optim.Adam, {"lr": tcfg.sparse_lr})
    initial = _plain_state(model)  # on CPU the sharder re-initialises tables: keep the seeded ones
    apply_optimizer_in_backward(sparse_opt[0], model.ebc.parameters(), sparse_opt[1])
    constraints = {name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]) for name in model.sparse_names}
    sharders = [EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device=device.type), constraints=constraints)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders, init_data_parallel=False)
    _load_plain_state(dmp, initial)
    return dmp


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def predict(model: torch.nn.Module, loader: TrainingTableLoader, device: torch.device) -> dict[str, np.ndarray]:
    """Labels, predictions, user codes and (mmoe) mean gate weights over a whole loader."""
    model.eval()
    keys = ("click", "conversion", "user", "p_click", "p_cvr", "p_ctcvr")
    parts: dict[str, list] = {k: [] for k in keys}
    gate_sums: dict[str, torch.Tensor] = {}
    for batch in loader:
        batch = batch.to(device)
        out = model(batch.dense, batch.sparse)
        for k, v in (("click", batch.click), ("conversion", batch.conversion), ("user", batch.user),
                     ("p_click", out.p_click), ("p_cvr", out.p_cvr), ("p_ctcvr", out.p_ctcvr)):
            parts[k].append(v.cpu().numpy())
        for t, w in (out.gates or {}).items():
            gate_sums[t] = gate_sums.get(t, 0) + w.sum(0).cpu()
    result = {k: np.concatenate(v) for k, v in parts.items()}
    result.update({f"gate_{t}": (s / len(result["click"])).numpy() for t, s in gate_sums.items()})
    return result


def validation_metrics(pred: dict[str, np.ndarray]) -> dict[str, float]:
    groups = pred["user"] if (pred["user"] >= 0).any() else None
    return task_metrics(pred["click"], pred["conversion"], pred["p_click"], pred["p_cvr"], pred["p_ctcvr"], groups)


def gradient_cosine(model: torch.nn.Module, net: MultiTaskNet, batch: Batch, head: str) -> float:
    """Cosine between the click and conversion losses' gradients on what the tasks share.

    MMoE / shared bottom: the experts' / bottom's parameters. Single-task and soft sharing
    share only the embeddings, whose gradients the fused optimiser never exposes: there
    the gradient is taken w.r.t. the backbone input (pooled embeddings + dense features),
    the dense-visible part of the embeddings. autograd.grad stops at these inputs, so the
    embeddings' fused backward (which would update them) does not run.
    """
    model.eval()
    out = model(batch.dense, batch.sparse)
    losses = task_losses(out, batch.click, batch.conversion, head)
    shared = net.backbone.shared_parameters() or [out.features]
    grads = [torch.cat([g.flatten() for g in torch.autograd.grad(losses[t], shared, retain_graph=True)]) for t in TASKS]
    return float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))


# ---------------------------------------------------------------- checkpoints

def _save(path: Path, obj: dict) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _is_better(metric: str, value: float, best: float | None) -> bool:
    if not np.isfinite(value):
        return False
    return best is None or (value > best if metric in HIGHER_IS_BETTER else value < best)


# ---------------------------------------------------------------- the stage

def train_model(
    cfg: FunnelConfig,
    warehouse: Path,
    run_date: dt.date,
    *,
    max_epochs: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume) the run for ``run_date``; ``max_epochs`` stops early without
    finishing the run (as a kill would), e.g. to test resumption."""
    tcfg, mcfg, spec = cfg.train, cfg.model, cfg.features
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tcfg.sparse_optimizer == "adam" and device.type == "cpu":
        raise StageError("train.sparse_optimizer = 'adam' needs a CUDA device: FBGEMM's fused CPU embedding "
                         "kernels support row-wise Adagrad only; use 'rowwise_adagrad'")
    torch.set_num_threads(tcfg.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)

    train_days, val_day = training_window(cfg, run_date)
    train_files = [f for day in train_days for f in parquet_files(training_dir(warehouse, day))]
    val_files = parquet_files(training_dir(warehouse, val_day))
    dense_names = spec.dense_names()
    mean, std = dense_stats(train_files, dense_names)
    net = MultiTaskNet(spec, mcfg, mean, std).to(device)  # seeded on the CPU; tables copied into the shards
    weighting = LossWeighting(mcfg).to(device)
    _init_process_group(cfg.state_dir, device)
    model = distribute(net, tcfg, device)
    dense_params = [p for _, p in in_backward_optimizer_filter(model.named_parameters())]
    dense_opt = torch.optim.AdamW(
        [{"params": dense_params}, {"params": list(weighting.parameters()), "weight_decay": 0.0}],
        lr=tcfg.dense_lr, weight_decay=tcfg.weight_decay,
    )
    loaders = dict(sparse=spec.sparse, dense_names=dense_names, batch_size=tcfg.batch_size, seed=cfg.seed,
                   pin_memory=device.type == "cuda")
    train_loader = TrainingTableLoader(train_files, shuffle=True, shuffle_buffer_rows=tcfg.shuffle_buffer_rows, **loaders)
    val_loader = TrainingTableLoader(val_files, shuffle=False, **loaders)
    cosine_batch = next(iter(val_loader)).to(device)

    key = run_key(cfg, warehouse, run_date)
    ckpt_dir = Path(cfg.state_dir) / "checkpoints" / key
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "history": [],
             "finished": False, "mlflow_run_id": None}
    if (ckpt_dir / "last.pt").exists():
        saved = torch.load(ckpt_dir / "last.pt", weights_only=False)
        _load_plain_state(model, saved["model"])
        weighting.load_state_dict(saved["weighting"])
        dense_opt.load_state_dict(saved["dense_opt"])
        model.fused_optimizer.load_state_dict(saved["fused_opt"])
        torch.set_rng_state(saved["rng"])
        state = saved["state"]

    tracker = None
    if not state["finished"]:
        tags = {"stage": "train", "run_date": day_str(run_date), "train_days": ",".join(map(day_str, train_days)),
                "val_day": day_str(val_day), "run_key": key, **_data_tags(warehouse, [*train_days, val_day])}
        if commit := git_commit():
            tags["git_commit"] = commit
        tracker = RunTracker(cfg.state_dir, f"train-{day_str(run_date)}", tags, run_id=state["mlflow_run_id"])
        if state["mlflow_run_id"] is None:
            state["mlflow_run_id"] = tracker.run_id
            tracker.log_params(flatten(cfg.model_dump(mode="json")))

    last_epoch = tcfg.epochs if max_epochs is None else min(tcfg.epochs, max_epochs)
    metric = tcfg.early_stopping_metric
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=not progress)
    with bar:
        while not state["finished"] and state["epoch"] < last_epoch:
            epoch = state["epoch"]
            train_loader.set_epoch(epoch)
            model.train()
            task = bar.add_task(f"epoch {epoch + 1}/{tcfg.epochs}", total=len(train_loader), info="")
            sums, rows, started = {}, 0, time.perf_counter()
            for batch in train_loader:
                batch = batch.to(device)
                out = model(batch.dense, batch.sparse)
                loss, parts = training_loss(out, batch.click, batch.conversion, mcfg.conversion_head, weighting,
                                            net.backbone.penalty(), mcfg.soft_sharing_strength)
                dense_opt.zero_grad(set_to_none=True)
                loss.backward()  # also updates the embedding rows (fused optimiser)
                dense_opt.step()
                state["step"] += 1
                rows += len(batch)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(batch)
                rate = rows / (time.perf_counter() - started)
                bar.update(task, advance=1, info=f"loss {loss.item():.4f}  {rate:,.0f} samples/s")
                if state["step"] % tcfg.log_every_steps == 0:
                    tracker.log_metrics({f"train/step_loss_{k}": float(v) for k, v in parts.items()}, state["step"])

            pred = predict(model, val_loader, device)
            val = validation_metrics(pred)
            record = {"epoch": epoch + 1, "train/samples_per_s": rate,
                      **{f"train/loss_{k}": v / rows for k, v in sums.items()},
                      **{f"train/task_weight_{t}": w for t, w in weighting.weights().items()},
                      "train/grad_cosine": gradient_cosine(model, net, cosine_batch, mcfg.conversion_head),
                      **{f"val/{k}": v for k, v in val.items()},
                      **{f"val/gate_{t}_expert{e}": float(w) for t in TASKS for e, w in enumerate(pred.get(f"gate_{t}", []))}}
            state["history"].append(record)
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, epoch + 1)
            if _is_better(metric, val[metric], state["best"]):
                state.update(best=val[metric], best_epoch=epoch + 1, bad_epochs=0)
                _save(ckpt_dir / "best.pt", {"model": _plain_state(model), "epoch": epoch + 1, "val": val,
                                             "gate_usage": {t: pred[f"gate_{t}"] for t in TASKS if f"gate_{t}" in pred}})
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            state["finished"] = state["epoch"] >= tcfg.epochs or state["bad_epochs"] >= tcfg.patience
            _save(ckpt_dir / "last.pt", {"model": _plain_state(model), "weighting": weighting.state_dict(),
                                         "dense_opt": dense_opt.state_dict(), "fused_opt": model.fused_optimizer.state_dict(),
                                         "rng": torch.get_rng_state(), "state": state})

    if state["best_epoch"] < 0:
        raise StageError(f"training {key} produced no finite validation {metric} on {val_files}")
    best = torch.load(ckpt_dir / "best.pt", weights_only=False)
    result_model = MultiTaskNet(spec, mcfg, mean, std)
    result_model.load_state_dict(best["model"])
    result_model.eval()
    if tracker is not None:
        if state["finished"]:
            _log_final_artifacts(tracker, cfg, warehouse, [*train_days, val_day], state["history"], best,
                                 predict(result_model, val_loader, torch.device("cpu")), ckpt_dir)
        tracker.end("FINISHED" if state["finished"] else "KILLED")
    return TrainResult(key, ckpt_dir, result_model, state["best_epoch"], state["best"], state["epoch"], best["val"],
                       state["history"], state["mlflow_run_id"])


def _manifests(warehouse: Path, days: list[dt.date]) -> dict[str, dict]:
    out = {}
    for day in days:
        path = training_dir(warehouse, day) / "manifest.json"
        if path.exists():
            out[day_str(day)] = json.loads(path.read_text())
    return out


def _data_tags(warehouse: Path, days: list[dt.date]) -> dict[str, str]:
    """Content hashes of the training tables, from their manifests (when present)."""
    return {f"data.{day}.sha256": m["content_sha256"] for day, m in _manifests(warehouse, days).items()
            if "content_sha256" in m}


def _log_final_artifacts(tracker: RunTracker, cfg: FunnelConfig, warehouse: Path, days: list[dt.date],
                         history: list[dict], best: dict, pred: dict[str, np.ndarray], ckpt_dir: Path) -> None:
    """Config, vocab versions, plots (loss, ROC, reliability, gates) and the best checkpoint."""
    tracker.client.log_text(tracker.run_id, to_toml(cfg.model_dump(by_alias=True)), "config.toml")
    versions = {day: m["vocab_versions"] for day, m in _manifests(warehouse, days).items() if "vocab_versions" in m}
    if versions:
        tracker.log_dict(versions, "vocab_versions.json")
    clicked = pred["click"] > 0
    curves = {"click": (pred["click"], pred["p_click"]),
              "cvr (clicked)": (pred["conversion"][clicked], pred["p_cvr"][clicked]),
              "ctcvr": (pred["conversion"], pred["p_ctcvr"])}
    tracker.log_figure(plot_loss_curves(history), "plots/loss_curves.png")
    tracker.log_figure(plot_roc(curves), "plots/roc.png")
    tracker.log_figure(plot_reliability(curves), "plots/reliability.png")
    if best.get("gate_usage"):
        tracker.log_figure(plot_gate_usage(best["gate_usage"]), "plots/gate_usage.png")
    tracker.log_metrics({f"best/{k}": v for k, v in best["val"].items()}, best["epoch"])
    tracker.log_file(ckpt_dir / "best.pt", "checkpoint")
