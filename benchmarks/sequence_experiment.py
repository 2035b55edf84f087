"""What behaviour sequences and the dot interaction buy, on synthetic worlds whose clicks
depend on a latent user x item match (what a click history reveals):

    python -m benchmarks.sequence_experiment [--worlds rich sparse] [--variants none mean din attention]
        [--seeds 3] [--epochs 2] [--days 9] [--window-days 6] [--output state/sequence_experiment]
    python -m benchmarks.sequence_experiment --worlds quality demo --variants none dot

Worlds (the demo config's generator otherwise): ``rich``: 3,000 users x 60,000 impressions
a day (many clicks per user); ``sparse``: 40,000 users, the same traffic (few clicks per
user); ``quality``: configs/quality.toml's 200 users x 100 items with the latent match on
(``latent_match_scale = 1``) and 100,000 impressions a day; ``demo``: configs/demo.toml's.

Variants: ``none`` (the config's model), ``mean`` / ``din`` / ``attention`` (a click
sequence of the item id and category, N = 50, with that encoder), ``dot`` (the dot
interaction of all sparse features, projected to 16 dims), ``din+dot``.

Per (world, seed) the logs, features and training tables are built once (with the click
sequence's columns, which a model without it ignores) and every variant trains on the same
rows; seed k sets the config's seed to seed + k (a new world, logs and initialisation).
Models train on the window before L - 1, early-stop on L - 1 and are scored on L, the
newest mature day. Per run: click, CVR and CTCVR AUC; the paired standard error of each
difference to ``none`` on the same rows; the oracle's click AUC (the generator's noise-free
logit); click AUC by the row's past clicks (0, 1-4, 5+: the history length). The summary
gives per (world, variant) the mean over seeds of each AUC with the standard error of that
mean (from the per-seed standard errors), and the mean difference to ``none`` with its
standard error. Runs append to ``<output>-runs.csv`` as they finish; a rerun skips them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.mtl_experiment import (
    append_run,
    build_warehouse,
    held_out_day,
    log_days,
    read_runs,
    truth_rows,
    with_overrides,
)
from pipeline.config import FunnelConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
WORLDS = {
    "rich": ("configs/demo.toml", {"users": 3000, "items": 2000, "impressions_per_day": 60_000}),
    "sparse": ("configs/demo.toml", {"users": 40_000, "items": 5000, "impressions_per_day": 60_000}),
    "quality": ("configs/quality.toml", {"latent_match_scale": 1.0, "impressions_per_day": 100_000}),
    "demo": ("configs/demo.toml", {}),
}
VARIANTS = ("none", "mean", "din", "attention", "dot", "din+dot")
VIEWS = ("click", "cvr", "ctcvr")
HISTORY_BUCKETS = {"0": (0, 0), "1-4": (1, 4), "5+": (5, 1 << 30)}
SEQUENCE = {"name": "clicked", "items": ["item_id", "category_id"], "max_length": 50}


def world_config(world: str, seed: int, args) -> FunnelConfig:
    path, generate = WORLDS[world]
    cfg = load_config(ROOT / path)
    days = args.days or cfg.generate.days
    features = cfg.features.model_dump(by_alias=True)
    features["sequences"] = [SEQUENCE]
    return with_overrides(
        cfg,
        top={"seed": cfg.seed + seed},
        generate={**generate, "days": days},
        features=features,
        train={"epochs": args.epochs, "window_days": args.window_days, "min_window_days": 2},
    )


def variant_config(cfg: FunnelConfig, variant: str) -> FunnelConfig:
    features = cfg.features.model_dump(by_alias=True)
    encoder = variant.removesuffix("+dot")
    if encoder in ("none", "dot"):
        features["sequences"] = []
    else:
        features["sequences"] = [{**SEQUENCE, "encoder": encoder}]
    model = {"interaction": "dot", "interaction_dim": 16} if variant.endswith("dot") else {}
    return with_overrides(cfg, features=features, model=model)


def predictions(cfg: FunnelConfig, warehouse: Path, run_date: dt.date, day: dt.date) -> dict[str, np.ndarray]:
    """Train ``cfg``'s model for ``run_date``; its predictions on ``day``'s rows."""
    import torch

    from features.catalog import training_dir
    from models.loader import parquet_files, table_loader
    from models.predict import predict
    from pipeline.train_stage import train_run

    result = train_run(cfg, warehouse, run_date, progress=False)
    loader = table_loader(cfg, parquet_files(training_dir(warehouse, day)), batch_size=8192, shuffle=False)
    return predict(result.model, loader, torch.device("cpu"))


def history_lengths(warehouse: Path, day: dt.date) -> np.ndarray:
    import pyarrow.parquet as pq

    from features.catalog import training_dir
    from models.loader import parquet_files

    column = f"{SEQUENCE['name']}__item_id"
    tables = [pq.read_table(f, columns=[column]) for f in parquet_files(training_dir(warehouse, day))]
    return np.concatenate([t.column(0).combine_chunks().value_lengths().to_numpy(zero_copy_only=False) for t in tables])


def run_metrics(cfg, pred, base, lengths, oracle_logit) -> dict[str, float]:
    """AUCs and standard errors of one run, its paired differences to ``base`` (the
    ``none`` run on the same rows), click AUC per history bucket and the oracle's."""
    from models.metrics import auc, auc_difference_standard_error
    from models.predict import auc_difference_standard_errors

    row = {}
    labels = {"click": pred["label_click"], "cvr": pred["label_conversion"], "ctcvr": pred["label_conversion"]}
    for view in VIEWS:
        keep = pred["label_click"] > 0 if view == "cvr" else slice(None)
        row[f"{view}_auc"] = auc(labels[view][keep], pred[f"p_{view}"][keep])
        row[f"{view}_se"] = auc_difference_standard_error(labels[view][keep], pred[f"p_{view}"][keep], None)
    diff_se = auc_difference_standard_errors(cfg, pred, base)
    for view in VIEWS:
        keep = pred["label_click"] > 0 if view == "cvr" else slice(None)
        row[f"{view}_diff"] = row[f"{view}_auc"] - auc(labels[view][keep], base[f"p_{view}"][keep])
        row[f"{view}_diff_se"] = diff_se[view]
    for bucket, (lo, hi) in HISTORY_BUCKETS.items():
        rows = (lengths >= lo) & (lengths <= hi)
        row[f"click_auc_{bucket}"] = auc(pred["label_click"][rows], pred["p_click"][rows])
        row[f"click_diff_{bucket}"] = row[f"click_auc_{bucket}"] - auc(pred["label_click"][rows], base["p_click"][rows])
        row[f"share_{bucket}"] = float(rows.mean())
    row["oracle_click_auc"] = auc(pred["label_click"], oracle_logit)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", nargs="+", default=["rich", "sparse"], choices=list(WORLDS))
    p.add_argument("--variants", nargs="+", default=["none", "mean", "din", "attention"], choices=VARIANTS)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--days", type=int, default=9, help="log days (0: the config's)")
    p.add_argument("--window-days", type=int, default=6)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--output", type=Path, default=Path("state/sequence_experiment"))
    args = p.parse_args(argv)
    if "none" not in args.variants:
        args.variants.insert(0, "none")  # the base every difference is paired with
    runs_path = args.output.with_name(args.output.name + "-runs.csv")
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    done = _read(runs_path)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for world in args.worlds:
            for seed in range(args.seeds):
                wanted = [v for v in args.variants if (world, seed, v) not in done]
                if not wanted:
                    continue
                cfg = world_config(world, seed, args)
                warehouse = Path(tmp) / f"{world}-{seed}" / "warehouse"
                print(f"{world} seed {seed}: building the warehouse ...", flush=True)
                build_warehouse(cfg, warehouse)
                day = held_out_day(cfg)
                run_date = log_days(cfg)[-1] - dt.timedelta(days=1)
                lengths = history_lengths(warehouse, day)
                oracle = truth_rows(warehouse, day)["click_logit"]
                preds = {}
                for variant in args.variants:  # none first: the others pair with it
                    vcfg = variant_config(cfg, variant)
                    vcfg = vcfg.model_copy(update={"state_dir": Path(tmp) / f"{world}-{seed}" / variant})
                    preds[variant] = predictions(vcfg, warehouse, run_date, day)
                    if variant in wanted:
                        row = {"world": world, "seed": seed, "variant": variant}
                        row |= run_metrics(vcfg, preds[variant], preds["none"], lengths, oracle)
                        append_run(runs_path, row, list(row))
                        done[world, seed, variant] = row
                        print(
                            f"  {variant:10s} click {row['click_auc']:.4f} ({row['click_diff']:+.4f} ± "
                            f"{row['click_diff_se']:.4f})  oracle {row['oracle_click_auc']:.4f}",
                            flush=True,
                        )
    print(summary(done, args.worlds, args.variants))


def summary(done: dict, worlds: list[str], variants: list[str]) -> str:
    """Per world and variant: mean over seeds of each AUC ± the standard error of that mean,
    and the mean paired difference to none ± its standard error."""
    lines = [
        "| world | variant | seeds | click AUC | CVR AUC | CTCVR AUC | click vs none | CTCVR vs none | "
        "click vs none by past clicks 0 / 1-4 / 5+ | oracle gap |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for world in worlds:
        for variant in variants:
            rows = [r for (w, _, v), r in sorted(done.items()) if w == world and v == variant]
            if not rows:
                continue

            def mean_se(key: str, se_key: str, rows=rows) -> str:
                m = np.mean([r[key] for r in rows])
                se = np.sqrt(np.sum([r[se_key] ** 2 for r in rows])) / len(rows)
                return f"{m:+.4f} ± {se:.4f}" if "diff" in key else f"{m:.4f} ± {se:.4f}"

            buckets = " / ".join(f"{np.mean([r[f'click_diff_{b}'] for r in rows]):+.4f}" for b in HISTORY_BUCKETS)
            gap = np.mean([r["oracle_click_auc"] - r["click_auc"] for r in rows])
            lines.append(
                f"| {world} | {variant} | {len(rows)} | {mean_se('click_auc', 'click_se')} | "
                f"{mean_se('cvr_auc', 'cvr_se')} | {mean_se('ctcvr_auc', 'ctcvr_se')} | "
                f"{mean_se('click_diff', 'click_diff_se')} | {mean_se('ctcvr_diff', 'ctcvr_diff_se')} | "
                f"{buckets} | {gap:.4f} |"
            )
    shares = {
        world: " / ".join(
            f"{np.mean([r[f'share_{b}'] for (w, _, _), r in done.items() if w == world]):.2f}" for b in HISTORY_BUCKETS
        )
        for world in worlds
        if any(w == world for w, _, _ in done)
    }
    lines.append("")
    lines += [f"{world}: share of test rows with 0 / 1-4 / 5+ past clicks: {s}" for world, s in shares.items()]
    return "\n".join(lines)


def _read(path: Path) -> dict:
    """The runs done so far, by (world, seed, variant)."""
    return {(r["world"], int(r["seed"]), r["variant"]): r for r in read_runs(path, ("world", "variant"))}


if __name__ == "__main__":
    main()
