"""The ``train`` stage: fit the multi-task network on the window of mature days.

Window: L = run_date - contract.maturity_lag_days is the newest mature day. The model
trains on days L - window_days + 1 .. L - 1 and validates (early stopping, metrics) on L,
so ``train.window_days`` >= 2.

Sparse parameters live in one torchrec EmbeddingBagCollection wrapped by
``DistributedModelParallel`` (DMP) with FBGEMM's fused optimiser applied inside the
backward (row-wise Adagrad or Adam): no dense embedding gradients are ever materialised.
Dense parameters (and the uncertainty weights) use AdamW. With bf16 autocast on CUDA
(``train.mixed_precision``) the dense layers run in bf16; losses are taken in float32.

One process or many. Run plainly, training is one process (world size 1, rendezvous
through a FileStore under the state dir): gloo + CPU, or nccl + the GPU. Under ``torchrun``
(RANK / WORLD_SIZE / MASTER_ADDR set) every rank joins one ``env://`` process group; the
tables are placed by torchrec's planner (``train.sharding``: table-wise by default, or
row/column-wise, data-parallel, or the planner's choice), the dense layers are replicated
with DDP (the uncertainty weights' gradients are averaged by hand), and each rank reads
its own row groups of the training and validation tables (``rank::world``).
``train.batch_size`` is the global batch: each of N ranks takes batch_size / N rows per
step, so a run's optimisation does not depend on how many ranks share it. Ranks whose
shard runs out first start it again, so all ranks take the same number of steps (every
step is a collective); validation repeats batches the same way but drops their output.
Metrics are computed on all ranks' predictions (all-gathered). Only rank 0 writes
checkpoints and talks to MLflow; the other ranks wait at a barrier.

Each epoch ends with a validation pass and an atomic checkpoint under
``<state_dir>/checkpoints/<run key>/`` (model, both optimisers' state, torch RNG, epoch,
best metric, history, MLflow run id); running the same command again after a kill
resumes from it, with any number of ranks: sharded tables and the fused optimiser's
per-row state are gathered into whole tensors on save and copied into whatever shards a
rank owns on load. On the CPU, the same seed, data and world size give identical weights.

Two hooks for the nightly pipeline: ``initial_state`` warm-starts a new run from another
model's plain state_dict (embedding tables copy their overlapping leading rows:
vocabularies only grow), ``freeze_shared`` trains only the towers, heads and gates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from features.config import FunnelConfig, TaskConfig, TrainConfig
from features.contract import day_str
from features.errors import StageError
from features.examples import mature_day, training_dir
from features.io import atomic_write_bytes
from features.table_source import prepare_table
from models.loader import Batch, TrainingTableLoader, parquet_files
from models.losses import LossWeighting, task_losses, training_loss
from models.metrics import view_auc_difference_standard_errors, view_metrics
from models.nets import ModelOutput, MultiTaskNet, dense_stats
from models.quiet import library_noise_silenced
from models.tracking import (RunTracker, flatten, git_commit, plot_gate_usage, plot_loss_curves, plot_reliability,
                             plot_roc, to_toml)

HIGHER_IS_BETTER = ("_auc", "_gauc")  # metric name suffixes; logloss, ece: lower is better
# train.sharding -> the sharding types the planner may choose from ("auto": all sharded
# ones; it drops those the device cannot do, e.g. row-wise on the CPU).
SHARDING_TYPES = {
    "auto": [ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.COLUMN_WISE, ShardingType.TABLE_ROW_WISE],
    "table_wise": [ShardingType.TABLE_WISE],
    "row_wise": [ShardingType.ROW_WISE],
    "column_wise": [ShardingType.COLUMN_WISE],
    "data_parallel": [ShardingType.DATA_PARALLEL],
}


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


@dataclass(frozen=True)
class TrainingData:
    """What a training run reads: its files, and tags that name the data (MLflow, run key)."""

    name: str  # the run date, or "table" for a user's own table
    train_files: list[Path]
    val_files: list[Path]
    tags: dict[str, str]
    vocab_versions: dict  # the vocabulary versions the tables were encoded with (per day, or for the table)


def training_data(cfg: FunnelConfig, warehouse: Path, run_date: dt.date | None) -> TrainingData:
    """Event logs: the window of mature days before ``run_date`` (the newest validates).
    A ``[table]`` source: its train and val splits, prepared first when their inputs changed
    (``run_date`` is not used)."""
    if cfg.table is not None:
        # under torchrun rank 0 writes the tables; the others then find them ready
        prepared = prepare_table(cfg, warehouse) if _rank() == 0 else None
        _barrier()
        prepared = prepared or prepare_table(cfg, warehouse)
        tags = {"source": "table", **{f"data.{split}.sha256": ",".join(info["content_sha256"].values())
                                      for split, info in prepared.manifest["splits"].items()}}
        return TrainingData("table", prepared.files["train"], prepared.files["val"], tags,
                            prepared.manifest["vocab_versions"])
    if run_date is None:
        raise StageError("training on event logs needs a run date (--date)")
    train_days, val_day = training_window(cfg, run_date)
    tags = {"run_date": day_str(run_date), "train_days": ",".join(map(day_str, train_days)),
            "val_day": day_str(val_day), **_data_tags(warehouse, [*train_days, val_day])}
    versions = {day: m["vocab_versions"] for day, m in _manifests(warehouse, [*train_days, val_day]).items()
                if "vocab_versions" in m}
    return TrainingData(day_str(run_date), [f for day in train_days for f in parquet_files(training_dir(warehouse, day))],
                        parquet_files(training_dir(warehouse, val_day)), tags, versions)


def run_key(cfg: FunnelConfig, warehouse: Path, run_date: dt.date | None, data: TrainingData | None = None) -> str:
    """Checkpoint folder name: the data's name and a hash of the whole config, the
    warehouse and the data's hashes (from the manifests), so changed inputs start afresh."""
    data = data or training_data(cfg, warehouse, run_date)
    identity = {"config": cfg.model_dump(mode="json"), "warehouse": str(Path(warehouse).resolve()),
                "data": {k: v for k, v in data.tags.items() if k.startswith("data.")}}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{data.name}-{digest[:12]}"


def checkpoint_dir(cfg: FunnelConfig, key: str) -> Path:
    """Where the training run ``key`` (``run_key``) keeps its checkpoints."""
    return Path(cfg.state_dir) / "checkpoints" / key


# ---------------------------------------------------------------- distributed set-up

def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _device() -> torch.device:
    """This rank's GPU (LOCAL_RANK under torchrun), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def _init_process_group(state_dir: Path, device: torch.device) -> None:
    """Under torchrun: the ``env://`` group of all ranks. Otherwise world size 1, rendezvous
    through a fresh FileStore under the state dir (no ports)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if _launched_by_torchrun():
        dist.init_process_group(backend, init_method="env://")
        return
    path = Path(state_dir).resolve() / "dist" / f"store-{os.getpid()}-{time.time_ns()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    dist.init_process_group(backend, store=dist.FileStore(str(path), 1), rank=0, world_size=1)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _reduce(values: list[float], device: torch.device, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[float]:
    """Element-wise ``op`` of ``values`` over all ranks (the same result on every rank)."""
    if _world() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def _broadcast(value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce-mean the gradients of parameters DDP does not see (the loss weighting)."""
    for p in params:
        if p.grad is not None and _world() > 1:
            dist.all_reduce(p.grad)
            p.grad /= _world()


# ---------------------------------------------------------------- world-size independent state

def _region(offsets: Sequence[int], sizes: Sequence[int]) -> tuple[slice, ...]:
    """The index of a shard inside its whole tensor."""
    return tuple(slice(o, o + n) for o, n in zip(offsets, sizes))


def _gather_whole(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of a flat state whose ShardedTensors are assembled whole on rank 0 (a
    collective: every rank calls it). Other ranks get only the plain tensors, which every
    rank holds alike (dense layers under DDP). Keys of sharded tensors may differ by rank
    (the fused optimiser lists only the tables a rank holds); rank 0 gets their union."""
    whole = {k: v.detach().cpu().clone() for k, v in tensors.items() if not isinstance(v, ShardedTensor)}
    # this rank's pieces: key -> (global shape, [(offsets, CPU copy of a local shard)])
    mine = {k: (tuple(v.metadata().size), [(s.metadata.shard_offsets, s.tensor.detach().cpu()) for s in v.local_shards()])
            for k, v in tensors.items() if isinstance(v, ShardedTensor)}
    everyone = [mine]
    if _world() > 1:
        everyone = [None] * _world() if _rank() == 0 else None
        dist.gather_object(mine, everyone, dst=0)
        if _rank() != 0:
            return whole
    for rank_pieces in everyone:
        for key, (shape, shards) in rank_pieces.items():
            for offsets, shard in shards:
                if key not in whole:
                    whole[key] = torch.zeros(shape, dtype=shard.dtype)
                whole[key][_region(offsets, shard.shape)] = shard
    return whole


def _copy_into(targets: Mapping[str, torch.Tensor], whole: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy whole tensors into ``targets`` in place: into the local shards (at their offsets)
    of a ShardedTensor, or the entire tensor otherwise."""
    with torch.no_grad():
        for key, target in targets.items():
            if key not in whole:
                raise StageError(f"checkpoint {what} has no '{key}'")
            source = whole[key]
            shape = tuple(target.metadata().size if isinstance(target, ShardedTensor) else target.shape)
            if tuple(source.shape) != shape:
                raise StageError(f"checkpoint {what} '{key}' has shape {tuple(source.shape)}, the model {shape}")
            if isinstance(target, ShardedTensor):
                for shard in target.local_shards():
                    shard.tensor.copy_(source[_region(shard.metadata.shard_offsets, shard.metadata.shard_sizes)])
            else:
                target.copy_(source)


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with sharded tables as whole CPU tensors (on rank 0; see _gather_whole)."""
    return _gather_whole(module.state_dict())


def _load_plain_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a plain state_dict into a (possibly sharded) module, in place."""
    _copy_into(module.state_dict(), state, "model")


def _fused_state(model: DistributedModelParallel) -> tuple[dict, dict[str, torch.Tensor]]:
    """The fused optimiser's state_dict and its tensors flattened as '<param>/<state>'."""
    state_dict = model.fused_optimizer.state_dict()
    flat = {f"{param}/{name}": v for param, states in state_dict["state"].items() for name, v in states.items()}
    return state_dict, flat


def _plain_fused_state(model: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """Per-row optimiser state (e.g. row-wise Adagrad's momentum) as whole tensors, on rank 0."""
    return _gather_whole(_fused_state(model)[1])


def _load_plain_fused_state(model: DistributedModelParallel, whole: Mapping[str, torch.Tensor]) -> None:
    state_dict, flat = _fused_state(model)
    _copy_into(flat, whole, "fused optimiser state")
    model.fused_optimizer.load_state_dict(state_dict)


def distribute(model: MultiTaskNet, tcfg: TrainConfig, device: torch.device, *,
               freeze_embeddings: bool = False) -> DistributedModelParallel:
    """Shard the EBC as ``train.sharding`` says, with the sparse optimiser fused into its
    backward (learning rate 0 when ``freeze_embeddings``: the rows do not move; data-parallel
    tables are dense parameters: leave them out of the dense optimiser). The dense layers
    are not wrapped in DDP yet: call ``init_data_parallel()`` after freezing any."""
    if tcfg.sharding == "row_wise" and device.type == "cpu":
        raise StageError("train.sharding = 'row_wise' needs a CUDA device: on the CPU torchrec's planner offers "
                         "table_wise, column_wise and data_parallel")
    lr = 0.0 if freeze_embeddings else tcfg.sparse_lr
    sparse_opt = (RowWiseAdagrad, {"lr": lr}) if tcfg.sparse_optimizer == "rowwise_adagrad" \
        else (torch.optim.Adam, {"lr": lr})
    initial = _plain_state(model)  # on CPU the sharder re-initialises tables: keep the seeded ones
    apply_optimizer_in_backward(sparse_opt[0], model.ebc.parameters(), sparse_opt[1])
    types = [t.value for t in SHARDING_TYPES[tcfg.sharding]]
    constraints = {name: ParameterConstraints(sharding_types=types) for name in model.sparse_names}
    sharders = [EmbeddingBagCollectionSharder()]
    world = _world()
    # The planner warns on every run about its own defaults (directly built Topology,
    # heuristic storage reservation); the plan it makes here is the one wanted.
    with library_noise_silenced("torchrec.distributed.planner", FutureWarning):
        topology = Topology(world_size=world, compute_device=device.type,
                            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders, init_data_parallel=False)
    _load_plain_state(dmp, initial)
    return dmp


# ---------------------------------------------------------------- warm start

def warm_start(net: MultiTaskNet, initial: Mapping[str, torch.Tensor]) -> None:
    """Initialise ``net`` in place from another model's plain state_dict.

    Embedding tables copy the overlapping leading rows (vocabularies are append-only, so an
    old row keeps its meaning; new rows keep their fresh init); every other tensor (the
    dense statistics included, so the start is exactly the other model) must match in
    shape. A missing, extra or mis-shaped key raises StageError naming it."""
    own = net.state_dict()
    missing, extra = sorted(own.keys() - initial.keys()), sorted(initial.keys() - own.keys())
    if missing or extra:
        raise StageError(f"warm start: initial_state does not fit the model: missing {missing}, unexpected {extra}")
    tables = {f"ebc.embedding_bags.{name}.weight" for name in net.sparse_names}
    with torch.no_grad():
        for key, target in own.items():
            source = torch.as_tensor(initial[key])
            if key in tables and source.dim() == 2 and source.shape[1] == target.shape[1]:
                rows = min(source.shape[0], target.shape[0])
                target[:rows].copy_(source[:rows])
            elif source.shape != target.shape:
                raise StageError(f"warm start: '{key}' has shape {tuple(source.shape)} in initial_state, "
                                 f"{tuple(target.shape)} in the model")
            else:
                target.copy_(source)


# ---------------------------------------------------------------- evaluation

def _forward(model: torch.nn.Module, batch: Batch, amp: bool) -> ModelOutput:
    """The model's outputs in float32. With ``amp`` (CUDA) the forward runs under bf16
    autocast (the Linear layers; FBGEMM's embedding kernels keep float32); the heads turn
    their logits to float32 before the probabilities."""
    with torch.autocast(batch.dense.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(batch.dense, batch.sparse)
    if not amp:
        return out
    gates = {t: g.float() for t, g in out.gates.items()} if out.gates else out.gates
    return ModelOutput(out.logits, out.probs, out.features.float(), gates)


def _steps(loader: TrainingTableLoader, steps: int) -> Iterator[tuple[Batch, bool]]:
    """Exactly ``steps`` (batch, is_repeat) of ``loader``: a shard that runs out first (row
    groups do not split evenly over the ranks) starts again, with is_repeat = True."""
    done = 0
    while done < steps:
        for batch in loader:
            if done == steps:
                return
            yield batch, done >= len(loader)
            done += 1


@torch.no_grad()
def predict(model: torch.nn.Module, loader: TrainingTableLoader, device: torch.device, steps: int | None = None,
            amp: bool = False) -> dict[str, np.ndarray]:
    """Over a whole loader: ``label_<column>`` per label, ``p_<view>`` per task view, the
    user codes ``user`` and (mmoe, ple) each task's mean gate weights ``gate_<task>``.

    ``steps`` > len(loader): run that many forward passes (a collective under torchrun)
    and drop the repeated batches' output."""
    model.eval()
    parts: dict[str, list] = {}
    gate_sums: dict[str, torch.Tensor] = {}
    for batch, repeated in _steps(loader, len(loader) if steps is None else steps):
        batch = batch.to(device, non_blocking=True)
        out = _forward(model, batch, amp)
        if repeated:
            continue
        columns = {"user": batch.user, **{f"label_{k}": v for k, v in batch.labels.items()},
                   **{f"p_{k}": v for k, v in out.probs.items()}}
        for k, v in columns.items():
            parts.setdefault(k, []).append(v.cpu().numpy())
        for t, w in (out.gates or {}).items():
            gate_sums[t] = gate_sums.get(t, 0) + w.sum(0).cpu()
    result = {k: np.concatenate(v) for k, v in parts.items()}
    result.update({f"gate_{t}": (s / len(result["user"])).numpy() for t, s in gate_sums.items()})
    return result


def _gather_predictions(pred: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All ranks' predictions in rank order (gates: the row-weighted mean), on every rank."""
    if _world() == 1:
        return pred
    everyone: list = [None] * _world()
    dist.all_gather_object(everyone, pred)
    rows = np.array([len(p["user"]) for p in everyone], dtype=np.float64)
    return {k: (sum(p[k] * n for p, n in zip(everyone, rows)) / rows.sum() if k.startswith("gate_")
                else np.concatenate([p[k] for p in everyone])) for k in pred}


def _labels_and_probs(pred: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``predict``'s output as (label column -> labels, task view -> probabilities)."""
    return ({k.removeprefix("label_"): v for k, v in pred.items() if k.startswith("label_")},
            {k.removeprefix("p_"): v for k, v in pred.items() if k.startswith("p_")})


def validation_metrics(cfg: FunnelConfig, pred: dict[str, np.ndarray]) -> dict[str, float]:
    """Every task view's metrics (``models.metrics.view_metrics``) of ``predict``'s output."""
    groups = pred["user"] if (pred["user"] >= 0).any() else None
    return view_metrics(cfg.views(), *_labels_and_probs(pred), groups)


def auc_difference_standard_errors(cfg: FunnelConfig, pred_a: dict[str, np.ndarray],
                                   pred_b: dict[str, np.ndarray]) -> dict[str, float]:
    """Per task view, the standard error of auc(a) - auc(b) for two models' ``predict``
    outputs on the same rows (paired: ``models.metrics.auc_difference_standard_error``)."""
    labels, probs_a = _labels_and_probs(pred_a)
    return view_auc_difference_standard_errors(cfg.views(), labels, probs_a, _labels_and_probs(pred_b)[1])


def gradient_cosine(model: torch.nn.Module, net: MultiTaskNet, batch: Batch, tasks: Sequence[TaskConfig],
                    head: str) -> dict[str, float]:
    """Cosine between the task losses' gradients on what the tasks share: ``grad_cosine``
    (the mean over pairs of tasks) and, with more than two tasks, ``grad_cosine/<a>-<b>``.

    MMoE / shared bottom: the experts' / bottom's parameters. Single-task and soft sharing
    share only the embeddings, whose gradients the fused optimiser never exposes: there
    the gradient is taken w.r.t. the backbone input (pooled embeddings + dense features),
    the dense-visible part of the embeddings. autograd.grad stops at these inputs, so the
    embeddings' fused backward (which would update them) does not run. Frozen shared
    layers (fine-tuning) are measured at the backbone input too; NaN when nothing the
    tasks share has a gradient. ``model`` must not be DDP-wrapped (pass ``dmp.module``):
    DDP expects a backward after a training forward.
    """
    model.eval()
    out = model(batch.dense, batch.sparse)
    losses = task_losses(out, batch.labels, tasks, head)
    shared = [p for p in net.backbone.shared_parameters() if p.requires_grad] or [out.features]
    if not all(t.requires_grad for t in shared):
        return {"grad_cosine": float("nan")}
    grads = {t.name: torch.cat([g.flatten() for g in torch.autograd.grad(losses[t.name], shared, retain_graph=True)])
             for t in tasks}
    names = list(grads)
    pairs = {f"grad_cosine/{a}-{b}": float(torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0))
             for i, a in enumerate(names) for b in names[i + 1:]}
    return {"grad_cosine": float(np.mean(list(pairs.values()))), **(pairs if len(pairs) > 1 else {})}


# ---------------------------------------------------------------- checkpoints

def _save(path: Path, obj: dict) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _is_better(metric: str, value: float, best: float | None) -> bool:
    if not np.isfinite(value):
        return False
    return best is None or (value > best if metric.endswith(HIGHER_IS_BETTER) else value < best)


# ---------------------------------------------------------------- the stage

def dense_optimizer(params, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW at the config's dense rate and weight decay for ``params`` (tensors or groups).

    Fused: one kernel over every tensor. PyTorch's default on the CPU is a Python loop of
    small ops per tensor: 1.75 ms a step against 0.32 ms fused for MMoE on Census (24
    tensors), about 7% of its training step."""
    return torch.optim.AdamW(params, lr=tcfg.dense_lr, weight_decay=tcfg.weight_decay, fused=True)


def train_model(
    cfg: FunnelConfig,
    warehouse: Path,
    run_date: dt.date | None,
    *,
    max_epochs: int | None = None,
    progress: bool = True,
    initial_state: Mapping[str, torch.Tensor] | None = None,
    freeze_shared: bool = False,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train (or resume) the run for ``run_date`` (a ``[table]`` source: on its train split,
    validated on its val split; no date); ``max_epochs`` stops early without finishing the
    run (as a kill would), e.g. to test resumption.

    ``initial_state``: a plain state_dict to start from when there is no checkpoint to
    resume (see :func:`warm_start`). ``freeze_shared``: embeddings and the shared experts /
    bottom get no updates (embedding learning rate 0, shared dense layers left out of
    AdamW); the towers, heads and gates train. ``parent_run_id`` makes the MLflow run its
    child; ``extra_tags`` are added to the run's tags. Under torchrun every rank calls this
    and gets the same result; rank 0 alone writes checkpoints and talks to MLflow."""
    tcfg, mcfg, spec = cfg.train, cfg.model, cfg.features
    device = _device()
    if tcfg.sparse_optimizer == "adam" and device.type == "cpu":
        raise StageError("train.sparse_optimizer = 'adam' needs a CUDA device: FBGEMM's fused CPU embedding "
                         "kernels support row-wise Adagrad only; use 'rowwise_adagrad'")
    _init_process_group(cfg.state_dir, device)
    rank, world = _rank(), _world()
    if tcfg.batch_size % world:
        raise StageError(f"train.batch_size = {tcfg.batch_size} is the global batch and must split evenly over "
                         f"the {world} ranks of this job")
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(tcfg.threads or max(1, (os.cpu_count() or 1) // local_ranks))
    torch.manual_seed(cfg.seed)
    amp = tcfg.mixed_precision and device.type == "cuda"

    data = training_data(cfg, warehouse, run_date)
    train_files, val_files = data.train_files, data.val_files
    dense_names = spec.dense_names()
    key = run_key(cfg, warehouse, run_date, data)
    ckpt_dir = checkpoint_dir(cfg, key)
    resuming = (ckpt_dir / "last.pt").exists()

    mean, std = dense_stats(train_files, dense_names)
    net = MultiTaskNet(spec, mcfg, cfg.tasks, mean, std)  # seeded on the CPU, alike on every rank; tables go into the shards
    if initial_state is not None and not resuming:
        warm_start(net, initial_state)
    net = net.to(device)
    if freeze_shared:
        for p in net.backbone.shared_parameters():
            p.requires_grad_(False)
    weighting = LossWeighting(mcfg, cfg.tasks).to(device)
    model = distribute(net, tcfg, device, freeze_embeddings=freeze_shared)
    if world > 1:
        model.init_data_parallel()  # DDP over the dense layers that train
    dense_params = [p for name, p in in_backward_optimizer_filter(model.named_parameters())
                    if p.requires_grad and not (freeze_shared and name.startswith("ebc."))]  # data-parallel tables
    dense_opt = dense_optimizer([{"params": dense_params}, {"params": list(weighting.parameters()), "weight_decay": 0.0}], tcfg)
    loaders = dict(sparse=spec.sparse, dense_names=dense_names, labels=cfg.label_columns,
                   seed=cfg.seed, pin_memory=device.type == "cuda")
    mine = dict(batch_size=tcfg.batch_size // world, shard=(rank, world), **loaders)
    train_loader = TrainingTableLoader(train_files, shuffle=True, shuffle_buffer_rows=tcfg.shuffle_buffer_rows, **mine)
    val_loader = TrainingTableLoader(val_files, shuffle=False, **mine)
    train_steps, val_steps = _steps_per_epoch(train_loader, val_loader, device)
    cosine_batch = next(iter(val_loader)).to(device)

    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "history": [],
             "finished": False, "mlflow_run_id": None}
    if resuming:
        saved = torch.load(ckpt_dir / "last.pt", weights_only=False, map_location="cpu")
        _load_plain_state(model, saved["model"])
        weighting.load_state_dict(saved["weighting"])
        dense_opt.load_state_dict(saved["dense_opt"])
        _load_plain_fused_state(model, saved["fused_opt"])
        torch.set_rng_state(saved["rng"])
        state = saved["state"]

    tracker = None
    if rank == 0 and not state["finished"]:
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
    state["mlflow_run_id"] = _broadcast(state["mlflow_run_id"])

    last_epoch = tcfg.epochs if max_epochs is None else min(tcfg.epochs, max_epochs)
    metric = cfg.early_stopping_metric
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=not progress or rank != 0)
    with bar:
        while not state["finished"] and state["epoch"] < last_epoch:
            epoch = state["epoch"]
            train_loader.set_epoch(epoch)
            model.train()
            task = bar.add_task(f"epoch {epoch + 1}/{tcfg.epochs}", total=train_steps, info="")
            sums: dict[str, torch.Tensor] = {}
            rows, started = 0, time.perf_counter()
            for batch, _ in _steps(train_loader, train_steps):
                batch = batch.to(device, non_blocking=True)
                out = _forward(model, batch, amp)
                loss, parts = training_loss(out, batch.labels, cfg.tasks, mcfg.conversion_head, weighting,
                                            net.backbone.penalty(), mcfg.soft_sharing_strength)
                dense_opt.zero_grad(set_to_none=True)
                loss.backward()  # also updates the embedding rows (fused optimiser); DDP averages dense gradients
                _average_gradients(weighting.parameters())
                for group in dense_opt.param_groups:
                    group["lr"] = dense_learning_rate(tcfg, state["step"], tcfg.epochs * train_steps)
                dense_opt.step()
                state["step"] += 1
                rows += len(batch)
                for k, v in parts.items():  # kept on the device: no sync per step
                    sums[k] = sums.get(k, 0.0) + v.double() * len(batch)
                bar.update(task, advance=1)
                if state["step"] % tcfg.log_every_steps == 0:
                    step_losses = {k: float(v) for k, v in parts.items()}
                    bar.update(task, info=f"loss {step_losses['total']:.4f}  "
                                          f"{rows * world / (time.perf_counter() - started):,.0f} samples/s")
                    if tracker is not None:
                        tracker.log_metrics({f"train/step_loss_{k}": v for k, v in step_losses.items()}, state["step"])
            totals = _reduce([rows, *(float(v) for v in sums.values())], device)  # over all ranks
            rate = totals[0] / (time.perf_counter() - started)
            train_losses = {f"train/loss_{k}": v / totals[0] for k, v in zip(sums, totals[1:])}

            pred = _gather_predictions(predict(model, val_loader, device, val_steps, amp))
            val = validation_metrics(cfg, pred)
            record = {"epoch": epoch + 1, "train/samples_per_s": rate, **train_losses,
                      **{f"train/task_weight_{t}": w for t, w in weighting.weights().items()},
                      **{f"train/{k}": v for k, v in
                         gradient_cosine(model.module, net, cosine_batch, cfg.tasks, mcfg.conversion_head).items()},
                      **{f"val/{k}": v for k, v in val.items()},
                      **{f"val/{k}_expert{e}": float(w) for k, g in pred.items()
                         if k.startswith("gate_") for e, w in enumerate(g)}}
            state["history"].append(record)
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, epoch + 1)
            model_state = _plain_state(model)  # collectives: every rank takes part, rank 0 writes
            if _is_better(metric, val[metric], state["best"]):  # the same on every rank: gathered predictions
                state.update(best=val[metric], best_epoch=epoch + 1, bad_epochs=0)
                if rank == 0:
                    _save(ckpt_dir / "best.pt", {"model": model_state, "epoch": epoch + 1, "val": val,
                                                 "gate_usage": {k.removeprefix("gate_"): g for k, g in pred.items()
                                                                if k.startswith("gate_")}})
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            state["finished"] = state["epoch"] >= tcfg.epochs or state["bad_epochs"] >= tcfg.patience
            fused_state = _plain_fused_state(model)
            if rank == 0:
                _save(ckpt_dir / "last.pt", {"model": model_state, "weighting": weighting.state_dict(),
                                             "dense_opt": dense_opt.state_dict(), "fused_opt": fused_state,
                                             "rng": torch.get_rng_state(), "state": state})
            _barrier()

    if state["best_epoch"] < 0:
        raise StageError(f"training {key} produced no finite validation {metric} on {val_files}")
    best = torch.load(ckpt_dir / "best.pt", weights_only=False, map_location="cpu")
    result_model = MultiTaskNet(spec, mcfg, cfg.tasks, mean, std)
    result_model.load_state_dict(best["model"])
    result_model.eval()
    if tracker is not None:
        if state["finished"]:
            whole_val = TrainingTableLoader(val_files, shuffle=False, batch_size=tcfg.batch_size, **loaders)
            _log_final_artifacts(tracker, cfg, data, state["history"], best,
                                 predict(result_model, whole_val, torch.device("cpu")), ckpt_dir)
        tracker.end("FINISHED" if state["finished"] else "KILLED")
    _barrier()
    return TrainResult(key, ckpt_dir, result_model, state["best_epoch"], state["best"], state["epoch"], best["val"],
                       state["history"], state["mlflow_run_id"])


def dense_learning_rate(tcfg: TrainConfig, step: int, total_steps: int) -> float:
    """The dense optimiser's rate at ``step`` (0-based) of ``total_steps``: constant, or a
    cosine decay from ``train.dense_lr`` to 0 over the whole run. A function of the step
    alone, so a resumed run continues the same schedule."""
    if tcfg.lr_schedule == "constant":
        return tcfg.dense_lr
    return tcfg.dense_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def _steps_per_epoch(train: TrainingTableLoader, val: TrainingTableLoader, device: torch.device) -> tuple[int, int]:
    """Training and validation steps every rank takes: the most batches any rank's shard has."""
    most = _reduce([len(train), len(val)], device, dist.ReduceOp.MAX)
    fewest = _reduce([len(train), len(val)], device, dist.ReduceOp.MIN)
    for (name, loader), n in zip((("training", train), ("validation", val)), fewest):
        if n == 0:
            raise StageError(f"the {name} table {[str(f) for f in loader.files]} has fewer non-empty row groups than "
                             f"the {_world()} ranks of this job: every rank needs one; write smaller row groups")
    return int(most[0]), int(most[1])


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


def view_curves(cfg: FunnelConfig, pred: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(labels, predictions) per task view for ROC and reliability plots, e.g. click, cvr
    (on the clicked rows only) and ctcvr."""
    curves = {}
    for view, (label, mask) in cfg.views().items():
        y, p = pred[f"label_{label}"], pred[f"p_{view}"]
        keep = slice(None) if mask is None else pred[f"label_{mask}"] > 0
        curves[view if mask is None else f"{view} ({mask} = 1)"] = (y[keep], p[keep])
    return curves


def _log_final_artifacts(tracker: RunTracker, cfg: FunnelConfig, data: TrainingData, history: list[dict], best: dict,
                         pred: dict[str, np.ndarray], ckpt_dir: Path) -> None:
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
    tracker.log_file(ckpt_dir / "best.pt", "checkpoint")
