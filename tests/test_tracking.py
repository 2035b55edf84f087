"""MLflow runs of killed processes: a run whose process was killed before it could end
it (kill -9 before a training's first checkpoint) is marked FAILED by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from models.tracking import RunTracker, tracking_uri

ROOT = Path(__file__).resolve().parents[1]


def test_a_killed_processes_run_is_marked_failed_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    state = tmp_path / "state"
    code = (
        "import os, signal, sys\nfrom models.tracking import RunTracker\n"
        "print(RunTracker(sys.argv[1], 'train-2026-11-05', {'stage': 'train'}).run_id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", code, str(state)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    orphan = killed.stdout.strip()
    client = MlflowClient(tracking_uri(state))
    assert client.get_run(orphan).info.status == "RUNNING"
    live = RunTracker(state, "evaluate-2026-11-05", {"stage": "evaluate"})  # this process: alive

    RunTracker(state, "train-2026-11-05", {"stage": "train"})
    run = client.get_run(orphan)
    assert run.info.status == "FAILED" and "killed" in run.data.tags["outcome"]
    assert client.get_run(live.run_id).info.status == "RUNNING"
