"""``funnelrank experiment transfer`` on the tiny synthetic warehouse: the report, what each
single-task model trains (the conversion model's click tower never moves, the click model
has no conversion loss), the MLflow parent run with its children and artifacts; the
report's numbers (combined standard error, verdict) on constructed values."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from models.checkpoint import checkpoint_dir
from models.nets import MultiTaskNet, dense_stats
from models.tracking import to_toml, tracking_uri
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.train_stage import training_data
from pipeline.transfer import (
    combined_se,
    single_task_config,
    single_task_probs,
    summarise,
    verdict,
)

RUN_DATE = dt.date(2026, 11, 4)  # the tiny warehouse's newest night: trains on 11-01, 11-02, validates on 11-03
SEEDS = 2
TRAIN = {"window_days": 3, "epochs": 2, "batch_size": 256, "dense_lr": 0.005, "sparse_lr": 0.1, "threads": 1}


@pytest.fixture(scope="module")
def experiment(tiny_warehouse, tmp_path_factory):
    """One real ``funnelrank experiment transfer`` run, 2 seeds: (config, config path, stdout)."""
    cfg, _ = tiny_warehouse
    root = tmp_path_factory.mktemp("transfer")
    data = cfg.model_dump(by_alias=True)
    data["train"] = {**data["train"], **TRAIN}
    data["state_dir"] = str(root / "state")  # the shared warehouse's own state stays untouched
    path = root / "transfer.toml"
    path.write_text(to_toml(data))
    cfg = load_config(path)
    buffer = io.StringIO()  # capsys is per test: the module's one run is read from here
    with contextlib.redirect_stdout(buffer):
        code = main(
            ["experiment", "transfer", "--config", str(path), "--seeds", str(SEEDS), "--run-date", "2026-11-04"]
        )
    assert code == 0, buffer.getvalue()
    return cfg, path, buffer.getvalue()


def _runs(cfg):
    client = MlflowClient(tracking_uri(cfg.state_dir))
    runs = client.search_runs([client.get_experiment_by_name("funnelrank-train").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("stage") == "experiment")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def test_the_report_gives_both_aucs_the_difference_and_a_verdict_per_view(experiment):
    cfg, _, out = experiment
    assert "[1/6] multi_task seed 11: training" in out and "[6/6] single_conversion seed 12" in out
    assert "2 seed(s) [11, 12]" in out and "AUC on 2026-11-03" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "view"
    assert [line.split("|")[1].strip() for line in table[1:]] == ["click", "ctcvr", "cvr"]
    for line in table[1:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        multi, single, diff = (tuple(float(x) for x in c.split(" ± ")) for c in cells[1:4])
        assert 0.0 < multi[0] < 1.0 and 0.0 < single[0] < 1.0 and diff[1] > 0
        assert diff[0] == pytest.approx(multi[0] - single[0], abs=2e-4)
        assert cells[4] == verdict(diff[0], diff[1])


def test_mlflow_parent_run_has_the_models_as_children_the_plot_and_the_report(experiment):
    cfg, _, _ = experiment
    client, parent, children = _runs(cfg)
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["transfer.model"] for r in children) == sorted(
        ["multi_task", "single_click", "single_conversion"] * SEEDS
    )
    assert all(r.info.status == "FINISHED" and r.data.tags["stage"] == "experiment-train" for r in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "transfer")}
    assert artifacts == {"transfer/auc_by_model.png", "transfer/report.md", "transfer/report.json"}
    report = json.loads(Path(client.download_artifacts(parent.info.run_id, "transfer/report.json")).read_text())
    assert report["seeds"] == [11, 12] and report["eval"] == "2026-11-03"
    assert set(report["views"]) == {"click", "cvr", "ctcvr"}
    assert len(report["views"]["cvr"]["per_seed"]) == SEEDS
    assert set(report["runs"].values()) == {r.info.run_id for r in children}
    for view in ("click", "cvr", "ctcvr"):
        assert parent.data.tags[f"transfer.verdict.{view}"] == report["views"][view]["verdict"]
        assert parent.data.metrics[f"transfer/{view}_diff"] == pytest.approx(report["views"][view]["diff"])


def test_single_task_models_learn_from_their_own_loss_alone(experiment, tiny_warehouse):
    cfg, _, _ = experiment
    _, _, children = _runs(cfg)
    by_model = {(r.data.tags["transfer.model"], r.data.params["seed"]): r for r in children}

    click = by_model["single_click", "11"]
    assert click.data.metrics["train/task_weight_conversion"] == 0.0
    assert click.data.metrics["train/loss_total"] == pytest.approx(click.data.metrics["train/loss_click"], rel=1e-6)
    conversion = by_model["single_conversion", "11"]
    assert conversion.data.params["model.conversion_head"] == "direct"
    assert conversion.data.metrics["train/task_weight_click"] == 0.0
    assert conversion.data.metrics["train/loss_total"] == pytest.approx(
        conversion.data.metrics["train/loss_conversion"], rel=1e-6
    )

    # the conversion model's click gate, tower and head are where the seed put them: no
    # gradient reached them (AdamW's weight decay shrinks them by ~1e-8 a step, nothing else)
    single = single_task_config(cfg.model_copy(update={"seed": 11}), "conversion")
    files = training_data(single, cfg.warehouse, RUN_DATE).train_files
    torch.manual_seed(11)
    initial = MultiTaskNet(single.features, single.model, single.tasks, *dense_stats(files, cfg.features.dense_names()))
    start = initial.state_dict()
    trained = torch.load(
        checkpoint_dir(cfg, conversion.data.tags["run_key"]) / "best.pt", weights_only=False, map_location="cpu"
    )["model"]
    click_parts = [k for k in start if ".click." in f".{k}" and not k.startswith("served.")]
    assert {k.split(".click.")[0] for k in click_parts} == {"backbone.gates", "backbone.towers", "heads"}
    for k in click_parts:
        torch.testing.assert_close(trained[k], start[k], rtol=1e-5, atol=1e-7, msg=k)
    moved = [k for k in start if k.startswith(("backbone.towers.conversion", "backbone.experts"))]
    assert all(not torch.allclose(trained[k], start[k]) for k in moved if k.endswith("weight")), moved


def test_a_rerun_reuses_the_models_and_reopens_the_parent_run(experiment, capsys):
    cfg, path, _ = experiment
    _, parent, children = _runs(cfg)
    assert (
        main(["experiment", "transfer", "--config", str(path), "--seeds", "2", "--date", "2026-11-04", "--quiet"]) == 0
    )
    out = capsys.readouterr().out
    assert parent.info.run_id in out and "[1/6]" not in out  # --quiet: no progress
    _, again, children_again = _runs(cfg)
    assert again.info.run_id == parent.info.run_id
    assert {r.info.run_id for r in children_again} == {r.info.run_id for r in children}


def test_bad_seeds_and_a_test_date_inside_the_window_are_refused(experiment, capsys):
    cfg, path, _ = experiment
    with pytest.raises(SystemExit) as exit_:
        main(["experiment", "transfer", "--config", str(path), "--seeds", "0"])
    assert exit_.value.code == 2 and "not a positive integer: '0'" in capsys.readouterr().err
    code = main(["experiment", "transfer", "--config", str(path), "--date", "2026-11-04", "--test-date", "2026-11-02"])
    assert code == 3
    assert "--test-date 2026-11-02 is inside the training window (up to 2026-11-02)" in capsys.readouterr().err


# ---------------------------------------------------------------- the numbers


def test_verdict_is_beyond_two_standard_errors_either_way():
    assert verdict(0.0100, 0.0040) == "helps"
    assert verdict(-0.0100, 0.0040) == "hurts"
    assert verdict(0.0079, 0.0040) == "no significant difference"
    assert verdict(-0.0080, 0.0040) == "no significant difference"  # exactly 2 SE is not beyond
    assert verdict(0.0, 0.0) == "no significant difference"
    assert verdict(float("nan"), 0.001) == verdict(0.01, float("nan")) == "undetermined"


def test_combined_standard_error_adds_the_seeds_spread_and_the_shared_rows_noise_once():
    diffs, paired = [0.010, 0.020, 0.030], [0.003, 0.004, 0.005]
    # var over seeds (ddof 1) = 1e-4, over 3 seeds; the rows' noise: mean of the squares, not divided
    assert combined_se(diffs, paired) == pytest.approx(np.sqrt(1e-4 / 3 + (9 + 16 + 25) * 1e-6 / 3))
    assert combined_se([0.01], [0.004]) == pytest.approx(0.004)  # one seed: its paired SE alone
    assert combined_se([0.01, 0.01], [0.0, 0.0]) == 0.0


def test_summarise_combines_the_seeds_per_view():
    def seed(diff: float) -> dict:
        entry = {
            "multi_task_auc": 0.70 + diff,
            "multi_task_auc_se": 0.01,
            "single_task_auc": 0.70,
            "single_task_auc_se": 0.01,
            "diff": diff,
            "diff_se": 0.002,
        }
        return {"click": entry, "cvr": {**entry, "diff": -diff, "multi_task_auc": 0.70 - diff}}

    views = summarise([seed(0.010), seed(0.012)])
    assert views["click"]["diff"] == pytest.approx(0.011)
    assert views["click"]["diff_se"] == pytest.approx(np.sqrt(2e-6 / 2 + 4e-6))
    assert views["click"]["verdict"] == "helps" and views["cvr"]["verdict"] == "hurts"
    assert views["click"]["multi_task_auc"] == pytest.approx(0.711)
    assert len(views["cvr"]["per_seed"]) == 2


def test_the_single_task_ctcvr_is_the_product_of_the_click_and_conversion_models(tiny_warehouse):
    cfg, _ = tiny_warehouse
    preds = {
        "click": {"p_click": np.array([0.1, 0.5]), "p_cvr": np.array([0.9, 0.9]), "p_ctcvr": np.array([0.0, 0.0])},
        "conversion": {"p_click": np.array([0.9, 0.9]), "p_cvr": np.array([0.2, 0.4]), "p_ctcvr": np.zeros(2)},
    }
    probs = single_task_probs(cfg.tasks, preds)
    np.testing.assert_allclose(probs["click"], [0.1, 0.5])
    np.testing.assert_allclose(probs["cvr"], [0.2, 0.4])
    np.testing.assert_allclose(probs["ctcvr"], [0.02, 0.2])


def test_single_task_configs_weigh_the_other_tasks_zero(tiny_warehouse):
    cfg, _ = tiny_warehouse
    click, conversion = single_task_config(cfg, "click"), single_task_config(cfg, "conversion")
    assert [t.loss_weight for t in click.tasks] == [1.0, 0.0]
    assert [t.loss_weight for t in conversion.tasks] == [0.0, 1.0]
    for single in (click, conversion):
        assert single.model.loss_weighting == "fixed" and single.model.conversion_head == "direct"
        assert single.model.backbone == cfg.model.backbone
    assert click.early_stopping_metric == "click_auc" and conversion.early_stopping_metric == "cvr_auc"
    with pytest.raises(ValueError, match="no binary task 'ctcvr'"):
        single_task_config(cfg, "ctcvr")
