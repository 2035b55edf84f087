"""The multi-task ranking network: one torchrec EmbeddingBagCollection shared by all
tasks, a backbone (single-task / shared-bottom / soft-sharing / MMoE), and one head per
task of ``cfg.tasks`` (by default click, and conversion as a funnel step after it).

Input: dense features [B, n_dense] (normalised inside the model, so export and serving
get the training statistics with the weights) and a KeyedJaggedTensor with one key per
sparse feature, in spec order. Output: a ``ModelOutput`` with each task's logit, the
served probability of every task view (``features.config.task_views``): corrected for
negative down-sampling and calibrated (``models.calibration``), and each value task's
served E[value | after].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)

from features.config import FeaturesConfig, SequenceFeature, TaskConfig
from features.errors import StageError
from models.calibration import ServedProbabilities
from models.config import ModelConfig, sequence_element_dim
from models.interaction import DotInteraction, interaction_pairs
from models.sequence_encoders import History, sequence_encoder
from serving.spec import sequence_age_column, sequence_column

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
# state_dict prefixes of the embedding tables (torchrec's, with the fused sparse optimiser)
EMBEDDING_PREFIXES = ("ebc.", "ec.")
# state_dict prefix of the sampling correction and calibrators: set by each run, not learned
SERVED_PREFIX = "served."


@dataclass
class ModelOutput:
    # task -> [B] its head's logit (a funnel step's: of P(task | after)), as trained: on sampled
    # rows, before the sampling correction and the calibrator; what the losses read. A value
    # task's: its head's output (log1p(value) or log E[value], by its value_loss)
    logits: dict[str, torch.Tensor]
    # task view -> [B] served probability (corrected, calibrated), e.g. click, cvr, ctcvr = click x cvr
    probs: dict[str, torch.Tensor]
    features: torch.Tensor  # [B, in_dim] pooled embeddings + normalised dense (backbone input)
    gates: dict[str, torch.Tensor] | None = None  # mmoe, ple: task -> [B, experts] softmax weights
    # value task -> [B] served E[value | after] (models.calibration.expected_value); {} without value tasks
    values: dict[str, torch.Tensor] = field(default_factory=dict)


class TaskHeads(nn.ModuleDict):
    """One linear head per task (keyed by its name) on its backbone output: the task's logit
    (a funnel step's: of P(task | after)). What is served from them is
    ``models.calibration.ServedProbabilities``."""

    def __init__(self, in_dim: int, tasks: Sequence[TaskConfig]) -> None:
        super().__init__({t.name: nn.Linear(in_dim, 1) for t in tasks})
        self.tasks = list(tasks)

    def forward(self, hidden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # float32 logits: under bf16 autocast (CUDA) the probabilities and losses stay float32
        return {t.name: self[t.name](hidden[t.name]).squeeze(-1).float() for t in self.tasks}

    @torch.no_grad()
    def start_values(self, bases: dict[str, float]) -> None:
        """Start each value task's head at its base (``value_bases``): bias = base, so its
        first output is the training rows' mean in the head's space, not 0 (log1p values of
        a few hundred are ~5: many steps of the dense optimiser away)."""
        for name, base in bases.items():
            self[name].bias.fill_(base)


def value_bases(files: Sequence[Path], tasks: Sequence[TaskConfig]) -> dict[str, float]:
    """Per value task, the mean of its target over ``files``' rows where its ``after``
    label is 1, in its head's space: mean log1p(value) (log_mse), log mean value (tweedie);
    0 without such rows."""
    labels = {t.name: t.label_column for t in tasks}
    bases = {}
    for t in tasks:
        if not t.is_value:
            continue
        values = []
        for f in files:
            table = pq.read_table(f, columns=[t.label_column, labels[t.after]])
            after = table.column(1).to_numpy(zero_copy_only=False) > 0
            values.append(table.column(0).to_numpy(zero_copy_only=False).astype(np.float64)[after])
        v = np.concatenate(values) if values else np.zeros(0)
        v = v[np.isfinite(v) & (v >= 0)]
        if not len(v):
            bases[t.name] = 0.0
        elif t.value_loss == "tweedie":
            bases[t.name] = float(np.log(max(v.mean(), 1e-6)))
        else:
            bases[t.name] = float(np.log1p(v).mean())
    return bases


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
        empty = [c for c, k in zip(names, n, strict=True) if k == 0]
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


def last_linear(net: nn.Sequential) -> nn.Parameter:
    """The weight of an ``mlp``'s last Linear."""
    return [m for m in net if isinstance(m, nn.Linear)][-1].weight


def task_towers(cfg: ModelConfig, tasks: Sequence[str]) -> tuple[nn.ModuleDict, int]:
    """One tower per task on a shared representation of the experts' (or bottom's) last
    size, and the size it outputs (that size itself without tower layers)."""
    towers = nn.ModuleDict({t: mlp(cfg.expert_dims[-1], cfg.tower_dims, cfg.dropout) for t in tasks})
    return towers, cfg.tower_dims[-1] if cfg.tower_dims else cfg.expert_dims[-1]


class Backbone(nn.Module):
    """Maps the shared input [B, in_dim] to one representation per task [B, out_dim].
    Constructed as ``Backbone(in_dim, cfg, tasks)`` with the task names."""

    out_dim: int

    def shared_parameters(self) -> list[nn.Parameter]:
        """Dense parameters every task's loss reaches (empty when tasks share only embeddings)."""
        return []

    def last_shared_layer(self) -> list[nn.Parameter]:
        """The weights of the last dense layer every task's loss reaches (GradNorm's W);
        empty when tasks share only embeddings."""
        return []

    def penalty(self) -> torch.Tensor:
        """Extra loss term of the backbone (soft sharing's L2 pull); 0 otherwise."""
        return torch.zeros(())

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        raise NotImplementedError


class SingleTask(Backbone):
    """One separate network per task (the baseline); only the embeddings are shared."""

    def __init__(self, in_dim: int, cfg: ModelConfig, tasks: Sequence[str]) -> None:
        super().__init__()
        dims = [*cfg.expert_dims, *cfg.tower_dims]
        self.nets = nn.ModuleDict({t: mlp(in_dim, dims, cfg.dropout) for t in tasks})
        self.out_dim = dims[-1]

    def forward(self, x):
        return {t: net(x) for t, net in self.nets.items()}, None


class SoftSharing(SingleTask):
    """One network per task; ``penalty`` pulls corresponding layers' weights together
    (the squared distance summed over every pair of tasks)."""

    def penalty(self) -> torch.Tensor:
        nets = [list(net.parameters()) for net in self.nets.values()]
        return sum(
            ((p - q) ** 2).sum() for i, a in enumerate(nets) for b in nets[i + 1 :] for p, q in zip(a, b, strict=True)
        )


class SharedBottom(Backbone):
    """Hard sharing: one shared MLP, then a small tower per task."""

    def __init__(self, in_dim: int, cfg: ModelConfig, tasks: Sequence[str]) -> None:
        super().__init__()
        self.bottom = mlp(in_dim, cfg.expert_dims, cfg.dropout)
        self.towers, self.out_dim = task_towers(cfg, tasks)

    def shared_parameters(self):
        return list(self.bottom.parameters())

    def last_shared_layer(self):
        return [last_linear(self.bottom)]

    def forward(self, x):
        h = self.bottom(x)
        return {t: tower(h) for t, tower in self.towers.items()}, None


class MMoE(Backbone):
    """Multi-gate mixture of experts (Ma et al. 2018): shared experts, a softmax gate per task."""

    def __init__(self, in_dim: int, cfg: ModelConfig, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.experts = nn.ModuleList(mlp(in_dim, cfg.expert_dims, cfg.dropout) for _ in range(cfg.n_experts))
        self.gates = nn.ModuleDict({t: nn.Linear(in_dim, cfg.n_experts) for t in tasks})
        self.towers, self.out_dim = task_towers(cfg, tasks)

    def shared_parameters(self):
        return list(self.experts.parameters())

    def last_shared_layer(self):
        return [last_linear(e) for e in self.experts]

    def forward(self, x):
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        gates = {t: torch.softmax(g(x), dim=-1) for t, g in self.gates.items()}
        # all tasks' mixtures in one bmm ([B, T, E] x [B, E, H]): ~2x faster on CPU than einsum
        mixed = torch.bmm(torch.stack([gates[t] for t in self.tasks], dim=1), experts)
        return {t: self.towers[t](mixed[:, i]) for i, t in enumerate(self.tasks)}, gates


class CGCLayer(nn.Module):
    """One PLE extraction level (customised gate control): per task ``ple_task_experts``
    experts on the task's input, ``ple_shared_experts`` experts on the shared input, a
    softmax gate per task over [its own experts, then the shared experts], and (all levels
    but the last) a shared gate over [task 0's experts, task 1's, ..., the shared experts]
    whose mixture is the next level's shared input."""

    def __init__(self, in_dim: int, cfg: ModelConfig, n_tasks: int, shared_gate: bool) -> None:
        super().__init__()
        n_own, n_shared = cfg.ple_task_experts, cfg.ple_shared_experts
        self.task_experts = nn.ModuleList(
            nn.ModuleList(mlp(in_dim, cfg.expert_dims, cfg.dropout) for _ in range(n_own)) for _ in range(n_tasks)
        )
        self.shared_experts = nn.ModuleList(mlp(in_dim, cfg.expert_dims, cfg.dropout) for _ in range(n_shared))
        self.task_gates = nn.ModuleList(nn.Linear(in_dim, n_own + n_shared) for _ in range(n_tasks))
        self.shared_gate = nn.Linear(in_dim, n_tasks * n_own + n_shared) if shared_gate else None

    def forward(
        self, task_inputs: Sequence[torch.Tensor], shared_input: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """-> (task outputs [B, T, H], next shared input [B, H] or None, task gates [B, T, E_own + E_shared])."""
        own = torch.stack(
            [
                torch.stack([e(x) for e in experts], dim=1)
                for experts, x in zip(self.task_experts, task_inputs, strict=True)
            ],
            dim=1,
        )  # [B, T, E_own, H]
        shared = torch.stack([e(shared_input) for e in self.shared_experts], dim=1)  # [B, E_shared, H]
        b, n_tasks, n_own, h = own.shape
        gates = torch.stack(
            [torch.softmax(g(x), dim=-1) for g, x in zip(self.task_gates, task_inputs, strict=True)], dim=1
        )
        # every task's mixture in one bmm: row (b, t) mixes task t's experts and the shared ones
        pools = torch.cat([own, shared.unsqueeze(1).expand(-1, n_tasks, -1, -1)], dim=2)  # [B, T, E, H]
        mixed = torch.bmm(gates.reshape(b * n_tasks, 1, -1), pools.reshape(b * n_tasks, -1, h)).view(b, n_tasks, h)
        if self.shared_gate is None:
            return mixed, None, gates
        everything = torch.cat([own.reshape(b, n_tasks * n_own, h), shared], dim=1)  # [B, T * E_own + E_shared, H]
        weights = torch.softmax(self.shared_gate(shared_input), dim=-1)
        return mixed, torch.bmm(weights.unsqueeze(1), everything).squeeze(1), gates


class PLE(Backbone):
    """Progressive layered extraction (Tang et al. 2020): ``ple_levels`` CGC levels, then a
    tower per task. Level 1 reads x everywhere; a later level's task experts read their
    task's previous output and its shared experts the previous shared-gate mixture.

    ``gates`` are the last level's task gates, [B, ple_task_experts + ple_shared_experts]:
    indices 0 .. ple_task_experts - 1 are the task's own experts, the rest the shared ones."""

    def __init__(self, in_dim: int, cfg: ModelConfig, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.levels = nn.ModuleList(
            CGCLayer(
                in_dim if i == 0 else cfg.expert_dims[-1], cfg, len(self.tasks), shared_gate=i < cfg.ple_levels - 1
            )
            for i in range(cfg.ple_levels)
        )
        self.towers, self.out_dim = task_towers(cfg, tasks)

    def shared_parameters(self):
        # Non-final levels' task experts also feed the shared gate and so reach every task's
        # loss; listed are only the parts shared by construction.
        shared: list[nn.Parameter] = []
        for level in self.levels:
            shared += level.shared_experts.parameters()
            if level.shared_gate is not None:
                shared += level.shared_gate.parameters()
        return shared

    def last_shared_layer(self):
        return [last_linear(e) for e in self.levels[-1].shared_experts]

    def forward(self, x):
        task_inputs, shared = [x] * len(self.tasks), x
        for level in self.levels:
            mixed, shared, gates = level(task_inputs, shared)
            task_inputs = mixed.unbind(1)
        hidden = {t: self.towers[t](mixed[:, i]) for i, t in enumerate(self.tasks)}
        return hidden, {t: gates[:, i] for i, t in enumerate(self.tasks)}


BACKBONES: dict[str, type[Backbone]] = {
    "single_task": SingleTask,
    "shared_bottom": SharedBottom,
    "soft_sharing": SoftSharing,
    "mmoe": MMoE,
    "ple": PLE,
}


# ---------------------------------------------------------------- the model


def carried_features(spec: FeaturesConfig) -> list[str]:
    """The sparse features some behaviour sequence carries (spec order): their tables serve
    the candidate and the history elements alike, so they live in EmbeddingCollections."""
    carried = {name for seq in spec.sequences for name in seq.items}
    return [f.name for f in spec.sparse if f.name in carried]


def embedding_configs(spec: FeaturesConfig) -> list[EmbeddingBagConfig]:
    """One pooled table per sparse feature no sequence carries, named after it (torchrec
    keys = feature names)."""
    carried = set(carried_features(spec))
    return [
        EmbeddingBagConfig(
            name=f.name,
            embedding_dim=f.dim,
            num_embeddings=f.num_embeddings,
            feature_names=[f.name],
            pooling=_POOLING[f.pooling],
        )
        for f in spec.sparse
        if f.name not in carried
    ]


def sequence_embedding_configs(spec: FeaturesConfig) -> dict[int, list[EmbeddingConfig]]:
    """Per embedding dim (an EmbeddingCollection holds tables of one dim), the tables of the
    carried features: each is looked up by the candidate's feature and by every sequence
    column of it, so a history item and the candidate share one embedding row."""
    by_dim: dict[int, list[EmbeddingConfig]] = {}
    carried = set(carried_features(spec))
    for f in spec.sparse:
        if f.name in carried:
            columns = [sequence_column(seq.name, f.name) for seq in spec.sequences if f.name in seq.items]
            by_dim.setdefault(f.dim, []).append(
                EmbeddingConfig(
                    name=f.name, embedding_dim=f.dim, num_embeddings=f.num_embeddings, feature_names=[f.name, *columns]
                )
            )
    return by_dim


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
    """Sparse features -> torchrec tables (pooled; carried by a sequence: per element);
    sequences -> their encoders; optional dot interactions; dense -> normaliser; then
    cross layers, the backbone and the task heads (``forward_from_embeddings``)."""

    def __init__(
        self,
        spec: FeaturesConfig,
        cfg: ModelConfig,
        tasks: Sequence[TaskConfig],
        dense_mean: np.ndarray,
        dense_std: np.ndarray,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.sparse_names = [f.name for f in spec.sparse]
        self.sequences: list[SequenceFeature] = list(spec.sequences)
        pooled = embedding_configs(spec)
        self.ebc = EmbeddingBagCollection(tables=pooled, device=device) if pooled else None
        self.ec = nn.ModuleDict(
            {
                f"dim{dim}": EmbeddingCollection(tables=tables, device=device)
                for dim, tables in sequence_embedding_configs(spec).items()
            }
        )
        element_dims = {seq.name: sequence_element_dim(spec, seq) for seq in self.sequences}
        self.sequence_encoders = nn.ModuleDict(
            {seq.name: sequence_encoder(seq, element_dims[seq.name], cfg) for seq in self.sequences}
        )
        self.normalizer = DenseNormalizer(dense_mean, dense_std)
        member_dims = {f.name: f.dim for f in spec.sparse} | element_dims
        self.interaction = None
        if cfg.interaction == "dot":
            members = list(
                dict.fromkeys(n for pair in interaction_pairs(list(member_dims), cfg.interaction_groups) for n in pair)
            )
            self.interaction = DotInteraction({n: member_dims[n] for n in members}, cfg)
        in_dim = (
            sum(member_dims.values())
            + (self.interaction.out_dim if self.interaction is not None else 0)
            + len(dense_mean)
        )
        self.cross = CrossNetwork(in_dim, cfg.cross_layers)
        self.backbone = BACKBONES[cfg.backbone](in_dim, cfg, [t.name for t in tasks])
        self.heads = TaskHeads(self.backbone.out_dim, tasks)
        self.served = ServedProbabilities(tasks, cfg.calibration, cfg.calibration_segments)

    def tables(self) -> dict[str, torch.Tensor]:
        """Sparse feature name -> its embedding table's weight (pooled or per element)."""
        weights = {n: bag.weight for n, bag in self.ebc.embedding_bags.items()} if self.ebc is not None else {}
        for collection in self.ec.values():
            weights.update({n: table.weight for n, table in collection.embeddings.items()})
        return {n: weights[n] for n in self.sparse_names}

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> ModelOutput:
        # KeyedTensor.to_dict: by name, so a sharded EBC's own key order does not matter
        by_name = self.ebc(sparse).to_dict() if self.ebc is not None else {}
        looked_up = {}  # key -> JaggedTensor of per-id embeddings
        for collection in self.ec.values():
            looked_up.update(collection(sparse))
        for name in self.sparse_names:
            if name not in by_name:  # a carried feature: one id per row, so its values are [B, dim]
                by_name[name] = looked_up[name].values()
        histories = [self._history(seq, looked_up, sparse) for seq in self.sequences]
        return self.forward_from_embeddings(dense, [by_name[n] for n in self.sparse_names], histories)

    @staticmethod
    def _history(seq: SequenceFeature, looked_up: dict, sparse: KeyedJaggedTensor) -> History:
        """One sequence's real elements (jagged: no padding), their rows and ages."""
        columns = [looked_up[sequence_column(seq.name, f)] for f in seq.items]
        lengths = columns[0].lengths()
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        elements = torch.cat([c.values() for c in columns], dim=-1)
        return History(elements, rows, sparse[sequence_age_column(seq.name)].values())

    def forward_from_embeddings(
        self, dense: torch.Tensor, embeddings: Sequence[torch.Tensor], histories: Sequence[History] = ()
    ) -> ModelOutput:
        """Everything after the embedding lookup: raw dense [B, n_dense], the pooled
        embeddings in spec order ([B, dim] per feature) and each sequence's history ->
        encode the sequences, interact, normalise, cross, backbone, task heads, served
        probabilities (sampling correction, calibrators, funnel product). The exported
        ONNX graph (models.export.OnnxRanker) looks up its own plain tables and runs this
        same step."""
        members = dict(zip(self.sparse_names, embeddings, strict=True))
        for seq, history in zip(self.sequences, histories, strict=True):
            candidate = torch.cat([members[f] for f in seq.items], dim=1)
            members[seq.name] = self.sequence_encoders[seq.name](history, candidate)
        parts = list(members.values())
        if self.interaction is not None:
            parts.append(self.interaction([members[n] for n in self.interaction.members]))
        x = self.cross(torch.cat([*parts, self.normalizer(dense)], dim=1))
        hidden, gates = self.backbone(x)
        logits = self.heads(hidden)
        return ModelOutput(logits, self.served(logits), x, gates, self.served.expected_values(logits))
