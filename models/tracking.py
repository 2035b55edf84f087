"""MLflow tracking for training runs, and the plots logged with them.

The store is explicit (MLflow's own default depends on the working directory):
``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<state_dir>/mlflow.db`` with artifacts
under ``<state_dir>/mlartifacts``. Everything goes through an ``MlflowClient`` bound to a
run id, so no global "active run" state leaks between stages or tests.

Each run is tagged with the machine and process that run it (``funnelrank.process``): a
process killed before it could end its run (kill -9, before a training's first
checkpoint) leaves it RUNNING, and the next run started in the experiment marks it FAILED.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from features.io import process_alive  # noqa: E402
from models.metrics import reliability_curve, roc_curve  # noqa: E402

EXPERIMENT = "funnelrank-train"
# MLflow draws a progress bar per artifact download: noise in a nightly run's log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
_BATCH = 100  # MLflow's limit of params / metrics per log_batch call
PROCESS_TAG = "funnelrank.process"  # "<host>:<pid>" of the process running the run


def tracking_uri(state_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(state_dir).resolve() / 'mlflow.db'}"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """{"model": {"n_experts": 4}} -> {"model.n_experts": "4"} (lists stay one value)."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)
    return out


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def to_toml(tree: Mapping, prefix: str = "") -> str:
    """A config tree (a run config's ``model_dump(by_alias=True)``) as TOML that loads back."""
    lines = [
        f"{k} = {_toml_value(v)}"
        for k, v in tree.items()
        if v is not None
        and not isinstance(v, Mapping)
        and not (isinstance(v, list) and v and isinstance(v[0], Mapping))
    ]
    for k, v in tree.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{prefix}{k}]", to_toml(v, f"{prefix}{k}.")]
        elif isinstance(v, list) and v and isinstance(v[0], Mapping):
            for item in v:
                lines += ["", f"[[{prefix}{k}]]", to_toml(item, f"{prefix}{k}.")]
    return "\n".join(lines).strip("\n") + "\n"


REPOSITORY = Path(__file__).resolve().parent.parent


def git_commit(repo: Path = REPOSITORY) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


class RunTracker:
    """One MLflow run: created, or reopened by id when a killed training resumes."""

    def __init__(
        self,
        state_dir: Path,
        run_name: str,
        tags: Mapping[str, str],
        run_id: str | None = None,
        experiment: str = EXPERIMENT,
    ) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri(state_dir))
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, PROCESS_TAG, _this_process())
            return
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            artifacts = (
                None if os.environ.get("MLFLOW_TRACKING_URI") else (Path(state_dir).resolve() / "mlartifacts").as_uri()
            )
            experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        else:
            experiment_id = found.experiment_id
        fail_orphaned_runs(self.client, experiment_id)
        self.run_id = self.client.create_run(
            experiment_id, run_name=run_name, tags={**tags, PROCESS_TAG: _this_process()}
        ).info.run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def log_file(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_dict(self, obj: object, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def log_figure(self, fig: plt.Figure, name: str) -> None:
        self.client.log_figure(self.run_id, fig, name)
        plt.close(fig)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_orphaned_runs(client: MlflowClient, experiment_id: str) -> None:
    """Mark FAILED the experiment's RUNNING runs whose process, on this machine, has ended
    without ending them (killed); runs of live processes and of other machines are left
    alone. A killed training that had checkpointed reopens its run when it resumes."""
    host = socket.gethostname()
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=10_000):
        owner, _, pid = run.data.tags.get(PROCESS_TAG, "").rpartition(":")
        if owner == host and pid.isdigit() and not process_alive(int(pid)):
            client.set_tag(
                run.info.run_id, "outcome", f"failed: its process {pid} ended without ending the run (killed)"
            )
            client.set_terminated(run.info.run_id, status="FAILED")


# ---------------------------------------------------------------- plots


def plot_loss_curves(history: Sequence[Mapping[str, float]]) -> plt.Figure:
    """Per-epoch train and validation loss of each task."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for key in ("train/loss_click", "train/loss_conversion", "val/click_logloss", "val/ctcvr_logloss"):
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    ax.set(xlabel="epoch", ylabel="loss", title="loss curves")
    ax.legend()
    return fig


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> plt.Figure:
    """ROC per task; ``curves`` maps task -> (labels, scores)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for task, (labels, scores) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=task)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (validation day)")
    ax.legend()
    return fig


def plot_reliability(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> plt.Figure:
    """Reliability diagram per task (mean prediction vs observed rate per bin)."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 4), squeeze=False)
    for ax, (task, (labels, probs)) in zip(axes[0], curves.items(), strict=True):
        mean_p, observed, _ = reliability_curve(labels, probs)
        top = max(float(np.nanmax(np.r_[mean_p, observed, 1e-3])), 1e-3)
        ax.plot([0, top], [0, top], color="grey", linestyle=":")
        ax.plot(mean_p, observed, marker="o")
        ax.set(xlabel="mean prediction", ylabel="observed rate", title=task)
    fig.tight_layout()
    return fig


def plot_gate_usage(usage: Mapping[str, np.ndarray]) -> plt.Figure:
    """MMoE or PLE: mean gate weight per task (rows) x expert (columns; PLE: the task's own experts first)."""
    tasks = list(usage)
    matrix = np.stack([usage[t] for t in tasks])
    fig, ax = plt.subplots(figsize=(1 + matrix.shape[1], 1 + len(tasks)))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k")
    ax.set(
        xticks=range(matrix.shape[1]),
        yticks=range(len(tasks)),
        yticklabels=tasks,
        xlabel="expert",
        title="gate usage (mean weight per expert)",
    )
    fig.colorbar(im)
    fig.tight_layout()
    return fig
