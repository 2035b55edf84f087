"""Point-in-time aggregates: daily counters per aggregate key, rolled over previous days.

Point-in-time rule: the dense features of a row on day X use only events that happened
on days strictly before X. Each day's counters are therefore kept by EVENT time:

* ``imps``: impressions whose ts is on D;
* ``clicks``: impressions whose first qualifying click (see features.labels) is on D;
* ``convs``: clicked impressions whose first attributed conversion is on D, and
  ``conv_value``: the value of the attributed conversions on D.

Summed over all days these equal the sums of the ``click``, ``conversion`` and
``conversion_value`` labels, so features and labels count the same events. A click or
conversion on D belongs to an impression of up to ``maturity_lag_days`` earlier, whose
partitions are read to attribute it to the impression's key (user, item, user x category,
...). Key columns are looked up on the impression, else in the users / items snapshot
accepted on D.

Layout: ``<warehouse>/features/daily/<key name>/date=D/part-0.parquet``; each row also
carries ``key_hash``, a stable 64-bit hash of its key tuple, which the rolling states
(``<warehouse>/features/rolling/``, described further down) are keyed by, and the rows are
in ascending key_hash order, the states' order.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from features.config import AGGREGATE_METRICS, AggregateKey, DataConfig
from features.contract import SNAPSHOT_TABLES, day_start, day_str, in_day, scan_validated, validated_dir
from features.errors import DataContractError, StageError
from features.io import atomic_dir, atomic_write_json, sha256_dir, write_parquet_dir
from features.labels import attributed_conversions, first_clicks, scan_events
from features.snapshots import SNAPSHOT_JOIN_KEY, CodedColumn, JoinedRows, join_snapshots, snapshot_scans
from serving.encoding import _mix64 as mix64

COUNTS = ("imps", "clicks", "convs")


def daily_root(warehouse: Path, key_name: str) -> Path:
    return Path(warehouse) / "features" / "daily" / key_name


def daily_dir(warehouse: Path, key_name: str, day: dt.date) -> Path:
    return daily_root(warehouse, key_name) / f"date={day_str(day)}"


def partition_days(root: Path, pattern: str = "*.parquet") -> set[dt.date]:
    """Days of the ``date=YYYY-MM-DD`` folders under ``root`` that hold files matching
    ``pattern`` (half-written ``.tmp-`` folders are not partitions)."""
    if not root.is_dir():
        return set()
    return {
        dt.date.fromisoformat(p.name.removeprefix("date="))
        for p in root.iterdir()
        if p.name.startswith("date=") and any(p.glob(pattern))
    }


def days_since_history_start(existing: set[dt.date], wanted: list[dt.date], what: str, root: Path) -> list[dt.date]:
    """The ``wanted`` days on or after the first existing day, all of which must exist.

    Days before history starts hold no events; a missing day after it is a gap (a stage
    did not run), which would silently turn into zeros, so it raises, naming the day.
    """
    if not existing:
        return []
    start = min(existing)
    days = sorted(d for d in wanted if d >= start)
    missing = [d for d in days if d not in existing]
    if missing:
        raise DataContractError(
            f"{what} for {day_str(missing[0])} missing in {root} while history starts on {day_str(start)}: "
            f"a stage did not run for that day"
        )
    return days


def _key_column_sources(cfg: DataConfig, warehouse: Path, day: dt.date) -> dict[str, str]:
    """Where each aggregate-key column comes from: "impressions", "users" or "items"."""
    schemas = {"impressions": scan_validated(warehouse, "impressions", day).collect_schema()}
    sources: dict[str, str] = {}
    for key in cfg.features.aggregate_keys:
        for col in key.columns:
            for table in ("impressions", *SNAPSHOT_TABLES):
                if table not in schemas:
                    schemas[table] = scan_validated(warehouse, table, day).collect_schema()
                if col in schemas[table]:
                    sources[col] = table
                    break
            else:
                raise DataContractError(
                    f"aggregate key {key.name!r}: column {col!r} is in none of the validated "
                    f"impressions, users, items of {day_str(day)}"
                )
    return sources


def daily_events(cfg: DataConfig, warehouse: Path, day: dt.date) -> tuple[JoinedRows, list[str]]:
    """Rows of activity on ``day`` (an impression shown, first clicked or converting that
    day): the key columns of the impressions + imps, clicks, convs, conv_value, joined to
    the snapshots that hold the other key columns; and the partitions it reads."""
    sources = _key_column_sources(cfg, warehouse, day)
    carried = list(dict.fromkeys(
        [c for c, t in sources.items() if t == "impressions"]
        + [SNAPSHOT_JOIN_KEY[t] for t in sources.values() if t != "impressions"]
    ))
    lag = cfg.contract.maturity_lag_days
    earlier = [day - dt.timedelta(days=n) for n in range(lag, 0, -1)]
    imps_root = validated_dir(warehouse, "impressions", day).parent
    days = [*days_since_history_start(partition_days(imps_root), earlier, "validated impressions", imps_root), day]

    # Only earlier impressions late enough to have a click or an attributed conversion on
    # ``day`` matter: that skips most of the earlier days before the join.
    earliest = day_start(day) - cfg.contract.click_window - cfg.contract.attribution_window
    impressions = pl.concat(
        [scan_validated(warehouse, "impressions", d).select("impression_id", "ts", *carried) for d in days]
    ).filter(pl.col("ts") >= earliest)
    clicks = pl.concat([scan_events(warehouse, "clicks", d) for d in days])
    conversions = pl.concat([scan_events(warehouse, "conversions", d) for d in days])
    inputs = [str(validated_dir(warehouse, t, d)) for d in days for t in ("impressions", "clicks", "conversions")]

    clicked = first_clicks(impressions, clicks, cfg.contract.click_window)
    conv_ts = pl.col("conv_ts")
    converted = (
        attributed_conversions(clicked, conversions, cfg.contract.attribution_window)
        .group_by("impression_id")
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
            impressions.filter(in_day(pl.col("ts"), day)).select(*carried, pl.lit(1, pl.Int64).alias("imps")),
            clicked.filter(in_day(pl.col("first_click"), day)).select(*carried, pl.lit(1, pl.Int64).alias("clicks")),
            converted.select(*carried, "convs", "conv_value"),
        ],
        how="diagonal",
    ).with_columns(pl.col(*COUNTS).fill_null(0), pl.col("conv_value").fill_null(0.0))

    scans = snapshot_scans(warehouse, day, sources)
    inputs += [str(validated_dir(warehouse, table, day)) for table in scans]
    events, *snapshots = pl.collect_all([events, *scans.values()])
    # One chunk per column: gathers on it are ~5x faster.
    return join_snapshots(events.rechunk(), sources, dict(zip(scans, snapshots, strict=True)), warehouse, day), inputs


def combine_hashes(column_hashes: list[np.ndarray]) -> np.ndarray:
    """One stable 64-bit hash per row from the per-column hashes of a key tuple."""
    combined = np.zeros(len(column_hashes[0]) if column_hashes else 0, np.uint64)
    for hashes in column_hashes:
        combined = mix64(combined * KEY_HASH_STEP + hashes)
    return combined


def column_codes(rows: pl.DataFrame, columns: list[str]) -> dict[str, CodedColumn]:
    """Each column of ``rows`` as a CodedColumn."""
    return {column: CodedColumn.encode(rows[column]) for column in columns}


def key_hashes(frame: pl.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the stable 64-bit hash of its key tuple (as in the daily partitions'
    ``key_hash``) and whether any key column is null. Only distinct values are hashed."""
    coded = column_codes(frame, columns).values()
    has_null = np.zeros(frame.height, bool)
    for column in coded:
        has_null |= column.codes == column.null_code
    return combine_hashes([column.hashes[column.codes] for column in coded]), has_null


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
    sums = {metric: np.bincount(group, weights=events[metric].to_numpy(), minlength=len(first_row))[order] for metric in (*COUNTS, "conv_value")}
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
    events, inputs = daily_events(cfg, warehouse, day)
    manifest: dict = {"date": day_str(day), "impressions": int(events.rows["imps"].sum()), "inputs": inputs, "rows": {}, "outputs": {}}
    t = time.perf_counter()
    timings["events"] = t - started
    key_columns = dict.fromkeys(c for key in cfg.features.aggregate_keys for c in key.columns)
    coded = {column: events.coded(column) for column in key_columns}  # one encoding per column, shared by the keys
    for key in cfg.features.aggregate_keys:
        counters = counters_by_key(events.rows, key.columns, coded)
        hashes = counters["key_hash"].to_numpy()
        if (hashes[1:] == hashes[:-1]).any():  # sorted: equal hashes are neighbours
            raise StageError(f"64-bit key hash collision among the {key.name!r} keys of {day_str(day)}: rename one key value")
        timings["counters"] += time.perf_counter() - t
        t = time.perf_counter()
        target = write_parquet_dir(daily_dir(warehouse, key.name, day), counters)
        timings["write"] += time.perf_counter() - t
        t = time.perf_counter()
        manifest["rows"][key.name] = counters.height
        manifest["outputs"][key.name] = str(target)
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    manifest["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    return manifest


# --- rolling point-in-time features -------------------------------------------------------


def _count_name(metric: str, w: int) -> str:
    return f"_{metric}_{w}"


def _history(cfg: DataConfig, warehouse: Path, key: AggregateKey, day: dt.date) -> pl.LazyFrame:
    """The key's daily counts (key columns, imps, clicks, convs) of days [day - max window,
    day - 1] with ``age`` = day - d."""
    root = daily_root(warehouse, key.name)
    existing = partition_days(root)
    if not existing:
        raise DataContractError(f"no daily aggregates for key {key.name!r} in {root}: run `funnelrank features` first")
    wanted = [day - dt.timedelta(days=n) for n in range(1, max(cfg.features.windows_days) + 1)]
    days = days_since_history_start(existing, wanted, f"daily aggregates of key {key.name!r}", root)
    frames = [
        pl.scan_parquet(daily_dir(warehouse, key.name, d) / "*.parquet").select(
            *key.columns, *COUNTS, pl.lit((day - d).days, pl.Int32).alias("age")
        )
        for d in days
    ]
    if not frames:  # before history: no events, but the key columns keep their types
        schema_only = pl.scan_parquet(daily_dir(warehouse, key.name, min(existing)) / "*.parquet").head(0)
        frames = [schema_only.select(*key.columns, *COUNTS, pl.lit(0, pl.Int32).alias("age"))]
    return pl.concat(frames)


def _window_counts(windows: list[int]) -> list[pl.Expr]:
    # Masked columns summed plainly: much faster in a group-by than a filter per window.
    return [
        pl.when(pl.col("age") <= w).then(pl.col(metric)).otherwise(0).sum().alias(_count_name(metric, w))
        for w in windows
        for metric in COUNTS
    ]


def _global_rates(totals: dict[str, int | None], windows: list[int]) -> dict[int, tuple[float, float]]:
    """Per window: (clicks / imps, convs / clicks) over all keys; 0 when there is no event."""
    rates = {}
    for w in windows:
        imps, clicks, convs = (totals[_count_name(m, w)] or 0 for m in COUNTS)
        rates[w] = (clicks / imps if imps else 0.0, convs / clicks if clicks else 0.0)
    return rates


def _smoothed(events: pl.Expr, base: pl.Expr, prior: float, global_rate: float) -> pl.Expr:
    """(events + prior * global_rate) / (base + prior); the global rate when that is 0 / 0."""
    denominator = base + prior
    return pl.when(denominator > 0).then((events + prior * global_rate) / denominator).otherwise(global_rate)


def _defaults(cfg: DataConfig, key: AggregateKey, rates: dict[int, tuple[float, float]]) -> dict[str, float]:
    """The features at zero counts: the same arithmetic, rounded to Float32 like the features."""
    prior = cfg.features.prior_strength
    defaults: dict[str, float] = {}
    for w in cfg.features.windows_days:
        ctr, cvr = rates[w]
        no_history = [0.0, 0.0, 0.0, (prior * ctr) / prior if prior > 0 else ctr, (prior * cvr) / prior if prior > 0 else cvr]
        defaults.update(zip(_feature_names(key, w), (float(np.float32(v)) for v in no_history), strict=True))
    return defaults


def _features_from_counts(cfg: DataConfig, key: AggregateKey, counts: pl.DataFrame, rates: dict[int, tuple[float, float]]) -> pl.DataFrame:
    """Key columns + the key's dense features from its per-window counts."""
    return counts.select(*key.columns, *_feature_columns(cfg, key, rates))


def _feature_columns(cfg: DataConfig, key: AggregateKey, rates: dict[int, tuple[float, float]]) -> list[pl.Expr]:
    """The key's dense features (Float32) from the per-window count columns."""
    prior = cfg.features.prior_strength
    features: list[pl.Expr] = []
    for w in cfg.features.windows_days:
        imps, clicks, convs = (pl.col(_count_name(m, w)) for m in COUNTS)
        ctr, cvr = rates[w]
        features += [
            imps.log1p(), clicks.log1p(), convs.log1p(),
            _smoothed(clicks, imps, prior, ctr), _smoothed(convs, clicks, prior, cvr),
        ]  # fmt: skip
    names = [n for w in cfg.features.windows_days for n in _feature_names(key, w)]
    return [f.cast(pl.Float32).alias(n) for f, n in zip(features, names, strict=True)]



def _feature_names(key: AggregateKey, w: int) -> list[str]:
    # Same order as FeaturesConfig.dense_names (AGGREGATE_METRICS).
    return [f"{key.name}_{metric}_{w}d" for metric in AGGREGATE_METRICS]


def rolled_features(cfg: DataConfig, warehouse: Path, day: dt.date) -> tuple[dict[str, pl.LazyFrame], dict[str, dict[str, float]]]:
    """``rolling_features`` and ``rolling_defaults`` of every aggregate key in one pass
    over each key's history."""
    windows = cfg.features.windows_days
    frames: dict[str, pl.LazyFrame] = {}
    defaults: dict[str, dict[str, float]] = {}
    for key in cfg.features.aggregate_keys:
        history = _history(cfg, warehouse, key, day)
        totals, counts = pl.collect_all([history.select(_window_counts(windows)), history.group_by(key.columns).agg(_window_counts(windows))])
        rates = _global_rates(totals.row(0, named=True), windows)
        frames[key.name] = _features_from_counts(cfg, key, counts, rates).lazy()
        defaults[key.name] = _defaults(cfg, key, rates)
    return frames, defaults


def rolling_features(cfg: DataConfig, warehouse: Path, day: dt.date) -> dict[str, pl.LazyFrame]:
    """Per aggregate key, the features as of the START of ``day``: key columns + the key's
    ``dense_names`` (Float32), one row per key value seen in the longest window.

    Window w covers the daily counters of days [day - w, day - 1]; counts are log1p'd,
    rates smoothed toward the window's global rate with ``prior_strength``.
    """
    return rolled_features(cfg, warehouse, day)[0]


def rolling_defaults(cfg: DataConfig, warehouse: Path, day: dt.date) -> dict[str, dict[str, float]]:
    """Per aggregate key, the value of each feature for a key value with no history
    (log1p(0) = 0 counts, the global rates): what a joiner fills missing rows with."""
    windows = cfg.features.windows_days
    defaults = {}
    for key in cfg.features.aggregate_keys:
        totals = _history(cfg, warehouse, key, day).select(_window_counts(windows)).collect()
        defaults[key.name] = _defaults(cfg, key, _global_rates(totals.row(0, named=True), windows))
    return defaults


def attach_rolling_features(
    rows: pl.LazyFrame, cfg: DataConfig, frames: dict[str, pl.LazyFrame], defaults: dict[str, dict[str, float]]
) -> pl.LazyFrame:
    """Left-join each key's rolling features onto ``rows`` (which must hold the key
    columns), keeping row order; rows without history get the defaults."""
    # Each join takes only the key columns and the features are stacked beside ``rows``:
    # joining the wide rows themselves would copy all their columns once per key.
    looked_up = [
        rows.select(key.columns)
        .join(frames[key.name], on=key.columns, how="left", maintain_order="left")
        .select(pl.col(name).fill_null(pl.lit(value, pl.Float32)) for name, value in defaults[key.name].items())
        for key in cfg.features.aggregate_keys
    ]
    return pl.concat([rows, *looked_up], how="horizontal")


# --- persisted rolling state: window sums per key, advanced one day at a time -------------
#
# ``<warehouse>/features/rolling/<key name>/date=X/`` holds the key's window counts as of
# the START of X (the daily counters of days [X - w, X - 1] summed, per window w):
#
# * ``state.arrow``: Arrow IPC file, ``key_hash`` UInt64 (``key_hashes`` of the key
#   columns, sorted, unique) + one Int64 column per metric and window (``_imps_7``, ...).
#   Keys whose counts are all zero over the longest window are left out: they read the
#   same as keys never seen (zero counts, the no-history defaults).
# * ``manifest.json``: key, key columns, windows, rows, the sha256 of every daily
#   partition summed in (so a rewritten partition invalidates the state), how it was built.
#
# State(X + 1) = state(X) + daily(X) - daily(X - w) per window; without a valid state(X)
# (first run, a gap, a backfill out of order, a rewritten partition) it is recomputed from
# the daily partitions. Both give the same content (tests/test_rolling_state.py).

STATE_FILE = "state.arrow"
STATE_FORMAT = 1
STATES_KEPT_DAYS = 1  # states older than the day before the newest are deleted
KEY_HASH_STEP = np.uint64(0x9E3779B97F4A7C15)
INT32_MAX = np.iinfo(np.int32).max


def rolling_state_root(warehouse: Path, key_name: str) -> Path:
    return Path(warehouse) / "features" / "rolling" / key_name


def rolling_state_dir(warehouse: Path, key_name: str, day: dt.date) -> Path:
    return rolling_state_root(warehouse, key_name) / f"date={day_str(day)}"


def _state_columns(windows: list[int]) -> list[str]:
    return [_count_name(metric, w) for w in windows for metric in COUNTS]


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
        return {name: int(column.sum(dtype=np.int64)) for name, column in zip(_state_columns(list(self.windows)), self.counts, strict=True)}


def _empty_state(day: dt.date, windows: list[int]) -> RollingState:
    return RollingState(day, tuple(windows), np.zeros(0, np.uint64), [np.zeros(0, np.int64) for _ in _state_columns(windows)])


def _scan_daily_hashed(warehouse: Path, key: AggregateKey, day: dt.date) -> pl.LazyFrame:
    """One daily partition's key_hash and counts."""
    path = daily_dir(warehouse, key.name, day)
    scan = pl.scan_parquet(path / "*.parquet")
    if "key_hash" not in scan.collect_schema():
        raise DataContractError(f"{path} has no key_hash column (written by an older version): rerun `funnelrank features` for {day_str(day)}")
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


def _window_days(day: dt.date, max_window: int) -> list[dt.date]:
    return [day - dt.timedelta(days=n) for n in range(1, max_window + 1)]


def _relative(warehouse: Path, path: Path) -> str:
    return path.relative_to(warehouse).as_posix()


def daily_partition_hashes(warehouse: Path, key: AggregateKey, days: list[dt.date]) -> dict[str, str]:
    """sha256 of the key's existing daily partitions of ``days``, by warehouse-relative path."""
    paths = [daily_dir(warehouse, key.name, d) for d in days]
    return {_relative(warehouse, p): sha256_dir(p) for p in paths if any(p.glob("*.parquet"))}


def _state_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _state_matches(manifest: dict | None, cfg: DataConfig, key: AggregateKey, daily_sha: dict[str, str]) -> bool:
    return bool(manifest) and manifest.get("format") == STATE_FORMAT and manifest.get("key_columns") == key.columns and (
        manifest.get("windows") == list(cfg.features.windows_days) and manifest.get("daily_sha256") == daily_sha
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
    state = RollingState(day, tuple(windows), table.column("key_hash").to_numpy(), [table.column(c).to_numpy() for c in columns])
    return state if (table.num_rows, state.totals) == (manifest.get("rows"), manifest.get("totals")) else None


def _recomputed_state(cfg: DataConfig, warehouse: Path, key: AggregateKey, day: dt.date) -> RollingState:
    """The state of ``day`` summed from the daily partitions of its longest window."""
    windows = list(cfg.features.windows_days)
    root = daily_root(warehouse, key.name)
    existing = partition_days(root)
    if not existing:
        raise DataContractError(f"no daily aggregates for key {key.name!r} in {root}: run `funnelrank features` first")
    days = days_since_history_start(existing, _window_days(day, max(windows)), f"daily aggregates of key {key.name!r}", root)
    if not days:
        return _empty_state(day, windows)
    history = pl.concat([
        _scan_daily_hashed(warehouse, key, d).with_columns(pl.lit((day - d).days, pl.Int32).alias("age"))
        for d in days
    ])  # fmt: skip
    summed = history.group_by("key_hash").agg(_window_counts(windows)).sort("key_hash").collect()
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
        raise DataContractError(f"daily aggregates of key {key.name!r} for {day_str(day)} missing in {root}: a stage did not run for that day")
    else:
        added, added_counts = np.zeros(0, np.uint64), np.zeros((0, len(COUNTS)), np.int64)
    pos = np.searchsorted(keys, added)
    new = ~((pos < len(keys)) & (keys[np.minimum(pos, len(keys) - 1)] == added)) if len(keys) else np.ones(len(added), bool)
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
            raise StageError(f"rolling state of key {key.name!r} for {day_str(day)} lacks keys of {daily_dir(warehouse, key.name, leaving)}")
        for j in range(len(COUNTS)):
            counts[i * len(COUNTS) + j][pos] -= gone_counts[:, j]
    keep = _in_longest_window(counts, windows)
    return RollingState(day + dt.timedelta(days=1), tuple(windows), keys[keep], [c[keep] for c in counts])


def _merged(old: np.ndarray, inserted: np.ndarray | int, old_rows: np.ndarray, new_rows: np.ndarray, dtype=None) -> np.ndarray:
    """A new array holding ``old`` at ``old_rows`` (a mask) and ``inserted`` at ``new_rows``."""
    out = np.empty(len(old_rows), dtype or old.dtype)
    out[old_rows] = old
    out[new_rows] = inserted
    return out


def _write_state(warehouse: Path, key: AggregateKey, state: RollingState, daily_sha: dict[str, str], built: str) -> None:
    """Write the state atomically, uncompressed (so it can be memory-mapped); a count
    column is stored as Int32 when its values fit."""
    columns = {
        name: column if column.dtype == np.int32 or column.max(initial=0) > INT32_MAX else column.astype(np.int32)  # counts are >= 0
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


def rolling_state(cfg: DataConfig, warehouse: Path, key: AggregateKey, day: dt.date, daily_sha: dict[str, str] | None = None) -> RollingState:
    """The key's window counts as of the start of ``day``: read when a state written from
    the current daily partitions is there, else advanced from the previous day's state,
    else recomputed; written atomically. ``daily_sha``: the sha256 of the key's daily
    partitions of [day - longest window, day - 1] (``daily_partition_hashes``) when the
    caller has them already."""
    windows = list(cfg.features.windows_days)
    if daily_sha is None:
        daily_sha = daily_partition_hashes(warehouse, key, _window_days(day, max(windows)))
    path = rolling_state_dir(warehouse, key.name, day)
    manifest = _state_manifest(path)
    if _state_matches(manifest, cfg, key, daily_sha) and (state := _load_state(path, day, windows, manifest)) is not None:
        return state
    yesterday = day - dt.timedelta(days=1)
    previous_path = rolling_state_dir(warehouse, key.name, yesterday)
    previous_manifest = _state_manifest(previous_path)
    if previous_manifest is not None:
        # Yesterday's window: today's without day - 1, plus the day that has just left it.
        previous_days = _window_days(yesterday, max(windows))
        previous_sha = daily_partition_hashes(warehouse, key, previous_days[-1:]) | {
            p: sha for p, sha in daily_sha.items() if p != _relative(warehouse, daily_dir(warehouse, key.name, yesterday))
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


def state_features(cfg: DataConfig, key: AggregateKey, state: RollingState, coded: dict[str, CodedColumn]) -> pl.DataFrame:
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
    per_key = pl.DataFrame(counts).select(_feature_columns(cfg, key, _global_rates(state.totals, windows)))
    return per_key[group]
