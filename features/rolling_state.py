"""Persisted rolling states: each aggregate key's window sums, advanced one day at a time,
from which the ``examples`` stage looks up the rolling features of a day's rows.

``features.catalog.rolling_state_dir`` (``features/rolling/<key name>/date=X/``) holds the
key's window counts as of the START of X (the daily counters of days [X - w, X - 1]
summed, per window w):

* ``state.arrow``: Arrow IPC file, ``key_hash`` UInt64 (the daily partitions' key hash,
  sorted, unique) + one Int64 column per metric and window (``_imps_7``, ...). Keys whose
  counts are all zero over the longest window are left out: they read the same as keys
  never seen (zero counts, the no-history defaults).
* ``manifest.json``: key, key columns, windows, rows, the sha256 of every daily
  partition summed in (so a rewritten partition invalidates the state), how it was built.

State(X + 1) = state(X) + daily(X) - daily(X - w) per window; without a valid state(X)
(first run, a gap, a backfill out of order, a rewritten partition) it is recomputed from
the daily partitions. Both give the same content, and features read from a state equal
the join of features.rolling_features' tables (tests/test_rolling_state.py).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from features.catalog import (
    daily_dir,
    daily_root,
    holds_data,
    partition_days,
    rolling_state_dir,
    rolling_state_root,
    warehouse_relative,
)
from features.config import AggregateKey, DataConfig
from features.contract import day_str
from features.daily_counters import COUNTS, key_groups
from features.errors import DataContractError, StageError
from features.io import atomic_dir, atomic_write_json, sha256_dir
from features.rolling_features import (
    count_column,
    feature_columns,
    global_rates,
    history_days,
    window_counts,
    window_days,
)
from features.snapshots import CodedColumn

STATE_FILE = "state.arrow"
STATE_FORMAT = 1
STATES_KEPT_DAYS = 1  # states older than the day before the newest are deleted
INT32_MAX = np.iinfo(np.int32).max


def _state_columns(windows: list[int]) -> list[str]:
    return [count_column(metric, w) for w in windows for metric in COUNTS]


@dataclass(frozen=True)
class RollingState:
    """A key's window counts as of the start of ``day`` (see the section comment)."""

    day: dt.date
    windows: tuple[int, ...]
    key_hash: np.ndarray  # uint64, sorted, unique
    counts: list[np.ndarray]  # one Int32 or Int64 array per _state_columns entry, aligned with key_hash

    @cached_property
    def totals(self) -> dict[str, int]:
        """Each count column summed over every key (what the global rates come from)."""
        columns = zip(_state_columns(list(self.windows)), self.counts, strict=True)
        return {name: int(column.sum(dtype=np.int64)) for name, column in columns}


def _empty_state(day: dt.date, windows: list[int]) -> RollingState:
    no_counts = [np.zeros(0, np.int64) for _ in _state_columns(windows)]
    return RollingState(day, tuple(windows), np.zeros(0, np.uint64), no_counts)


def _scan_daily_hashed(warehouse: Path, key: AggregateKey, day: dt.date) -> pl.LazyFrame:
    """One daily partition's key_hash and counts."""
    path = daily_dir(warehouse, key.name, day)
    scan = pl.scan_parquet(path / "*.parquet")
    if "key_hash" not in scan.collect_schema():
        raise DataContractError(
            f"{path} has no key_hash column (written by an older version): "
            f"rerun `funnelrank features` for {day_str(day)}"
        )
    return scan.select("key_hash", *COUNTS)


def _read_daily_sorted(warehouse: Path, key: AggregateKey, day: dt.date) -> tuple[np.ndarray, np.ndarray]:
    """One daily partition's key hashes in ascending order and their imps/clicks/convs
    [n, 3]. Partitions are written in that order; ones written in key order by an older
    version are sorted here."""
    frame = _scan_daily_hashed(warehouse, key, day).collect()
    hashes = frame["key_hash"].to_numpy()
    if (hashes[1:] < hashes[:-1]).any():
        frame = frame.sort("key_hash")
        hashes = frame["key_hash"].to_numpy()
    return hashes, frame.select(COUNTS).to_numpy().astype(np.int64, copy=False)


def daily_partition_hashes(warehouse: Path, key: AggregateKey, days: list[dt.date]) -> dict[str, str]:
    """sha256 of the key's existing daily partitions of ``days``, by warehouse-relative path."""
    paths = [daily_dir(warehouse, key.name, d) for d in days]
    return {warehouse_relative(warehouse, p): sha256_dir(p) for p in paths if holds_data(p)}


def _state_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _state_matches(manifest: dict | None, cfg: DataConfig, key: AggregateKey, daily_sha: dict[str, str]) -> bool:
    return bool(manifest) and (
        manifest.get("format") == STATE_FORMAT
        and manifest.get("key_columns") == key.columns
        and manifest.get("windows") == list(cfg.features.windows_days)
        and manifest.get("daily_sha256") == daily_sha
    )


def _load_state(path: Path, day: dt.date, windows: list[int], manifest: dict) -> RollingState | None:
    """The state written at ``path``, memory-mapped (a lookup reads only the pages it
    needs); None when its rows or totals disagree with its manifest (a damaged file is
    rebuilt, not trusted)."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path / STATE_FILE))).read_all()
    except (OSError, pa.ArrowInvalid):
        return None
    columns = _state_columns(windows)
    if table.column_names != ["key_hash", *columns]:
        return None
    counts = [table.column(c).to_numpy() for c in columns]
    state = RollingState(day, tuple(windows), table.column("key_hash").to_numpy(), counts)
    return state if (table.num_rows, state.totals) == (manifest.get("rows"), manifest.get("totals")) else None


def _recomputed_state(cfg: DataConfig, warehouse: Path, key: AggregateKey, day: dt.date) -> RollingState:
    """The state of ``day`` summed from the daily partitions of its longest window."""
    windows = list(cfg.features.windows_days)
    days, _ = history_days(warehouse, key, day, max(windows))
    if not days:
        return _empty_state(day, windows)
    history = pl.concat([
        _scan_daily_hashed(warehouse, key, d).with_columns(pl.lit((day - d).days, pl.Int32).alias("age"))
        for d in days
    ])  # fmt: skip
    summed = history.group_by("key_hash").agg(window_counts(windows)).sort("key_hash").collect()
    counts = [summed[c].to_numpy() for c in _state_columns(windows)]
    keep = _in_longest_window(counts, windows)
    return RollingState(day, tuple(windows), summed["key_hash"].to_numpy()[keep], [c[keep] for c in counts])


def _in_longest_window(counts: list[np.ndarray], windows: list[int]) -> np.ndarray:
    """Keys with any event in the longest window (the others read as never seen)."""
    longest = windows.index(max(windows)) * len(COUNTS)
    return (counts[longest] != 0) | (counts[longest + 1] != 0) | (counts[longest + 2] != 0)


def _advanced_state(warehouse: Path, key: AggregateKey, previous: RollingState) -> RollingState:
    """state(X + 1) = state(X) + daily(X) - daily(X - w) for each window w; for w = 1 that is
    daily(X) itself."""
    day = previous.day
    windows = list(previous.windows)
    root = daily_root(warehouse, key.name)
    existing = partition_days(root)
    keys = previous.key_hash
    if day in existing:
        added, added_counts = _read_daily_sorted(warehouse, key, day)
    elif existing and min(existing) <= day:
        raise DataContractError(
            f"daily aggregates of key {key.name!r} for {day_str(day)} missing in {root}: "
            "a stage did not run for that day"
        )
    else:
        added, added_counts = np.zeros(0, np.uint64), np.zeros((0, len(COUNTS)), np.int64)
    pos = np.searchsorted(keys, added)
    if len(keys):
        new = ~((pos < len(keys)) & (keys[np.minimum(pos, len(keys) - 1)] == added))
    else:
        new = np.ones(len(added), bool)
    # Each added key's row in the merged order: its place among the old keys, moved on by
    # the new keys before it; every other row takes an old key, in order.
    added_rows = pos + np.cumsum(new) - new
    old_rows = np.ones(len(keys) + int(new.sum()), bool)
    old_rows[added_rows[new]] = False
    keys = _merged(keys, added[new], old_rows, added_rows[new])
    # Int32 halves the memory traffic of these passes over every key; Int64 where a sum might
    # not fit (a column's total bounds its largest value: counts are >= 0).
    added_total = added_counts.sum(axis=0)
    counts = []
    for i, (name, column) in enumerate(zip(_state_columns(windows), previous.counts, strict=True)):
        metric, window = i % len(COUNTS), windows[i // len(COUNTS)]
        fits = (0 if window == 1 else previous.totals[name]) + int(added_total[metric]) <= INT32_MAX
        if window == 1:
            column = np.zeros(len(keys), np.int32 if fits else np.int64)
            column[added_rows] = added_counts[:, metric]
        else:
            column = _merged(column, 0, old_rows, added_rows[new], np.int32 if fits else np.int64)
            column[added_rows] += added_counts[:, metric]
        counts.append(column)
    for i, w in enumerate(windows):
        leaving = day - dt.timedelta(days=w)
        if w == 1 or leaving not in existing:
            continue
        gone, gone_counts = _read_daily_sorted(warehouse, key, leaving)
        nonzero = gone_counts.any(axis=1)  # a key counted nowhere may have left the state
        gone, gone_counts = gone[nonzero], gone_counts[nonzero]
        pos = np.searchsorted(keys, gone)
        if len(gone) and (len(keys) == 0 or not (keys[np.minimum(pos, len(keys) - 1)] == gone).all()):
            raise StageError(
                f"rolling state of key {key.name!r} for {day_str(day)} lacks keys of "
                f"{daily_dir(warehouse, key.name, leaving)}"
            )
        for j in range(len(COUNTS)):
            counts[i * len(COUNTS) + j][pos] -= gone_counts[:, j]
    keep = _in_longest_window(counts, windows)
    return RollingState(day + dt.timedelta(days=1), tuple(windows), keys[keep], [c[keep] for c in counts])


def _merged(
    old: np.ndarray, inserted: np.ndarray | int, old_rows: np.ndarray, new_rows: np.ndarray, dtype=None
) -> np.ndarray:
    """A new array holding ``old`` at ``old_rows`` (a mask) and ``inserted`` at ``new_rows``."""
    out = np.empty(len(old_rows), dtype or old.dtype)
    out[old_rows] = old
    out[new_rows] = inserted
    return out


def _write_state(
    warehouse: Path, key: AggregateKey, state: RollingState, daily_sha: dict[str, str], built: str
) -> None:
    """Write the state atomically, uncompressed (so it can be memory-mapped); a count
    column is stored as Int32 when its values fit."""
    columns = {
        # counts are >= 0
        name: column if column.dtype == np.int32 or column.max(initial=0) > INT32_MAX else column.astype(np.int32)
        for name, column in zip(_state_columns(list(state.windows)), state.counts, strict=True)
    }
    table = pa.table({"key_hash": state.key_hash, **columns})
    target = rolling_state_dir(warehouse, key.name, state.day)
    with atomic_dir(target) as tmp:
        with pa.OSFile(str(tmp / STATE_FILE), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        manifest = {
            "format": STATE_FORMAT, "key": key.name, "key_columns": key.columns, "date": day_str(state.day),
            "as_of": "start of date", "windows": list(state.windows), "rows": table.num_rows, "totals": state.totals,
            "daily_sha256": daily_sha, "built": built, "file": STATE_FILE,
        }  # fmt: skip
        atomic_write_json(tmp / "manifest.json", manifest)
    for old in partition_days(rolling_state_root(warehouse, key.name), "manifest.json"):
        if old < state.day - dt.timedelta(days=STATES_KEPT_DAYS):
            shutil.rmtree(rolling_state_dir(warehouse, key.name, old), ignore_errors=True)


def rolling_state(
    cfg: DataConfig, warehouse: Path, key: AggregateKey, day: dt.date, daily_sha: dict[str, str] | None = None
) -> RollingState:
    """The key's window counts as of the start of ``day``: read when a state written from
    the current daily partitions is there, else advanced from the previous day's state,
    else recomputed; written atomically. ``daily_sha``: the sha256 of the key's daily
    partitions of [day - longest window, day - 1] (``daily_partition_hashes``) when the
    caller has them already."""
    windows = list(cfg.features.windows_days)
    if daily_sha is None:
        daily_sha = daily_partition_hashes(warehouse, key, window_days(day, max(windows)))
    path = rolling_state_dir(warehouse, key.name, day)
    manifest = _state_manifest(path)
    if _state_matches(manifest, cfg, key, daily_sha):
        state = _load_state(path, day, windows, manifest)
        if state is not None:
            return state
    yesterday = day - dt.timedelta(days=1)
    previous_path = rolling_state_dir(warehouse, key.name, yesterday)
    previous_manifest = _state_manifest(previous_path)
    if previous_manifest is not None:
        # Yesterday's window: today's without day - 1, plus the day that has just left it.
        previous_days = window_days(yesterday, max(windows))
        previous_sha = daily_partition_hashes(warehouse, key, previous_days[-1:]) | {
            p: sha
            for p, sha in daily_sha.items()
            if p != warehouse_relative(warehouse, daily_dir(warehouse, key.name, yesterday))
        }
    previous = None
    if previous_manifest is not None and _state_matches(previous_manifest, cfg, key, previous_sha):
        previous = _load_state(previous_path, yesterday, windows, previous_manifest)
    if previous is not None:
        state, built = _advanced_state(warehouse, key, previous), "advanced"
    else:
        state, built = _recomputed_state(cfg, warehouse, key, day), "recomputed"
    _write_state(warehouse, key, state, daily_sha, built)
    return state


def state_features(
    cfg: DataConfig, key: AggregateKey, state: RollingState, coded: dict[str, CodedColumn]
) -> pl.DataFrame:
    """The key's dense features for each row, in row order, from the rows' key columns
    (``coded``): the state's counts of the row's key (zero when it has none, or a
    null key column, like the left join of ``attach_rolling_features``), smoothed and
    log1p'd. Computed once per distinct key, then spread over its rows."""
    windows = list(state.windows)
    group, first_row, group_hash = key_groups(coded, key.columns)
    group_null = np.zeros(len(first_row), bool)
    for c in key.columns:
        group_null |= coded[c].codes[first_row] == coded[c].null_code
    order = np.argsort(group_hash)  # sorted queries: cache-friendly searches
    pos = np.searchsorted(state.key_hash, group_hash[order])
    found = pos < len(state.key_hash)
    found[found] = state.key_hash[pos[found]] == group_hash[order][found]
    found &= ~group_null[order]
    groups_found, state_rows = order[found], pos[found]
    counts = {}
    for name, column in zip(_state_columns(windows), state.counts, strict=True):
        per_group = np.zeros(len(first_row), column.dtype)
        per_group[groups_found] = column[state_rows]
        counts[name] = per_group
    per_key = pl.DataFrame(counts).select(feature_columns(cfg, key, global_rates(state.totals, windows)))
    return per_key[group]
