"""``funnelrank runs compare``: training runs side by side, from the MLflow store.

A terminal table of the key validation metrics (best epoch) and of every config key
whose value differs between the runs, and a picture of the metrics' trend over the
nights per task, written to a path or logged to the newest run's artifacts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from features.errors import StageError
from models.tracking import EXPERIMENT, tracking_uri
from pipeline.config import FunnelConfig

KEY_TAGS = ("run_date", "warm_start", "warm_start_version")


def key_metrics(cfg: FunnelConfig) -> list[str]:
    """The table's metrics: per task view (click, cvr, ctcvr by default) AUC, GAUC, logloss, calibration."""
    return [f"{view}_{m}" for view in cfg.views() for m in ("auc", "gauc", "logloss", "calibration")]


def find_runs(cfg: FunnelConfig, run_ids: Sequence[str] = (), last: int = 5) -> list:
    """The given training runs, or the newest ``last`` finished ones, oldest first."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg.state_dir))
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException:
                raise StageError(f"no MLflow run {run_id!r} in {tracking_uri(cfg.state_dir)}") from None
        return runs
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise StageError(f"no training runs yet in {tracking_uri(cfg.state_dir)} (experiment {EXPERIMENT!r})")
    runs = client.search_runs(
        [experiment.experiment_id],
        "tags.stage = 'train' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=last,
    )
    if not runs:
        raise StageError(f"no finished training runs in {tracking_uri(cfg.state_dir)}")
    return sorted(runs, key=lambda r: (r.data.tags.get("run_date", ""), r.info.start_time))


def differing_params(runs: Sequence) -> dict[str, list[str]]:
    keys = sorted({k for r in runs for k in r.data.params})
    values = {k: [r.data.params.get(k, "-") for r in runs] for k in keys}
    return {k: v for k, v in values.items() if len(set(v)) > 1}


def comparison_rows(runs: Sequence, metrics: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(label, one cell per run): tags, best-epoch metrics, then differing config keys."""
    rows = [("run", [f"{r.info.run_name} ({r.info.run_id[:8]})" for r in runs])]
    rows += [(tag, [r.data.tags.get(tag, "-") for r in runs]) for tag in KEY_TAGS]
    for metric in metrics:
        rows.append((metric, [_cell(r.data.metrics, metric) for r in runs]))
    rows += [(f"config: {k}", v) for k, v in differing_params(runs).items()]
    return rows


def _cell(logged: dict[str, float], metric: str) -> str:
    """A run's best-epoch value of ``metric``; an AUC with its standard error where logged."""
    value, se = logged.get(f"best/{metric}"), logged.get(f"best/{metric}_se")
    if value is None:
        return "-"
    return f"{value:.4f} ± {se:.4f}" if se is not None else f"{value:.4f}"


def plot_trends(runs: Sequence, metrics: Sequence[str]):
    """``metrics`` (e.g. the AUC of each task view) over the runs' nights (x: run date, or
    run name without one), with 95% error bars where a standard error is logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.data.tags.get("run_date") or r.info.run_name for r in runs]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = [r.data.metrics.get(f"best/{metric}", float("nan")) for r in runs]
        # 95% interval of each value where its standard error is logged (AUCs); none otherwise
        spread = [1.96 * r.data.metrics.get(f"best/{metric}_se", 0.0) for r in runs]
        ax.errorbar(range(len(runs)), values, yerr=spread, marker="o", capsize=3)
        ax.set_xticks(range(len(runs)), labels, rotation=45, ha="right")
        ax.set(title=metric, ylabel="validation (best epoch)")
    fig.suptitle("funnelrank: metrics over nights (bars: 95% interval from the validation rows)")
    fig.tight_layout()
    return fig


def compare_runs(
    cfg: FunnelConfig, run_ids: Sequence[str] = (), last: int = 5, output: Path | None = None
) -> tuple[list, str]:
    """Print-ready rows and where the trend picture went (a path, or an MLflow artifact)."""
    from mlflow.tracking import MlflowClient

    runs = find_runs(cfg, run_ids, last)
    fig = plot_trends(runs, [f"{view}_auc" for view in cfg.views()])
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=100)
        where = str(output)
    else:
        name = f"reports/compare_{len(runs)}_runs.png"
        MlflowClient(tracking_uri=tracking_uri(cfg.state_dir)).log_figure(runs[-1].info.run_id, fig, name)
        where = f"MLflow run {runs[-1].info.run_id}: {name}"
    import matplotlib.pyplot as plt

    plt.close(fig)
    return comparison_rows(runs, key_metrics(cfg)), where


def render(rows: list[tuple[str, list[str]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    header, *body = rows
    table = Table(
        title="funnelrank runs (validation metrics of the best epoch, AUC ± its standard error; "
        "config keys that differ)"
    )
    table.add_column(header[0])
    for cell in header[1]:
        table.add_column(cell, justify="right")
    for label, cells in body:
        table.add_row(label, *cells)
    Console(width=max(120, 30 + 28 * len(header[1]))).print(table)
