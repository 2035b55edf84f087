"""The multi-task ranking network: one torchrec EmbeddingBagCollection shared by all
tasks, a backbone (single-task / shared-bottom / soft-sharing / MMoE), and two heads
(click; conversion, either direct pCVR or ESMM).

Input: dense features [B, n_dense] (normalised inside the model, so export and serving
get the training statistics with the weights) and a KeyedJaggedTensor with one key per
sparse feature, in spec order. Output: a ``ModelOutput`` with logits and probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from features.config import FeaturesConfig, ModelConfig
from features.errors import StageError

TASKS = ("click", "conversion")
_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


@dataclass
class ModelOutput:
    click_logit: torch.Tensor  # [B]
    cvr_logit: torch.Tensor  # [B], logit of P(conversion | click)
    p_click: torch.Tensor
    p_cvr: torch.Tensor
    p_ctcvr: torch.Tensor  # P(click and conversion) = p_click * p_cvr
    features: torch.Tensor  # [B, in_dim] pooled embeddings + normalised dense (backbone input)
    gates: dict[str, torch.Tensor] | None = None  # mmoe: task -> [B, n_experts] softmax weights


# ---------------------------------------------------------------- dense normalisation

def dense_stats(files: Sequence[Path], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the dense columns over ``files`` (one vectorised pass per file).

    Nulls/NaNs are ignored; a constant column gets std 1 so it passes through centred.
    """
    if not names:
        return np.zeros(0, np.float32), np.ones(0, np.float32)
    n = np.zeros(len(names))
    total = np.zeros(len(names))
    total_sq = np.zeros(len(names))
    for f in files:
        table = pq.read_table(f, columns=list(names))
        x = np.column_stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in names])
        ok = np.isfinite(x)
        x = np.where(ok, x, 0.0)
        n += ok.sum(0)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
    if not n.all():
        empty = [c for c, k in zip(names, n) if k == 0]
        raise StageError(f"dense columns {empty} have no values in {[str(f) for f in files]}")
    mean = total / np.maximum(n, 1)
    std = np.sqrt(np.maximum(total_sq / np.maximum(n, 1) - mean**2, 0.0))
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


class DenseNormalizer(nn.Module):
    """(x - mean) / std with the training window's statistics kept as buffers; NaN -> 0."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num((x - self.mean) / self.std, nan=0.0)


# ---------------------------------------------------------------- backbones

def mlp(in_dim: int, dims: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for d in dims:
        layers += [nn.Linear(in_dim, d), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = d
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """Maps the shared input [B, in_dim] to one representation per task [B, out_dim]."""

    out_dim: int

    def shared_parameters(self) -> list[nn.Parameter]:
        """Dense parameters every task's loss reaches (empty when tasks share only embeddings)."""
        return []

    def penalty(self) -> torch.Tensor:
        """Extra loss term of the backbone (soft sharing's L2 pull); 0 otherwise."""
        return torch.zeros(())

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        raise NotImplementedError


class SingleTask(Backbone):
    """One separate network per task (the baseline); only the embeddings are shared."""

    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        dims = [*cfg.expert_dims, *cfg.tower_dims]
        self.nets = nn.ModuleDict({t: mlp(in_dim, dims, cfg.dropout) for t in TASKS})
        self.out_dim = dims[-1]

    def forward(self, x):
        return {t: net(x) for t, net in self.nets.items()}, None


class SoftSharing(Backbone):
    """One network per task; ``penalty`` pulls corresponding layers' weights together."""

    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        dims = [*cfg.expert_dims, *cfg.tower_dims]
        self.nets = nn.ModuleDict({t: mlp(in_dim, dims, cfg.dropout) for t in TASKS})
        self.out_dim = dims[-1]

    def penalty(self) -> torch.Tensor:
        a, b = (list(self.nets[t].parameters()) for t in TASKS)
        return sum(((p - q) ** 2).sum() for p, q in zip(a, b, strict=True))

    def forward(self, x):
        return {t: net(x) for t, net in self.nets.items()}, None


class SharedBottom(Backbone):
    """Hard sharing: one shared MLP, then a small tower per task."""

    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.bottom = mlp(in_dim, cfg.expert_dims, cfg.dropout)
        self.towers = nn.ModuleDict({t: mlp(cfg.expert_dims[-1], cfg.tower_dims, cfg.dropout) for t in TASKS})
        self.out_dim = cfg.tower_dims[-1] if cfg.tower_dims else cfg.expert_dims[-1]

    def shared_parameters(self):
        return list(self.bottom.parameters())

    def forward(self, x):
        h = self.bottom(x)
        return {t: tower(h) for t, tower in self.towers.items()}, None


class MMoE(Backbone):
    """Multi-gate mixture of experts (Ma et al. 2018): shared experts, a softmax gate per task."""

    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.experts = nn.ModuleList(mlp(in_dim, cfg.expert_dims, cfg.dropout) for _ in range(cfg.n_experts))
        self.gates = nn.ModuleDict({t: nn.Linear(in_dim, cfg.n_experts) for t in TASKS})
        self.towers = nn.ModuleDict({t: mlp(cfg.expert_dims[-1], cfg.tower_dims, cfg.dropout) for t in TASKS})
        self.out_dim = cfg.tower_dims[-1] if cfg.tower_dims else cfg.expert_dims[-1]

    def shared_parameters(self):
        return list(self.experts.parameters())

    def forward(self, x):
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        gates = {t: torch.softmax(g(x), dim=-1) for t, g in self.gates.items()}
        # both tasks' mixtures in one bmm ([B, T, E] x [B, E, H]): ~2x faster on CPU than einsum
        mixed = torch.bmm(torch.stack([gates[t] for t in TASKS], dim=1), experts)
        return {t: self.towers[t](mixed[:, i]) for i, t in enumerate(TASKS)}, gates


BACKBONES: dict[str, type[Backbone]] = {
    "single_task": SingleTask,
    "shared_bottom": SharedBottom,
    "soft_sharing": SoftSharing,
    "mmoe": MMoE,
}


# ---------------------------------------------------------------- the model

def embedding_configs(spec: FeaturesConfig) -> list[EmbeddingBagConfig]:
    """One table per sparse feature, named after it (torchrec keys = feature names)."""
    return [
        EmbeddingBagConfig(
            name=f.name,
            embedding_dim=f.dim,
            num_embeddings=f.num_embeddings,
            feature_names=[f.name],
            pooling=_POOLING[f.pooling],
        )
        for f in spec.sparse
    ]


class CrossNetwork(nn.Module):
    """DCN-v2 cross layers: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l.

    An MLP over concatenated embeddings learns multiplicative interactions (a user
    embedding's dot product with an item's) poorly; each cross layer adds explicit
    pairwise products of the input's coordinates. No layers: the identity."""

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class MultiTaskNet(nn.Module):
    def __init__(
        self,
        spec: FeaturesConfig,
        cfg: ModelConfig,
        dense_mean: np.ndarray,
        dense_std: np.ndarray,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.sparse_names = [f.name for f in spec.sparse]
        self.conversion_head = cfg.conversion_head
        self.ebc = EmbeddingBagCollection(tables=embedding_configs(spec), device=torch.device(device))
        self.normalizer = DenseNormalizer(dense_mean, dense_std)
        in_dim = sum(f.dim for f in spec.sparse) + len(dense_mean)
        self.cross = CrossNetwork(in_dim, cfg.cross_layers)
        self.backbone = BACKBONES[cfg.backbone](in_dim, cfg)
        self.heads = nn.ModuleDict({t: nn.Linear(self.backbone.out_dim, 1) for t in TASKS})

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> ModelOutput:
        pooled = self.ebc(sparse)
        # A sharded EBC may return its keys in another order: put them back in spec order.
        if pooled.keys() == self.sparse_names:
            emb = pooled.values()
        else:
            by_name = pooled.to_dict()
            emb = torch.cat([by_name[n] for n in self.sparse_names], dim=1)
        x = self.cross(torch.cat([emb, self.normalizer(dense)], dim=1))
        hidden, gates = self.backbone(x)
        click_logit = self.heads["click"](hidden["click"]).squeeze(-1)
        cvr_logit = self.heads["conversion"](hidden["conversion"]).squeeze(-1)
        p_click, p_cvr = torch.sigmoid(click_logit), torch.sigmoid(cvr_logit)
        return ModelOutput(click_logit, cvr_logit, p_click, p_cvr, p_click * p_cvr, x, gates)

