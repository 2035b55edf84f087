"""Behaviour sequences (``[[features.sequences]]``): per row of day L, the key's (the user's)
last ``max_length`` clicked or converted items strictly before L, newest first, each with
its age in days, built incrementally from a persisted per-key state.

An event is the first qualifying click of an impression (``event = "click"``), or the
first attributed conversion of a clicked one (``"conversion"``), at the time it happens,
the same events the daily counters count (features.labels.day_activity).

``features.catalog.sequence_state_dir`` (``features/sequences/<name>/date=X/``) holds the
sequence's elements as of the START of X, i.e. every event of the days before X:

* ``part-0.parquet``: one row per element: ``key`` (the key column's value), ``ts`` (the
  event's time), ``item_id`` and the carried features' columns of table impressions (as on
  the event's impression); sorted by key, newest first within a key (ties: impression_id),
  at most ``max_length`` per key. Keys without events have no rows.
* ``manifest.json``: the identity (event, key, max_length, stored columns, label windows),
  users, elements, the reconciliation of the day's merge, the sha256 of the data file, of
  the validated partitions whose events of X - 1 were added and of the previous state's data.

state(X + 1) = the newest max_length per key of (X's events, newest first) + state(X): the
``features`` stage for day D writes state(D + 1), reading only D's activity (D and the
maturity-lag days before it), never older days. The ``examples`` stage for the mature day
L reads state(L): events strictly before L, the counters' point-in-time rule.

A state is trusted while its identity matches the config, the partitions it added are
unchanged and it was built from the previous state on disk (when that is still kept);
otherwise it is rebuilt from the newest trusted state before it by replaying the days in
between (from the first day of history at worst: a new sequence, a changed max_length).
Each state is written atomically, so a killed run leaves the states before it intact;
states more than ``maturity_lag_days + 1`` days older than the one written are deleted
(the examples stage reads the mature day's, that many days behind the features stage).

Reading (``sequence_columns``): each row's key's elements of state(L) no older than
``max_age_days`` (applied here, so the state serves any age limit), encoded with the
vocabulary versions the day's candidate columns were encoded with: the item id with the
item feature's (a history item and the candidate share one embedding row), an items
attribute looked up in the items snapshot accepted on L (what the candidate gets that
day; an item missing from it encodes to 0, as for the candidate), an impressions
attribute as stored. Vectorised: per distinct key, then gathered per row.
``key_sequences`` gives the same elements per key (a serving bundle carries them).
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
import pyarrow.compute as pc

from features.catalog import (
    DATA_FILE,
    holds_data,
    partition_days,
    scan_validated,
    sequence_state_dir,
    sequence_state_root,
    validated_root,
    warehouse_relative,
)
from features.config import DataConfig, SequenceFeature
from features.contract import day_str, in_day
from features.errors import DataContractError, StageError
from features.io import (
    atomic_dir,
    atomic_write_json,
    record_sha256,
    recorded_sha256,
    sha256_dir,
)
from features.labels import (
    DayActivity,
    activity_days,
    activity_partitions,
    day_activity,
)
from features.snapshots import SNAPSHOT_JOIN_KEY, JoinedRows
from features.vocab import load_vocabulary
from serving.encoding import as_strings

STATE_FORMAT = 1
KEY, TS = "key", "ts"
EVENT_TS = pl.Datetime("us", "UTC")


@dataclass(frozen=True)
class SequenceState:
    """A sequence's elements as of the start of ``day`` (the columns of the module doc)."""

    day: dt.date
    elements: pl.DataFrame

    @cached_property
    def users(self) -> int:
        return self.elements[KEY].n_unique()


def stored_columns(cfg: DataConfig, seq: SequenceFeature) -> list[str]:
    """The impressions columns a state keeps per element: item_id, then those of the
    carried features of table impressions (items attributes are looked up when read)."""
    sparse = {f.name: f for f in cfg.features.sparse}
    carried = [sparse[name] for name in seq.items[1:]]
    return list(dict.fromkeys(["item_id", *(f.column for f in carried if f.table == "impressions")]))


def _identity(cfg: DataConfig, seq: SequenceFeature) -> dict:
    """What a state's content depends on besides the events (a change rebuilds it)."""
    return {
        "format": STATE_FORMAT,
        "event": seq.event,
        "key": seq.key,
        "max_length": seq.max_length,
        "columns": stored_columns(cfg, seq),
        "contract": cfg.contract.model_dump(mode="json"),
    }


def _history_start(warehouse: Path) -> dt.date:
    """The first day with validated impressions: no event happened before it."""
    root = validated_root(warehouse, "impressions")
    if not (days := partition_days(root)):
        raise DataContractError(f"no validated impressions in {root}: run `funnelrank validate` first")
    return min(days)


def _empty_elements(cfg: DataConfig, warehouse: Path, seq: SequenceFeature, day: dt.date) -> pl.DataFrame:
    """No elements, with the types the impressions of ``day`` give them."""
    schema = scan_validated(warehouse, "impressions", day).collect_schema()
    return pl.DataFrame(schema={KEY: schema[seq.key], TS: EVENT_TS, **{c: schema[c] for c in stored_columns(cfg, seq)}})


def carried_columns(cfg: DataConfig, seq: SequenceFeature) -> list[str]:
    """The impressions columns ``sequence_events`` needs its activity to carry."""
    return list(dict.fromkeys([seq.key, *stored_columns(cfg, seq)]))


def sequence_events(cfg: DataConfig, seq: SequenceFeature, activity: DayActivity, day: dt.date) -> pl.LazyFrame:
    """The sequence's events of ``day`` (key, ts, stored columns) in ``activity`` (carrying
    ``carried_columns``), by key, newest first (ties: impression_id); events of a null key
    belong to no history and are left out."""
    stored, carried = stored_columns(cfg, seq), carried_columns(cfg, seq)
    if seq.event == "click":
        events = activity.clicked.select("impression_id", pl.col("first_click").alias(TS), *carried)
    else:
        events = activity.conversions.group_by("impression_id").agg(
            pl.col("conv_ts").min().alias(TS), *[pl.col(c).first() for c in carried]
        )
    return (
        events.filter(in_day(pl.col(TS), day) & pl.col(seq.key).is_not_null())
        .sort([seq.key, TS, "impression_id"], descending=[False, True, False])
        .select(pl.col(seq.key).alias(KEY), pl.col(TS).cast(EVENT_TS), *stored)
    )


def day_events(cfg: DataConfig, warehouse: Path, seq: SequenceFeature, day: dt.date) -> pl.DataFrame:
    """The sequence's events of ``day`` (``sequence_events``)."""
    return sequence_events(cfg, seq, day_activity(cfg, warehouse, day, carried_columns(cfg, seq)), day).collect()


def _advanced(previous: SequenceState, events: pl.DataFrame, max_length: int) -> tuple[SequenceState, dict]:
    """state(X + 1) from state(X) and X's events (newer than every element of state(X)),
    and the merge's reconciliation; raises StageError when the counts do not add up."""
    # A stable sort by key keeps each key's new events (first in the concatenation) in front.
    merged = pl.concat([events, previous.elements], how="vertical_relaxed").sort(KEY, maintain_order=True)
    kept = merged.filter(pl.int_range(pl.len()).over(KEY) < max_length)
    # Independently of the merge: each key keeps min(N, old + new) elements.
    per_key = (
        pl.concat([previous.elements.group_by(KEY).len(), events.group_by(KEY).len()])
        .group_by(KEY)
        .agg(pl.col("len").sum())
    )
    expected = int(per_key["len"].clip(upper_bound=max_length).sum())
    state = SequenceState(previous.day + dt.timedelta(days=1), kept)
    if (kept.height, state.users) != (expected, per_key.height):
        raise StageError(
            f"sequence state of {day_str(state.day)} has {kept.height} elements of {state.users} keys, "
            f"expected {expected} of {per_key.height}"
        )
    return state, {
        "previous_users": previous.users,
        "previous_elements": previous.elements.height,
        "events_added": events.height,
        "elements_dropped": previous.elements.height + events.height - kept.height,
    }


def _activity_hashes(cfg: DataConfig, warehouse: Path, day: dt.date) -> dict[str, str]:
    """sha256 of the validated partitions that ``day``'s events are read from."""
    paths = activity_partitions(warehouse, activity_days(cfg, warehouse, day))
    return {warehouse_relative(warehouse, p): sha256_dir(p) for p in paths if holds_data(p)}


def _manifest(warehouse: Path, seq: SequenceFeature, day: dt.date) -> dict | None:
    try:
        return json.loads((sequence_state_dir(warehouse, seq.name, day) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _trusted(cfg: DataConfig, warehouse: Path, seq: SequenceFeature, day: dt.date) -> bool:
    """Whether state(day) on disk was built, by this config, from the partitions there now
    and from the previous state on disk (when it is still kept)."""
    manifest = _manifest(warehouse, seq, day)
    if manifest is None or manifest.get("identity") != _identity(cfg, seq):
        return False
    if manifest.get("inputs") != _activity_hashes(cfg, warehouse, day - dt.timedelta(days=1)):
        return False
    previous = sequence_state_dir(warehouse, seq.name, day - dt.timedelta(days=1)) / DATA_FILE
    return not previous.exists() or manifest.get("previous_sha256") == recorded_sha256(previous)


def _load(warehouse: Path, seq: SequenceFeature, day: dt.date) -> SequenceState | None:
    """The state written for ``day``; None when its file disagrees with its manifest (a
    damaged file is rebuilt, not trusted)."""
    manifest, path = _manifest(warehouse, seq, day), sequence_state_dir(warehouse, seq.name, day) / DATA_FILE
    try:
        if recorded_sha256(path) != manifest["content_sha256"]:
            return None
        state = SequenceState(day, pl.read_parquet(path))
    except (OSError, KeyError, TypeError, pl.exceptions.PolarsError):
        return None
    return state if (state.users, state.elements.height) == (manifest.get("users"), manifest.get("elements")) else None


def _write(
    cfg: DataConfig,
    warehouse: Path,
    seq: SequenceFeature,
    state: SequenceState,
    previous_sha256: str | None,
    reconciliation: dict,
) -> str:
    """Write the state atomically, delete the ones no stage reads any more; return the data file's sha256."""
    target = sequence_state_dir(warehouse, seq.name, state.day)
    with atomic_dir(target) as tmp:
        state.elements.write_parquet(tmp / DATA_FILE, compression="zstd")
        content_sha256 = record_sha256(tmp / DATA_FILE)
        atomic_write_json(tmp / "manifest.json", {
            "sequence": seq.name, "date": day_str(state.day), "as_of": "start of date", "identity": _identity(cfg, seq),
            "users": state.users, "elements": state.elements.height, "reconciliation": reconciliation,
            "inputs": _activity_hashes(cfg, warehouse, state.day - dt.timedelta(days=1)),
            "previous_sha256": previous_sha256, "content_sha256": content_sha256, "file": DATA_FILE,
        })  # fmt: skip
    oldest_kept = state.day - dt.timedelta(days=cfg.contract.maturity_lag_days + 1)
    for old in partition_days(sequence_state_root(warehouse, seq.name), "manifest.json"):
        if old < oldest_kept:
            shutil.rmtree(sequence_state_dir(warehouse, seq.name, old), ignore_errors=True)
    return content_sha256


def _newest_trusted(
    cfg: DataConfig, warehouse: Path, seq: SequenceFeature, day: dt.date, start: dt.date
) -> tuple[SequenceState, str | None] | None:
    """The newest state on or before ``day`` to build on, with its data's sha256: among the
    newest run of consecutive kept states, the trusted ones from the oldest up to the first
    that is not (a stale state taints those built on it). None: none to build on."""
    kept = {d for d in partition_days(sequence_state_root(warehouse, seq.name)) if start < d <= day}
    run = []
    newest = max(kept, default=None)
    while newest in kept:
        run.append(newest)
        newest -= dt.timedelta(days=1)
    trusted = []
    for d in reversed(run):
        if not _trusted(cfg, warehouse, seq, d):
            break
        trusted.append(d)
    for d in reversed(trusted):
        if (state := _load(warehouse, seq, d)) is not None:
            return state, _manifest(warehouse, seq, d)["content_sha256"]
    return None


def sequence_state(
    cfg: DataConfig, warehouse: Path, seq: SequenceFeature, day: dt.date, events_before: pl.DataFrame | None = None
) -> SequenceState:
    """The sequence's elements as of the start of ``day`` (events of the days before it):
    read when trusted, else advanced day by day from the newest trusted state before it
    (or from the first day of history), each day written atomically. ``events_before``:
    the events of ``day - 1`` (``sequence_events``) when the caller has them already."""
    warehouse = Path(warehouse)
    start = _history_start(warehouse)
    if day <= start:
        return SequenceState(day, _empty_elements(cfg, warehouse, seq, start))
    found = _newest_trusted(cfg, warehouse, seq, day, start)
    state, sha = found or (SequenceState(start, _empty_elements(cfg, warehouse, seq, start)), None)
    while state.day < day:
        known = events_before is not None and state.day == day - dt.timedelta(days=1)
        events = events_before if known else day_events(cfg, warehouse, seq, state.day)
        state, reconciliation = _advanced(state, events, seq.max_length)
        sha = _write(cfg, warehouse, seq, state, sha, reconciliation)
    return state


def _young_runs(seq: SequenceFeature, state: SequenceState) -> tuple[pl.Series, np.ndarray, np.ndarray, np.ndarray]:
    """(each key with elements, the start of its run of elements, the run's length with
    ``max_age_days`` applied, each element's age in days as of ``state.day``)."""
    elements = state.elements
    runs = elements.group_by(KEY, maintain_order=True).len()  # the state is sorted by key
    run_length = runs["len"].to_numpy().astype(np.int64)
    run_start = np.cumsum(run_length) - run_length
    age = (state.day - dt.date(1970, 1, 1)).days - elements[TS].dt.date().cast(pl.Int32).to_numpy()
    if seq.max_age_days:
        # Newest first: a key's elements young enough are a prefix of its run.
        young = (age <= seq.max_age_days).astype(np.int64)
        run_length = np.add.reduceat(young, run_start) if len(run_start) else run_length
    return runs[KEY], run_start, run_length, age


def _encoded_elements(
    cfg: DataConfig,
    warehouse: Path,
    seq: SequenceFeature,
    state: SequenceState,
    picked: np.ndarray,
    age: np.ndarray,
    items_snapshot: pl.DataFrame | None,
    vocab_versions: dict[str, int],
) -> list[np.ndarray]:
    """The elements of ``state`` at ``picked``: per carried feature its embedding rows, then
    their ages (``age``: of every element). ``items_snapshot``: the items snapshot the
    attributes are read from, its last row all null (an item missing from it)."""
    elements = state.elements
    sparse = {f.name: f for f in cfg.features.sparse}
    items = pc.dictionary_encode(elements["item_id"].to_arrow().take(pa.array(picked)))
    values: list[np.ndarray] = []
    for name in seq.items:
        feature = sparse[name]
        vocab = load_vocabulary(warehouse, feature, vocab_versions[name])
        if feature.column == "item_id":
            values.append(vocab.encode(items))
        elif feature.table == "items":
            key = items_snapshot[SNAPSHOT_JOIN_KEY["items"]].to_arrow()
            at = pc.fill_null(pc.index_in(items.dictionary, value_set=key), items_snapshot.height - 1)
            per_item = vocab.encode(items_snapshot[feature.column].to_arrow().take(at))
            values.append(per_item[items.indices.to_numpy(zero_copy_only=False)])
        else:
            values.append(vocab.encode(elements[feature.column].to_arrow().take(pa.array(picked))))
    values.append(age[picked].astype(np.int32))
    return values


def sequence_columns(
    cfg: DataConfig,
    warehouse: Path,
    seq: SequenceFeature,
    state: SequenceState,
    rows: JoinedRows,
    vocab_versions: dict[str, int],
) -> dict[str, pa.Array]:
    """The sequence's training-table columns for ``rows`` (of ``state.day``), in
    ``seq.column_names`` order: per carried feature a list of embedding rows, then the ages
    (see the module doc). ``vocab_versions``: the version each feature was encoded with."""
    key = rows.coded(seq.key)
    keys, run_start, run_length, age = _young_runs(seq, state)
    # Each distinct key of the rows (then the null key: no history) -> its run of elements.
    run = pc.index_in(key.values, value_set=keys.to_arrow().cast(key.values.type))
    found = run.is_valid().to_numpy(zero_copy_only=False)
    run = pc.fill_null(run, 0).to_numpy(zero_copy_only=False)
    lengths = np.append(np.where(found, run_length[run] if len(run_length) else 0, 0), 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    starts = np.append(np.where(found, run_start[run] if len(run_start) else 0, 0), 0)
    picked = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    # rows.snapshots["items"]: the snapshot accepted on the day, its last row all null
    values = _encoded_elements(cfg, warehouse, seq, state, picked, age, rows.snapshots.get("items"), vocab_versions)
    # Spread over the rows: one gather shared by the columns (faster than a take per list column).
    row_lengths = lengths[key.codes]
    row_offsets = np.concatenate([[0], np.cumsum(row_lengths)])
    row_picked = np.repeat(offsets[:-1][key.codes] - row_offsets[:-1], row_lengths) + np.arange(row_offsets[-1])
    row_offsets = pa.array(row_offsets, pa.int64())
    return {
        name: pa.LargeListArray.from_arrays(row_offsets, pa.array(column[row_picked]))
        for name, column in zip(seq.column_names, values, strict=True)
    }


def key_sequences(
    cfg: DataConfig,
    warehouse: Path,
    seq: SequenceFeature,
    state: SequenceState,
    items_snapshot: pl.DataFrame,
    vocab_versions: dict[str, int],
) -> pa.Table:
    """The sequence's elements per key as of ``state.day``, as a serving bundle carries
    them: one row per element (``max_age_days`` applied), by key, newest first, with
    ``key`` (the key's text, serving.encoding.as_strings), ``ts``, the raw ``item_id``
    and the columns ``sequence_columns`` gives a row of ``state.day`` whose key it is
    (items attributes looked up in ``items_snapshot``, the items snapshot a row of that
    day joins)."""
    keys, run_start, run_length, age = _young_runs(seq, state)
    offsets = np.cumsum(run_length) - run_length
    picked = np.repeat(run_start - offsets, run_length) + np.arange(int(run_length.sum()))
    with_null = pl.concat([items_snapshot, pl.DataFrame(schema=items_snapshot.schema).clear(1)])
    values = _encoded_elements(cfg, warehouse, seq, state, picked, age, with_null, vocab_versions)
    taken = state.elements[picked]
    columns = {
        "key": as_strings(keys.to_arrow()).take(pa.array(np.repeat(np.arange(len(keys)), run_length))),
        "ts": taken[TS].to_arrow(),
        "item_id": as_strings(taken["item_id"].to_arrow()),
    }
    columns.update({name: pa.array(column) for name, column in zip(seq.column_names, values, strict=True)})
    return pa.table(columns)
