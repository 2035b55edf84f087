"""The MMoE paper's experiment on our synthetic funnel: does MMoE's advantage over a shared
bottom grow as the click and conversion tasks become less related?

    python -m benchmarks.mtl_experiment [--config configs/demo.toml] [--seeds 3] \
        [--correlations 0.9 0.3] [--days 14] [--users 20000] [--items 5000] \
        [--impressions-per-day 100000] [--epochs 3] [--window-days 7] [--batch-size 4096] \
        [--backbones ...] [--heads ...] \
        [--workdir DIR] [--output state/mtl_experiment] [--report-only]

For every (task correlation, seed) it generates the config's synthetic logs with
``generate.task_correlation`` and ``seed`` replaced, runs validate -> features -> examples
for every day, then trains every backbone (single_task, shared_bottom, mmoe) with every
conversion head (direct, esmm) and scores the best epoch on a held-out test day.

Seeds: seed ``k`` sets the config's one ``seed`` to ``config seed + k``, which draws a new
hidden world and new logs (users, items, factors, task weights, labels) as well as a new
model initialisation and batch order, so the spread over seeds is the honest one: data
and training noise together. Within one (correlation, seed) every model sees the same data.

Days: with L the newest day whose labels are mature at the end of the log, the models
train on the ``train.window_days - 1`` days before L - 1, early-stop on L - 1 (the
validation day) and are scored on L (the test day, unseen by training and model
selection). Metrics are test-day ones: AUC of click, CVR (conversion given click, on
clicked rows) and CTCVR (conversion on all impressions), and GAUC (per-user AUC,
impression-weighted) of click and CTCVR.

Oracle: the same metrics of the generator's noise-free logits on the same test rows
(``truth/``: what a model seeing every hidden factor, but not the per-impression noise,
ranks by). Click: ``click_logit_observable``. CVR: ``conversion_logit_observable`` on
clicked rows. CTCVR: sigmoid(click logit) * sigmoid(conversion logit), the noise-free
P(click and conversion); it ranks like the true funnel up to the noise's blurring.

Output: a table of mean +- std over seeds per (correlation, backbone, head), printed and
written as ``<output>.md`` and ``<output>.csv``; per-run rows go to ``<output>-runs.csv``
as they finish, and a rerun with the same options skips the runs already there (runs are
keyed by correlation, seed, backbone and head only: give other options another --output);
``--report-only`` writes the table from the runs done so far.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.config import DEFAULT_CONFIG, FunnelConfig, load_config, parse_config

BACKBONES = ("single_task", "shared_bottom", "mmoe")
HEADS = ("direct", "esmm")
METRICS = ("click_auc", "click_gauc", "cvr_auc", "ctcvr_auc", "ctcvr_gauc")


def log_days(cfg: FunnelConfig) -> list[dt.date]:
    g = cfg.generate
    return [g.start_date + dt.timedelta(days=i) for i in range(g.days)]


def build_warehouse(cfg: FunnelConfig, warehouse: Path) -> None:
    """Generate the config's synthetic logs and run validate -> features -> examples for
    every day, building the training table of every day that is mature by the log's end."""
    from features.daily_counters import build_daily_aggregates
    from features.examples import build_training_table
    from features.synthetic import generate_logs
    from features.validate import validate_day

    generate_logs(cfg, warehouse, progress=False)
    days = log_days(cfg)
    lag = dt.timedelta(days=cfg.contract.maturity_lag_days)
    for day in days:
        validate_day(cfg, warehouse, day)  # raises on a failed day
        build_daily_aggregates(cfg, warehouse, day)
        if day - lag >= days[0]:
            build_training_table(cfg, warehouse, day)


def held_out_day(cfg: FunnelConfig) -> dt.date:
    """The newest mature day of the log: the held-out test day."""
    return log_days(cfg)[-1] - dt.timedelta(days=cfg.contract.maturity_lag_days)


def truth_rows(warehouse: Path, day: dt.date) -> dict[str, np.ndarray]:
    """Labels, user ids and the generator's noise-free logits of ``day``'s training rows,
    in the training table's row order."""
    import polars as pl

    from features.catalog import training_dir, truth_dir

    rows = pl.scan_parquet(training_dir(warehouse, day) / "*.parquet").select(
        "impression_id", "raw_user_id", "click", "conversion"
    )
    truth = pl.scan_parquet(truth_dir(warehouse, day) / "*.parquet").select(
        "impression_id", "click_logit_observable", "conversion_logit_observable"
    )
    joined = rows.join(truth, on="impression_id", how="left", maintain_order="left").collect()
    if joined["click_logit_observable"].null_count():
        raise ValueError(
            f"{truth_dir(warehouse, day)} lacks {joined['click_logit_observable'].null_count()} impressions of the "
            "training table"
        )
    return {
        "click": joined["click"].to_numpy(),
        "conversion": joined["conversion"].to_numpy(),
        "user": joined["raw_user_id"].to_numpy(),
        "click_logit": joined["click_logit_observable"].to_numpy(),
        "conversion_logit": joined["conversion_logit_observable"].to_numpy(),
    }


def oracle_metrics(cfg: FunnelConfig, rows: dict[str, np.ndarray]) -> dict[str, float]:
    """The METRICS of the noise-free logits (see the module docstring)."""
    from models.metrics import view_metrics

    p_click = 1.0 / (1.0 + np.exp(-rows["click_logit"]))
    p_cvr = 1.0 / (1.0 + np.exp(-rows["conversion_logit"]))
    m = view_metrics(
        cfg.views(),
        {"click": rows["click"], "conversion": rows["conversion"]},
        {"click": p_click, "cvr": p_cvr, "ctcvr": p_click * p_cvr},
        rows["user"],
    )
    return {k: m[k] for k in METRICS}


def model_metrics(cfg: FunnelConfig, warehouse: Path, run_date: dt.date, day: dt.date) -> tuple[dict[str, float], int]:
    """Train the config's model for ``run_date`` and score its best epoch on ``day``:
    (METRICS, epochs run)."""
    import torch

    from features.catalog import training_dir
    from models.loader import parquet_files, table_loader
    from models.predict import predict, validation_metrics
    from pipeline.train_stage import train_run

    result = train_run(cfg, warehouse, run_date, progress=False)
    loader = table_loader(cfg, parquet_files(training_dir(warehouse, day)), 8192, shuffle=False, seed=0)
    m = validation_metrics(cfg, predict(result.model, loader, torch.device("cpu")))
    return {k: m[k] for k in METRICS}, result.epochs_run


def with_overrides(cfg: FunnelConfig, **sections: dict) -> FunnelConfig:
    """A copy of ``cfg`` with keys of its sections replaced (validated again)."""
    data = cfg.model_dump(by_alias=True)
    for section, values in sections.items():
        if section == "top":
            data.update(values)
        else:
            data[section] = {**data[section], **values}
    return parse_config(data, "mtl_experiment overrides")


TEXT_FIELDS = ("backbone", "head")
RUN_FIELDS = ["correlation", "seed", "backbone", "head", "epochs", "seconds", *METRICS]


def read_runs(path: Path, text_fields: tuple[str, ...] = ()) -> list[dict]:
    """The runs already written to a ``-runs.csv`` (none when it does not exist): every
    field a float but ``text_fields``. Shared by the experiments in benchmarks/."""
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: (v if k in text_fields else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def append_run(path: Path, row: dict, fields: list[str]) -> None:
    """Append one run to a ``-runs.csv`` as it finishes (the header first in a new file), so
    a rerun can skip it."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()


def run_experiment(
    base: FunnelConfig,
    correlations: list[float],
    seeds: int,
    workdir: Path,
    runs_csv: Path,
    backbones: tuple[str, ...] = BACKBONES,
    heads: tuple[str, ...] = HEADS,
) -> list[dict]:
    """Every (correlation, seed, backbone, head) run not yet in ``runs_csv``; returns all rows
    (oracle rows have backbone ``oracle``)."""
    done = {(r["correlation"], r["seed"], r["backbone"], r["head"]) for r in read_runs(runs_csv, TEXT_FIELDS)}
    for k in range(seeds):  # seed-major: a run cut short still has every correlation for its first seeds
        seed = base.seed + k
        for correlation in correlations:
            keys = [(correlation, float(seed), b, h) for b in backbones for h in heads] + [
                (correlation, float(seed), "oracle", "-")
            ]
            if all(key in done for key in keys):
                continue
            folder = workdir / f"corr{correlation}-seed{seed}"
            cfg = with_overrides(
                base, top={"seed": seed, "state_dir": str(folder / "state")}, generate={"task_correlation": correlation}
            )
            started = time.perf_counter()
            build_warehouse(cfg, folder / "warehouse")
            day = held_out_day(cfg)
            run_date = log_days(cfg)[-1] - dt.timedelta(days=1)  # validation day = test day - 1
            if keys[-1] not in done:
                oracle = oracle_metrics(cfg, truth_rows(folder / "warehouse", day))
                append_run(
                    runs_csv,
                    {
                        "correlation": correlation,
                        "seed": seed,
                        "backbone": "oracle",
                        "head": "-",
                        "epochs": 0,
                        "seconds": round(time.perf_counter() - started, 1),
                        **oracle,
                    },
                    RUN_FIELDS,
                )
            print(f"correlation {correlation} seed {seed}: data in {time.perf_counter() - started:.0f} s", flush=True)
            for backbone in backbones:
                for head in heads:
                    if (correlation, float(seed), backbone, head) in done:
                        continue
                    started = time.perf_counter()
                    model_cfg = with_overrides(cfg, model={"backbone": backbone, "conversion_head": head})
                    metrics, epochs = model_metrics(model_cfg, folder / "warehouse", run_date, day)
                    seconds = round(time.perf_counter() - started, 1)
                    append_run(
                        runs_csv,
                        {
                            "correlation": correlation,
                            "seed": seed,
                            "backbone": backbone,
                            "head": head,
                            "epochs": epochs,
                            "seconds": seconds,
                            **metrics,
                        },
                        RUN_FIELDS,
                    )
                    print(
                        f"  {backbone:13s} {head:6s} "
                        + "  ".join(f"{m} {metrics[m]:.4f}" for m in METRICS)
                        + f"  ({epochs} epochs, {seconds:.0f} s)",
                        flush=True,
                    )
    return read_runs(runs_csv, TEXT_FIELDS)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std (ddof=1; nan for one seed) over seeds per (correlation, backbone, head),
    plus each model's click and CTCVR AUC minus shared_bottom's (same head, same seed)."""
    by_run = {(r["correlation"], r["seed"], r["backbone"], r["head"]): r for r in rows}
    order = {b: i for i, b in enumerate(("oracle", *BACKBONES))}
    groups = sorted(
        {(r["correlation"], r["backbone"], r["head"]) for r in rows}, key=lambda g: (-g[0], order.get(g[1], 99), g[2])
    )
    out = []
    for correlation, backbone, head in groups:
        members = [r for r in rows if (r["correlation"], r["backbone"], r["head"]) == (correlation, backbone, head)]
        entry = {"correlation": correlation, "backbone": backbone, "head": head, "seeds": len(members)}
        for m in METRICS:
            values = np.array([r[m] for r in members], dtype=np.float64)
            entry[f"{m}_mean"] = float(values.mean())
            entry[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        for m in ("click_auc", "ctcvr_auc"):  # paired by seed: the same data for both models
            deltas = [
                r[m] - by_run[key][m]
                for r in members
                if (key := (correlation, r["seed"], "shared_bottom", head)) in by_run
            ]
            entry[f"{m}_vs_shared_bottom"] = float(np.mean(deltas)) if deltas and backbone != "oracle" else float("nan")
            entry[f"{m}_vs_shared_bottom_std"] = (
                float(np.std(deltas, ddof=1)) if len(deltas) > 1 and backbone != "oracle" else float("nan")
            )
        out.append(entry)
    return out


def _mean_spread(mean: float, std: float, sign: str = "") -> str:
    return f"{mean:{sign}.4f}" + ("" if np.isnan(std) else f" ± {std:.4f}")


def markdown(summary: list[dict]) -> str:
    header = [
        "correlation",
        "model",
        "head",
        "seeds",
        *METRICS,
        "Δ click AUC vs shared_bottom",
        "Δ CTCVR AUC vs shared_bottom",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in summary:
        cells = [f"{e['correlation']:.2f}", e["backbone"], e["head"], str(e["seeds"])]
        cells += [_mean_spread(e[f"{m}_mean"], e[f"{m}_std"]) for m in METRICS]
        for m in ("click_auc", "ctcvr_auc"):
            delta, spread = e[f"{m}_vs_shared_bottom"], e[f"{m}_vs_shared_bottom_std"]
            cells.append("" if np.isnan(delta) else _mean_spread(delta, spread, sign="+"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(summary: list[dict], output: Path, render=markdown) -> None:
    """``<output>.md`` (the summary as ``render`` writes it) and ``<output>.csv`` (every field)."""
    from features.io import atomic_write_bytes

    atomic_write_bytes(output.with_suffix(".md"), (render(summary) + "\n").encode())
    fields = list(summary[0]) if summary else []
    lines = [",".join(fields)] + [",".join(str(e[f]) for f in fields) for e in summary]
    atomic_write_bytes(output.with_suffix(".csv"), ("\n".join(lines) + "\n").encode())


def add_world_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the synthetic world's size and of training (each: default the config's),
    shared by the experiments that build a world with ``build_warehouse``."""
    p.add_argument("--days", type=int, help="days of logs (default: the config's)")
    p.add_argument("--users", type=int, help="users (default: the config's)")
    p.add_argument("--items", type=int, help="items (default: the config's)")
    p.add_argument("--impressions-per-day", type=int, help="impressions per day (default: the config's)")
    p.add_argument("--epochs", type=int, help="max training epochs (default: the config's)")
    p.add_argument("--window-days", type=int, help="training window incl. the validation day (default: the config's)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="training batch (default: the config's; a small run needs a small one to take enough steps)",
    )


@contextlib.contextmanager
def experiment_workdir(workdir: Path | None) -> Iterator[Path]:
    """``--workdir`` when given (kept afterwards), else a temporary folder removed after."""
    if workdir is not None:
        yield workdir
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def world_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> FunnelConfig:
    """``--config`` with the ``add_world_arguments`` flags given; a usage error when the log
    is too short for the training window, the validation day and a held-out test day."""
    generate = {
        k: v
        for k, v in (
            ("days", args.days),
            ("users", args.users),
            ("items", args.items),
            ("impressions_per_day", args.impressions_per_day),
        )
        if v is not None
    }
    train = {
        k: v
        for k, v in (("epochs", args.epochs), ("window_days", args.window_days), ("batch_size", args.batch_size))
        if v is not None
    }
    base = with_overrides(load_config(args.config), generate=generate, train=train)
    needed = base.train.window_days + 1 + base.contract.maturity_lag_days  # + the test day
    if base.generate.days < needed:
        p.error(
            f"--days must be at least train.window_days + 1 + the maturity lag = {needed} (got {base.generate.days})"
        )
    return base


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base config (default %(default)s)")
    p.add_argument(
        "--seeds", type=int, default=3, help="seeds per correlation: config seed + 0..N-1 (default %(default)s)"
    )
    p.add_argument(
        "--correlations", type=float, nargs="+", default=[0.9, 0.3], help="task correlations (default %(default)s)"
    )
    add_world_arguments(p)
    p.add_argument("--workdir", type=Path, help="where the warehouses go (default: a temporary folder, removed after)")
    p.add_argument(
        "--output",
        type=Path,
        default=Path("state/mtl_experiment"),
        help="writes <output>.md, <output>.csv and <output>-runs.csv (default %(default)s)",
    )
    p.add_argument(
        "--backbones",
        nargs="+",
        choices=(*BACKBONES, "soft_sharing", "ple"),
        default=list(BACKBONES),
        help="(default: the MMoE paper's three, %(default)s)",
    )
    p.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS), help="(default: both)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the table from the runs already in <output>-runs.csv, train nothing",
    )
    args = p.parse_args(argv)

    base = world_config(p, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    runs_csv = args.output.with_name(args.output.name + "-runs.csv")
    g = base.generate
    print(
        f"mtl experiment: correlations {args.correlations}, {args.seeds} seed(s) from {base.seed}; {g.days} days x "
        f"{g.impressions_per_day:,} impressions, {g.users:,} users, {g.items:,} items; runs -> {runs_csv}",
        flush=True,
    )
    if args.report_only:
        rows = read_runs(runs_csv, TEXT_FIELDS)
    else:
        with experiment_workdir(args.workdir) as workdir:
            rows = run_experiment(base, args.correlations, args.seeds, workdir, runs_csv, args.backbones, args.heads)
    summary = summarise([r for r in rows if r["correlation"] in args.correlations])
    write_summary(summary, args.output)
    print(markdown(summary))
    print(f"written: {args.output.with_suffix('.md')}, {args.output.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
