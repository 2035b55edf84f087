"""``funnelrank``: one command, a subcommand per stage.

Every stage takes ``--config`` (TOML, default configs/demo.toml) and ``--warehouse``
(the data root; default from the config). Each command validates the config first and
imports its heavy libraries after, so ``--help`` and config errors answer at once.

Every command that writes the warehouse or its state holds the warehouse lock that
``nightly`` holds (``pipeline.nightly.warehouse_lock``) while it runs.

Exit codes: 0 ok, 2 bad usage or config, 3 a stage failed, 4 raw data broke the contract,
5 another run holds the warehouse lock.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from features.config import VALUE_METRICS, ConfigError
from features.errors import StageError
from pipeline.config import DEFAULT_CONFIG, FunnelConfig, load_config

MLFLOW_URI_SCHEMES = ("models:/", "runs:/")  # a --bundle that MLflow downloads


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


def _common(
    p: argparse.ArgumentParser,
    config_default: Path | None = DEFAULT_CONFIG,
    config_help: str = "run config (TOML), default %(default)s",
) -> None:
    p.add_argument("--config", type=Path, default=config_default, help=config_help)
    p.add_argument(
        "--warehouse",
        type=Path,
        default=None,
        help="data root; default: the config's `warehouse`. Its "
        "state (MLflow store, checkpoints, bundles, nightly records) goes to <warehouse>/state unless the "
        "config names a state_dir",
    )


def _load(args: argparse.Namespace, overrides: dict | None = None) -> tuple[FunnelConfig, Path]:
    """The config with ``--warehouse`` in place of its own (and so the state of that
    warehouse, unless the config names a ``state_dir``), and the warehouse."""
    if args.warehouse is not None:
        overrides = {**(overrides or {}), "warehouse": str(args.warehouse)}
    cfg = load_config(args.config, overrides)
    return cfg, cfg.warehouse


def _locked(warehouse: Path) -> contextlib.AbstractContextManager:
    """The warehouse lock for a command that writes (raises WarehouseLockedError, exit 5,
    while another run holds it). Under torchrun rank 0 holds it for the whole job."""
    from pipeline.nightly import warehouse_lock

    return warehouse_lock(warehouse) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()


def _refuse_table(cfg: FunnelConfig, args: argparse.Namespace) -> None:
    if cfg.table is not None:
        raise StageError(
            f"{args.config} trains on a feature table ([table] section): it has no event logs to "
            f"{args.command}; use `funnelrank train`, `evaluate`, `export` and `score` with it"
        )


def _load_event_logs(args: argparse.Namespace) -> tuple[FunnelConfig, Path]:
    """``_load`` for the stages that read event logs: refuses a ``[table]`` config."""
    cfg, warehouse = _load(args)
    _refuse_table(cfg, args)
    return cfg, warehouse


def cmd_generate(args: argparse.Namespace) -> int:
    flags = {
        "days": args.days,
        "users": args.users,
        "items": args.items,
        "impressions_per_day": args.impressions_per_day,
        "task_correlation": args.task_correlation,
        "start_date": args.start_date,
    }
    overrides: dict = {"generate": {k: v for k, v in flags.items() if v is not None}}
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg, warehouse = _load(args, overrides)
    from features.synthetic import generate_logs

    with _locked(warehouse):
        summary = generate_logs(cfg, warehouse, progress=not args.quiet)
    print(summary.describe())
    return 0


def cmd_adapt_aliccp(args: argparse.Namespace) -> int:
    overrides = {"generate": {"start_date": args.start_date}} if args.start_date else None
    cfg, warehouse = _load(args, overrides)
    from features.adapters import (
        aliccp_sample_days,
        aliccp_to_raw,
        describe_aliccp_summary,
    )

    days = aliccp_sample_days(args.data_dir, cfg.generate.start_date)
    with _locked(warehouse):
        summary = aliccp_to_raw(days, warehouse, cfg.contract, cfg.seed)
    print(describe_aliccp_summary(summary))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    cfg, warehouse = _load_event_logs(args)
    from features.validate import validate_day

    with _locked(warehouse):
        report = validate_day(cfg, warehouse, args.date)
    print(report.describe())
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    cfg, warehouse = _load_event_logs(args)
    from features.daily_counters import build_daily_aggregates

    with _locked(warehouse):
        manifest = build_daily_aggregates(cfg, warehouse, args.date)
    for name, rows in manifest["rows"].items():
        print(f"{name}: {rows} rows -> {manifest['outputs'][name]}")
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    cfg, warehouse = _load_event_logs(args)
    from features.examples import build_training_table

    with _locked(warehouse):
        manifest = build_training_table(cfg, warehouse, args.date)
    rows = manifest["rows"]
    state = "skipped (inputs unchanged)" if manifest["skipped"] else f"written in {manifest['timings_s']['total']:.2f}s"
    print(
        f"training table {manifest['date']}: {rows['rows_out']:,} rows of {rows['impressions_in']:,} impressions "
        f"({rows['quarantined'] if rows['quarantined'] is not None else 'no report'} quarantined), {state}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg, warehouse = _load(args)
    from pipeline.train_stage import train_run

    with _locked(warehouse):
        result = train_run(cfg, warehouse, args.date, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank returns the same result: rank 0 reports
        return 0
    metric = cfg.early_stopping_metric
    print(
        f"train {result.run_key}: {result.epochs_run} epochs, best epoch {result.best_epoch} "
        f"({metric} {result.best_metric:.4f}); checkpoints in {result.checkpoint_dir}; MLflow run "
        f"{result.mlflow_run_id}"
    )
    _print_metrics("val", cfg, result.val_metrics)
    return 0


def _print_metrics(what: str, cfg: FunnelConfig, metrics: dict[str, float]) -> None:
    for view in cfg.views():
        se = metrics.get(f"{view}_auc_se", float("nan"))  # absent from a checkpoint of an older funnelrank
        print(
            f"  {what} {view:>12s}  auc {metrics[f'{view}_auc']:.4f} ± {se:.4f}  "
            + "  ".join(f"{m} {metrics[f'{view}_{m}']:.4f}" for m in ("gauc", "logloss", "calibration"))
        )
    for task in cfg.value_views():
        print(
            f"  {what} {task:>12s}  "
            + "  ".join(f"{m} {metrics.get(f'{task}_{m}', float('nan')):.4f}" for m in VALUE_METRICS)
        )


def cmd_export(args: argparse.Namespace) -> int:
    cfg, warehouse = _load(args, {"export": {"quantize": args.quantize}} if args.quantize else None)
    from pipeline.export_stage import export_run

    with _locked(warehouse):
        summary = export_run(cfg, warehouse, args.date)
    for name, diff in summary["parity_max_abs_diff"].items():
        print(f"parity {name:8s} max abs diff {diff:.3g}")
    if quantization := summary["quantization"]:
        print(
            f"{quantization['precision']} against float32 on {quantization['rows']:,} rows of {summary['parity_data']}:"
        )
        for name, diff in quantization["max_abs_diff"].items():
            print(f"  {name:8s} max abs diff {diff:.3g}, mean {quantization['mean_abs_diff'][name]:.3g}")
        for view, m in quantization["views"].items():
            print(
                f"  {view:8s} AUC {m['auc_float32']:.5f} -> {m['auc_int8']:.5f} ({m['auc_change']:+.5f}), "
                f"calibration {m['calibration_float32']:.4f} -> {m['calibration_int8']:.4f} "
                f"({m['calibration_change']:+.2%})"
            )
    state = "skipped (inputs unchanged)" if summary["skipped"] else "written"
    print(f"bundle {summary['bundle']} {state}; parity on {summary['parity_rows']:,} rows of {summary['parity_data']}")
    print(f"MLflow artifacts {summary['artifact_uri'] or '(no MLflow run: not logged)'}")
    return 0


def _bundle_folder(args: argparse.Namespace) -> Path:
    """``--bundle``: a folder, or an MLflow URI (``models:/<name>@champion``, ``runs:/<id>/bundle``)
    downloaded into a temporary folder (removed at exit) from the MLflow store of the
    config's state (``MLFLOW_TRACKING_URI`` when set, as for every command; MLflow's own
    without a config)."""
    if not args.bundle.startswith(MLFLOW_URI_SCHEMES):
        return Path(args.bundle)
    from serving.bundle import download_bundle

    store = None
    if args.config is not None:
        from models.tracking import tracking_uri

        store = tracking_uri(_load(args)[0].state_dir)
    target = Path(tempfile.mkdtemp(prefix="funnelrank-bundle-"))
    atexit.register(shutil.rmtree, target, True)
    return download_bundle(args.bundle, target, store)


def cmd_score(args: argparse.Namespace) -> int:
    from serving.bundle import BundleError, load_bundle
    from serving.scorer import Scorer, score_parquet

    try:
        scorer = Scorer(load_bundle(_bundle_folder(args)), intra_op_threads=1)
        rows = score_parquet(scorer, args.input, args.output, workers=args.threads)
    except (BundleError, ValueError, OSError) as err:
        raise StageError(str(err)) from None
    print(f"scored {rows:,} rows with bundle {scorer.version} -> {args.output}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # the server's limits: the bundle's [scoring], or the one of --config, then the flags
    scoring = load_config(args.config).scoring.model_dump() if args.config else {}
    flags = {"max_candidates": args.max_candidates, "max_body_bytes": args.max_body_bytes}
    scoring |= {k: v for k, v in flags.items() if v is not None}
    from serving.bundle import BundleError
    from serving.http import ServerStartError, serve

    try:
        return serve(
            _bundle_folder(args),
            host=args.host,
            port=args.port,
            threads=args.threads,
            scoring=scoring,
            admin_token_file=args.admin_token_file,
        )
    except BundleError as err:
        raise StageError(str(err)) from None
    except ServerStartError as err:  # the address, the token file: a usage error, one line
        print(f"funnelrank serve: {err}", file=sys.stderr)
        return 2


def cmd_nightly(args: argparse.Namespace) -> int:
    cfg, warehouse = _load_event_logs(args)
    from pipeline.nightly import run_nights

    start, end = (args.date, args.date) if args.date else (args.start, args.end)
    if start is None or end is None:
        raise StageError("give --date D, or --start D1 and --end D2 for a backfill")
    run_nights(cfg, warehouse, start, end, rerun_from=args.rerun_from, last=args.to)
    return 0


def cmd_night_stage(args: argparse.Namespace) -> int:
    """``evaluate`` / ``promote``: that stage of the night, forced; earlier stages run only if not done yet.
    A ``[table]`` source has no nights: ``evaluate`` scores the trained model on its test split."""
    cfg, warehouse = _load(args)
    if cfg.table is not None and args.command == "evaluate":
        from pipeline.evaluate import evaluate_models
        from pipeline.train_stage import load_trained_model

        with _locked(warehouse):
            model, run_id = load_trained_model(cfg, warehouse, None)
            result = evaluate_models(cfg, warehouse, None, model, None, f"the trained model of MLflow run {run_id}")
        print(f"evaluate: {result['rows']:,} rows of the test split; MLflow run {result['mlflow_run_id']}")
        _print_metrics("test", cfg, result["candidate"])
        return 0
    _refuse_table(cfg, args)  # promote: the gate compares nights of event logs
    if args.date is None:
        raise StageError(f"{args.command} on event logs needs --date")
    from pipeline.nightly import run_nights

    run_nights(cfg, warehouse, args.date, args.date, rerun_from=args.command, last=args.command)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    cfg, _ = _load(args)
    from pipeline.compare import compare_runs, render

    rows, where = compare_runs(cfg, args.run_ids, args.last, args.output)
    render(rows)
    print(f"trend report: {where}")
    return 0


def cmd_experiment_transfer(args: argparse.Namespace) -> int:
    cfg, warehouse = _load(args)
    from pipeline.transfer import run_transfer

    echo = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    with _locked(warehouse):
        report = run_transfer(cfg, warehouse, args.date, args.seeds, args.test_date, not args.quiet, echo)
    print(
        f"transfer: multi-task vs single-task models, {len(report['seeds'])} seed(s) {report['seeds']}, "
        f"AUC on {report['eval']} ({report['rows']:,} rows), ± standard error; MLflow parent run "
        f"{report['mlflow_run_id']}"
    )
    print(report["markdown"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    cfg, warehouse = _load(args)
    from pipeline.demo import run_demo

    run_demo(cfg, warehouse)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="funnelrank",
        description="Multi-objective (click -> conversion) ranking pipeline. "
        "Nightly stages: validate -> features -> examples -> train -> evaluate -> export -> promote.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, **common) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p, **common)
        p.set_defaults(func=func)
        return p

    add("demo", cmd_demo, "Generate synthetic logs and run every stage on them end to end (what `make demo` runs).")

    p = add("generate", cmd_generate, "Write synthetic raw logs (contract v1) and the true probabilities beside them.")
    p.add_argument("--days", type=int, help="number of days to generate")
    p.add_argument("--seed", type=int, help="random seed (default: the config's `seed`)")
    p.add_argument("--users", type=int, help="number of users")
    p.add_argument("--items", type=int, help="number of items")
    p.add_argument("--impressions-per-day", type=int, help="impressions per day")
    p.add_argument("--task-correlation", type=float, help="correlation of the click / conversion tasks, -1..1")
    p.add_argument("--start-date", type=_date, help="first day, YYYY-MM-DD")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add(
        "adapt-aliccp",
        cmd_adapt_aliccp,
        "Write the Ali-CCP train/val/test samples as raw logs (contract v1) on three consecutive days from "
        "generate.start_date.",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("../shared/data/ali-ccp"),
        help="folder of the ali_ccp_*_sample.csv files (default %(default)s)",
    )
    p.add_argument("--start-date", type=_date, help="first day, YYYY-MM-DD (default: the config's generate.start_date)")

    p = add("validate", cmd_validate, "Check a day's raw partitions against the contract; quarantine bad rows.")
    p.add_argument("--date", type=_date, required=True, help="the day to validate, YYYY-MM-DD")

    p = add(
        "features", cmd_features, "Count a day's impressions, clicks and conversions per aggregate key (by event time)."
    )
    p.add_argument("--date", type=_date, required=True, help="the day to aggregate, YYYY-MM-DD")

    p = add(
        "examples",
        cmd_examples,
        "Write the training table of the mature day (--date minus the maturity lag) and update the vocabularies.",
    )
    p.add_argument("--date", type=_date, required=True, help="the nightly run date, YYYY-MM-DD")

    p = add(
        "train",
        cmd_train,
        "Train the multi-task model on the window of mature days, or on a [table] source's train "
        "split (resumes a killed run); log it to MLflow.",
    )
    p.add_argument(
        "--date", type=_date, help="the nightly run date, YYYY-MM-DD (event logs; a [table] source needs none)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add(
        "export",
        cmd_export,
        "Export the trained model of the run as an ONNX serving bundle (parity-checked on the validation day, or a "
        "[table] source's test split) and log it to the run's MLflow artifacts.",
    )
    p.add_argument(
        "--date", type=_date, help="the nightly run date, YYYY-MM-DD (event logs; a [table] source needs none)"
    )
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default=None,
        help="the model's precision (default: the config's export.quantize): int8 quantises the dense layers, "
        "refused when an AUC falls more than export.max_auc_drop or a calibration moves more than "
        "export.max_calibration_change against float32",
    )

    p = add(
        "score",
        cmd_score,
        "Batch-score a Parquet file with an exported bundle (no torch needed): (user_id, item_id, context) rows, "
        "or a [table] model's feature columns.",
    )
    p.add_argument(
        "--bundle",
        required=True,
        help="exported bundle folder, or an MLflow URI: models:/funnelrank@champion, runs:/<run id>/bundle "
        "(from the store of --config's state, or MLFLOW_TRACKING_URI)",
    )
    p.add_argument(
        "--input",
        type=Path,
        required=True,
        help="Parquet file: user_id, item_id and context columns (event-log "
        "bundles) or the feature columns the table was trained on (table bundles)",
    )
    p.add_argument(
        "--output",
        type=Path,
        required=True,
        help="Parquet file to write (atomically): the input + p_<task> per "
        "task (p_click, p_conversion by default) + score",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads scoring chunks of rows at once, each encoding and running the model "
        "(default: the cores, %(default)s)",
    )

    p = add(
        "serve",
        cmd_serve,
        "Serve an exported bundle over HTTP: POST /v1/rank, GET /healthz /readyz /metrics; "
        "SIGHUP reloads, SIGTERM drains. Exit codes: 2 the address or the admin token file cannot be used, 3 the "
        "bundle.",
        config_default=None,
        config_help="take the server's limits and timeouts from this config's [scoring] "
        "(default: the bundle's, from the config it was exported with)",
    )
    p.add_argument(
        "--bundle",
        required=True,
        help="exported bundle folder (reloaded from the same path), or an MLflow URI: models:/funnelrank@champion, "
        "runs:/<run id>/bundle (downloaded once at start, from the store of --config's state or MLFLOW_TRACKING_URI)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s: loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port (default %(default)s; 0 picks a free one)")
    p.add_argument(
        "--threads", type=int, default=1, help="onnxruntime intra-op threads per model call (default %(default)s)"
    )
    p.add_argument(
        "--max-candidates",
        type=_positive,
        default=None,
        help="candidates per request at most (default: scoring.max_candidates)",
    )
    p.add_argument(
        "--max-body-bytes", type=_positive, default=None, help="request body limit (default: scoring.max_body_bytes)"
    )
    p.add_argument(
        "--admin-token-file",
        type=Path,
        default=None,
        help="turn POST /admin/reload on with the token in this file (default: the FUNNELRANK_ADMIN_TOKEN "
        "environment variable; neither: only SIGHUP reloads)",
    )

    from pipeline.nightly import STAGES  # noqa: PLC0415 - light module: no heavy imports at its top

    p = add(
        "nightly",
        cmd_nightly,
        "Run the night for --date D (or backfill --start..--end): validate -> features -> examples -> "
        "train -> evaluate -> export -> promote. Finished stages with unchanged inputs are skipped, so the same "
        "command resumes a failed or killed night. Exit codes: 3 a stage failed, 4 bad raw data, 5 warehouse locked.",
    )
    p.add_argument("--date", type=_date, help="the night to run, YYYY-MM-DD")
    p.add_argument("--start", type=_date, help="backfill: first night")
    p.add_argument("--end", type=_date, help="backfill: last night (inclusive)")
    p.add_argument(
        "--from",
        dest="rerun_from",
        choices=STAGES,
        help="rerun this stage and every later one even if their inputs are unchanged",
    )
    p.add_argument("--to", choices=STAGES, default=STAGES[-1], help="stop after this stage (default %(default)s)")

    for stage, text in (
        (
            "evaluate",
            "Score the night's mature day with its candidate and the champion, side by side in MLflow "
            "(the night's earlier stages run first when they have not); a [table] source: score the "
            "trained model on the test split",
        ),
        (
            "promote",
            "Register the night's bundle in the MLflow registry and move `champion` if the gate passes "
            "(the night's earlier stages run first when they have not)",
        ),
    ):
        p = add(stage, cmd_night_stage, f"{text}.")
        p.add_argument("--date", type=_date, help="the nightly run date, YYYY-MM-DD (required for event logs)")

    runs = sub.add_parser(
        "runs",
        help="Work with the training runs in MLflow (`runs compare`).",
        description="Work with the training runs in MLflow.",
    )
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    p = runs_sub.add_parser(
        "compare",
        help="Training runs side by side: key metrics, config keys that differ, metric trends over nights.",
        description="Training runs side by side: key validation metrics, the config keys that differ, "
        "and a plot of the metrics over the nights (written to --output or logged to the newest run).",
    )
    _common(p)
    p.set_defaults(func=cmd_runs)
    p.add_argument(
        "run_ids",
        nargs="*",
        metavar="RUN_ID",
        help="MLflow run ids (default: the newest --last finished training runs)",
    )
    p.add_argument(
        "--last", type=int, default=5, help="compare the newest N finished training runs (default %(default)s)"
    )
    p.add_argument(
        "--output", type=Path, help="write the trend plot (PNG) here instead of logging it to the newest run in MLflow"
    )

    experiment = sub.add_parser(
        "experiment",
        help="Experiments on the configured model (`experiment transfer`).",
        description="Experiments on the configured model, logged to MLflow as a parent run with a child per "
        "trained model.",
    )
    experiment_sub = experiment.add_subparsers(dest="experiment_command", required=True, metavar="ACTION")
    p = experiment_sub.add_parser(
        "transfer",
        help="Negative transfer: the multi-task model beside one single-task model per task, per task view: "
        "AUCs, the difference with its paired standard error, and a verdict.",
        description="Train the configured multi-task model and one single-task model per task (the other tasks' "
        "loss weight 0) on the nightly training window of --run-date (a [table] source: its train split), over "
        "--seeds seeds, and score them on the validation day (or --test-date; a [table] source: its test split). "
        "Prints per task view (click, cvr, ctcvr) both AUCs, the difference (multi - single) with its standard "
        "error (paired on the rows, combined over the seeds) and a verdict: sharing helps / no significant "
        "difference / hurts (beyond 2 standard errors). One MLflow parent run holds the models' runs, the report "
        "and a plot. Rerunning the same command reuses the finished models.",
    )
    _common(p)
    p.set_defaults(func=cmd_experiment_transfer)
    p.add_argument(
        "--run-date",
        "--date",
        dest="date",
        type=_date,
        help="the nightly run date whose training window the models train on, YYYY-MM-DD (event logs; a [table] "
        "source needs none)",
    )
    p.add_argument(
        "--seeds",
        type=_positive,
        default=3,
        help="seeds: the config's seed + 0..N-1 (model initialisation and batch order; default %(default)s)",
    )
    p.add_argument(
        "--test-date",
        type=_date,
        help="score on this mature day's table instead of the validation day (after the window, e.g. the day after "
        "the validation day, which no model has seen; event logs only)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress")

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"funnelrank: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"funnelrank {args.command}: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
