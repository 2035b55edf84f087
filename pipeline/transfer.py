"""``funnelrank experiment transfer``: does sharing pay? The configured multi-task model
beside one single-task model per task, on the same data and seeds, per task view.

Models. Seed k (k = 0..N-1) sets the config's ``seed`` to ``seed + k``: the model's
initialisation and the batch order (the data are the warehouse's, the same for every
seed). Per seed: the configured model, and per binary task one single-task model, which
is the same config with every other task's ``loss_weight`` 0, ``model.loss_weighting =
"fixed"`` and ``model.conversion_head = "direct"`` (``single_task_config``). Its other
towers, heads and gates then get a zero gradient (AdamW's decoupled weight decay still
shrinks them by a factor 1 - lr x weight_decay a step) and the embeddings and shared
layers learn from its own loss alone, with the capacity of the multi-task model: only the
sharing differs. A task without ``after`` is trained on its own BCE over every row; a
funnel step (conversion after click) on BCE of P(conversion | click) over the clicked rows:
the ESMM paper's BASE model. Early stopping watches the task's own view (``cvr`` for a
funnel step) with the configured metric's kind.

Views. A task without ``after`` is measured by its own model; a funnel step's conditional
view (cvr) by the step's model on the rows where ``after`` is 1, and its joint view (ctcvr)
by the product of the two single-task models' probabilities: P(click) from the click model
x P(conversion | click) from the conversion model, on every row.

Data. What the nightly ``train`` for the run date trains on (``pipeline.train_stage``: the
window of mature days before it, validated on the newest), scored on the validation day as
``evaluate`` scores a night (or on ``--test-date``, a later mature day no model has seen);
a ``[table]`` source: trained on its train split, validated on val, scored on test.

Standard errors. Per seed, the difference d_k = AUC(multi-task) - AUC(single-task) on the
same rows has DeLong's paired standard error s_k (``models.metrics``). Over N seeds the
report gives mean(d) with SE^2 = var_k(d_k) / N + mean_k(s_k^2). The two terms are the two
sources of noise: training (initialisation and batch order: independent over seeds, so
it averages down as var / N) and the test rows (one set of rows shared by every seed, so
their noise does not average down: the rows' part of d_k is nearly the same for every k,
and its variance is s_k^2, counted once, not divided by N). var_k(d_k) also holds the part
of the rows' noise that differs between seeds, so the sum is conservative. With one seed
the training noise is not measured: SE = s_0. Each AUC's own ± is combined the same way
from its unpaired DeLong SE. The verdict: sharing ``helps`` when mean(d) > 2 SE, ``hurts``
when mean(d) < -2 SE, else ``no significant difference``.

MLflow: one parent run (stage ``experiment``) whose children are the trained models (stage
``experiment-train``, so ``runs compare`` keeps to the nightly trainings), with the
report (``transfer/report.md``, ``transfer/report.json``), its metrics and the comparison
plot (``transfer/auc_by_model.png``). The runs are keyed by their configs and data, as a
nightly training is: the same command again reuses finished models (a killed one resumes
from its last epoch) and reopens the same parent run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from features.config import TaskConfig, task_views
from features.errors import StageError
from pipeline.config import FunnelConfig, parse_config

Z_SIGNIFICANT = 2.0  # |difference| above this many standard errors is a verdict
MULTI_TASK = "multi_task"
VERDICTS = ("helps", "no significant difference", "hurts")


def binary_tasks(tasks: Sequence[TaskConfig]) -> list[TaskConfig]:
    """The tasks whose views have an AUC (0/1 labels); the others get no single-task model."""
    return [t for t in tasks if getattr(t, "kind", "binary") == "binary"]


def report_views(cfg: FunnelConfig) -> dict[str, tuple[str, str | None]]:
    """The task views the report compares: those of the binary tasks (click, cvr, ctcvr)."""
    return task_views(binary_tasks(cfg.tasks))


def with_seed(cfg: FunnelConfig, seed: int) -> FunnelConfig:
    data = cfg.model_dump(by_alias=True)
    return parse_config({**data, "seed": seed}, f"transfer: seed {seed}")


def single_task_config(cfg: FunnelConfig, task: str) -> FunnelConfig:
    """``cfg`` trained on ``task``'s loss alone (module docstring): every other task's
    loss_weight 0, fixed weighting, the direct conversion head, early stopping on the task's
    own view."""
    by_name = {t.name: t for t in cfg.tasks}
    if task not in {t.name for t in binary_tasks(cfg.tasks)}:
        raise ValueError(f"no binary task {task!r} among {list(by_name)}")
    own = by_name[task]
    view = own.conditional_name if own.after else own.name
    kind = cfg.early_stopping_metric.rsplit("_", 1)[1]
    data = cfg.model_dump(by_alias=True)
    data["tasks"] = [{**t, "loss_weight": 1.0 if t["name"] == task else 0.0} for t in data["tasks"]]
    data["model"] = {**data["model"], "loss_weighting": "fixed", "conversion_head": "direct"}
    data["train"] = {**data["train"], "early_stopping_metric": f"{view}_{kind}"}
    return parse_config(data, f"transfer: single-task {task}")


def model_configs(cfg: FunnelConfig, seeds: int) -> list[tuple[str, int, FunnelConfig]]:
    """(label, seed, config) of every model, seed-major (a cut-short experiment has whole
    seeds): ``multi_task`` and ``single_<task>`` per binary task."""
    out = []
    for k in range(seeds):
        seeded = with_seed(cfg, cfg.seed + k)
        out.append((MULTI_TASK, seeded.seed, seeded))
        out += [(f"single_{t.name}", seeded.seed, single_task_config(seeded, t.name)) for t in binary_tasks(cfg.tasks)]
    return out


def single_task_probs(tasks: Sequence[TaskConfig], preds: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """Per view, the single-task models' probabilities (module docstring); ``preds``:
    task -> its single-task model's ``predict`` output."""
    probs: dict[str, np.ndarray] = {}
    for t in binary_tasks(tasks):
        if t.after is None:
            probs[t.name] = preds[t.name][f"p_{t.name}"]
    for t in binary_tasks(tasks):
        if t.after is not None:
            probs[t.conditional_name] = preds[t.name][f"p_{t.conditional_name}"]
            probs[t.joint_name] = probs[t.after] * probs[t.conditional_name]
    return probs


# ---------------------------------------------------------------- the report's numbers


def combined_se(values: Sequence[float], standard_errors: Sequence[float]) -> float:
    """Standard error of mean(values) over seeds that share their test rows: sqrt(var(values)
    / n + mean(se^2)) (module docstring); one value: its own se."""
    values, se = np.asarray(values, dtype=np.float64), np.asarray(standard_errors, dtype=np.float64)
    between = values.var(ddof=1) / len(values) if len(values) > 1 else 0.0
    return float(np.sqrt(between + np.mean(se**2)))


def verdict(diff: float, se: float, z: float = Z_SIGNIFICANT) -> str:
    """helps / hurts when the multi-task minus single-task difference is beyond ``z``
    standard errors, else no significant difference; undetermined without numbers."""
    if not (np.isfinite(diff) and np.isfinite(se)):
        return "undetermined"
    if abs(diff) > z * se:
        return "helps" if diff > 0 else "hurts"
    return "no significant difference"


def seed_comparison(
    views: Mapping[str, tuple[str, str | None]],
    labels: Mapping[str, np.ndarray],
    multi: Mapping[str, np.ndarray],
    single: Mapping[str, np.ndarray],
) -> dict[str, dict[str, float]]:
    """One seed, per view: both AUCs with their standard errors, the difference and its
    paired standard error (multi and single: view -> probabilities on the same rows)."""
    from models.metrics import view_auc_difference_standard_errors, view_metrics

    m, s = view_metrics(views, labels, multi, None), view_metrics(views, labels, single, None)
    paired = view_auc_difference_standard_errors(views, labels, multi, single)
    return {
        v: {
            "multi_task_auc": m[f"{v}_auc"],
            "multi_task_auc_se": m[f"{v}_auc_se"],
            "single_task_auc": s[f"{v}_auc"],
            "single_task_auc_se": s[f"{v}_auc_se"],
            "diff": m[f"{v}_auc"] - s[f"{v}_auc"],
            "diff_se": paired[v],
        }
        for v in views
    }


def summarise(per_seed: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict]:
    """Per view over the seeds (``seed_comparison`` outputs): mean AUCs and difference with
    their combined standard errors, the verdict, and the seeds' own numbers."""
    out = {}
    for view in per_seed[0]:
        rows = [s[view] for s in per_seed]
        entry = {}
        for what, se_key in (
            ("multi_task_auc", "multi_task_auc_se"),
            ("single_task_auc", "single_task_auc_se"),
            ("diff", "diff_se"),
        ):
            entry[what] = float(np.mean([r[what] for r in rows]))
            entry[se_key] = combined_se([r[what] for r in rows], [r[se_key] for r in rows])
        entry["verdict"] = verdict(entry["diff"], entry["diff_se"])
        entry["per_seed"] = rows
        out[view] = entry
    return out


def markdown(views: Mapping[str, dict]) -> str:
    """The report's table (``summarise``'s output), aligned for a terminal too."""
    header = ["view", "multi-task AUC", "single-task AUC", "difference (multi - single)", "verdict"]
    body = [
        [
            view,
            f"{e['multi_task_auc']:.4f} ± {e['multi_task_auc_se']:.4f}",
            f"{e['single_task_auc']:.4f} ± {e['single_task_auc_se']:.4f}",
            f"{e['diff']:+.4f} ± {e['diff_se']:.4f}",
            e["verdict"],
        ]
        for view, e in views.items()
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def plot_report(views: Mapping[str, dict], title: str):
    """AUC per view (one panel each) of the multi-task and single-task models: each seed's
    value and the mean with its 95% interval (1.96 combined SE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(views), figsize=(3.6 * len(views), 3.8), squeeze=False)
    for ax, (view, e) in zip(axes[0], views.items(), strict=True):
        for x, who in enumerate(("multi_task", "single_task")):
            seeds = [r[f"{who}_auc"] for r in e["per_seed"]]
            ax.plot([x] * len(seeds), seeds, "o", color="grey", alpha=0.5, markersize=4)
            ax.errorbar(x, e[f"{who}_auc"], yerr=1.96 * e[f"{who}_auc_se"], fmt="s", capsize=5, markersize=7)
        ax.set_xticks([0, 1], ["multi-task", "single-task"])
        ax.set_xlim(-0.6, 1.6)
        ax.set(title=f"{view}: {e['diff']:+.4f} ± {e['diff_se']:.4f}\n{e['verdict']}", ylabel="AUC")
    fig.suptitle(f"{title}\nsquares: mean over the seeds, bars: its 95% interval; dots: each seed", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- running it


def predict_table(model, cfg: FunnelConfig, files: Sequence[Path]) -> dict[str, np.ndarray]:
    """A trained model's ``predict`` output over ``files`` (in file order: every model the same rows)."""
    import torch

    from models.loader import table_loader
    from models.predict import predict

    return predict(model, table_loader(cfg, files, batch_size=16_384, shuffle=False), torch.device("cpu"))


def compare_predictions(
    cfg: FunnelConfig, multi: Mapping[str, np.ndarray], singles: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, dict[str, float]]:
    """``seed_comparison`` of one seed's ``predict`` outputs: the multi-task model's and
    each binary task's single-task model's (task -> output), on the same rows."""
    from models.predict import prediction_labels

    labels = prediction_labels(multi)
    for task, pred in singles.items():
        if any(not np.array_equal(v, pred[f"label_{k}"]) for k, v in labels.items()):
            raise StageError(f"the single-task {task} model was scored on other rows than the multi-task model")
    views = report_views(cfg)
    multi_probs = {v: multi[f"p_{v}"] for v in views}
    return seed_comparison(views, labels, multi_probs, single_task_probs(cfg.tasks, singles))


def evaluation_files(
    cfg: FunnelConfig, warehouse: Path, run_date: dt.date | None, test_date: dt.date | None
) -> tuple[str, list[Path]]:
    """(name, files) the models are scored on: ``evaluate``'s table (the validation day, or
    a ``[table]`` source's test split), or the mature day ``test_date`` after the training window."""
    from features.catalog import training_dir
    from features.contract import day_str
    from models.loader import parquet_files
    from pipeline.evaluate import evaluation_table
    from pipeline.train_stage import training_window

    if test_date is None:
        return evaluation_table(cfg, warehouse, run_date)
    if cfg.table is not None:
        raise StageError("--test-date is for event logs: a [table] source is scored on its test split")
    train_days, _ = training_window(cfg, run_date)
    if test_date <= train_days[-1]:
        raise StageError(
            f"--test-date {day_str(test_date)} is inside the training window (up to {day_str(train_days[-1])}): "
            "give the validation day or a later mature day"
        )
    folder = training_dir(warehouse, test_date)
    files = parquet_files(folder) if folder.is_dir() else []
    if not files:
        raise StageError(
            f"no training table for --test-date {day_str(test_date)} ({folder}): run `funnelrank examples` for it first"
        )
    return day_str(test_date), files


def run_transfer(
    cfg: FunnelConfig,
    warehouse: Path,
    run_date: dt.date | None,
    seeds: int,
    test_date: dt.date | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Train (or reuse) every model of the experiment, score them, log the report under one
    MLflow parent run; the report: {"views": summarise(...), "eval": name, "rows", "seeds",
    "runs": {"<label> seed <s>": MLflow run id}, "mlflow_run_id": the parent's, "markdown"}."""
    from models.train import run_key, train_model
    from pipeline.train_stage import training_data

    if seeds < 1:
        raise ValueError(f"seeds must be at least 1 (got {seeds})")
    if len(binary_tasks(cfg.tasks)) < 2:
        raise StageError("the transfer experiment compares binary tasks: the config has fewer than two")
    data = training_data(cfg, warehouse, run_date)
    eval_name, eval_files = evaluation_files(cfg, warehouse, run_date, test_date)
    models = model_configs(cfg, seeds)
    named = {
        (label, seed): dataclasses.replace(data, name=f"{data.name}-transfer-{label}-seed{seed}")
        for label, seed, _ in models
    }
    keys = [run_key(c, warehouse, named[label, seed]) for label, seed, c in models]
    key = hashlib.sha256(json.dumps([keys, eval_name, [str(f) for f in eval_files]]).encode()).hexdigest()[:16]
    parent = _parent_tracker(cfg, data, key, eval_name, seeds)
    echo(
        f"transfer experiment {key}: {len(models)} models ({seeds} seed(s) from {cfg.seed}), scored on {eval_name}; "
        f"MLflow parent run {parent.run_id}"
    )
    try:
        runs, per_seed, rows = {}, [], 0
        by_seed: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        for i, (label, seed, model_cfg) in enumerate(models, 1):
            echo(f"[{i}/{len(models)}] {label} seed {seed}: training")
            started = time.perf_counter()
            result = train_model(
                model_cfg,
                warehouse,
                named[label, seed],
                progress=progress,
                parent_run_id=parent.run_id,
                extra_tags={"stage": "experiment-train", "experiment": "transfer", "transfer.model": label},
            )
            pred = predict_table(result.model, model_cfg, eval_files)
            rows = len(pred["user"])
            runs[f"{label} seed {seed}"] = result.mlflow_run_id
            by_seed.setdefault(seed, {})[label] = pred
            echo(
                f"[{i}/{len(models)}] {label} seed {seed}: {result.epochs_run} epochs, best "
                f"{model_cfg.early_stopping_metric} {result.best_metric:.4f} ({time.perf_counter() - started:.0f} s)"
            )
            if len(by_seed[seed]) == 1 + len(binary_tasks(cfg.tasks)):  # the seed's models are all done
                done = by_seed.pop(seed)
                singles = {label.removeprefix("single_"): p for label, p in done.items() if label != MULTI_TASK}
                per_seed.append(compare_predictions(cfg, done[MULTI_TASK], singles))
        views = summarise(per_seed)
        title = f"transfer: {data.name}, {seeds} seed(s), scored on {eval_name} ({rows:,} rows)"
        report = {
            "key": key,
            "eval": eval_name,
            "rows": rows,
            "seeds": [seed for label, seed, _ in models if label == MULTI_TASK],
            "views": views,
            "runs": runs,
            "mlflow_run_id": parent.run_id,
            "markdown": markdown(views),
        }
        parent.log_metrics(
            {f"transfer/{v}_{k}": e[k] for v, e in views.items() for k in e if k not in ("verdict", "per_seed")}, 0
        )
        for v, e in views.items():
            parent.client.set_tag(parent.run_id, f"transfer.verdict.{v}", e["verdict"])
        parent.client.log_text(parent.run_id, f"# {title}\n\n{report['markdown']}\n", "transfer/report.md")
        parent.log_dict({k: v for k, v in report.items() if k != "markdown"}, "transfer/report.json")
        parent.log_figure(plot_report(views, title), "transfer/auc_by_model.png")
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end()
    return report


def _parent_tracker(cfg: FunnelConfig, data, key: str, eval_name: str, seeds: int):
    """The experiment's parent run: the one of an earlier run of the same experiment
    (``key``), reopened, or a new one."""
    from mlflow.tracking import MlflowClient

    from models.tracking import EXPERIMENT, RunTracker, tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(cfg.state_dir))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    found = (
        client.search_runs([experiment.experiment_id], f"tags.`transfer.key` = '{key}'", max_results=1)
        if experiment is not None
        else []
    )
    tags = {
        "stage": "experiment",
        "experiment": "transfer",
        "transfer.key": key,
        "eval": eval_name,
        "seeds": str(seeds),
        **{k: v for k, v in data.tags.items() if not k.startswith("data.")},
    }
    return RunTracker(cfg.state_dir, f"transfer-{data.name}", tags, run_id=found[0].info.run_id if found else None)
