"""The ``features`` stage: each day's events counted per aggregate key (user, item, user x category, ...).

Point-in-time rule: the dense features of a row on day X use only events that happened
on days strictly before X. Each day's counters are therefore kept by EVENT time:

* ``imps``: impressions whose ts is on D;
* ``clicks``: impressions whose first qualifying click (see features.labels) is on D;
* ``convs``: clicked impressions whose first attributed conversion is on D, and
  ``conv_value``: the value of the attributed conversions on D.

Summed over all days these equal the sums of the ``click``, ``conversion`` and
``conversion_value`` labels, so features and labels count the same events. A click or
conversion on D belongs to an impression of up to ``maturity_lag_days`` earlier, whose
partitions are read to attribute it to the impression's key. Key columns are looked up on
the impression, else in the users / items snapshot accepted on D (``key_column_sources``).

Written to ``features.catalog.daily_dir`` (``features/daily/<key name>/date=D/``); each row
also carries ``key_hash``, a stable 64-bit hash of its key tuple, which the rolling states
(features.rolling_state) are keyed by, and the rows are in ascending key_hash order, the
states' order. The file's metadata (``DAILY_INPUTS``) holds the sha256 of every validated
partition the day was counted from: a day validated again afterwards makes the partition
stale (``stale_daily_aggregates``), which ``examples`` refuses to read.

The stage also adds D's events to each behaviour sequence's state (features.sequences:
the state as of the start of D + 1 is written), reading D's activity only.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from features.catalog import (
    daily_dir,
    scan_validated,
    sequence_state_dir,
    validated_dir,
    warehouse_relative,
)
from features.config import AggregateKey, DataConfig
from features.contract import SNAPSHOT_TABLES, day_str, in_day
from features.errors import DataContractError, StageError
from features.io import changed_folders, sha256_dir, write_parquet_dir
from features.labels import day_activity
from features.sequences import carried_columns, sequence_events, sequence_state
from features.snapshots import (
    SNAPSHOT_JOIN_KEY,
    CodedColumn,
    JoinedRows,
    join_snapshots,
    snapshot_scans,
)
from serving.encoding import _mix64 as mix64

COUNTS = ("imps", "clicks", "convs")
KEY_HASH_STEP = np.uint64(0x9E3779B97F4A7C15)
# A daily partition's file metadata key: JSON {validated partition: its sha256_dir when counted}.
DAILY_INPUTS = "funnelrank.counted_from"


def stale_daily_aggregates(
    warehouse: Path, folders: list[Path], hashed: dict[str, str | None] | None = None
) -> list[str]:
    """The daily partitions among ``folders`` counted from validated partitions that have
    changed since (validated again) or are gone, each with what changed. Partitions written
    without the record (by an older version) have nothing to compare and pass. ``hashed``:
    see ``changed_folders``."""
    stale = []
    for folder in folders:
        recorded = {
            k.decode(): v for f in folder.glob("*.parquet") for k, v in (pq.read_metadata(f).metadata or {}).items()
        }
        if DAILY_INPUTS not in recorded:
            continue
        if changed := changed_folders(warehouse, json.loads(recorded[DAILY_INPUTS]), hashed):
            what = ", ".join(f"{p} {why}" for p, why in changed.items())
            stale.append(f"{warehouse_relative(warehouse, folder)} ({what})")
    return stale


def key_column_sources(
    keys: Sequence[AggregateKey], warehouse: Path, day: dt.date, request_columns: Collection[str] | None = None
) -> dict[str, str]:
    """Where each column of the aggregate ``keys`` comes from: the first of "impressions",
    "users", "items" whose validated partition of ``day`` holds it. ``request_columns``: the
    impressions columns to look in instead of the validated impressions of ``day`` (a bundle's
    scorer: the columns a request carries)."""
    columns: dict[str, set[str] | None] = {"impressions": None if request_columns is None else set(request_columns)}
    where = "the validated impressions, users, items"
    if request_columns is not None:
        where = "the request columns, the validated users, items"
    sources: dict[str, str] = {}
    for key in keys:
        for col in key.columns:
            for table in ("impressions", *SNAPSHOT_TABLES):
                if columns.get(table) is None:  # read only the schemas needed
                    columns[table] = set(scan_validated(warehouse, table, day).collect_schema())
                if col in columns[table]:
                    sources[col] = table
                    break
            else:
                raise DataContractError(
                    f"aggregate key {key.name!r}: column {col!r} is in none of {where} of {day_str(day)}"
                )
    return sources


def daily_events(
    cfg: DataConfig, warehouse: Path, day: dt.date
) -> tuple[JoinedRows, list[str], dict[str, pl.DataFrame]]:
    """Rows of activity on ``day`` (an impression shown, first clicked or converting that
    day): the key columns of the impressions + imps, clicks, convs, conv_value, joined to
    the snapshots that hold the other key columns; the partitions it reads; and each
    behaviour sequence's events of the day (features.sequences.sequence_events), read in
    the same pass."""
    sources = key_column_sources(cfg.features.aggregate_keys, warehouse, day)
    carried = list(
        dict.fromkeys(
            [c for c, t in sources.items() if t == "impressions"]
            + [SNAPSHOT_JOIN_KEY[t] for t in sources.values() if t != "impressions"]
        )
    )
    sequences = cfg.features.sequences
    activity = day_activity(
        cfg, warehouse, day, list(dict.fromkeys(carried + [c for seq in sequences for c in carried_columns(cfg, seq)]))
    )
    inputs = [str(p) for p in activity.partitions]
    conv_ts = pl.col("conv_ts")
    converted = (
        activity.conversions.group_by("impression_id")
        .agg(
            in_day(conv_ts.min(), day).cast(pl.Int64).alias("convs"),
            pl.col("value").filter(in_day(conv_ts, day)).sum().alias("conv_value"),
            in_day(conv_ts, day).any().alias("active"),
            *[pl.col(c).first() for c in carried],
        )
        .filter("active")
        .drop("active")
    )
    events = pl.concat(
        [
            activity.impressions.filter(in_day(pl.col("ts"), day)).select(*carried, pl.lit(1, pl.Int64).alias("imps")),
            activity.clicked.filter(in_day(pl.col("first_click"), day)).select(
                *carried, pl.lit(1, pl.Int64).alias("clicks")
            ),
            converted.select(*carried, "convs", "conv_value"),
        ],
        how="diagonal",
    ).with_columns(pl.col(*COUNTS).fill_null(0), pl.col("conv_value").fill_null(0.0))

    scans = snapshot_scans(warehouse, day, sources)
    inputs += [str(validated_dir(warehouse, table, day)) for table in scans]
    # One query: the sequences' events share the scans and joins of the activity with the counters'.
    plans = [events, *(sequence_events(cfg, seq, activity, day) for seq in sequences), *scans.values()]
    events, *collected = pl.collect_all(plans)
    sequence_rows = dict(zip((seq.name for seq in sequences), collected[: len(sequences)], strict=True))
    snapshots = collected[len(sequences) :]
    # One chunk per column: gathers on it are ~5x faster.
    rows = join_snapshots(events.rechunk(), sources, dict(zip(scans, snapshots, strict=True)), warehouse, day)
    return rows, inputs, sequence_rows


def combine_hashes(column_hashes: list[np.ndarray]) -> np.ndarray:
    """One stable 64-bit hash per row from the per-column hashes of a key tuple."""
    combined = np.zeros(len(column_hashes[0]) if column_hashes else 0, np.uint64)
    for hashes in column_hashes:
        combined = mix64(combined * KEY_HASH_STEP + hashes)
    return combined


def _compact(codes: np.ndarray, n_codes: int) -> tuple[np.ndarray, int]:
    """``codes`` (in 0..n_codes-1) renumbered 0..k-1 keeping their order, and k."""
    if n_codes <= 4 * len(codes) + 1_000_000:  # a presence table: linear time, no sort
        present = np.zeros(n_codes, bool)
        present[codes] = True
        return (np.cumsum(present) - 1)[codes], int(present.sum())
    distinct, renumbered = np.unique(codes, return_inverse=True)
    return renumbered.reshape(-1), len(distinct)


def row_groups(column_codes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Group rows by a tuple of integer codes (>= 0), one array per key column: each
    row's group 0..k-1 (in the codes' mixed-radix order) and one row of each group."""
    n_rows = len(column_codes[0]) if column_codes else 0
    group, n_groups = np.zeros(n_rows, np.int64), 1
    for codes in column_codes:
        radix = int(codes.max(initial=0)) + 1
        group, n_groups = _compact(group * radix + codes, n_groups * radix)
    first_row = np.empty(n_groups if n_rows else 0, np.int64)
    first_row[group] = np.arange(n_rows)  # any row of a group holds its key values
    return group, first_row


def key_groups(coded: dict[str, CodedColumn], columns: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by their key tuple of ``columns``: each row's group, one row of each
    group (``row_groups``) and each group's key hash (as in the daily partitions' ``key_hash``)."""
    group, first_row = row_groups([coded[c].codes for c in columns])
    return group, first_row, combine_hashes([coded[c].hashes[coded[c].codes[first_row]] for c in columns])


def counters_by_key(events: pl.DataFrame, columns: list[str], coded: dict[str, CodedColumn]) -> pl.DataFrame:
    """The key columns, ``key_hash`` (UInt64), then summed imps, clicks, convs (Int64) and
    conv_value (Float64) per distinct key, in ascending key_hash order (the rolling states'
    order, so the nightly state update reads a day without sorting it). ``events``: the
    counts per row; ``coded``: the rows' key columns (keys sharing a column share them).

    Same sums as ``group_by(columns).agg(sum)``, but each string column is hashed once
    (dictionary encoding) and the grouping runs on the integer codes.
    """
    group, first_row, key_hash = key_groups(coded, columns)
    order = np.argsort(key_hash)
    # float64 sums are exact for counts below 2**53.
    sums = {
        metric: np.bincount(group, weights=events[metric].to_numpy(), minlength=len(first_row))[order]
        for metric in (*COUNTS, "conv_value")
    }
    return pl.DataFrame([coded[c].values_at(first_row[order]).alias(c) for c in columns]).with_columns(
        pl.Series("key_hash", key_hash[order], pl.UInt64),
        *[pl.Series(metric, sums[metric].round().astype(np.int64)) for metric in COUNTS],
        pl.Series("conv_value", sums["conv_value"], pl.Float64),
    )


def build_daily_aggregates(cfg: DataConfig, warehouse: Path, day: dt.date) -> dict:
    """Write each aggregate key's counters of ``day`` (``counters_by_key``) atomically;
    return a manifest. Raises when two keys of the day share a key hash."""
    started = time.perf_counter()
    timings = dict.fromkeys(("events", "counters", "write"), 0.0)
    events, inputs, sequence_rows = daily_events(cfg, warehouse, day)
    impressions = int(events.rows["imps"].sum())
    manifest: dict = {"date": day_str(day), "impressions": impressions, "inputs": inputs, "rows": {}, "outputs": {}}
    counted_from = {
        DAILY_INPUTS: json.dumps({warehouse_relative(warehouse, Path(p)): sha256_dir(Path(p)) for p in inputs})
    }
    t = time.perf_counter()
    timings["events"] = t - started
    key_columns = dict.fromkeys(c for key in cfg.features.aggregate_keys for c in key.columns)
    coded = {column: events.coded(column) for column in key_columns}  # one encoding per column, shared by the keys
    for key in cfg.features.aggregate_keys:
        counters = counters_by_key(events.rows, key.columns, coded)
        hashes = counters["key_hash"].to_numpy()
        if (hashes[1:] == hashes[:-1]).any():  # sorted: equal hashes are neighbours
            raise StageError(
                f"64-bit key hash collision among the {key.name!r} keys of {day_str(day)}: rename one key value"
            )
        timings["counters"] += time.perf_counter() - t
        t = time.perf_counter()
        target = write_parquet_dir(daily_dir(warehouse, key.name, day), counters, metadata=counted_from)
        timings["write"] += time.perf_counter() - t
        t = time.perf_counter()
        manifest["rows"][key.name] = counters.height
        manifest["outputs"][key.name] = str(target)
    for seq in cfg.features.sequences:  # each one's state as of the next day: this day's events added
        state = sequence_state(cfg, warehouse, seq, day + dt.timedelta(days=1), sequence_rows[seq.name])
        manifest["rows"][seq.name] = state.users
        manifest["outputs"][seq.name] = str(sequence_state_dir(warehouse, seq.name, state.day))
    timings["sequences"] = time.perf_counter() - t
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    manifest["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    return manifest
