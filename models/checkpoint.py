"""Checkpoints of a training run and warm starts from another model's weights.

A run keeps two files under ``<state_dir>/checkpoints/<run key>/``: ``last.pt``, written
atomically after every epoch (model, both optimisers' state, torch RNG, the loop's state:
epoch, best metric, history, MLflow run id), from which running the same command again
after a kill resumes, with any number of ranks; and ``best.pt``, the best epoch's plain
state_dict with its validation metrics and gate usage. Sharded tables and the fused
optimiser's per-row state are stored as whole tensors (``models.distributed``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel

from features.errors import StageError
from features.io import atomic_write_bytes
from models.config import TrainingConfig
from models.distributed import copy_into, gather_whole, load_plain_state, this_rank
from models.nets import EMBEDDING_PREFIXES, SERVED_PREFIX, MultiTaskNet


def checkpoint_dir(cfg: TrainingConfig, key: str) -> Path:
    """Where the training run ``key`` (``models.train.run_key``) keeps its checkpoints."""
    return Path(cfg.state_dir) / "checkpoints" / key


def write_checkpoint(path: Path, obj: dict) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically (a kill leaves the old file or the new one)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _fused_state(model: DistributedModelParallel) -> tuple[dict, dict[str, torch.Tensor]]:
    """The fused optimiser's state_dict and its tensors flattened as '<param>/<state>'."""
    state_dict = model.fused_optimizer.state_dict()
    flat = {f"{param}/{name}": v for param, states in state_dict["state"].items() for name, v in states.items()}
    return state_dict, flat


def plain_fused_state(model: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """Per-row optimiser state (e.g. row-wise Adagrad's momentum) as whole tensors, on rank 0."""
    return gather_whole(_fused_state(model)[1])


def load_plain_fused_state(model: DistributedModelParallel, whole: Mapping[str, torch.Tensor]) -> None:
    state_dict, flat = _fused_state(model)
    copy_into(flat, whole, "fused optimiser state")
    model.fused_optimizer.load_state_dict(state_dict)


def save_resumable(
    path: Path,
    model_state: Mapping[str, torch.Tensor],
    model: DistributedModelParallel,
    weighting: nn.Module,
    dense_opt: torch.optim.Optimizer,
    state: dict,
) -> None:
    """Write ``last.pt``: everything a killed run resumes from. A collective (the fused
    optimiser's state is gathered); rank 0 writes. ``model_state``: ``plain_state(model)``."""
    fused_state = plain_fused_state(model)
    if this_rank() == 0:
        write_checkpoint(
            path,
            {
                "model": model_state,
                "weighting": weighting.state_dict(),
                "dense_opt": dense_opt.state_dict(),
                "fused_opt": fused_state,
                "rng": torch.get_rng_state(),
                "state": state,
            },
        )


def load_resumable(
    path: Path, model: DistributedModelParallel, weighting: nn.Module, dense_opt: torch.optim.Optimizer
) -> dict:
    """Restore the model, the loss weighting, both optimisers and torch's RNG from
    ``last.pt`` (in place, into whatever shards this rank holds); return the loop's state."""
    saved = torch.load(path, weights_only=False, map_location="cpu")
    load_plain_state(model, saved["model"])
    weighting.load_state_dict(saved["weighting"])
    dense_opt.load_state_dict(saved["dense_opt"])
    load_plain_fused_state(model, saved["fused_opt"])
    torch.set_rng_state(saved["rng"])
    return saved["state"]


def warm_start(net: MultiTaskNet, initial: Mapping[str, torch.Tensor]) -> None:
    """Initialise ``net`` in place from another model's plain state_dict.

    Embedding tables copy the overlapping leading rows (vocabularies are append-only, so an
    old row keeps its meaning; new rows keep their fresh init); every other tensor (the
    dense statistics included, so the start is exactly the other model) must match in
    shape. A missing, extra or mis-shaped key raises StageError naming it, but for the
    sampling correction and the calibrators (``served.``): copied where they fit, else (a
    model from before calibration, another calibration method) left as they are. A training
    run resets them and fits its calibrators afresh (``models.train``)."""
    own = net.state_dict()
    initial = {
        k: v
        for k, v in initial.items()
        if not k.startswith(SERVED_PREFIX) or (k in own and tuple(torch.as_tensor(v).shape) == own[k].shape)
    }
    own = {k: v for k, v in own.items() if not k.startswith(SERVED_PREFIX) or k in initial}
    missing, extra = sorted(own.keys() - initial.keys()), sorted(initial.keys() - own.keys())
    if missing or extra:
        raise StageError(f"warm start: initial_state does not fit the model: missing {missing}, unexpected {extra}")
    tables = {key for key in own if key.startswith(EMBEDDING_PREFIXES)}
    with torch.no_grad():
        for key, target in own.items():
            source = torch.as_tensor(initial[key])
            if key in tables and source.dim() == 2 and source.shape[1] == target.shape[1]:
                rows = min(source.shape[0], target.shape[0])
                target[:rows].copy_(source[:rows])
            elif source.shape != target.shape:
                raise StageError(
                    f"warm start: '{key}' has shape {tuple(source.shape)} in initial_state, "
                    f"{tuple(target.shape)} in the model"
                )
            else:
                target.copy_(source)
