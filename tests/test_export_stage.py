"""The ``export`` stage on a really trained run of the tiny warehouse: refused before
training has finished, then a parity-checked bundle under state_dir/bundles, logged to the
training's MLflow run (a real sqlite store) and loadable from ``runs:/<id>/bundle``;
a rerun skips; ``funnelrank export --date`` end to end."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import torch
from bundle_fixture import DAYS, START, users_and_items
from mlflow.tracking import MlflowClient

from features.errors import StageError
from models.tracking import to_toml, tracking_uri
from pipeline.cli import main
from pipeline.export_stage import export_run, model_sha256
from pipeline.train_stage import load_trained_model, train_run
from serving.bundle import load_bundle, load_bundle_from_mlflow
from serving.scorer import Scorer

RUN_DATE = START + dt.timedelta(days=DAYS - 1)  # validation day START+2 (maturity lag 1), trains on START+1


@pytest.fixture
def run(tiny_run):
    return tiny_run


@pytest.fixture(autouse=True)
def _explicit_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store is <state_dir>/mlflow.db


def test_export_before_and_after_training(run, tmp_path):
    cfg = run[0].model_copy(update={"state_dir": tmp_path / "state"})  # its own store: untrained whatever ran before
    with pytest.raises(StageError, match=r"checkpoint .*last\.pt not found; run `funnelrank train --date 2026-11-04"):
        export_run(cfg, cfg.warehouse, RUN_DATE)

    killed = train_run(cfg, cfg.warehouse, RUN_DATE, max_epochs=1, progress=False)  # stops as a kill would
    with pytest.raises(StageError, match=r"has not finished .*epoch 1 of 2.*to resume it"):
        export_run(cfg, cfg.warehouse, RUN_DATE)

    trained = train_run(cfg, cfg.warehouse, RUN_DATE, progress=False)  # resumes and finishes
    assert trained.mlflow_run_id == killed.mlflow_run_id
    model, run_id = load_trained_model(cfg, cfg.warehouse, RUN_DATE)
    assert run_id == trained.mlflow_run_id
    assert model_sha256(model) == model_sha256(trained.model)  # the best epoch's weights, normaliser included

    summary = export_run(cfg, cfg.warehouse, RUN_DATE)
    assert not summary["skipped"]
    assert Path(summary["bundle"]) == cfg.state_dir / "bundles" / trained.run_key
    assert summary["validation_day"] == "2026-11-03"
    assert summary["parity_rows"] >= 4000  # the whole validation day (the tiny day has fewer than 10,000 rows)
    assert set(summary["parity_max_abs_diff"]) == {"p_click", "p_cvr", "p_ctcvr", "score"}
    assert max(summary["parity_max_abs_diff"].values()) <= 1e-5
    assert summary["artifact_uri"] == f"runs:/{run_id}/bundle"
    local = load_bundle(summary["bundle"])
    assert local.sha256 == summary["bundle_sha256"]
    assert local.spec.events.features_as_of == dt.date(2026, 11, 5)

    # What the lead registers as a model version loads through the scorer's own loader.
    logged = load_bundle_from_mlflow(summary["artifact_uri"], tmp_path / "download", tracking_uri(cfg.state_dir))
    assert logged.sha256 == local.sha256
    users, items = users_and_items(cfg)
    request = {
        "user_id": str(users[1]),
        "context": {"device": "ios", "slot": 3},
        "candidates": [{"item_id": str(i)} for i in items[:30]] + [{"item_id": "never-seen"}],
    }
    assert Scorer(logged).score(request) == Scorer(local).score(request)

    again = export_run(cfg, cfg.warehouse, RUN_DATE)
    assert again["skipped"] and again["bundle_sha256"] == summary["bundle_sha256"]


def test_cli_export_prints_parity_bundle_and_artifact_uri(run, capsys):
    cfg, config_path = run
    train_run(cfg, cfg.warehouse, RUN_DATE, progress=False)  # nothing to do when another test trained it
    model, run_id = load_trained_model(cfg, cfg.warehouse, RUN_DATE)
    date = RUN_DATE.isoformat()
    assert main(["export", "--config", str(config_path), "--date", date]) == 0
    out = capsys.readouterr().out
    for name in ("p_click", "p_cvr", "p_ctcvr", "score"):
        assert f"parity {name}" in out
    assert f"MLflow artifacts runs:/{run_id}/bundle" in out
    assert main(["export", "--config", str(config_path), "--date", date]) == 0
    assert "skipped (inputs unchanged)" in capsys.readouterr().out

    # A changed bundle (tampered file) is exported again and logged again.
    folder = next((cfg.state_dir / "bundles").iterdir())
    (folder / "spec.json").write_text((folder / "spec.json").read_text() + " ")
    assert main(["export", "--config", str(config_path), "--date", date]) == 0
    out = capsys.readouterr().out
    assert f"bundle {folder} written" in out
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["inputs"]["model_sha256"] == model_sha256(model)
    tags = MlflowClient(tracking_uri(cfg.state_dir)).get_run(run_id).data.tags
    assert tags["bundle.sha256"] == load_bundle(folder).sha256

    # No run for another date: the error names the checkpoint and the command; exit 3.
    assert main(["export", "--config", str(config_path), "--date", "2026-11-03"]) == 3
    assert "run `funnelrank train --date 2026-11-03" in capsys.readouterr().err


def test_a_nan_model_is_not_exported_nor_logged(run, tmp_path, capsys):
    cfg, _ = run
    cfg = cfg.model_copy(update={"state_dir": tmp_path / "state", "train": cfg.train.model_copy(update={"epochs": 1})})
    trained = train_run(cfg, cfg.warehouse, RUN_DATE, progress=False)
    best = trained.checkpoint_dir / "best.pt"
    saved = torch.load(best, weights_only=False)
    saved["model"]["heads.click.bias"].fill_(float("nan"))  # a checkpoint of a model that diverged
    torch.save(saved, best)
    config = tmp_path / "config.toml"
    config.write_text(to_toml(cfg.model_dump(by_alias=True)))

    assert main(["export", "--config", str(config), "--date", RUN_DATE.isoformat()]) == 3
    err = capsys.readouterr().err
    assert "funnelrank export: ONNX parity failed for " in err and "outputs not finite: p_click in PyTorch" in err
    assert not (cfg.state_dir / "bundles" / trained.run_key).exists()
    assert not list((cfg.state_dir / "bundles").glob(".tmp-*"))
    client = MlflowClient(tracking_uri(cfg.state_dir))
    assert not client.list_artifacts(trained.mlflow_run_id, "bundle")
    assert "bundle.sha256" not in client.get_run(trained.mlflow_run_id).data.tags
