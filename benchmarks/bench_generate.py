"""Throughput and peak memory of the synthetic log generator.

    python -m benchmarks.bench_generate                                    # demo size: 100k/day x 14 days
    python -m benchmarks.bench_generate --impressions 10000000 --days 1    # one 10M-impression day

Writes into a temporary warehouse (removed afterwards unless --warehouse is given) and
prints impressions/s and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
from pathlib import Path

from features.synthetic import generate_logs
from pipeline.config import DEFAULT_CONFIG, load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--impressions", type=int, default=100_000, help="impressions per day (default %(default)s)")
    parser.add_argument("--days", type=int, default=14, help="days (default %(default)s)")
    parser.add_argument("--warehouse", type=Path, default=None, help="keep the output here (default: a temp dir)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, {"generate": {"impressions_per_day": args.impressions, "days": args.days}})
    warehouse = args.warehouse or Path(tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        summary = generate_logs(cfg, warehouse, progress=False)
    finally:
        if args.warehouse is None:
            shutil.rmtree(warehouse, ignore_errors=True)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(summary.describe())
    print(f"bench_generate: {summary.rows['impressions']:,} impressions ({args.days} x {args.impressions:,}) "
          f"in {summary.seconds:.1f} s = {summary.impressions_per_second:,.0f} impressions/s, "
          f"peak RSS {peak_rss_mib:,.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
