"""A new user's first nights: `funnelrank nightly --start FIRST_DAY --end D` over a fresh
warehouse skips train and what follows it (a line each, exit 0) until
``train.min_window_days`` mature days exist, then trains on the days there are. Two
warehouses run from the same folder with a config that names no ``state_dir`` keep
their state apart, and a night killed during train reruns against another tracking store.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient
from test_nightly import START, _kill_when

from features.synthetic import generate_logs
from models.tracking import EXPERIMENT, to_toml, tracking_uri
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.registry import current_champion

ROOT = Path(__file__).resolve().parents[1]
DAYS = [START + dt.timedelta(days=i) for i in range(5)]  # maturity lag 2: night 4 has 3 mature days


def _config(root: Path) -> Path:
    """The tiny nightly world with a 4-day window, trained from 3 days on; no state_dir."""
    cfg = load_config(
        ROOT / "configs" / "demo.toml",
        {
            "warehouse": str(root / "wh1"),
            "generate": {
                "start_date": START,
                "days": len(DAYS),
                "users": 800,
                "items": 300,
                "impressions_per_day": 6000,
            },
            "train": {"window_days": 4, "min_window_days": 3, "epochs": 1, "batch_size": 512},
            "promote": {"min_auc": 0.0, "calibration_min": 0.001, "calibration_max": 1000.0, "auc_tolerance": 0.99},
        },
    )
    generate_logs(cfg, cfg.warehouse, progress=False)
    data = cfg.model_dump(by_alias=True)
    del data["state_dir"]
    path = root / "cfg.toml"
    path.write_text(to_toml(data))
    return path


def _lines(out: str, day: dt.date) -> dict[str, str]:
    return {line.split()[1]: line for line in out.splitlines() if line.startswith(f"{day}  ")}


def test_first_nights_then_a_second_warehouse_and_another_tracking_store(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the same folder for both warehouses
    config = _config(tmp_path)
    wh1, wh2 = tmp_path / "wh1", tmp_path / "wh2"
    shutil.copytree(wh1 / "raw", wh2 / "raw")

    assert main(["nightly", "--config", str(config), "--start", str(DAYS[0]), "--end", str(DAYS[4])]) == 0
    out = capsys.readouterr().out
    for night, have in zip(DAYS[:4], (0, 0, 1, 2), strict=True):
        lines = _lines(out, night)
        assert f"{have} mature day(s) of data so far" in lines["train"] and "training needs 3" in lines["train"]
        assert lines["train"].split()[2] == "skipped"
        for stage in ("evaluate", "export", "promote"):
            assert lines[stage].split()[2] == "skipped" and "no model tonight" in lines[stage]
    last = _lines(out, DAYS[4])
    assert all(last[s].split()[2] == "done" for s in ("train", "evaluate", "export", "promote")), last
    assert "3 mature day(s) of data so far" in last["train"] and "v1 promoted" in last["promote"]
    train = json.loads((wh1 / "state" / "nightly" / str(DAYS[4]) / "train.json").read_text())["outputs"]
    assert train["window_days"] == 3
    cfg1 = load_config(config)
    assert cfg1.state_dir == wh1 / "state" and current_champion(cfg1).version == 1

    # the second warehouse, same folder and config: its own records (every stage runs), killed
    # during its first training after a checkpoint
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "nightly",
            "--config",
            str(config),
            "--warehouse",
            str(wh2),
            "--start",
            str(DAYS[0]),
            "--end",
            str(DAYS[4]),
        ],
        cwd=tmp_path,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    _kill_when(process, lambda: any((wh2 / "state" / "checkpoints").glob("*/last.pt")))
    out = process.stdout.read()
    assert all(_lines(out, night)["validate"].split()[2] == "done" for night in DAYS[:4]), out
    # rerun against another tracking store: the checkpoint's run and the night's parent run live
    # in the first store, so the night starts its MLflow part afresh there
    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    (tmp_path / "other").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert main(["nightly", "--config", str(config), "--warehouse", str(wh2), "--date", str(DAYS[4])]) == 0
    last = _lines(capsys.readouterr().out, DAYS[4])
    assert [last[s].split()[2] for s in ("validate", "features", "examples")] == ["skipped"] * 3
    assert "v1 promoted" in last["promote"]
    client = MlflowClient(other)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.stage = 'train'")
    assert [r.info.status for r in runs] == ["FINISHED"] and runs[0].data.tags["val_day"] == str(DAYS[2])

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(cfg1.state_dir) != other and current_champion(cfg1).version == 1  # the first store: as it was
    assert not (tmp_path / "state").exists()  # nothing in the shared folder's default state
