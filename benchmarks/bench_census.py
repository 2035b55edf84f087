"""The Census-Income multi-task benchmark: funnelrank's backbones on the MMoE paper's two
tasks (income > 50K, never married), against the numbers of the libraries users would
otherwise pick.

    python -m benchmarks.bench_census                      # 4 backbones x 3 seeds, 5 epochs, batch 1024
    python -m benchmarks.bench_census --backbones mmoe --seeds 1
    python -m benchmarks.bench_census --backbones mmoe --bucket-numeric 32   # + bucketised numbers
    python -m benchmarks.bench_census --backbones mmoe --train-fraction 0.5 --epochs 10   # half the rows, same steps

Data: ``configs/census.toml`` (the fixed torch-rechub split of the UCI Census-Income (KDD)
test file in ``../shared/data/census-income/derived_rechub_split``: 59,857 train / 19,952
val / 19,953 test rows), read through the ``[table]`` source. Each run is a fresh process
(so peak RSS is its own) that trains with ``funnelrank train``'s code path (``train_run``:
torchrec EBC, fused row-wise Adagrad, AdamW; the val split early-stops) and scores the best
epoch on the test split. Printed per backbone: test AUC per task (mean and spread over
seeds, and the DeLong standard error that the test split's 19,953 rows alone put on
one run's AUC), training samples/s (mean over epochs, validation excluded), wall seconds of the
run (training and test scoring) and peak RSS.

Reference on this 2-core machine and split (issue 8), 5 epochs at batch 1024: other
libraries reach income AUC 0.94-0.945 and marital AUC 0.988-0.994 at 10,000-28,000
training samples/s. Targets: income >= 0.950 and marital >= 0.995 for the best backbone
(mean of 3 seeds), mmoe >= 50,000 samples/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import in_child, peak_rss_mib

BACKBONES = ("single_task", "shared_bottom", "mmoe", "ple")


def _run(
    config: Path,
    backbone: str,
    seed: int,
    epochs: int,
    batch_size: int,
    workdir: str,
    table: dict,
    sparse: list[dict],
    out,
) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from models.loader import TrainingTableLoader
    from models.predict import predict, validation_metrics
    from pipeline.config import load_config
    from pipeline.evaluate import evaluation_table
    from pipeline.train_stage import train_run

    started = time.perf_counter()
    cfg = load_config(
        config,
        {
            "seed": seed,
            "warehouse": f"{workdir}/warehouse",
            "state_dir": f"{workdir}/state-{backbone}-{seed}",
            "model": {"backbone": backbone},
            "train": {"epochs": epochs, "batch_size": batch_size},
            "table": table,
            "features": {"sparse": sparse},
        },
    )
    result = train_run(cfg, cfg.warehouse, None, progress=False)
    _, test_files = evaluation_table(cfg, cfg.warehouse, None)
    test = TrainingTableLoader(
        test_files,
        cfg.features.sparse,
        cfg.features.dense_names(),
        8192,
        shuffle=False,
        seed=0,
        labels=cfg.label_columns,
    )
    metrics = validation_metrics(cfg, predict(result.model, test, torch.device("cpu")))
    out.put(
        {
            "test": {view: metrics[f"{view}_auc"] for view in cfg.views()},
            "test_se": {view: metrics[f"{view}_auc_se"] for view in cfg.views()},
            "samples_per_s": statistics.mean(h["train/samples_per_s"] for h in result.history),
            "epochs": result.epochs_run,
            "best_epoch": result.best_epoch,
            "seconds": time.perf_counter() - started,
            "peak_rss_mib": peak_rss_mib(),
        }
    )


def _train_rows(config: Path, table: dict, warehouse: Path):
    """The train split's rows, read the way the table source reads them (a CSV converted
    once, into ``warehouse``, where preparing the table finds it again)."""
    from features.io import sha256_file
    from features.table_source import parquet_source, read_splits, split_inputs
    from pipeline.config import load_config

    cfg = load_config(config, {"table": table})
    paths = split_inputs(cfg.table)
    sources = {split: parquet_source(path, sha256_file(path), warehouse) for split, path in paths.items()}
    return cfg, read_splits(cfg, paths, sources)["train"]


def train_subset(config: Path, fraction: float, workdir: Path) -> dict:
    """A ``[table]`` override that trains on a seeded random ``fraction`` of the train split
    (val and test unchanged), written as Parquet under ``workdir``; {} for the whole split."""
    if not 0.0 < fraction <= 1.0:
        raise SystemExit(f"--train-fraction must lie in (0, 1], got {fraction}")
    if fraction == 1.0:
        return {}
    from pipeline.config import load_config

    if load_config(config).table.train is None:
        raise SystemExit(f"--train-fraction needs separate train/val/test files in {config}'s [table]")
    _, rows = _train_rows(config, {}, workdir / "warehouse")
    path = workdir / f"train-{fraction:g}.parquet"
    rows.sample(fraction=fraction, seed=0).write_parquet(path)
    return {"train": str(path)}


def bucketised_numeric(config: Path, buckets: int, warehouse: Path, table: dict) -> list[dict]:
    """The config's sparse features plus, when ``buckets`` > 1, a kind = "bucket" feature per
    numeric feature cut at the train split's ``buckets``-quantiles (ties merged)."""
    import numpy as np
    import polars as pl

    from pipeline.config import load_config

    cfg = load_config(config)
    sparse = [f.model_dump(mode="json") for f in cfg.features.sparse]
    if buckets <= 1:
        return sparse
    cfg, frame = _train_rows(config, table, warehouse)
    for f in cfg.features.numeric:
        values = frame.get_column(f.column).drop_nulls().cast(pl.Float64).to_numpy()
        cuts = np.unique(np.quantile(values, np.linspace(0.0, 1.0, buckets + 1)[1:-1]))
        sparse.append(
            {
                "name": f"{f.name}_bucket",
                "table": f.table,
                "column": f.column,
                "kind": "bucket",
                "boundaries": cuts.tolist(),
                "dim": 8,
            }
        )
    return sparse


def _spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("configs/census.toml"))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--seeds", type=int, default=3, help="runs per backbone, seeds 0..N-1 (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--bucket-numeric",
        type=int,
        default=0,
        metavar="N",
        help='also feed each numeric column as a kind = "bucket" feature cut at the train split\'s N-quantiles',
    )
    parser.add_argument(
        "--train-fraction",
        type=float,
        default=1.0,
        metavar="F",
        help="train on a seeded random share F of the train split (val and test unchanged): "
        "how test AUC grows with training rows",
    )
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as workdir:  # one warehouse: the table is prepared once
        table = train_subset(args.config, args.train_fraction, Path(workdir))
        sparse = bucketised_numeric(args.config, args.bucket_numeric, Path(workdir) / "warehouse", table)
        print(
            f"config {args.config}  train fraction {args.train_fraction:g}  epochs {args.epochs}  batch "
            f"{args.batch_size}  "
            f"seeds {args.seeds}  sparse features {len(sparse)}  "
            f"cores {os.cpu_count()}  load avg {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        for backbone in args.backbones:
            runs = [
                in_child(_run, args.config, backbone, seed, args.epochs, args.batch_size, workdir, table, sparse)
                for seed in range(args.seeds)
            ]
            for seed, r in enumerate(runs):
                print(
                    f"  {backbone:13s} seed {seed}: "
                    + "  ".join(f"{v} {a:.4f} (SE {r['test_se'][v]:.4f})" for v, a in r["test"].items())
                    + f"  {r['samples_per_s']:,.0f} samples/s  best epoch {r['best_epoch']}  {r['seconds']:.1f} s",
                    flush=True,
                )
            rows.append((backbone, runs))

    views = list(rows[0][1][0]["test"])
    header = (
        f"{'backbone':13s} "
        + " ".join(f"{'test ' + v + ' AUC':>19s} {'SE':>6s}" for v in views)
        + f" {'samples/s':>10s} {'wall s':>7s} {'peak RSS':>9s}"
    )
    print("\n" + header)
    for backbone, runs in rows:
        print(
            f"{backbone:13s} "
            + " ".join(
                f"{_spread([r['test'][v] for r in runs]):>19s} {statistics.mean(r['test_se'][v] for r in runs):6.4f}"
                for v in views
            )
            + f" {statistics.mean(r['samples_per_s'] for r in runs):>10,.0f}"
            + f" {statistics.mean(r['seconds'] for r in runs):>7.1f}"
            + f" {max(r['peak_rss_mib'] for r in runs):>6.0f} MiB"
        )
    print(
        "AUC: mean ± std over seeds.  SE: standard error of one run's test AUC, from the test split's finite "
        "sample (DeLong), mean over seeds."
    )


if __name__ == "__main__":
    main()
