"""The multi-task network and its losses: shapes, gradients of every loss term, gates."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import KeyedJaggedTensor

from features.config import TaskConfig
from models.balancing import LossWeighting, training_loss
from models.config import ModelConfig
from models.losses import task_losses
from models.nets import BACKBONES, MultiTaskNet, dense_stats
from pipeline.config import parse_config

SPEC = parse_config(
    {
        "features": {
            "sparse": [
                {"name": "a", "table": "impressions", "column": "a", "dim": 4, "capacity": 50},
                {"name": "b", "table": "items", "column": "b", "dim": 8, "capacity": 20},
                {
                    "name": "tags",
                    "table": "users",
                    "column": "tags",
                    "kind": "list",
                    "dim": 4,
                    "capacity": 30,
                    "pooling": "mean",
                },
            ],
            "numeric": [
                {"name": "x1", "table": "impressions", "column": "x1"},
                {"name": "x2", "table": "items", "column": "x2"},
            ],
        }
    }
).features
B = 32
TASKS = parse_config(
    {"features": {"sparse": [{"name": "a", "table": "impressions", "column": "a"}]}}
).tasks  # click, conversion


def labels(click: torch.Tensor, conversion: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"click": click, "conversion": conversion}


def make_batch(seed: int = 0) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tag_lengths = torch.randint(0, 4, (B,), generator=g)
    values = torch.cat(
        [
            torch.randint(0, 50, (B,), generator=g),
            torch.randint(0, 20, (B,), generator=g),
            torch.randint(1, 30, (int(tag_lengths.sum()),), generator=g),
        ]
    )
    lengths = torch.cat([torch.ones(2 * B, dtype=torch.long), tag_lengths])
    kjt = KeyedJaggedTensor(keys=["a", "b", "tags"], values=values, lengths=lengths)
    dense = torch.randn(B, 2, generator=g) * 3 + 1
    click = (torch.rand(B, generator=g) < 0.5).float()
    conversion = click * (torch.rand(B, generator=g) < 0.5).float()
    return dense, kjt, click, conversion


def make_model(**model_kwargs) -> MultiTaskNet:
    torch.manual_seed(0)
    cfg = ModelConfig(expert_dims=[16, 8], tower_dims=[4], n_experts=3, **model_kwargs)
    return MultiTaskNet(SPEC, cfg, TASKS, np.array([1.0, 1.0], np.float32), np.array([3.0, 3.0], np.float32))


@pytest.mark.parametrize("head", ["direct", "esmm"])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_forward_shapes_every_backbone_and_head(backbone: str, head: str) -> None:
    model = make_model(backbone=backbone, conversion_head=head)
    dense, kjt, click, conversion = make_batch()
    out = model(dense, kjt)
    assert set(out.logits) == {"click", "conversion"} and set(out.probs) == {"click", "cvr", "ctcvr"}
    for t in (*out.logits.values(), *out.probs.values()):
        assert t.shape == (B,)
        assert torch.isfinite(t).all()
    assert ((out.probs["click"] > 0) & (out.probs["click"] < 1)).all()
    torch.testing.assert_close(out.probs["cvr"], torch.sigmoid(out.logits["conversion"]))
    torch.testing.assert_close(out.probs["ctcvr"], out.probs["click"] * out.probs["cvr"])
    assert out.features.shape == (B, 4 + 8 + 4 + 2)
    assert (out.gates is not None) == (backbone in ("mmoe", "ple"))
    losses = task_losses(out, labels(click, conversion), TASKS, head)
    assert set(losses) == {"click", "conversion"} and all(torch.isfinite(v) for v in losses.values())


def test_mmoe_gates_are_distributions_per_task() -> None:
    model = make_model(backbone="mmoe")
    out = model(*make_batch()[:2])
    assert set(out.gates) == {"click", "conversion"}
    for w in out.gates.values():
        assert w.shape == (B, 3)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(B))
    # the two gates are different functions of the input
    assert not torch.allclose(out.gates["click"], out.gates["conversion"])


def test_esmm_both_loss_terms_have_gradients() -> None:
    model = make_model(backbone="shared_bottom", conversion_head="esmm")
    dense, kjt, click, conversion = make_batch()
    out = model(dense, kjt)
    losses = task_losses(out, labels(click, conversion), TASKS, "esmm")
    click_w, cvr_w = model.heads["click"].bias, model.heads["conversion"].bias
    g_click = torch.autograd.grad(losses["click"], [click_w, cvr_w], retain_graph=True, allow_unused=True)
    g_conv = torch.autograd.grad(losses["conversion"], [click_w, cvr_w], retain_graph=True)
    assert g_click[0].abs().sum() > 0 and g_click[1] is None  # CTR loss: click head only
    assert g_conv[0].abs().sum() > 0 and g_conv[1].abs().sum() > 0  # CTCVR loss: through pCTR and pCVR
    total, _, parts = training_loss(
        out, labels(click, conversion), TASKS, "esmm", LossWeighting(ModelConfig(), TASKS), torch.zeros(()), 0.0
    )
    torch.testing.assert_close(total, losses["click"] + losses["conversion"])
    # the total's gradient on the click head is the sum of both terms' (neither dropped)
    (g_total,) = torch.autograd.grad(total, [click_w])
    torch.testing.assert_close(g_total, g_click[0] + g_conv[0])


def test_esmm_conversion_loss_is_bce_of_ctcvr_on_all_rows() -> None:
    model = make_model(conversion_head="esmm")
    dense, kjt, click, conversion = make_batch()
    out = model(dense, kjt)
    expected = torch.nn.functional.binary_cross_entropy(out.probs["ctcvr"], conversion)
    torch.testing.assert_close(task_losses(out, labels(click, conversion), TASKS, "esmm")["conversion"], expected)


def test_direct_conversion_loss_uses_clicked_rows_only() -> None:
    model = make_model(conversion_head="direct")
    dense, kjt, click, conversion = make_batch()
    out = model(dense, kjt)
    loss = task_losses(out, labels(click, conversion), TASKS, "direct")["conversion"]
    clicked = click > 0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        out.logits["conversion"][clicked], conversion[clicked]
    )
    torch.testing.assert_close(loss, expected)
    # no clicks in the batch: zero loss, not NaN
    zero = task_losses(out, labels(torch.zeros(B), torch.zeros(B)), TASKS, "direct")["conversion"]
    assert zero.item() == 0.0


def test_uncertainty_weighting_parameters_get_gradients() -> None:
    weighting = LossWeighting(ModelConfig(loss_weighting="uncertainty"), TASKS)
    losses = {"click": torch.tensor(0.7), "conversion": torch.tensor(0.1)}
    total = weighting(losses)
    torch.testing.assert_close(total, torch.tensor(0.8))  # s = 0 at start: plain sum
    total.backward()
    # d/ds (exp(-s) L + s) = 1 - L at s = 0
    torch.testing.assert_close(weighting.log_vars.grad, torch.tensor([0.3, 0.9]))
    assert LossWeighting(ModelConfig(), TASKS).log_vars is None


def test_fixed_weights_from_config() -> None:
    tasks = [
        TaskConfig(name="click", loss_weight=2.0),
        TaskConfig(name="conversion", after="click", joint_name="ctcvr", conditional_name="cvr", loss_weight=0.5),
    ]
    weighting = LossWeighting(ModelConfig(), tasks)
    torch.testing.assert_close(
        weighting({"click": torch.tensor(1.0), "conversion": torch.tensor(4.0)}), torch.tensor(4.0)
    )


def test_independent_tasks_each_learn_their_own_label_on_every_row() -> None:
    """Three tasks without a funnel: one head, one BCE on all rows and one probability each."""
    tasks = [TaskConfig(name=n, label=f"y_{n}") for n in ("a", "b", "c")]
    torch.manual_seed(0)
    model = MultiTaskNet(
        SPEC,
        ModelConfig(backbone="mmoe", expert_dims=[8], tower_dims=[4], n_experts=2),
        tasks,
        np.zeros(2, np.float32),
        np.ones(2, np.float32),
    )
    dense, kjt, click, conversion = make_batch()
    out = model(dense, kjt)
    assert set(out.probs) == set(out.logits) == {"a", "b", "c"} and set(out.gates) == {"a", "b", "c"}
    ys = {"y_a": click, "y_b": conversion, "y_c": 1 - click}
    losses = task_losses(out, ys, tasks, "esmm")  # the head choice only matters for funnel steps
    for t in tasks:
        expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[t.name], ys[t.label_column])
        torch.testing.assert_close(losses[t.name], expected)
    # soft sharing's penalty covers every pair of task networks
    soft = MultiTaskNet(
        SPEC,
        ModelConfig(backbone="soft_sharing", expert_dims=[8], tower_dims=[4]),
        tasks,
        np.zeros(2, np.float32),
        np.ones(2, np.float32),
    ).backbone
    nets = [list(n.parameters()) for n in soft.nets.values()]
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum(((p - q) ** 2).sum() for i, j in pairs for p, q in zip(nets[i], nets[j], strict=True))
    torch.testing.assert_close(soft.penalty(), expected)


def test_soft_sharing_penalty_pulls_task_networks_together() -> None:
    model = make_model(backbone="soft_sharing")
    before = model.backbone.penalty()
    assert before.item() > 0
    opt = torch.optim.SGD(model.backbone.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model.backbone.penalty().backward()
        opt.step()
    assert model.backbone.penalty().item() < 0.5 * before.item()
    # and it enters the training loss with its strength
    dense, kjt, click, conversion = make_batch()
    out = model(dense, kjt)
    w = LossWeighting(ModelConfig(), TASKS)
    with_pen, _, _ = training_loss(out, labels(click, conversion), TASKS, "esmm", w, model.backbone.penalty(), 0.5)
    without, _, _ = training_loss(out, labels(click, conversion), TASKS, "esmm", w, model.backbone.penalty(), 0.0)
    torch.testing.assert_close(with_pen - without, 0.5 * model.backbone.penalty())
    assert make_model(backbone="mmoe").backbone.penalty().item() == 0.0


def test_shared_parameters_per_backbone() -> None:
    assert make_model(backbone="single_task").backbone.shared_parameters() == []
    assert make_model(backbone="soft_sharing").backbone.shared_parameters() == []
    assert len(make_model(backbone="shared_bottom").backbone.shared_parameters()) == 4
    assert len(make_model(backbone="mmoe").backbone.shared_parameters()) == 3 * 4


def test_dense_stats_and_normalizer(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x1 = rng.normal(5, 2, 1000).astype(np.float32)
    x2 = np.full(1000, 7.0, np.float32)  # constant: std 1, not 0
    for i, part in enumerate((slice(0, 400), slice(400, 1000))):
        pq.write_table(pa.table({"x1": x1[part], "x2": x2[part]}), tmp_path / f"part-{i}.parquet")
    mean, std = dense_stats(sorted(tmp_path.glob("*.parquet")), ["x1", "x2"])
    np.testing.assert_allclose(mean, [x1.mean(), 7.0], rtol=1e-5)
    np.testing.assert_allclose(std, [x1.std(), 1.0], rtol=1e-4)
    model = MultiTaskNet(SPEC, ModelConfig(), TASKS, mean, std)
    z = model.normalizer(torch.from_numpy(np.column_stack([x1, x2])))
    assert abs(z[:, 0].mean().item()) < 1e-4 and abs(z[:, 0].std().item() - 1) < 1e-2
    assert z[:, 1].abs().max().item() == 0.0
    assert set(model.state_dict()) >= {"normalizer.mean", "normalizer.std"}


def test_cross_layers_add_explicit_products_and_zero_layers_are_the_identity() -> None:
    from models.nets import CrossNetwork

    torch.manual_seed(0)
    x0 = torch.randn(5, 6)
    assert torch.equal(CrossNetwork(6, 0)(x0), x0)
    cross = CrossNetwork(6, 2)
    w0, w1 = cross.layers
    x1 = x0 * (x0 @ w0.weight.T + w0.bias) + x0
    expected = x0 * (x1 @ w1.weight.T + w1.bias) + x1
    assert torch.allclose(cross(x0), expected, atol=1e-6)
    # one layer can represent a product of two coordinates: x0_a * x0_b
    one = CrossNetwork(2, 1)
    with torch.no_grad():
        one.layers[0].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        one.layers[0].bias.copy_(torch.tensor([-1.0, -1.0]))
    out = one(x0[:, :2])
    assert torch.allclose(out[:, 0], x0[:, 0] * x0[:, 1], atol=1e-6)
