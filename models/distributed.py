"""Distributed plumbing of training: the process group, collectives, whole tensors of
sharded state, and sharding the embedding tables.

One process or many. Run plainly, training is one process (world size 1, rendezvous
through a FileStore under the state dir): gloo + CPU, or nccl + the GPU. Under ``torchrun``
(RANK / WORLD_SIZE / MASTER_ADDR set) every rank joins one ``env://`` process group; the
tables are placed by torchrec's planner (``train.sharding``: table-wise by default, or
row/column-wise, data-parallel, or the planner's choice) and the dense layers are
replicated with DDP (the uncertainty weights' gradients are averaged by hand).

Sharded state is saved and loaded as whole tensors (``plain_state``, ``load_plain_state``):
gathered on rank 0, copied into whatever shards a rank owns, so a checkpoint moves between
world sizes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import (
    EmbeddingShardingPlanner,
    ParameterConstraints,
    Topology,
)
from torchrec.distributed.types import ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from features.errors import StageError
from models.config import TrainConfig
from models.nets import MultiTaskNet
from models.quiet import library_noise_silenced

# train.sharding -> the sharding types the planner may choose from ("auto": all sharded
# ones; it drops those the device cannot do, e.g. row-wise on the CPU).
SHARDING_TYPES = {
    "auto": [ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.COLUMN_WISE, ShardingType.TABLE_ROW_WISE],
    "table_wise": [ShardingType.TABLE_WISE],
    "row_wise": [ShardingType.ROW_WISE],
    "column_wise": [ShardingType.COLUMN_WISE],
    "data_parallel": [ShardingType.DATA_PARALLEL],
}


# ---------------------------------------------------------------- the process group


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_device() -> torch.device:
    """This rank's GPU (LOCAL_RANK under torchrun), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def init_process_group(state_dir: Path, device: torch.device) -> None:
    """Under torchrun: the ``env://`` group of all ranks. Otherwise world size 1, rendezvous
    through a fresh FileStore under the state dir (no ports). Once per process."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if _launched_by_torchrun():
        dist.init_process_group(backend, init_method="env://")
        return
    path = Path(state_dir).resolve() / "dist" / f"store-{os.getpid()}-{time.time_ns()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    dist.init_process_group(backend, store=dist.FileStore(str(path), 1), rank=0, world_size=1)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def this_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def reduce_values(
    values: list[float], device: torch.device, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> list[float]:
    """Element-wise ``op`` of ``values`` over all ranks (the same result on every rank)."""
    if world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``tensor`` over all ranks (a new tensor on every rank)."""
    if world_size() == 1:
        return tensor
    summed = tensor.clone()
    dist.all_reduce(summed)
    return summed / world_size()


def broadcast_from_rank0(value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce-mean the gradients of parameters DDP does not see (the loss weighting)."""
    for p in params:
        if p.grad is not None and world_size() > 1:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


# ---------------------------------------------------------------- world-size independent state


def _region(offsets: Sequence[int], sizes: Sequence[int]) -> tuple[slice, ...]:
    """The index of a shard inside its whole tensor."""
    return tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))


def gather_whole(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of a flat state whose ShardedTensors are assembled whole on rank 0 (a
    collective: every rank calls it). Other ranks get only the plain tensors, which every
    rank holds alike (dense layers under DDP). Keys of sharded tensors may differ by rank
    (the fused optimiser lists only the tables a rank holds); rank 0 gets their union."""
    whole = {k: v.detach().cpu().clone() for k, v in tensors.items() if not isinstance(v, ShardedTensor)}
    # this rank's pieces: key -> (global shape, [(offsets, CPU copy of a local shard)])
    mine = {
        k: (tuple(v.metadata().size), [(s.metadata.shard_offsets, s.tensor.detach().cpu()) for s in v.local_shards()])
        for k, v in tensors.items()
        if isinstance(v, ShardedTensor)
    }
    everyone = [mine]
    if world_size() > 1:
        everyone = [None] * world_size() if this_rank() == 0 else None
        dist.gather_object(mine, everyone, dst=0)
        if this_rank() != 0:
            return whole
    for rank_pieces in everyone:
        for key, (shape, shards) in rank_pieces.items():
            for offsets, shard in shards:
                if key not in whole:
                    whole[key] = torch.zeros(shape, dtype=shard.dtype)
                whole[key][_region(offsets, shard.shape)] = shard
    return whole


def copy_into(targets: Mapping[str, torch.Tensor], whole: Mapping[str, torch.Tensor], what: str) -> None:
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


def plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with sharded tables as whole CPU tensors (on rank 0; see gather_whole)."""
    return gather_whole(module.state_dict())


def load_plain_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a plain state_dict into a (possibly sharded) module, in place."""
    copy_into(module.state_dict(), state, "model")


# ---------------------------------------------------------------- sharding


def distribute(
    model: MultiTaskNet, tcfg: TrainConfig, device: torch.device, *, freeze_embeddings: bool = False
) -> DistributedModelParallel:
    """Shard the embedding tables (the EBC and the sequences' ECs) as ``train.sharding``
    says, with the sparse optimiser fused into their backward (learning rate 0 when
    ``freeze_embeddings``: the rows do not move; data-parallel tables are dense parameters:
    leave them out of the dense optimiser). The dense layers are not wrapped in DDP yet:
    call ``init_data_parallel()`` after freezing any."""
    if tcfg.sharding == "row_wise" and device.type == "cpu":
        raise StageError(
            "train.sharding = 'row_wise' needs a CUDA device: on the CPU torchrec's planner offers "
            "table_wise, column_wise and data_parallel"
        )
    lr = 0.0 if freeze_embeddings else tcfg.sparse_lr
    sparse_opt = (
        (RowWiseAdagrad, {"lr": lr}) if tcfg.sparse_optimizer == "rowwise_adagrad" else (torch.optim.Adam, {"lr": lr})
    )
    initial = plain_state(model)  # on CPU the sharder re-initialises tables: keep the seeded ones
    apply_optimizer_in_backward(sparse_opt[0], list(model.tables().values()), sparse_opt[1])
    types = [t.value for t in SHARDING_TYPES[tcfg.sharding]]
    constraints = {name: ParameterConstraints(sharding_types=types) for name in model.sparse_names}
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    world = world_size()
    # The planner warns on every run about its own defaults (directly built Topology,
    # heuristic storage reservation); the plan it makes here is the one wanted.
    with library_noise_silenced("torchrec.distributed.planner", FutureWarning):
        topology = Topology(
            world_size=world,
            compute_device=device.type,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        )
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders, init_data_parallel=False)
    load_plain_state(dmp, initial)
    return dmp
