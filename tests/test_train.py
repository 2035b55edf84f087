"""The training stage end to end on small learnable tables: learning, resume after a
kill, reproducibility, and what lands in MLflow."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from benchmarks.bench_train import write_synthetic_day
from features.catalog import training_dir
from features.config import ConfigError
from features.errors import StageError
from models.metrics import auc
from models.nets import MultiTaskNet
from models.tracking import to_toml, tracking_uri
from pipeline.cli import main
from pipeline.config import FunnelConfig, parse_config
from pipeline.train_stage import train_run, training_window

RUN_DATE = dt.date(2026, 11, 10)
ROWS_PER_DAY = 4000


def make_cfg(tmp_path, model: dict | None = None, train: dict | None = None) -> FunnelConfig:
    return parse_config(
        {
            "seed": 3,
            "warehouse": str(tmp_path / "warehouse"),
            "state_dir": str(tmp_path / "state"),
            "features": {
                "sparse": [
                    {"name": "item", "table": "items", "column": "item", "dim": 8, "capacity": 300},
                    {"name": "shop", "table": "items", "column": "shop", "dim": 4, "capacity": 50},
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
                "numeric": [
                    {"name": "x1", "table": "impressions", "column": "x1"},
                    {"name": "x2", "table": "impressions", "column": "x2"},
                ],
            },
            "model": {"expert_dims": [32, 16], "tower_dims": [8], "n_experts": 3, **(model or {})},
            "train": {
                "window_days": 3,
                "epochs": 2,
                "batch_size": 256,
                "dense_lr": 0.005,
                "sparse_lr": 0.1,
                "patience": 5,
                "shuffle_buffer_rows": 2000,
                "threads": 2,
                "log_every_steps": 5,
                **(train or {}),
            },
        }
    )


def write_learnable_window(root: Path, row_group_rows: int) -> list[Path]:
    """The training and validation days of RUN_DATE's window under ``root / "warehouse"``:
    learnable tables (benchmarks.bench_train.write_synthetic_day) seeded by day index."""
    cfg = make_cfg(root)
    train_days, val_day = training_window(cfg, RUN_DATE)
    folders = [training_dir(root / "warehouse", day) for day in [*train_days, val_day]]
    for i, folder in enumerate(folders):
        write_synthetic_day(cfg.features, folder, ROWS_PER_DAY, seed=i, row_group_rows=row_group_rows)
    return folders


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    """Three mature days of a learnable table, each with an examples-style manifest."""
    root = tmp_path_factory.mktemp("wh")
    for i, folder in enumerate(write_learnable_window(root, row_group_rows=1000)):
        (folder / "manifest.json").write_text(
            json.dumps({"content_sha256": f"hash{i}", "vocab_versions": {"item": i + 1}})
        )
    return root / "warehouse"


def same(a: object, b: object) -> bool:
    """Exact equality that treats NaN as equal to NaN (metrics of absent classes)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def final_weights(result) -> dict[str, torch.Tensor]:
    return result.model.state_dict()


def test_training_beats_constant_predictor_and_logs_to_mlflow(tmp_path, warehouse) -> None:
    cfg = make_cfg(tmp_path)
    result = train_run(cfg, warehouse, RUN_DATE, progress=False)
    assert result.epochs_run == 2 and len(result.history) == 2
    # a constant predictor has AUC 0.5; the labels depend on item, tags and x1
    assert result.val_metrics["click_auc"] > 0.62, result.val_metrics
    assert result.val_metrics["ctcvr_auc"] > 0.6, result.val_metrics
    assert -1.0 <= result.history[-1]["train/grad_cosine"] <= 1.0
    assert sum(result.history[-1][f"val/gate_click_expert{e}"] for e in range(3)) == pytest.approx(1.0, abs=1e-5)

    client = MlflowClient(tracking_uri(cfg.state_dir))
    assert tracking_uri(cfg.state_dir).startswith("sqlite:///")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.backbone"] == "mmoe"
    assert run.data.params["train.batch_size"] == "256"
    assert run.data.tags["val_day"] == "2026-11-08" and run.data.tags["data.2026-11-06.sha256"] == "hash0"
    for name in (
        "val/click_auc",
        "val/cvr_auc",
        "val/ctcvr_logloss",
        "train/loss_click",
        "train/loss_conversion",
        "train/grad_cosine",
        "train/step_loss_total",
        "best/click_auc",
    ):
        assert name in run.data.metrics, name
    assert len(client.get_metric_history(run.info.run_id, "val/click_auc")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for folder in ("plots", "checkpoint") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {
        "config.toml",
        "vocab_versions.json",
        "plots/loss_curves.png",
        "plots/roc.png",
        "plots/reliability.png",
        "plots/gate_usage.png",
        "checkpoint/best.pt",
    } <= artifacts
    assert (cfg.state_dir / "mlartifacts").is_dir()

    # the returned plain model scores like the validation metrics say
    from models.loader import TrainingTableLoader
    from models.predict import predict

    val = TrainingTableLoader(
        [training_dir(warehouse, dt.date(2026, 11, 8)) / "part-0.parquet"],
        cfg.features.sparse,
        cfg.features.dense_names(),
        512,
        shuffle=False,
        seed=0,
    )
    pred = predict(result.model, val, torch.device("cpu"))
    assert auc(pred["label_click"], pred["p_click"]) == pytest.approx(result.val_metrics["click_auc"], abs=1e-6)
    assert np.isfinite(pred["p_ctcvr"]).all()


def test_resume_after_kill_matches_uninterrupted_run_and_reruns_reproduce(tmp_path, warehouse) -> None:
    whole = train_run(make_cfg(tmp_path / "a"), warehouse, RUN_DATE, progress=False)

    cfg_b = make_cfg(tmp_path / "b")
    killed = train_run(cfg_b, warehouse, RUN_DATE, max_epochs=1, progress=False)
    assert killed.epochs_run == 1
    run = MlflowClient(tracking_uri(cfg_b.state_dir)).get_run(killed.mlflow_run_id)
    assert run.info.status == "KILLED"
    resumed = train_run(cfg_b, warehouse, RUN_DATE, progress=False)
    assert resumed.epochs_run == 2 and resumed.mlflow_run_id == killed.mlflow_run_id
    assert MlflowClient(tracking_uri(cfg_b.state_dir)).get_run(resumed.mlflow_run_id).info.status == "FINISHED"

    again = train_run(make_cfg(tmp_path / "c"), warehouse, RUN_DATE, progress=False)
    for other in (resumed, again):
        a, b = final_weights(whole), final_weights(other)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        assert same(other.val_metrics, whole.val_metrics)
        drop = {"train/samples_per_s"}
        assert same(
            [{k: v for k, v in h.items() if k not in drop} for h in other.history],
            [{k: v for k, v in h.items() if k not in drop} for h in whole.history],
        )

    # a finished run is not trained again
    rerun = train_run(cfg_b, warehouse, RUN_DATE, progress=False)
    assert rerun.epochs_run == 2 and torch.equal(
        final_weights(rerun)["heads.click.weight"], final_weights(whole)["heads.click.weight"]
    )


@pytest.mark.parametrize(
    ("backbone", "head", "weighting"),
    [
        ("single_task", "direct", "uncertainty"),
        ("soft_sharing", "esmm", "fixed"),
        ("shared_bottom", "direct", "fixed"),
    ],
)
def test_other_backbones_heads_and_weightings_train(tmp_path, warehouse, backbone, head, weighting) -> None:
    cfg = make_cfg(
        tmp_path,
        model={"backbone": backbone, "conversion_head": head, "loss_weighting": weighting},
        train={"epochs": 1},
    )
    result = train_run(cfg, warehouse, RUN_DATE, progress=False)
    h = result.history[0]
    assert result.val_metrics["click_auc"] > 0.55, result.val_metrics
    learned = h["train/task_weight_click"] != 1.0 and h["train/task_weight_conversion"] != 1.0
    assert learned == (weighting == "uncertainty")
    assert -1.0 <= h["train/grad_cosine"] <= 1.0
    assert (h["train/loss_penalty"] > 0) == (backbone == "soft_sharing")
    assert "val/gate_click_expert0" not in h


def test_missing_training_day_names_the_folder(tmp_path, warehouse) -> None:
    cfg = make_cfg(tmp_path, train={"window_days": 5})
    with pytest.raises(StageError, match="training/date=2026-11-04"):
        train_run(cfg, warehouse, RUN_DATE, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="adam is supported on CUDA")
def test_fused_adam_on_cpu_is_refused_with_the_key(tmp_path, warehouse) -> None:
    with pytest.raises(StageError, match="train.sparse_optimizer"):
        train_run(make_cfg(tmp_path, train={"sparse_optimizer": "adam"}), warehouse, RUN_DATE, progress=False)


def test_warm_start_with_frozen_shared_layers_and_a_parent_run(tmp_path, warehouse) -> None:
    champion = train_run(make_cfg(tmp_path, train={"epochs": 1}), warehouse, RUN_DATE, progress=False)
    old = champion.model.state_dict()

    # the item vocabulary grew by 40 ids since the champion was trained (another run key,
    # the same MLflow store)
    cfg = make_cfg(tmp_path, train={"epochs": 1})
    spec = cfg.features.model_dump()
    spec["sparse"][0]["capacity"] += 40
    cfg = cfg.model_copy(update={"features": type(cfg.features).model_validate(spec)})
    client = MlflowClient(tracking_uri(cfg.state_dir))
    parent = client.create_run(client.create_experiment("nightly")).info.run_id
    tuned = train_run(
        cfg,
        warehouse,
        RUN_DATE,
        progress=False,
        initial_state=old,
        freeze_shared=True,
        parent_run_id=parent,
        extra_tags={"warm_start": "champion", "warm_start_version": "3"},
    )
    new = tuned.model.state_dict()

    item = "ebc.embedding_bags.item.weight"
    assert new[item].shape[0] == old[item].shape[0] + 40
    assert torch.equal(new[item][: old[item].shape[0]], old[item])  # copied, then frozen
    torch.manual_seed(cfg.seed)  # the fresh init train_model starts from
    fresh = MultiTaskNet(
        cfg.features, cfg.model, cfg.tasks, np.zeros(2, np.float32), np.ones(2, np.float32)
    ).state_dict()
    assert torch.equal(new[item][old[item].shape[0] :], fresh[item][old[item].shape[0] :])  # new rows: fresh init
    frozen = [k for k in new if k.startswith(("ebc.", "backbone.experts.", "normalizer."))]
    trained = [k for k in new if k.startswith(("backbone.towers.", "backbone.gates.", "heads."))]
    assert len(frozen) > 3 and len(trained) > 3
    for k in frozen:
        if k != item:
            assert torch.equal(new[k], old[k]), k
    for k in trained:
        assert not torch.equal(new[k], old[k]), k

    run = client.get_run(tuned.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["warm_start"] == "champion" and run.data.tags["warm_start_version"] == "3"


def test_warm_start_that_does_not_fit_names_the_key_and_shapes(tmp_path, warehouse) -> None:
    cfg = make_cfg(tmp_path)
    mean, std = np.zeros(2, np.float32), np.ones(2, np.float32)
    state = MultiTaskNet(cfg.features, cfg.model, cfg.tasks, mean, std).state_dict()
    wrong_head = {**state, "heads.click.weight": torch.zeros(1, 9)}
    with pytest.raises(
        StageError, match=r"'heads\.click\.weight' has shape \(1, 9\) in initial_state, \(1, 8\) in the model"
    ):
        train_run(cfg, warehouse, RUN_DATE, progress=False, initial_state=wrong_head)
    wrong_dim = {**state, "ebc.embedding_bags.shop.weight": torch.zeros(59, 8)}
    with pytest.raises(
        StageError, match=r"'ebc\.embedding_bags\.shop\.weight' has shape \(59, 8\) in initial_state, \(59, 4\)"
    ):
        train_run(cfg, warehouse, RUN_DATE, progress=False, initial_state=wrong_dim)
    with pytest.raises(StageError, match=r"missing \['heads\.click\.bias'\]"):
        train_run(
            cfg,
            warehouse,
            RUN_DATE,
            progress=False,
            initial_state={k: v for k, v in state.items() if k != "heads.click.bias"},
        )


def test_sharding_choice_is_validated(tmp_path, warehouse) -> None:
    with pytest.raises(ConfigError, match=r"train\.sharding.*'table_wise'"):
        make_cfg(tmp_path, train={"sharding": "by_hash"})
    if not torch.cuda.is_available():
        with pytest.raises(StageError, match="train.sharding = 'row_wise' needs a CUDA device"):
            train_run(make_cfg(tmp_path, train={"sharding": "row_wise"}), warehouse, RUN_DATE, progress=False)


def test_cosine_schedule_decays_the_dense_rate_and_depends_on_the_step_only():
    from models.config import TrainConfig
    from models.train import dense_learning_rate

    constant, cosine = TrainConfig(dense_lr=0.02), TrainConfig(dense_lr=0.02, lr_schedule="cosine")
    assert {dense_learning_rate(constant, s, 100) for s in (0, 50, 99)} == {0.02}
    rates = [dense_learning_rate(cosine, s, 100) for s in range(100)]
    assert rates[0] == 0.02 and rates[50] == pytest.approx(0.01) and 0 < rates[-1] < 1e-4
    assert all(
        a > b for a, b in zip(rates, rates[1:], strict=False)
    )  # strictly decreasing: a resumed run picks up at its step


def test_a_learning_rate_that_diverges_stops_at_the_step_naming_the_task(tmp_path, warehouse) -> None:
    cfg = make_cfg(tmp_path, train={"dense_lr": 1e6})
    with pytest.raises(StageError) as err:
        train_run(cfg, warehouse, RUN_DATE, progress=False)
    assert err.value.exit_code == 3
    assert re.fullmatch(
        r"the loss of task 'click' is not finite at epoch 1, step \d+ of 32: lower train\.dense_lr / "
        r"train\.sparse_lr or look for huge values in the training table; no epoch finished, none is "
        r"saved",
        str(err.value),
    ), str(err.value)
    assert not list((cfg.state_dir / "checkpoints").glob("*/*.pt"))
    client = MlflowClient(tracking_uri(cfg.state_dir))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_values_that_overflow_the_model_stop_the_run_and_keep_the_last_good_checkpoint(
    tmp_path, warehouse, capsys
) -> None:
    own = tmp_path / "warehouse"
    shutil.copytree(warehouse, own)
    cfg = make_cfg(tmp_path)
    first = train_run(cfg, own, RUN_DATE, max_epochs=1, progress=False)
    last = first.checkpoint_dir / "last.pt"
    saved = last.read_bytes()
    # every 7th row of a training day now overflows float32 arithmetic in the first layer
    # (the run key is the same: it hashes the days' manifests, which stay as they were)
    day = training_dir(own, training_window(cfg, RUN_DATE)[0][0]) / "part-0.parquet"
    table = pq.read_table(day)
    x1 = table.column("x1").to_numpy().copy()
    x1[::7] = 3e38
    pq.write_table(
        table.set_column(table.schema.get_field_index("x1"), "x1", pa.array(x1, pa.float32())), day, row_group_size=1000
    )

    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg.model_dump(by_alias=True)))
    assert main(["train", "--config", str(config), "--warehouse", str(own), "--date", str(RUN_DATE), "--quiet"]) == 3
    message = capsys.readouterr().err
    assert re.search(
        r"funnelrank train: the loss of task '(click|conversion)' is not finite at epoch 2, step \d+ of "
        rf"32: .*; {re.escape(str(last))} keeps epoch 1$",
        message.strip(),
    ), message
    assert last.read_bytes() == saved
    assert MlflowClient(tracking_uri(cfg.state_dir)).get_run(first.mlflow_run_id).info.status == "FAILED"
