"""What negative down-sampling buys and costs on the demo world: training speed, AUC and
calibration at several rates r (``train.negative_sampling_rate``).

    python -m benchmarks.sampling_experiment [--config configs/demo.toml] [--rates 1 0.3 0.1] [--seeds 3]
        [--days 14] [--users N] [--items N] [--impressions-per-day N] [--epochs 3] [--window-days 7]
        [--workdir DIR] [--output state/sampling_experiment]

Per seed k (the config's seed + k: a new world, logs and initialisation) the logs, features
and training tables are built once; every rate trains on the same tables (the window before
L - 1, early stopping on L - 1) with ``model.calibration = "platt"`` and is scored on L, the
newest mature day, which neither training nor the calibrator saw.

Per run: training samples/s counted in rows of the original table (the rows an epoch covers,
sampled or not, per second of training: what the sampling saves), the share of rows kept;
on the test day click, CVR and CTCVR AUC, the click AUC's difference to r = 1 with its paired
standard error (same rows); the calibration ratio (mean predicted / observed) of click and
CTCVR after the sampling correction alone (the model's identity calibrators) and after the
Platt calibrators too. The summary: mean ± std over seeds per rate. Runs append to
``<output>-runs.csv`` as they finish; a rerun skips them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.mtl_experiment import append_run, build_warehouse, held_out_day, log_days, read_runs, with_overrides
from pipeline.config import DEFAULT_CONFIG, FunnelConfig, load_config

FIELDS = [
    "seed",
    "rate",
    "seconds",
    "epochs",
    "kept_share",
    "source_rows_per_s",
    "click_auc",
    "cvr_auc",
    "ctcvr_auc",
    "click_auc_vs_r1",
    "click_auc_vs_r1_se",
    "click_calibration_corrected",
    "ctcvr_calibration_corrected",
    "click_calibration_platt",
    "ctcvr_calibration_platt",
]


def run(cfg: FunnelConfig, warehouse: Path, run_date: dt.date, day: dt.date) -> tuple[dict, dict[str, np.ndarray]]:
    """Train ``cfg``'s model for ``run_date``; its speed and its test-day predictions, with
    ``p_<view>_corrected``: the sampling correction without the calibrators."""
    import time

    import torch

    from features.catalog import training_dir
    from models.calibration import ServedProbabilities
    from models.loader import parquet_files, table_loader
    from models.predict import predict
    from pipeline.train_stage import train_run, training_data

    started = time.perf_counter()
    result = train_run(cfg, warehouse, run_date, progress=False)
    seconds = time.perf_counter() - started
    sampled = table_loader(
        cfg,
        training_data(cfg, warehouse, run_date).train_files,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        negative_sampling_rate=cfg.train.negative_sampling_rate,
    )
    kept_share = sampled.rows / sampled.source_rows
    # samples/s counts the rows trained on; an epoch covers source_rows of the table
    speed = float(np.mean([h["train/samples_per_s"] for h in result.history])) / kept_share
    loader = table_loader(cfg, parquet_files(training_dir(warehouse, day)), batch_size=8192, shuffle=False)
    pred = predict(result.model, loader, torch.device("cpu"))
    corrected = ServedProbabilities(cfg.tasks, "none", 1)
    corrected.logit_offsets.copy_(result.model.served.logit_offsets)
    logits = {t.name: pred[f"logit_{t.name}"] for t in cfg.tasks}
    pred |= {f"p_{view}_corrected": p for view, p in corrected.of_logits(logits).items()}
    stats = {"seconds": round(seconds, 1), "epochs": result.epochs_run, "kept_share": kept_share}
    return stats | {"source_rows_per_s": speed}, pred


def metrics(pred: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, float]:
    """Test-day AUCs, the click AUC's paired difference to ``base`` (r = 1), calibration ratios."""
    from models.metrics import auc, auc_difference_standard_error, calibration

    click, conversion = pred["label_click"], pred["label_conversion"]
    clicked = click > 0
    row = {
        "click_auc": auc(click, pred["p_click"]),
        "cvr_auc": auc(conversion[clicked], pred["p_cvr"][clicked]),
        "ctcvr_auc": auc(conversion, pred["p_ctcvr"]),
        "click_auc_vs_r1": auc(click, pred["p_click"]) - auc(click, base["p_click"]),
        "click_auc_vs_r1_se": auc_difference_standard_error(click, pred["p_click"], base["p_click"]),
    }
    for view, labels in (("click", click), ("ctcvr", conversion)):
        row[f"{view}_calibration_corrected"] = calibration(labels, pred[f"p_{view}_corrected"])
        row[f"{view}_calibration_platt"] = calibration(labels, pred[f"p_{view}"])
    return row


def world_config(base: FunnelConfig, seed: int, args) -> FunnelConfig:
    generate = {
        k: v
        for k, v in (
            ("days", args.days),
            ("users", args.users),
            ("items", args.items),
            ("impressions_per_day", args.impressions_per_day),
        )
        if v
    }
    train = {"epochs": args.epochs, "window_days": args.window_days, "min_window_days": 2}
    return with_overrides(
        base, top={"seed": base.seed + seed}, generate=generate, train=train, model={"calibration": "platt"}
    )


def summary(rows: list[dict]) -> str:
    """Mean ± std over seeds per rate, as a markdown table."""
    columns = [
        ("source rows/s", "source_rows_per_s", ",.0f"),
        ("kept", "kept_share", ".3f"),
        ("click AUC", "click_auc", ".4f"),
        ("Δ click AUC vs r=1", "click_auc_vs_r1", "+.4f"),
        ("ctcvr AUC", "ctcvr_auc", ".4f"),
        ("cvr AUC", "cvr_auc", ".4f"),
        ("click cal. (corrected)", "click_calibration_corrected", ".3f"),
        ("ctcvr cal. (corrected)", "ctcvr_calibration_corrected", ".3f"),
        ("click cal. (+ platt)", "click_calibration_platt", ".3f"),
        ("ctcvr cal. (+ platt)", "ctcvr_calibration_platt", ".3f"),
    ]
    lines = [
        "| r | seeds | " + " | ".join(c[0] for c in columns) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for rate in sorted({r["rate"] for r in rows}, reverse=True):
        group = [r for r in rows if r["rate"] == rate]
        cells = [f"{rate:g}", str(len(group))]
        for _, key, fmt in columns:
            values = np.array([r[key] for r in group], dtype=np.float64)
            spread = f" ± {values.std(ddof=1):{fmt.lstrip('+')}}" if len(values) > 1 else ""
            cells.append(f"{values.mean():{fmt}}{spread}")
        lines.append("| " + " | ".join(cells) + " |")
    se = [r["click_auc_vs_r1_se"] for r in rows if r["rate"] != 1.0]
    if se:
        lines.append(f"\n(one run's paired standard error of Δ click AUC: {np.mean(se):.4f} on average)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--days", type=int, help="log days (default: the config's)")
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--impressions-per-day", type=int)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--window-days", type=int, default=7)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--output", type=Path, default=Path("state/sampling_experiment"))
    args = p.parse_args(argv)
    rates = [1.0, *[r for r in args.rates if r != 1.0]]  # r = 1 first: the others pair with it
    runs_path = args.output.with_name(args.output.name + "-runs.csv")
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["seed"], r["rate"]) for r in read_runs(runs_path)}
    base = load_config(args.config)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for seed in range(args.seeds):
            if all((seed, rate) in done for rate in rates):
                continue
            cfg = world_config(base, seed, args)
            warehouse = Path(tmp) / f"seed{seed}" / "warehouse"
            print(f"seed {seed}: building the warehouse ...", flush=True)
            build_warehouse(cfg, warehouse)
            day = held_out_day(cfg)
            run_date = log_days(cfg)[-1] - dt.timedelta(days=1)  # validation day = test day - 1
            preds = {}
            for rate in rates:
                rcfg = with_overrides(cfg, train={"negative_sampling_rate": rate})
                rcfg = rcfg.model_copy(update={"state_dir": Path(tmp) / f"seed{seed}" / f"r{rate}"})
                stats, preds[rate] = run(rcfg, warehouse, run_date, day)
                if (seed, rate) in done:
                    continue
                row = {"seed": seed, "rate": rate, **stats, **metrics(preds[rate], preds[1.0])}
                append_run(runs_path, row, FIELDS)
                print(
                    f"  r {rate:<4g} {row['source_rows_per_s']:>9,.0f} source rows/s  click AUC {row['click_auc']:.4f} "
                    f"({row['click_auc_vs_r1']:+.4f} ± {row['click_auc_vs_r1_se']:.4f})  calibration click "
                    f"{row['click_calibration_corrected']:.3f} -> {row['click_calibration_platt']:.3f}, ctcvr "
                    f"{row['ctcvr_calibration_corrected']:.3f} -> {row['ctcvr_calibration_platt']:.3f}  "
                    f"({row['seconds']:.0f} s)",
                    flush=True,
                )
    table = summary(read_runs(runs_path))
    args.output.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
