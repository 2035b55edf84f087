"""Behaviour sequences at serving time: each user's bundled history as the ONNX inputs,
with the fresh events a request carries in front of it.

The bundle holds, per sequence (``serving.spec.SequenceSpec``), every user's elements as
of the start of its ``features_as_of`` day, encoded (features.sequences.key_sequences):
exactly what a training row of that day gets. A row's inputs are ``<S>__<F>`` per
carried feature F and ``<S>__age_days``, int64 [rows, L], newest first, padded with -1
after the elements (L: the longest history of the rows, at least 1; an empty history,
e.g. a user the bundle does not know, is a row of -1).

Fresh events (a rank request's ``recent``, the batch scorer's ``recent`` column): a
user's events since the bundle was built, ``{"item_id", "event", "ts"}``. Those of a
sequence's event kind join the history of a sequence keyed by ``user_id``: the elements
newest first by ``ts`` (fresh events are normally newer than every bundled one, so they
go in front; at equal ts a fresh event comes first), an event of the same item at the
same time (to the microsecond) kept once, at most ``max_length``. A fresh event is
encoded as a candidate is (its item id with the item feature's vocabulary, items
attributes from the bundled items snapshot, an impressions attribute from the event's
field of that column, else null). Its age is the as-of day minus its UTC day, at least
1: an event of the as-of day or later gets 1, the freshest age training knows (a row of
day L only sees events of the days before L, so its ages are >= 1); with
``max_age_days`` an older event is left out, as training leaves it out.

Everything per row is vectorised (numpy over the flat elements); a request's one user
is looked up by dict.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from serving.encoding import KeyIndex, as_strings
from serving.spec import SEQUENCE_EVENTS, BundleError, SequenceItem, SequenceSpec

RECENT = "recent"  # the request field and the batch scorer's column
RECENT_FIELDS = ("item_id", "event", "ts")
TS_TYPE = pa.timestamp("us", tz="UTC")
DAY_US = 86_400_000_000
EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class RecentEvents:
    """Fresh events, flat: the row each belongs to (a batch's row; 0 for a request), the
    time (microseconds since the epoch, UTC), the kind (an index into SEQUENCE_EVENTS),
    the item id, and any other fields (impressions columns a sequence carries)."""

    row: np.ndarray  # int64
    ts: np.ndarray  # int64
    event: np.ndarray  # int64
    item_id: pa.LargeStringArray
    fields: dict[str, pa.Array]

    def filter(self, keep: np.ndarray) -> RecentEvents:
        """The events where ``keep`` (bool) is true."""
        mask = pa.array(keep)
        return RecentEvents(
            self.row[keep],
            self.ts[keep],
            self.event[keep],
            self.item_id.filter(mask),
            {k: v.filter(mask) for k, v in self.fields.items()},
        )

    def as_list_column(self, n: int) -> pa.LargeListArray:
        """These events (of one row) as the ``recent`` column of ``n`` rows, each with all of them."""
        events = pa.StructArray.from_arrays(
            [
                self.item_id,
                pa.array(np.asarray(SEQUENCE_EVENTS)[self.event], pa.large_string()),
                pa.array(self.ts, pa.int64()).cast(TS_TYPE),
                *self.fields.values(),
            ],
            names=[*RECENT_FIELDS, *self.fields],
        )
        m = len(self.ts)
        offsets = pa.array(np.arange(n + 1, dtype=np.int64) * m)
        return pa.LargeListArray.from_arrays(offsets, events.take(pa.array(np.tile(np.arange(m), n))))


def recent_events(entries: object, fields: Sequence[str] = ()) -> RecentEvents:
    """A request's ``recent`` list (objects with item_id, event, ts and optionally
    ``fields``, the impressions columns the sequences carry; other keys are ignored) as
    RecentEvents of row 0; ValueError naming the field (``recent[2].ts``) of the first bad entry."""
    if not isinstance(entries, list):
        raise ValueError(f"{RECENT} must be a list of {{item_id, event, ts}}, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        where = f"{RECENT}[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object with item_id, event and ts, got {type(entry).__name__}")
        for name in RECENT_FIELDS:
            if name not in entry:
                raise ValueError(f"{where}.{name} is missing")
        if not isinstance(entry["item_id"], str) or not entry["item_id"]:
            raise ValueError(f"{where}.item_id must be a non-empty string, got {entry['item_id']!r:.100}")
        if entry["event"] not in SEQUENCE_EVENTS:
            raise ValueError(f"{where}.event must be one of {list(SEQUENCE_EVENTS)}, got {entry['event']!r:.100}")
        if not isinstance(entry["ts"], str):
            raise ValueError(f"{where}.ts must be an ISO 8601 time with a zone offset, got {entry['ts']!r:.100}")
        for name in fields:
            if not isinstance(entry.get(name), str | int | float | bool | None):
                raise ValueError(f"{where}.{name} must be a string, number or null, got {type(entry[name]).__name__}")
    columns = {}
    for name in fields:
        try:
            column = pa.array([e.get(name) for e in entries])
        except (pa.ArrowException, OverflowError) as err:
            raise ValueError(f"{RECENT}[].{name}: the events' values cannot form one column: {err}") from None
        columns[name] = column.cast(pa.large_string()) if pa.types.is_null(column.type) else column
    return RecentEvents(
        np.zeros(len(entries), np.int64),
        _timestamps(pa.array([e["ts"] for e in entries], pa.large_string()), lambda j: f"{RECENT}[{j}].ts"),
        np.array([SEQUENCE_EVENTS.index(e["event"]) for e in entries], np.int64),
        pa.array([e["item_id"] for e in entries], pa.large_string()),
        columns,
    )


def recent_column_events(column: pa.Array | pa.ChunkedArray, fields: Sequence[str] = ()) -> RecentEvents:
    """The batch scorer's ``recent`` column (list<struct<item_id, event, ts>>, with the
    ``fields`` the sequences carry where known; ts a timestamp, naive = UTC, or ISO 8601
    text with a zone offset; a null list: no events) as RecentEvents; ValueError naming the
    row and field of the first bad element."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_struct(kind.value_type):
        raise ValueError(f"column {RECENT!r} must be a list of structs <item_id, event, ts>, got Arrow type {kind}")
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    row = np.repeat(np.arange(len(column), dtype=np.int64), lengths)
    offsets = np.cumsum(lengths) - lengths

    def where(j: int) -> str:
        return f"column {RECENT!r}, row {row[j]}: {RECENT}[{j - offsets[row[j]]}]"

    flat = pc.list_flatten(column)
    if flat.null_count:
        raise ValueError(f"{where(_first(flat.is_null()))} is null")
    names = [flat.type.field(k).name for k in range(flat.type.num_fields)]
    for name in RECENT_FIELDS:
        if name not in names:
            raise ValueError(f"column {RECENT!r}: its structs have no field {name!r} (fields: {names})")
    parts = dict(zip(names, flat.flatten(), strict=True))  # flatten(): the children as the (offset) structs see them
    for name in RECENT_FIELDS:
        if parts[name].null_count:
            raise ValueError(f"{where(_first(parts[name].is_null()))}.{name} is null")
    try:
        item_id = as_strings(parts["item_id"])
    except TypeError as err:
        raise ValueError(f"column {RECENT!r}: item_id {err}") from None
    try:
        event = pc.index_in(parts["event"], value_set=pa.array(SEQUENCE_EVENTS))
    except pa.ArrowException:
        raise ValueError(f"column {RECENT!r}: event must be text, got Arrow type {parts['event'].type}") from None
    if event.null_count:
        bad = _first(event.is_null())
        raise ValueError(
            f"{where(bad)}.event must be one of {list(SEQUENCE_EVENTS)}, got {parts['event'][bad].as_py()!r:.100}"
        )
    ts = parts["ts"]
    if pa.types.is_timestamp(ts.type):
        ts = ts.cast(pa.timestamp("us", tz=ts.type.tz), safe=False).cast(pa.int64()).to_numpy(zero_copy_only=False)
    elif pa.types.is_string(ts.type) or pa.types.is_large_string(ts.type):
        ts = _timestamps(ts, lambda j: f"{where(j)}.ts")
    else:
        raise ValueError(f"column {RECENT!r}: ts must be a timestamp or ISO 8601 text, got Arrow type {ts.type}")
    return RecentEvents(
        row,
        ts,
        event.to_numpy(zero_copy_only=False).astype(np.int64),
        item_id,
        {name: parts[name] if name in parts else pa.nulls(len(flat), pa.large_string()) for name in fields},
    )


def _first(mask: pa.Array) -> int:
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def _timestamps(text: pa.Array, where: Callable[[int], str]) -> np.ndarray:
    """ISO 8601 times with a zone offset as microseconds since the epoch (UTC); ValueError
    naming ``where(j)`` of the first that is not one."""
    try:
        return text.cast(TS_TYPE).cast(pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowException:
        for j, value in enumerate(text):  # the error path only: find the entry to name
            try:
                pa.array([value.as_py()], pa.large_string()).cast(TS_TYPE)
            except pa.ArrowException:
                raise ValueError(
                    f"{where(j)} must be an ISO 8601 time with a zone offset "
                    f"(2026-11-05T10:00:00Z), got {value.as_py()!r:.100}"
                ) from None
        raise


# (carried features, fresh events) -> the events' embedding rows of each feature (EventInputs encodes them)
EncodeElements = Callable[[tuple[SequenceItem, ...], RecentEvents], list[np.ndarray]]


class SequenceHistory:
    """One sequence's bundled history (see the module docstring): per key its run of
    elements, and the rows' ONNX inputs of it. Read-only after construction: thread-safe."""

    def __init__(self, spec: SequenceSpec, table: pa.Table, as_of: dt.date, file: str) -> None:
        self.spec = spec
        self.names = spec.input_names
        self.as_of_day = (as_of - EPOCH).days
        keys = as_strings(table.column("key"))
        n = len(keys)
        if n:  # the file is sorted by key: a run starts where the key changes
            changed = pc.not_equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
            starts = np.flatnonzero(np.concatenate([[True], changed]))
        else:
            starts = np.zeros(0, np.int64)
        self.start = np.append(starts, 0).astype(np.int64)  # the last entry: a key without history
        self.length = np.append(np.diff(np.append(starts, n)), 0).astype(np.int64)
        distinct = keys.take(pa.array(starts, pa.int64()))
        self.index = KeyIndex(distinct)
        self.row_of: dict[str, int] = dict(zip(distinct.to_pylist(), range(len(distinct)), strict=True))
        if len(self.row_of) != len(distinct) or (self.length > spec.max_length).any():
            raise BundleError(
                f"{file}: not a history of sequence {spec.name!r} (one run of at most {spec.max_length} elements "
                "per key, sorted by key)"
            )
        self.ts = table.column("ts").cast(TS_TYPE).cast(pa.int64()).to_numpy()
        self.item_id = as_strings(table.column("item_id"))
        self.values = [table.column(name).to_numpy().astype(np.int64) for name in self.names]

    def runs(self, keys: pa.Array) -> np.ndarray:
        """Each key's run (the last run, empty, for a key without history or null)."""
        if len(keys) == 1:  # a request's user: a dict lookup
            value = keys[0].as_py()
            return np.array([self.row_of.get(str(value), -1) if value is not None else -1], np.int64)
        return self.index.positions(keys)

    def feeds(
        self, keys: pa.Array, n: int, recent: RecentEvents | None, encode: EncodeElements
    ) -> dict[str, np.ndarray]:
        """The ONNX inputs of ``n`` rows whose keys are ``keys`` (n values, or 1 for all
        rows: a request's user), with ``recent`` (of those rows) in front where the
        sequence is the user's."""
        runs = self.runs(keys)
        lengths, starts = self.length[runs], self.start[runs]
        if recent is not None and self.spec.key == "user_id":
            recent = recent.filter(recent.event == SEQUENCE_EVENTS.index(self.spec.event))
        if recent is None or not len(recent.ts) or self.spec.key != "user_id":
            element = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
            columns = [v[element] for v in self.values]
        else:
            lengths, columns = self._merged(lengths, starts, recent, encode)
        width = max(1, int(lengths.max(initial=0)))
        position = np.arange(width)
        filled = position < lengths[:, None]
        at = np.cumsum(lengths) - lengths
        flat = np.where(filled, at[:, None] + position, 0)
        out = {}
        for name, column in zip(self.names, columns, strict=True):
            padded = np.where(filled, column[flat] if len(column) else 0, -1).astype(np.int64)
            out[name] = np.repeat(padded, n, axis=0) if len(padded) == 1 and n != 1 else padded
        return out

    def _merged(
        self, lengths: np.ndarray, starts: np.ndarray, recent: RecentEvents, encode: EncodeElements
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(elements per row, their columns, row by row) of the bundled elements and the
        fresh events merged (see the module docstring)."""
        age = np.maximum(self.as_of_day - np.floor_divide(recent.ts, DAY_US), 1)
        if self.spec.max_age_days:
            young = age <= self.spec.max_age_days
            recent, age = recent.filter(young), age[young]
        fresh = [*encode(self.spec.items, recent), age]
        element = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
        row = np.concatenate([recent.row, np.repeat(np.arange(len(lengths)), lengths)])
        ts = np.concatenate([recent.ts, self.ts[element]])
        bundled = np.concatenate([np.zeros(len(recent.ts), np.int64), np.ones(len(element), np.int64)])
        position = np.concatenate([np.arange(len(recent.ts)), np.arange(len(element))])
        items = pc.dictionary_encode(pa.concat_arrays([recent.item_id, self.item_id.take(pa.array(element))]))
        item = items.indices.to_numpy(zero_copy_only=False)
        # Newest first per row; at equal times fresh events first, each source in its order.
        order = np.lexsort((position, bundled, -ts, row))
        row, ts, item = row[order], ts[order], item[order]
        # A repeat of (row, item, ts) after its first occurrence in that order is left out.
        by_event = np.lexsort((np.arange(len(order)), ts, item, row))
        repeat = np.zeros(len(order), bool)
        same = (np.diff(row[by_event]) == 0) & (np.diff(item[by_event]) == 0) & (np.diff(ts[by_event]) == 0)
        repeat[by_event[1:][same]] = True
        kept = np.flatnonzero(~repeat)
        kept_row = row[kept]
        rank = np.arange(len(kept)) - np.searchsorted(kept_row, kept_row)
        kept = kept[rank < self.spec.max_length]
        merged_lengths = np.bincount(row[kept], minlength=len(lengths)).astype(np.int64)
        source = order[kept]  # positions in the concatenation of fresh events, then bundled elements
        columns = [np.concatenate([f, v[element]])[source] for f, v in zip(fresh, self.values, strict=True)]
        return merged_lengths, columns
