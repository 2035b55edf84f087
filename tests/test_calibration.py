"""Calibration in the model (models/calibration.py): the piecewise-linear map, its fit
(Platt and isotonic) on deliberately miscalibrated predictions, a model trained with a
weight that inflates positives and calibrated after training (held-out calibration,
unchanged AUC, what MLflow and the checkpoint get), the calibrator and the sampling
correction inside the exported ONNX graph (parity), and warm starts that refit it."""

from __future__ import annotations

import datetime as dt

import numpy as np
import onnxruntime as ort
import pytest
import torch
from bundle_fixture import small_model
from mlflow.tracking import MlflowClient

from benchmarks.bench_train import write_synthetic_day
from features.catalog import training_dir
from features.config import TaskConfig
from models.calibration import ServedProbabilities, fit_calibration, piecewise_linear
from models.checkpoint import warm_start
from models.export import check_parity, export_onnx, onnx_inputs, parity_batches
from models.loader import parquet_files, table_loader
from models.metrics import auc, calibration
from models.nets import MultiTaskNet
from models.predict import predict
from models.tracking import tracking_uri
from pipeline.config import FunnelConfig, parse_config
from pipeline.train_stage import train_run, training_window

FUNNEL = [
    TaskConfig(name="click"),
    TaskConfig(name="conversion", after="click", joint_name="ctcvr", conditional_name="cvr"),
]
RUN_DATE = dt.date(2026, 11, 10)


def test_piecewise_linear_interpolates_and_extends_its_end_slopes():
    knots = torch.tensor([-2.0, -0.5, 1.0, 4.0], dtype=torch.float64)
    values = torch.tensor([-3.0, -2.5, 0.0, 0.3], dtype=torch.float64)
    inside = torch.linspace(-2.0, 4.0, 101, dtype=torch.float64)
    np.testing.assert_allclose(piecewise_linear(inside, knots, values), np.interp(inside, knots, values), atol=1e-12)
    outside = torch.tensor([-5.0, 6.0], dtype=torch.float64)
    # beyond the ends: the first slope (1/3) and the last one (0.1)
    np.testing.assert_allclose(piecewise_linear(outside, knots, values), [-3.0 - 1.0, 0.3 + 0.2], atol=1e-12)


def miscalibrated(n: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Head logits of a funnel model that ranks well but is off in scale and level (click
    too high and too flat, conversion too steep), and labels drawn from the truth."""
    rng = np.random.default_rng(seed)
    click_truth, cvr_truth = rng.normal(-2.0, 1.2, n), rng.normal(-1.5, 1.0, n)
    click = rng.random(n) < 1 / (1 + np.exp(-click_truth))
    conversion = click & (rng.random(n) < 1 / (1 + np.exp(-cvr_truth)))
    logits = {
        "click": (0.6 * click_truth + 1.0).astype(np.float32),
        "conversion": (1.7 * cvr_truth - 0.5).astype(np.float32),
    }
    return logits, {"click": click.astype(np.float64), "conversion": conversion.astype(np.float64)}


@pytest.mark.parametrize(("method", "auc_change"), [("platt", 1e-6), ("isotonic", 1e-3)])
def test_fit_calibrates_held_out_rows_and_keeps_the_product_and_the_ranking(method, auc_change):
    fit_logits, fit_labels = miscalibrated(100_000, seed=1)
    logits, labels = miscalibrated(100_000, seed=2)  # held out
    served = ServedProbabilities(FUNNEL, method, 16)
    before = served.of_logits(logits)
    report = fit_calibration(served, fit_logits, fit_labels)
    after = served.of_logits(logits)

    assert report["click"]["positives"] == int(fit_labels["click"].sum())
    clicked = labels["click"] > 0
    y = {"click": labels["click"], "ctcvr": labels["conversion"]}
    for view in ("click", "ctcvr"):
        assert not 0.9 < calibration(y[view], before[view]) < 1.1, view  # the deliberate miscalibration
        assert 0.95 <= calibration(y[view], after[view]) <= 1.05, (view, calibration(y[view], after[view]))
    assert 0.95 <= calibration(labels["conversion"][clicked], after["cvr"][clicked]) <= 1.05
    # strictly increasing maps of each head's logit: pCTR's and pCVR's orderings stay
    assert abs(auc(y["click"], after["click"]) - auc(y["click"], before["click"])) <= auc_change
    cvr_auc = [auc(labels["conversion"][clicked], p["cvr"][clicked]) for p in (before, after)]
    assert abs(cvr_auc[1] - cvr_auc[0]) <= auc_change
    np.testing.assert_allclose(after["ctcvr"], after["click"] * after["cvr"], rtol=1e-6)
    if method == "platt":
        assert report["click"]["slope"] == pytest.approx(1 / 0.6, rel=0.05)  # undoes the flattening


def test_a_task_with_one_class_keeps_the_identity():
    logits, labels = miscalibrated(5000, seed=3)
    served = ServedProbabilities(FUNNEL, "platt", 32)
    report = fit_calibration(served, logits, {**labels, "conversion": np.zeros(5000)})
    assert "one class only" in report["conversion"]["skipped"]
    assert torch.equal(served.calibrators["conversion"].values, torch.tensor([-1.0, 1.0]))
    assert report["click"]["slope"] > 1.0


# ---------------------------------------------------------------- a trained model


def window_cfg(root, **train) -> FunnelConfig:
    return parse_config(
        {
            "seed": 5,
            "warehouse": str(root / "warehouse"),
            "state_dir": str(root / "state"),
            "features": {
                "sparse": [
                    {"name": "item", "table": "items", "column": "item", "dim": 8, "capacity": 300},
                    {
                        "name": "tags",
                        "table": "users",
                        "column": "tags",
                        "kind": "list",
                        "dim": 4,
                        "capacity": 60,
                        "pooling": "mean",
                    },
                ],
                "numeric": [{"name": "x1", "table": "impressions", "column": "x1"}],
            },
            "model": {"expert_dims": [16], "tower_dims": [8], "n_experts": 2, "cross_layers": 0},
            "train": {
                "window_days": 3,
                "epochs": 2,
                "batch_size": 1024,
                "dense_lr": 0.01,
                "sparse_lr": 0.1,
                "shuffle_buffer_rows": 20_000,
                "threads": 2,
                **train,
            },
        }
    )


@pytest.fixture(scope="module")
def window(tmp_path_factory):
    """Two training days, the validation day and a held-out day after it, of a learnable table."""
    root = tmp_path_factory.mktemp("calibration")
    cfg = window_cfg(root)
    train_days, val_day = training_window(cfg, RUN_DATE)
    held_out = val_day + dt.timedelta(days=1)
    for i, day in enumerate([*train_days, val_day, held_out]):
        write_synthetic_day(cfg.features, training_dir(root / "warehouse", day), 40_000, seed=100 + i)
    return root / "warehouse", parquet_files(training_dir(root / "warehouse", held_out))


@pytest.mark.parametrize(("method", "auc_change"), [("platt", 1e-6), ("isotonic", 1e-3)])
def test_a_model_trained_to_inflate_positives_is_calibrated_on_held_out_rows(tmp_path, window, method, auc_change):
    warehouse, held_out = window
    cfg = window_cfg(tmp_path, sample_weight="1 + 4 * click")  # every clicked row weighs 5 times
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"calibration": method})})
    result = train_run(cfg, warehouse, RUN_DATE, progress=False)

    uncalibrated = MultiTaskNet(cfg.features, cfg.model, cfg.tasks, np.zeros(1), np.ones(1))
    uncalibrated.load_state_dict(result.model.state_dict())
    uncalibrated.served.start_training(1.0)  # the same weights, identity calibrators
    loader = table_loader(cfg, held_out, batch_size=8192, shuffle=False)
    before, after = (predict(m, loader, torch.device("cpu")) for m in (uncalibrated, result.model))
    y = {"click": after["label_click"], "ctcvr": after["label_conversion"]}
    for view in ("click", "ctcvr"):
        assert calibration(y[view], before[f"p_{view}"]) > 1.3, view
        assert 0.95 <= calibration(y[view], after[f"p_{view}"]) <= 1.05, (
            view,
            calibration(y[view], after[f"p_{view}"]),
        )
    assert abs(auc(y["click"], after["p_click"]) - auc(y["click"], before["p_click"])) <= auc_change
    np.testing.assert_allclose(after["p_ctcvr"], after["p_click"] * after["p_cvr"], rtol=1e-6)

    # the validation day's before / after are logged, the best checkpoint carries the calibrators
    report = result.calibration
    assert report["method"] == method and report["metrics"]["before/click_calibration"] > 1.3
    assert report["metrics"]["after/click_calibration"] == pytest.approx(1.0, abs=0.02)
    assert result.val_metrics["click_calibration"] == report["metrics"]["after/click_calibration"]
    logged = MlflowClient(tracking_uri(cfg.state_dir)).get_run(result.mlflow_run_id).data.metrics
    for name in ("before/click_calibration", "after/ctcvr_ece", "before/ctcvr_logloss", "after/click_auc"):
        assert logged[f"calibration/{name}"] == pytest.approx(report["metrics"][name]), name
    assert logged["best/click_calibration"] == pytest.approx(report["metrics"]["after/click_calibration"])
    best = torch.load(result.checkpoint_dir / "best.pt", weights_only=False)
    assert best["calibration"] == report
    assert torch.equal(best["model"]["served.calibrators.click.values"], result.model.served.calibrators.click.values)
    # a finished run asked again is not calibrated again
    again = train_run(cfg, warehouse, RUN_DATE, progress=False)
    assert torch.equal(again.model.served.calibrators.click.values, result.model.served.calibrators.click.values)


def test_a_warm_start_refits_the_calibrators_and_a_model_without_them_loads(tmp_path, window):
    warehouse, _ = window
    champion = window_cfg(tmp_path / "a", epochs=1)
    trained = train_run(champion, warehouse, RUN_DATE, progress=False).model
    assert not torch.equal(trained.served.calibrators.click.values, torch.tensor([-1.0, 1.0]))

    # another calibration method is no other architecture: the weights warm-start, the calibrators start afresh
    cfg = window_cfg(tmp_path / "b", epochs=1)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"calibration": "isotonic"})})
    fresh = MultiTaskNet(cfg.features, cfg.model, cfg.tasks, np.zeros(1), np.ones(1))
    warm_start(fresh, trained.state_dict())
    assert torch.equal(fresh.heads.click.weight, trained.heads.click.weight)
    assert len(fresh.served.calibrators.click.values) == cfg.model.calibration_segments + 1
    warmed = train_run(cfg, warehouse, RUN_DATE, progress=False, initial_state=trained.state_dict())
    assert warmed.calibration["method"] == "isotonic"

    # a checkpoint written before calibration existed: identity calibrators, no correction
    legacy = {k: v for k, v in trained.state_dict().items() if not k.startswith("served.")}
    old = MultiTaskNet(champion.features, champion.model, champion.tasks, np.zeros(1), np.ones(1))
    old.load_state_dict(legacy)
    assert torch.equal(old.served.calibrators.click.values, torch.tensor([-1.0, 1.0]))
    assert torch.equal(old.served.logit_offsets, torch.zeros(2))


# ---------------------------------------------------------------- the exported graph


def test_the_calibrators_and_the_sampling_correction_are_inside_the_onnx_graph(tiny_warehouse, tmp_path):
    cfg, files = tiny_warehouse
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"calibration": "isotonic"})})
    model = small_model(cfg, files)
    model.served.start_training(0.25)  # trained on a quarter of the click negatives
    for calibrator in model.served.calibrators.values():  # increasing, curved, neither the identity nor a line
        knots = torch.linspace(-4.0, 4.0, cfg.model.calibration_segments + 1)
        calibrator.knots.copy_(knots)
        calibrator.values.copy_(0.5 * knots + 0.4 * torch.tanh(2.0 * knots) - 1.0)

    path = export_onnx(model, cfg.features, cfg.tasks, tmp_path / "model.onnx")
    parity = check_parity(model, path, parity_batches(cfg, files, min_rows=2000), cfg.features, cfg.tasks)
    assert max(parity["max_abs_diff"].values()) <= 1e-5
    # what the graph serves is the corrected, calibrated probability, not the head's sigmoid
    batch = next(iter(table_loader(cfg, files, batch_size=512, shuffle=False)))
    p_click, p_cvr = ort.InferenceSession(str(path)).run(["p_click", "p_cvr"], onnx_inputs(batch, cfg.features))
    with torch.no_grad():
        out = model(batch.dense, batch.sparse)
        corrected = out.logits["click"] + np.log(0.25)
        np.testing.assert_allclose(p_click, torch.sigmoid(model.served.calibrators.click(corrected)), atol=1e-5)
        assert np.abs(p_click - torch.sigmoid(out.logits["click"]).numpy()).max() > 1e-2
        np.testing.assert_allclose(
            p_cvr, torch.sigmoid(model.served.calibrators.conversion(out.logits["conversion"])), atol=1e-5
        )
