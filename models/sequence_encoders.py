"""Behaviour-sequence encoders: a user's history of items (``[[features.sequences]]``), each
element the carried features' embeddings side by side, becomes one vector of the same
size that joins the backbone input.

A ``History`` is flat: the elements of all rows one after the other (newest first within
a row), the row each belongs to, its age in days and, where the elements are padded, which
are real. Training hands over exactly the real elements (torchrec's jagged lookups), so an
encoder's cost follows the histories' total length, not rows x max_length; the ONNX graph
flattens its padded [B, L] inputs and marks the padding, which then counts for nothing.
So both give the same result for any padding, and an empty history encodes exactly like a
history of padding only: zeros.

Each encoder reads the history with the candidate [B, D] (the candidate item's same
features, from the same tables):

* ``mean``: the mean of the elements;
* ``din``: target attention of Zhou et al. (KDD 2018): an MLP over [h, c, h - c, h * c]
  weighs each element against the candidate; the weighted sum, no softmax (the sum keeps
  how much of the history matches);
* ``attention``: scaled dot-product attention of the candidate (query) over the elements
  plus an embedding of their age bucket (keys, values), ``attention_heads`` heads; the
  softmax runs per row (segment max, exp, segment sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from features.config import SequenceFeature
from models.config import ModelConfig

# Age buckets of the attention encoder: bucket k holds ages >= AGE_BOUNDARIES[k - 1] (days).
# Roughly logarithmic: a day's difference matters for recent events only.
AGE_BOUNDARIES = (1, 2, 3, 4, 6, 8, 11, 15, 21, 29, 41, 57, 80, 112, 157, 220)


@dataclass
class History:
    elements: torch.Tensor  # float [T, D]: every row's elements, row after row, newest first
    rows: torch.Tensor  # int64 [T]: the row (0 .. B - 1) of each element
    ages: torch.Tensor  # int64 [T]: days
    real: torch.Tensor | None = None  # bool [T]: False at padding; None: every element is real

    def weight(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` [T, ...] with padding elements zeroed."""
        if self.real is None:
            return values
        return values * self.real.view(-1, *[1] * (values.dim() - 1)).to(values.dtype)

    def per_row_sum(self, values: torch.Tensor, rows: int) -> torch.Tensor:
        """Sum of ``values`` [T, ...] over each row's real elements -> [rows, ...]."""
        weighted = self.weight(values)
        return weighted.new_zeros(rows, *values.shape[1:]).index_add(0, self.rows, weighted)

    def counts(self, rows: int) -> torch.Tensor:
        """Real elements per row, float [rows, 1]."""
        # ones_like, not new_ones(len(...)): the ONNX export keeps the element count symbolic
        return self.per_row_sum(torch.ones_like(self.rows, dtype=self.elements.dtype).unsqueeze(-1), rows)


class MeanEncoder(nn.Module):
    def forward(self, history: History, candidate: torch.Tensor) -> torch.Tensor:
        b = candidate.shape[0]
        return history.per_row_sum(history.elements, b) / history.counts(b).clamp(min=1.0)


class DinEncoder(nn.Module):
    """The first layer of the weighing MLP over [h, c, h - c, h * c] is written as
    W_h h + W_p (h * c) + W_c c: the same functions (h - c is a combination of h and c), with
    the candidate's part computed once per row instead of once per element and no
    concatenated copy of the elements, which dominate the cost. ReLU, not the paper's
    PReLU / Dice: PReLU's CPU backward alone cost as much as the rest of the encoder."""

    def __init__(self, dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.element = nn.Linear(dim, hidden[0])
        self.product = nn.Linear(dim, hidden[0], bias=False)
        self.candidate = nn.Linear(dim, hidden[0], bias=False)
        layers: list[nn.Module] = [nn.ReLU()]
        for size, h in zip(hidden, hidden[1:], strict=False):
            layers += [nn.Linear(size, h), nn.ReLU()]
        self.weigh = nn.Sequential(*layers, nn.Linear(hidden[-1], 1))

    def forward(self, history: History, candidate: torch.Tensor) -> torch.Tensor:
        h, rows = history.elements, history.rows
        first = (
            self.element(h)
            + self.product(h * candidate.index_select(0, rows))
            + self.candidate(candidate).index_select(0, rows)
        )
        return history.per_row_sum(self.weigh(first) * h, candidate.shape[0])


class AttentionEncoder(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.age = nn.Embedding(len(AGE_BOUNDARIES) + 1, dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.register_buffer("age_boundaries", torch.tensor(AGE_BOUNDARIES, dtype=torch.int64), persistent=False)

    def forward(self, history: History, candidate: torch.Tensor) -> torch.Tensor:
        b, dim = candidate.shape
        heads = self.heads
        # a comparison sum instead of bucketize: the same buckets, and it exports to ONNX
        buckets = (history.ages.unsqueeze(-1) >= self.age_boundaries).sum(-1)
        x = history.elements + self.age(buckets)
        q = self.query(candidate).view(b, heads, -1).index_select(0, history.rows)  # [T, H, d]
        k = self.key(x).unflatten(-1, (heads, -1))
        v = self.value(x).unflatten(-1, (heads, -1))
        scores = (q * k).sum(-1) / (dim // heads) ** 0.5  # [T, H]
        if history.real is not None:
            # a large negative, not -inf: a row of padding only must not give NaN
            scores = scores.masked_fill(~history.real.unsqueeze(-1), -1e9)
        # softmax within each row: subtract the row's max (per head), exp, divide by the row's sum
        row_index = history.rows.unsqueeze(-1).expand(-1, heads)
        row_max = scores.new_full((b, heads), -1e9).scatter_reduce(0, row_index, scores, "amax", include_self=True)
        exp = history.weight(torch.exp(scores - row_max.index_select(0, history.rows)))
        total = exp.new_zeros(b, heads).index_add(0, history.rows, exp)
        weights = exp / total.index_select(0, history.rows).clamp(min=1e-30)
        mixed = history.per_row_sum(weights.unsqueeze(-1) * v, b).reshape(b, dim)
        has_history = (history.counts(b) > 0).to(mixed.dtype)
        return self.out(mixed) * has_history


def sequence_encoder(sequence: SequenceFeature, dim: int, cfg: ModelConfig) -> nn.Module:
    """The encoder ``sequence.encoder`` names, for elements of ``dim``."""
    if sequence.encoder == "mean":
        return MeanEncoder()
    if sequence.encoder == "din":
        return DinEncoder(dim, cfg.sequence_attention_dims)
    return AttentionEncoder(dim, sequence.attention_heads)
