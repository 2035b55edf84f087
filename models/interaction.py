"""Explicit pairwise interactions (``model.interaction = "dot"``), DLRM's interaction arch:
the dot products of pairs of pooled embeddings (and sequence encodings) join the backbone
input. An MLP over concatenated embeddings learns a user x item dot product poorly
(Rendle et al., RecSys 2020); here it gets it as an input.

Which pairs: ``model.interaction_groups`` empty: every pair of all members; one group: the
pairs within it; two or more: every pair across two groups (user side x item side).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
from torch import nn

from models.config import ModelConfig


def interaction_pairs(members: Sequence[str], groups: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """The (a, b) member pairs whose dot products are taken, in a fixed order."""
    if not groups:
        return list(combinations(members, 2))
    if len(groups) == 1:
        return list(combinations(groups[0], 2))
    return [(a, b) for g, h in combinations(groups, 2) for a in g for b in h if a != b]


class DotInteraction(nn.Module):
    """[B, dim] per member (in ``dims`` order) -> [B, pairs] dot products. With
    ``model.interaction_dim`` each member is first projected to that size (linear, no bias:
    the product stays a bilinear form of the two embeddings)."""

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__()
        names = list(dims)
        self.members = names
        pairs = interaction_pairs(names, cfg.interaction_groups)
        self.out_dim = len(pairs)
        size = cfg.interaction_dim
        self.project = nn.ModuleList(nn.Linear(dims[n], size, bias=False) if size else nn.Identity() for n in names)
        index = {n: i for i, n in enumerate(names)}
        self.register_buffer("left", torch.tensor([index[a] for a, _ in pairs], dtype=torch.int64), persistent=False)
        self.register_buffer("right", torch.tensor([index[b] for _, b in pairs], dtype=torch.int64), persistent=False)

    def forward(self, members: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([p(m) for p, m in zip(self.project, members, strict=True)], dim=1)  # [B, M, d]
        return (stacked.index_select(1, self.left) * stacked.index_select(1, self.right)).sum(-1)
