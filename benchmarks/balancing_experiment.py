"""Task balancing against negative transfer: on synthetic worlds of related, unrelated and
conflicting tasks, does a balancing method let the multi-task model match single-task ones?

    python -m benchmarks.balancing_experiment [--config configs/demo.toml] [--seeds 3] \
        [--correlations 0.9 0.3 -0.5] [--methods fixed uncertainty dwa gradnorm pcgrad] \
        [--backbones mmoe] [--heads esmm] [--days 14] [--users 20000] [--items 5000] \
        [--impressions-per-day 100000] [--epochs 3] [--window-days 7] [--batch-size 4096] \
        [--workdir DIR] [--output state/balancing_experiment] [--report-only]

Worlds: per task correlation (``generate.task_correlation``: 0.9 related, 0.3 weakly
related, -0.5 conflicting: the two tasks' weights on the shared hidden features point
apart) one synthetic world of the config's size (``--days``, ``--users``, ... make it
smaller for a quick run), drawn with the config's seed; validate -> features -> examples
for every day (``benchmarks.mtl_experiment.build_warehouse``).

Models, as ``funnelrank experiment transfer`` trains them (``pipeline.transfer``): seed k
= config seed + k (k = 0..N-1) sets the model's initialisation and batch order, on the same
world. Per (seed, backbone): one single-task model per task (the other task's loss weight
0, fixed weighting, direct conversion head: ``pipeline.transfer.single_task_config``); per
(seed, backbone, head, method): the multi-task model with ``model.loss_weighting`` =
method. Every model trains on the ``train.window_days - 1`` days before L - 1, early-stops
on L - 1 and is scored on L, the newest mature day (the test day, unseen by training and
model selection; ``mtl_experiment.held_out_day``).

Numbers: per view (click; cvr on clicked rows; ctcvr on every row, the single-task
side's being the product of the two single-task models), test-day AUC and, for each
method, its difference against the single-task models of the same seed with DeLong's
paired standard error; over the seeds, means with the combined standard error of
``pipeline.transfer`` (the seeds share the test rows: SE^2 = var over seeds / N + the mean
squared per-seed SE) and the transfer verdict (beyond 2 SE: helps / hurts). The last
column says whether the method matches or beats the single-task models on every view within
one standard error (difference >= -SE), the issue's bar.

Output: printed and written as ``<output>.md`` and ``<output>.csv``; every trained model is
a row of ``<output>-runs.csv`` as it finishes, and a rerun with the same options skips the
runs already there (runs are keyed by correlation, seed, backbone, head and method only:
give other options another --output). The single-task models' test-day predictions are
kept in ``<output>-single/`` so a resumed run compares new methods with them without
training them again. ``--report-only`` writes the table from the runs done so far.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np

from benchmarks.mtl_experiment import (
    add_world_arguments,
    append_run,
    build_warehouse,
    experiment_workdir,
    held_out_day,
    log_days,
    read_runs,
    with_overrides,
    world_config,
    write_summary,
)
from features.config import ConfigError
from pipeline.config import DEFAULT_CONFIG, FunnelConfig
from pipeline.transfer import (
    combined_se,
    compare_predictions,
    report_views,
    single_task_config,
    verdict,
)

METHODS = ("fixed", "uncertainty", "dwa", "gradnorm", "pcgrad")
SINGLE = "single_task"  # the method field of the single-task models' rows
TEXT_FIELDS = ("backbone", "head", "method")


def run_fields(views: list[str]) -> list[str]:
    per_view = [f"{v}_{m}" for v in views for m in ("auc", "auc_se", "diff", "diff_se")]
    return ["correlation", "seed", "backbone", "head", "method", "epochs", "seconds", *per_view]


def train_and_predict(cfg: FunnelConfig, warehouse: Path, run_date: dt.date, test_files: list[Path]) -> tuple:
    """Train the config's model for ``run_date``: (its ``predict`` output on ``test_files``, epochs run)."""
    from pipeline.train_stage import train_run
    from pipeline.transfer import predict_table

    result = train_run(cfg, warehouse, run_date, progress=False)
    return predict_table(result.model, cfg, test_files), result.epochs_run


def _kept(pred: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in pred.items() if k.startswith(("label_", "p_"))}


def single_task_predictions(
    cfg: FunnelConfig, warehouse: Path, run_date: dt.date, test_files: list[Path], saved: Path, echo
) -> tuple[dict[str, dict[str, np.ndarray]], list[dict]]:
    """Task -> its single-task model's test-day predictions (labels and probabilities), read
    from ``saved`` (.npz) or trained now and saved; and the rows of the models trained now."""
    tasks = [t.name for t in cfg.tasks]
    if saved.exists():
        with np.load(saved) as stored:
            return {
                t: {k.split("/", 1)[1]: stored[k] for k in stored.files if k.startswith(f"{t}/")} for t in tasks
            }, []
    preds, trained = {}, []
    for task in tasks:
        started = time.perf_counter()
        pred, epochs = train_and_predict(single_task_config(cfg, task), warehouse, run_date, test_files)
        preds[task] = _kept(pred)
        trained.append({"task": task, "epochs": epochs, "seconds": round(time.perf_counter() - started, 1)})
        echo(f"    single-task {task}: {epochs} epochs, {trained[-1]['seconds']:.0f} s")
    saved.parent.mkdir(parents=True, exist_ok=True)
    np.savez(saved, **{f"{t}/{k}": v for t, p in preds.items() for k, v in p.items()})
    return preds, trained


def _row(key: tuple, epochs: int, seconds: float, views: dict[str, dict[str, float]]) -> dict:
    """A runs-CSV row: the run's key, epochs, seconds and per view auc, auc_se, diff, diff_se."""
    row = dict(zip(("correlation", "seed", "backbone", "head", "method"), key, strict=True))
    row |= {"epochs": epochs, "seconds": seconds}
    return row | {f"{v}_{m}": n[m] for v, n in views.items() for m in ("auc", "auc_se", "diff", "diff_se")}


def run_experiment(
    base: FunnelConfig,
    correlations: list[float],
    seeds: int,
    backbones: list[str],
    heads: list[str],
    methods: list[str],
    workdir: Path,
    output: Path,
    echo=print,
) -> list[dict]:
    """Every run not yet in ``<output>-runs.csv``; returns all its rows."""
    from features.catalog import training_dir
    from models.loader import parquet_files

    runs_csv = output.with_name(output.name + "-runs.csv")
    views = list(report_views(base))
    fields = run_fields(views)
    done = {tuple(r[f] for f in fields[:5]) for r in read_runs(runs_csv, TEXT_FIELDS)}
    for correlation in correlations:
        wanted = [
            (correlation, float(base.seed + k), b, h, m)
            for k in range(seeds)
            for b in backbones
            for h, m in [("direct", SINGLE), *((h, m) for h in heads for m in methods)]
        ]
        if all(key in done for key in wanted):
            continue
        folder = workdir / f"corr{correlation}"
        world = with_overrides(
            base, top={"state_dir": str(folder / "state")}, generate={"task_correlation": correlation}
        )
        warehouse = folder / "warehouse"
        started = time.perf_counter()
        build_warehouse(world, warehouse)
        test_files = parquet_files(training_dir(warehouse, held_out_day(world)))
        run_date = log_days(world)[-1] - dt.timedelta(days=1)  # validation day = test day - 1
        echo(f"correlation {correlation}: world ready in {time.perf_counter() - started:.0f} s")
        for k in range(seeds):
            seed = base.seed + k
            for backbone in backbones:
                keys = [key for key in wanted if key[1] == seed and key[2] == backbone]
                if all(key in done for key in keys):
                    continue
                cfg = with_overrides(world, top={"seed": seed}, model={"backbone": backbone})
                saved = output.with_name(output.name + "-single") / f"corr{correlation}-seed{seed}-{backbone}.npz"
                singles, trained = single_task_predictions(cfg, warehouse, run_date, test_files, saved, echo)
                single_key = (correlation, float(seed), backbone, "direct", SINGLE)
                if single_key not in done:
                    view_numbers = single_task_numbers(cfg, singles)
                    epochs = max((t["epochs"] for t in trained), default=0)
                    seconds = sum(t["seconds"] for t in trained)
                    append_run(runs_csv, _row(single_key, epochs, seconds, view_numbers), fields)
                for head in heads:
                    for method in methods:
                        key = (correlation, float(seed), backbone, head, method)
                        if key in done:
                            continue
                        started = time.perf_counter()
                        model_cfg = with_overrides(cfg, model={"conversion_head": head, "loss_weighting": method})
                        pred, epochs = train_and_predict(model_cfg, warehouse, run_date, test_files)
                        compared = compare_predictions(model_cfg, pred, singles)
                        view_numbers = {
                            v: {
                                "auc": e["multi_task_auc"],
                                "auc_se": e["multi_task_auc_se"],
                                "diff": e["diff"],
                                "diff_se": e["diff_se"],
                            }
                            for v, e in compared.items()
                        }
                        seconds = round(time.perf_counter() - started, 1)
                        append_run(runs_csv, _row(key, epochs, seconds, view_numbers), fields)
                        echo(
                            f"  seed {seed} {backbone} {head} {method:11s} "
                            + "  ".join(f"{v} {n['auc']:.4f} ({n['diff']:+.4f})" for v, n in view_numbers.items())
                            + f"  ({epochs} epochs, {seconds:.0f} s)"
                        )
    return read_runs(runs_csv, TEXT_FIELDS)


def single_task_numbers(cfg: FunnelConfig, singles: dict[str, dict[str, np.ndarray]]) -> dict[str, dict]:
    """The single-task side's test-day AUC and its standard error per view (no difference)."""
    from models.metrics import view_metrics
    from models.predict import prediction_labels
    from pipeline.transfer import single_task_probs

    views = report_views(cfg)
    m = view_metrics(views, prediction_labels(singles[cfg.tasks[0].name]), single_task_probs(cfg.tasks, singles), None)
    nan = float("nan")
    return {v: {"auc": m[f"{v}_auc"], "auc_se": m[f"{v}_auc_se"], "diff": nan, "diff_se": nan} for v in views}


def summarise(rows: list[dict], views: list[str]) -> list[dict]:
    """Per (correlation, backbone, head, method): each view's mean AUC and, for a method, its
    difference against the single-task models, with the combined standard errors over the
    seeds (``pipeline.transfer.combined_se``) and the verdict."""
    order = {m: i for i, m in enumerate((SINGLE, *METHODS))}
    groups = sorted(
        {(r["correlation"], r["backbone"], r["head"], r["method"]) for r in rows},
        key=lambda g: (-g[0], g[1], g[3] != SINGLE, g[2], order.get(g[3], 99)),
    )
    out = []
    for group in groups:
        members = [r for r in rows if (r["correlation"], r["backbone"], r["head"], r["method"]) == group]
        entry = dict(zip(("correlation", "backbone", "head", "method"), group, strict=True)) | {"seeds": len(members)}
        for v in views:
            for what in ("auc", "diff"):
                values = [r[f"{v}_{what}"] for r in members]
                entry[f"{v}_{what}"] = float(np.mean(values))
                entry[f"{v}_{what}_se"] = combined_se(values, [r[f"{v}_{what}_se"] for r in members])
            entry[f"{v}_verdict"] = verdict(entry[f"{v}_diff"], entry[f"{v}_diff_se"]) if group[3] != SINGLE else ""
        if group[3] != SINGLE:
            entry["matches_single_task"] = all(entry[f"{v}_diff"] >= -entry[f"{v}_diff_se"] for v in views)
        else:
            entry["matches_single_task"] = ""
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    views = [k.removesuffix("_verdict") for k in summary[0] if k.endswith("_verdict")] if summary else []
    header = [
        "correlation",
        "backbone",
        "head",
        "method",
        "seeds",
        *(f"{v} AUC" for v in views),
        *(f"Δ {v} vs single-task" for v in views),
        "matches single-task (Δ ≥ -SE on every view)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in summary:
        cells = [f"{e['correlation']:.2f}", e["backbone"], e["head"], e["method"], str(e["seeds"])]
        cells += [f"{e[f'{v}_auc']:.4f} ± {e[f'{v}_auc_se']:.4f}" for v in views]
        for v in views:
            verdict_ = e[f"{v}_verdict"]
            mark = f" ({verdict_})" if verdict_ in ("helps", "hurts") else ""
            cells.append("" if e["method"] == SINGLE else f"{e[f'{v}_diff']:+.4f} ± {e[f'{v}_diff_se']:.4f}{mark}")
        cells.append({True: "yes", False: "no", "": ""}[e["matches_single_task"]])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base config (default %(default)s)")
    p.add_argument(
        "--seeds", type=int, default=3, help="training seeds per world: config seed + 0..N-1 (default %(default)s)"
    )
    p.add_argument(
        "--correlations",
        type=float,
        nargs="+",
        default=[0.9, 0.3, -0.5],
        help="task correlations, one world each; negative: conflicting tasks (default %(default)s)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help="model.loss_weighting values to train (default %(default)s)",
    )
    p.add_argument(
        "--backbones",
        nargs="+",
        choices=("single_task", "shared_bottom", "soft_sharing", "mmoe", "ple"),
        default=["mmoe"],
        help="(default %(default)s)",
    )
    p.add_argument("--heads", nargs="+", choices=("direct", "esmm"), default=["esmm"], help="(default %(default)s)")
    add_world_arguments(p)
    p.add_argument("--workdir", type=Path, help="where the worlds go (default: a temporary folder, removed after)")
    p.add_argument(
        "--output",
        type=Path,
        default=Path("state/balancing_experiment"),
        help="writes <output>.md, <output>.csv, <output>-runs.csv and <output>-single/ (default %(default)s)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="write the table from the runs already in <output>-runs.csv"
    )
    args = p.parse_args(argv)
    base = world_config(p, args)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1 (got {args.seeds})")
    for method in args.methods:  # refused before any work: a method this version does not know
        try:
            with_overrides(base, model={"loss_weighting": method})
        except ConfigError as err:
            p.error(f"--methods {method}: {err}")
    views = list(report_views(base))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    g = base.generate
    print(
        f"balancing experiment: correlations {args.correlations}, methods {args.methods}, {args.backbones} x "
        f"{args.heads}, {args.seeds} seed(s) from {base.seed}; {g.days} days x {g.impressions_per_day:,} impressions, "
        f"{g.users:,} users, {g.items:,} items",
        flush=True,
    )
    echo = lambda line: print(line, flush=True)  # noqa: E731
    runs_csv = args.output.with_name(args.output.name + "-runs.csv")
    if args.report_only:
        rows = read_runs(runs_csv, TEXT_FIELDS)
    else:
        with experiment_workdir(args.workdir) as workdir:
            rows = run_experiment(
                base,
                args.correlations,
                args.seeds,
                args.backbones,
                args.heads,
                args.methods,
                workdir,
                args.output,
                echo,
            )
    chosen = [
        r
        for r in rows
        if r["correlation"] in args.correlations
        and r["backbone"] in args.backbones
        and (r["method"] == SINGLE or (r["method"] in args.methods and r["head"] in args.heads))
    ]
    summary = summarise(chosen, views)
    write_summary(summary, args.output, markdown)
    print(markdown(summary))
    print(f"written: {args.output.with_suffix('.md')}, {args.output.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
