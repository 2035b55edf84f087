"""The PLE backbone (progressive layered extraction): shapes, gates, which losses reach
which experts, and that the whole multi-task network learns two tasks with it."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

from features.config import TaskConfig
from models.config import ModelConfig
from models.nets import BACKBONES, PLE, CGCLayer, MultiTaskNet
from pipeline.config import parse_config

B, IN_DIM = 32, 6
TASK_EXPERTS, SHARED_EXPERTS = 2, 3

SPEC = parse_config(
    {
        "features": {
            "sparse": [{"name": "item", "table": "impressions", "column": "item", "dim": 4, "capacity": 20}],
            "numeric": [{"name": f"x{i}", "table": "impressions", "column": f"x{i}"} for i in range(4)],
        }
    }
).features
TASKS = [TaskConfig(name="a"), TaskConfig(name="b")]


def ple_config(levels: int, **kwargs) -> ModelConfig:
    return ModelConfig(
        backbone="ple",
        expert_dims=[16, 8],
        tower_dims=[4],
        ple_levels=levels,
        ple_task_experts=TASK_EXPERTS,
        ple_shared_experts=SHARED_EXPERTS,
        **kwargs,
    )


def make_backbone(n_tasks: int, levels: int) -> tuple[PLE, list[str], torch.Tensor]:
    torch.manual_seed(0)
    tasks = [f"t{i}" for i in range(n_tasks)]
    return PLE(IN_DIM, ple_config(levels), tasks), tasks, torch.randn(B, IN_DIM)


def grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def reached(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


def one_kjt(ids: torch.Tensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=["item"], values=ids, lengths=torch.ones(len(ids), dtype=torch.long))


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("n_tasks", [2, 3])
def test_shapes_and_gates_are_softmax_rows_over_own_then_shared_experts(n_tasks: int, levels: int) -> None:
    backbone, tasks, x = make_backbone(n_tasks, levels)
    hidden, gates = backbone(x)
    assert BACKBONES["ple"] is PLE and backbone.out_dim == 4
    assert list(hidden) == tasks and list(gates) == tasks
    for t in tasks:
        assert hidden[t].shape == (B, backbone.out_dim) and torch.isfinite(hidden[t]).all()
        assert gates[t].shape == (B, TASK_EXPERTS + SHARED_EXPERTS)
        assert (gates[t] >= 0).all()
        torch.testing.assert_close(gates[t].sum(-1), torch.ones(B))
    assert not torch.allclose(gates[tasks[0]], gates[tasks[1]])  # a gate per task
    # a shared gate in every level but the last
    assert [level.shared_gate is not None for level in backbone.levels] == [True] * (levels - 1) + [False]


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("n_tasks", [2, 3])
def test_shared_parameters_reach_every_task_and_own_experts_only_their_task(n_tasks: int, levels: int) -> None:
    backbone, tasks, x = make_backbone(n_tasks, levels)
    hidden, _ = backbone(x)
    losses = {t: (hidden[t] ** 2).sum() for t in tasks}
    shared = backbone.shared_parameters()
    # shared experts of every level (2 linear layers each) + the shared gates of non-final levels
    assert len(shared) == levels * SHARED_EXPERTS * 4 + (levels - 1) * 2
    last = backbone.levels[-1]
    for t, loss in losses.items():
        assert all(reached(g) for g in grads(loss, shared)), t
        for i, other in enumerate(tasks):
            own = list(last.task_experts[i].parameters())
            if other == t:
                assert all(reached(g) for g in grads(loss, own))
            else:  # another task's final experts: no gradient at all
                assert not any(reached(g) for g in grads(loss, own)), (t, other)
            if levels > 1:  # lower levels' task experts feed the shared gate, so every loss reaches them
                assert any(reached(g) for g in grads(loss, list(backbone.levels[0].task_experts[i].parameters())))


def test_cgc_layer_matches_the_per_task_mixture() -> None:
    torch.manual_seed(0)
    layer = CGCLayer(IN_DIM, ple_config(2), n_tasks=3, shared_gate=True)
    task_inputs, shared_input = [torch.randn(B, IN_DIM) for _ in range(3)], torch.randn(B, IN_DIM)
    mixed, shared_next, gates = layer(task_inputs, shared_input)
    shared_out = [e(shared_input) for e in layer.shared_experts]
    own_out = [[e(x) for e in experts] for experts, x in zip(layer.task_experts, task_inputs, strict=True)]
    for t, x in enumerate(task_inputs):
        w = torch.softmax(layer.task_gates[t](x), -1)  # own experts first, then the shared ones
        expected = sum(w[:, [k]] * out for k, out in enumerate(own_out[t] + shared_out))
        torch.testing.assert_close(gates[:, t], w)
        torch.testing.assert_close(mixed[:, t], expected)
    w = torch.softmax(layer.shared_gate(shared_input), -1)  # every task's experts in task order, then the shared
    everything = [out for outs in own_out for out in outs] + shared_out
    torch.testing.assert_close(shared_next, sum(w[:, [k]] * out for k, out in enumerate(everything)))


def test_multitask_net_with_ple_forward_backward() -> None:
    torch.manual_seed(0)
    model = MultiTaskNet(SPEC, ple_config(2), TASKS, np.zeros(4, np.float32), np.ones(4, np.float32))
    out = model(torch.randn(B, 4), one_kjt(torch.randint(0, 20, (B,))))
    assert set(out.logits) == {"a", "b"} and set(out.probs) == {"a", "b"}
    assert all(v.shape == (B,) and torch.isfinite(v).all() for v in out.logits.values())
    assert set(out.gates) == {"a", "b"} and out.gates["a"].shape == (B, TASK_EXPERTS + SHARED_EXPERTS)
    loss = sum(F.binary_cross_entropy(p, torch.ones(B)) for p in out.probs.values())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_multitask_net_with_ple_learns_two_different_tasks() -> None:
    g = torch.Generator().manual_seed(1)
    n = 256
    dense = torch.randn(n, 4, generator=g)
    ids = torch.randint(0, 20, (n,), generator=g)
    # two tasks that need different directions of the input
    labels = {
        "a": (dense @ torch.tensor([2.0, -1.0, 0.0, 0.5]) > 0).float(),
        "b": (dense @ torch.tensor([0.0, 1.0, 2.0, -1.0]) > 0).float(),
    }
    torch.manual_seed(0)
    model = MultiTaskNet(SPEC, ple_config(2), TASKS, np.zeros(4, np.float32), np.ones(4, np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    kjt = one_kjt(ids)

    def task_losses() -> dict[str, torch.Tensor]:
        logits = model(dense, kjt).logits
        return {t: F.binary_cross_entropy_with_logits(logits[t], y) for t, y in labels.items()}

    with torch.no_grad():
        before = {t: v.item() for t, v in task_losses().items()}
    for _ in range(200):
        opt.zero_grad()
        sum(task_losses().values()).backward()
        opt.step()
    with torch.no_grad():
        after = {t: v.item() for t, v in task_losses().items()}
    for t in labels:
        assert after[t] < 0.5 * before[t], (t, before, after)


def test_ple_config_fields_are_validated() -> None:
    cfg = ModelConfig(backbone="ple")
    assert (cfg.ple_levels, cfg.ple_shared_experts, cfg.ple_task_experts) == (2, 2, 1)
    for key in ("ple_levels", "ple_shared_experts", "ple_task_experts"):
        with pytest.raises(pydantic.ValidationError, match=key):
            ModelConfig(backbone="ple", **{key: 0})
