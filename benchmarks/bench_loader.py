"""Throughput of the training-table loader (models.loader) on a synthetic table.

    .venv/bin/python -m benchmarks.bench_loader [--rows 2000000] [--batch-size 4096]

Writes a random training table with the demo spec's columns (11 sparse features incl.
one list, 46 dense, labels, ids) to a temporary folder, then iterates the loader for one
shuffled epoch and prints samples/s and the peak RSS of the loading phase. Target: at
least 5x the training throughput (80,000 samples/s at batch 4096), i.e. 400,000 samples/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.config import FeaturesConfig
from pipeline.config import DEFAULT_CONFIG, load_config

MAX_LIST_LENGTH = 5


def synthetic_training_table(spec: FeaturesConfig, rows: int, seed: int, users: int = 1000) -> pa.Table:
    """A random table with the columns and types of features.examples' training table.

    Single ids are drawn over the whole embedding table including padding 0; list
    features have 0..MAX_LIST_LENGTH ids, so some lists are empty.
    """
    rng = np.random.default_rng(seed)
    columns: dict[str, pa.Array] = {}
    for feature in spec.sparse:
        if feature.kind == "id":
            columns[feature.name] = pa.array(rng.integers(0, feature.num_embeddings, rows, dtype=np.int64))
        else:
            lengths = rng.integers(0, MAX_LIST_LENGTH + 1, rows)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            values = pa.array(rng.integers(1, feature.num_embeddings, offsets[-1], dtype=np.int64))
            columns[feature.name] = pa.LargeListArray.from_arrays(pa.array(offsets), values)
    for name in spec.dense_names():
        columns[name] = pa.array(rng.standard_normal(rows, dtype=np.float32))
    click = rng.random(rows) < 0.1
    conversion = click & (rng.random(rows) < 0.2)
    columns["click"] = pa.array(click.astype(np.int8))
    columns["conversion"] = pa.array(conversion.astype(np.int8))
    columns["conversion_value"] = pa.array(np.where(conversion, rng.gamma(2.0, 10.0, rows), 0.0))
    columns["impression_id"] = pa.array(np.arange(rows)).cast(pa.large_string())
    columns["raw_user_id"] = pa.array(rng.integers(0, users, rows)).cast(pa.large_string())
    start = np.datetime64("2026-11-01T00:00", "ms")
    columns["ts"] = pa.array(
        start + rng.integers(0, 86_400_000, rows).astype("timedelta64[ms]"), pa.timestamp("us", tz="UTC")
    )
    return pa.table(columns)


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM, so the peak covers the loading phase only.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--row-group-rows", type=int, default=128 * 1024)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)

    import torch

    from models.loader import TrainingTableLoader

    spec = load_config(args.config).features
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        t0 = time.perf_counter()
        paths = []
        for i, rows in enumerate(np.diff(np.linspace(0, args.rows, args.files + 1).astype(int))):
            path = Path(tmp) / f"part-{i:05d}.parquet"
            table = synthetic_training_table(spec, int(rows), seed=i, users=20_000)
            # as features.examples writes it
            pq.write_table(table, path, row_group_size=args.row_group_rows, compression="zstd", compression_level=1)
            paths.append(path)
        size_mib = sum(p.stat().st_size for p in paths) / 2**20
        print(
            f"table: {args.rows:,} rows, {len(spec.sparse)} sparse, {len(spec.dense_names())} dense, "
            f"{len(paths)} files, {size_mib:.0f} MiB, written in {time.perf_counter() - t0:.1f} s"
        )

        _reset_peak_rss()
        rss_before = _rss_mib("VmRSS")
        loader = TrainingTableLoader(
            paths, spec.sparse, spec.dense_names(), batch_size=args.batch_size, shuffle=True, seed=0
        )
        t0 = time.perf_counter()
        samples = batches = 0
        first_batch_s = None
        for batch in loader:
            samples += len(batch)
            batches += 1
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        print(
            f"loader: {samples:,} samples in {batches} batches of {args.batch_size}, {seconds:.2f} s "
            f"(first batch after {first_batch_s:.2f} s) -> {samples / seconds:,.0f} samples/s"
        )
        print(f"RSS: {rss_before:,.0f} MiB before loading, peak {_rss_mib('VmHWM'):,.0f} MiB while loading")


if __name__ == "__main__":
    main()
