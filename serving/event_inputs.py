"""The ONNX inputs of rows scored with an events bundle (a model trained on event logs):
each row names a user, an item and its context; everything else is joined from the bundle.

Two entry points build the same inputs: ``feeds`` from an Arrow table of (user_id,
item_id, context columns) rows, vectorised (a hash index over the snapshots' keys), and
``request_feeds`` from a ranking request (one user, a context, candidate items; a dict
lookup per candidate, the user and context looked up once). Per row it

* encodes the request's id columns (user_id, item_id and the context features of the
  impressions table, e.g. device, slot) with the bundled vocabularies; unknown ids get
  their OOV bucket, exactly as in training (serving.encoding);
* looks up the user and item in the bundled snapshots (attribute ids already encoded,
  numeric features already transformed); a user or item missing from the snapshot gets
  what training gives a row whose snapshot join found nothing: padding id 0, an empty
  list, 0.0 for numeric features;
* looks up each aggregate key (user, item, user x category, ...) in its rolling-feature
  table; a key with no history gets the bundle's defaults (zero counts, global rates);
* gives each behaviour sequence the user's bundled history, with the fresh events of a
  request's ``recent`` (or the rows' ``recent`` column) in front (serving.histories); a
  user the bundle has no history of gets an empty one, as a new user does in training.

Context columns absent from a request (or null) are null, which encodes to the padding
id 0, the same as a null context value in training; a numeric context value absent is 0.0.

At load time every per-user and per-item input is precomputed per snapshot row (vocab ids
of user_id / item_id, attribute ids, interest lists, numeric features and the aggregates
keyed by the user or item alone), so a row costs a few ``np.take`` calls; only ids missing
from a snapshot are encoded and looked up by their string.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from serving.bundle import Bundle
from serving.encoding import KeyIndex, finite_numeric_values, join_key_columns
from serving.histories import RECENT, RecentEvents, SequenceHistory, recent_column_events, recent_events
from serving.joins import (
    AggregateTable,
    CodedKey,
    LazyColumns,
    SnapshotTable,
    cells,
    column_positions,
    expand,
)
from serving.spec import AggregateInput, AggregateKeySpec, BundleSpec, NumericInput, SequenceItem

REQUIRED_COLUMNS = ("user_id", "item_id")  # of an events bundle's rows
# The request path caches each context value's Arrow array and vocab ids (a request's
# device, slot, ...). A cache keyed by client values is bounded in bytes: values up to
# CONTEXT_CACHE_VALUE_CHARS are cached (~2 KB an entry), longer ones encoded every time.
CONTEXT_CACHE_SIZE = 10_000
CONTEXT_CACHE_VALUE_CHARS = 256
FEW_EVENTS = 256  # fresh events looked up in the items snapshot one by one; more: vectorised (a batch's)


def _snapshot_columns(spec: BundleSpec, table: str) -> list[str]:
    """The columns of the bundled ``table`` snapshot (users, items) the scorer reads: its key,
    its encoded sparse features, its transformed numeric features and the raw attributes
    of aggregate keys (as pipeline.bundle writes them)."""
    key = spec.events.snapshots[table].key
    raw = [c for k in spec.events.aggregate_keys for c in k.columns if k.sources[c] == table and c != key]
    return [
        key,
        *(f"sparse:{f.name}" for f in spec.sparse if f.table == table),
        *(f"dense:{d.name}" for d in spec.dense if isinstance(d, NumericInput) and d.table == table),
        *(f"raw:{c}" for c in dict.fromkeys(raw)),
    ]


def _cacheable(value) -> bool:
    return not isinstance(value, str) or len(value) <= CONTEXT_CACHE_VALUE_CHARS


class EventInputs:
    """An events bundle's snapshots and aggregates, loaded once; rows -> ONNX inputs
    (see the module docstring). Thread-safe."""

    required_columns = REQUIRED_COLUMNS

    def __init__(self, bundle: Bundle) -> None:
        spec = self.spec = bundle.spec
        events = spec.events
        self.snapshots = {
            t: SnapshotTable(bundle.table(s.file, _snapshot_columns(spec, t)), s.key)
            for t, s in events.snapshots.items()
        }
        self.key_snapshot = {s.key: t for t, s in events.snapshots.items()}  # user_id -> users, item_id -> items
        self.encoders = {f.name: bundle.encoder(f) for f in spec.sparse if f.table == "impressions"}
        n_dense = len(spec.dense)
        dense_names = [d.name for d in spec.dense]
        # (key, its table, its columns of the dense input)
        self.aggregates: list[tuple[AggregateKeySpec, AggregateTable, slice | list[int]]] = []
        for key in events.aggregate_keys:
            names = [d.name for d in spec.dense if isinstance(d, AggregateInput) and d.key == key.name]
            table = bundle.table(key.file, ["key", *names])
            self.aggregates.append(
                (
                    key,
                    AggregateTable(table, names, events.defaults[key.name]),
                    column_positions([dense_names.index(n) for n in names]),
                )
            )
        self.context_numeric = [
            (j, d) for j, d in enumerate(spec.dense) if isinstance(d, NumericInput) and d.table == "impressions"
        ]

        # Per snapshot row: the vocab ids of request columns that are the snapshot's key
        # (user_id, item_id) and a dense matrix holding the snapshot's numeric features and
        # its key's single-column aggregates (zeros elsewhere: the users' and items'
        # matrices are summed, which is exact).
        # table -> the impressions features keyed by it (user_id, item_id)
        self.key_features: dict[str, list[str]] = {t: [] for t in self.snapshots}
        for f in spec.sparse:
            if f.table == "impressions" and f.column in self.key_snapshot:
                table = self.key_snapshot[f.column]
                snapshot = self.snapshots[table]
                snapshot.ids[f.name] = np.append(self.encoders[f.name](snapshot.index.keys), 0)
                self.key_features[table].append(f.name)
        self.dense_of = {t: np.zeros((s.n + 1, n_dense), np.float32) for t, s in self.snapshots.items()}
        for j, d in enumerate(spec.dense):
            if isinstance(d, NumericInput) and d.table in self.snapshots:
                self.dense_of[d.table][:, j] = self.snapshots[d.table].dense[d.name]
        self.key_aggregates: dict[str, list] = {t: [] for t in self.snapshots}  # table -> [(aggregate, positions)]
        self.coded_keys: dict[str, CodedKey] = {}
        raw_codes: dict[tuple[str, str], tuple[np.ndarray, KeyIndex]] = {}
        for key, aggregate, positions in self.aggregates:
            sources = [
                ("snapshot-key" if c in self.key_snapshot else "context") if key.sources[c] == "request" else "raw"
                for c in key.columns
            ]
            if len(key.columns) == 1 and sources[0] == "snapshot-key":
                table = self.key_snapshot[key.columns[0]]
                snapshot = self.snapshots[table]
                self.dense_of[table][: snapshot.n, positions] = aggregate.features(snapshot.index.keys)
                self.dense_of[table][snapshot.n, positions] = aggregate.matrix[aggregate.default_row]
                self.key_aggregates[table].append((aggregate, positions))
            elif "context" not in sources:
                parts = []
                for c, source in zip(key.columns, sources, strict=True):
                    if source == "snapshot-key":
                        table = self.key_snapshot[c]
                        snapshot = self.snapshots[table]
                        parts.append((table, np.append(np.arange(snapshot.n), -1), snapshot.index))
                    else:
                        table = key.sources[c]
                        if (table, c) not in raw_codes:
                            codes, values = self.snapshots[table].raw_codes(c)
                            raw_codes[(table, c)] = (codes, KeyIndex(values))
                        parts.append((table, *raw_codes[(table, c)]))
                self.coded_keys[key.name] = CodedKey(aggregate, parts)

        self.histories = [
            SequenceHistory(
                q,
                bundle.table(q.file, ["key", "ts", "item_id", *q.input_names]),
                events.features_as_of,
                f"bundle {bundle.path}: {q.file}",
            )
            for q in events.sequences
        ]
        # the impressions columns carried per sequence element: a fresh event's own fields
        self.recent_fields = list(
            dict.fromkeys(i.column for q in events.sequences for i in q.items if i.source == "impressions")
        )

        # Request columns besides user_id/item_id: context features, aggregate-key parts and sequence keys.
        context = [f.column for f in spec.sparse if f.table == "impressions"]
        context += [d.column for _, d in self.context_numeric]
        context += [c for k in events.aggregate_keys for c, src in k.sources.items() if src == "request"]
        context += [q.key for q in events.sequences]
        self.context_columns = [c for c in dict.fromkeys(context) if c not in REQUIRED_COLUMNS]
        self._context_cache: dict[tuple, np.ndarray] = {}
        self._context_arrays: dict[tuple, pa.Array] = {}

    @staticmethod
    def _column(table: pa.Table, name: str) -> pa.Array:
        if name in table.column_names:
            return table.column(name).combine_chunks()
        if name in REQUIRED_COLUMNS:
            raise ValueError(f"scoring input has no column {name!r} (columns: {table.column_names})")
        return pa.nulls(table.num_rows, pa.large_string())  # absent context: null -> padding id

    def feeds(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The ONNX inputs of ``table``'s rows (user_id, item_id, context columns, and
        optionally each row's fresh events, column ``recent``)."""
        keys = {column: self._column(table, column) for column in self.key_snapshot}
        rows = {t: self.snapshots[t].rows(keys[column]) for column, t in self.key_snapshot.items()}
        recent = None
        if RECENT in table.column_names and self.histories:
            recent = recent_column_events(table.column(RECENT), self.recent_fields)
        return self._feeds(table.num_rows, rows, keys, lambda name: self._column(table, name), recent)

    def request_table(self, request: dict) -> pa.Table:
        """A ranking request as the table ``feeds`` takes (context repeated per row)."""
        user_id, context, candidates = request["user_id"], request.get("context") or {}, request["candidates"]
        items = pa.array([c["item_id"] for c in candidates], pa.large_string())
        n = len(items)
        repeat = pa.array(np.zeros(n, np.int64))
        columns = {"user_id": pa.array([user_id], pa.large_string()).take(repeat), "item_id": items}
        for name in self.context_columns:
            if context.get(name) is not None:
                columns[name] = pa.array([context[name]]).take(repeat)
        if request.get(RECENT):
            columns[RECENT] = recent_events(request[RECENT], self.recent_fields).as_list_column(n)
        return pa.table(columns)

    def request_feeds(self, request: dict) -> tuple[list[str], dict[str, np.ndarray]]:
        """(candidate item ids, ONNX inputs) of a ranking request: the same inputs as
        ``feeds(request_table(request))``, with the user and context looked up once and
        the candidates by dict."""
        user_id, context, candidates = request["user_id"], request.get("context") or {}, request["candidates"]
        item_ids = [c["item_id"] for c in candidates]
        users, items = self.snapshots["users"], self.snapshots["items"]
        n = len(item_ids)
        rows = {
            "users": np.array([users.row_of.get(user_id, users.n)], np.int64),
            "items": np.fromiter((items.row_of.get(i, items.n) for i in item_ids), np.int64, n),
        }
        keys = LazyColumns(lambda column: pa.array([user_id] if column == "user_id" else item_ids, pa.large_string()))
        # the fresh events are the user's: row 0 of the user's one row
        recent = recent_events(request[RECENT], self.recent_fields) if request.get(RECENT) is not None else None
        return item_ids, self._feeds(n, rows, keys, lambda name: self._context_value(name, context.get(name)), recent)

    def _feeds(
        self,
        n: int,
        rows: dict[str, np.ndarray],
        keys: dict[str, pa.Array],
        context,
        recent: RecentEvents | None = None,
    ) -> dict[str, np.ndarray]:
        """The ONNX inputs of ``n`` rows given each row's snapshot rows, the snapshot-key
        columns (user_id, item_id), ``context(name)``, a request column, and the fresh
        events of the rows (of their user); each of these holds ``n`` values, or 1 for all
        rows (a request's user and context)."""
        feeds: dict[str, np.ndarray] = {}
        for f in self.spec.sparse:
            name, source = f.name, f.table
            if source == "impressions" and f.column not in self.key_snapshot:
                try:
                    feeds[name] = expand(self._encode_context(name, context(f.column)), n)
                except TypeError as err:  # e.g. text for a bucketised number
                    raise ValueError(f"context.{f.column} (feature {name!r}): {err}") from None
            elif source == "impressions":
                table = self.key_snapshot[f.column]
                feeds[name] = expand(self.snapshots[table].ids[name][rows[table]], n)
            elif f.kind == "list":
                feeds[name] = expand(self.snapshots[source].list_ids(name, rows[source]), n)
            else:
                feeds[name] = expand(self.snapshots[source].ids[name][rows[source]], n)
        dense = expand(self.dense_of["users"][rows["users"]] + self.dense_of["items"][rows["items"]], n)
        for j, d in self.context_numeric:
            dense[:, j] = finite_numeric_values(
                context(d.column), d.transform, f"context.{d.column} (feature {d.name!r})"
            )
        for key, aggregate, positions in self.aggregates:
            coded = self.coded_keys.get(key.name)
            if coded is not None:
                at = np.broadcast_to(coded.positions(rows, aggregate.default_row), (n,))
                dense[:, positions] = aggregate.matrix[np.maximum(at, 0)]
                unknown = at < 0  # a part not in a snapshot: look the joined string up
                if unknown.any():
                    dense[cells(np.flatnonzero(unknown), positions)] = aggregate.features(
                        self._key_strings(key, rows, keys, context, n).filter(pa.array(unknown))
                    )
            elif not self._keyed_by_snapshot(key):
                dense[:, positions] = aggregate.features(self._key_strings(key, rows, keys, context, n))
        self._fill_misses(rows, keys, feeds, dense)
        feeds["dense"] = dense
        for history in self.histories:
            key = history.spec.key
            values = keys[key] if key in self.key_snapshot else context(key)
            feeds.update(history.feeds(values, n, recent, self._fresh_ids))
        return feeds

    def _fresh_ids(self, carried: tuple[SequenceItem, ...], events: RecentEvents) -> list[np.ndarray]:
        """Fresh events' embedding rows of each carried feature, encoded as a candidate's
        are: the item id by its items-snapshot row (an item not in the snapshot by its id
        text), an items attribute from the snapshot (padding 0 when the item is not in it),
        an impressions attribute from the event's own field of that column."""
        items = self.snapshots["items"]
        n = len(events.ts)
        if n <= FEW_EVENTS:  # a request's: a dict lookup per event beats hashing them (as for candidates)
            at = np.fromiter((items.row_of.get(i, items.n) for i in events.item_id.to_pylist()), np.int64, n)
        else:
            at = items.rows(events.item_id)
        miss = at == items.n
        out = []
        for item in carried:
            if item.source == "impressions":
                try:
                    out.append(self.encoders[item.feature](events.fields[item.column]))
                except TypeError as err:
                    raise ValueError(f"{RECENT}[].{item.column} (feature {item.feature!r}): {err}") from None
                continue
            ids = items.ids[item.feature][at]
            if item.source == "item" and miss.any():
                ids[miss] = self.encoders[item.feature](events.item_id.filter(pa.array(miss)))
            out.append(ids)
        return out

    def _encode_context(self, name: str, values: pa.Array) -> np.ndarray:
        """Vocab ids of a context column; a request's one value (device, slot) is encoded
        once per distinct value and cached (the cache stops growing at CONTEXT_CACHE_SIZE)."""
        if len(values) != 1:
            return self.encoders[name](values)
        key = (name, str(values.type), values[0].as_py())
        ids = self._context_cache.get(key)
        if ids is None:
            ids = self.encoders[name](values)
            if len(self._context_cache) < CONTEXT_CACHE_SIZE and _cacheable(key[2]):
                self._context_cache[key] = ids
        return ids

    def _keyed_by_snapshot(self, key: AggregateKeySpec) -> bool:
        first = key.columns[0]
        return len(key.columns) == 1 and key.sources[first] == "request" and first in self.key_snapshot

    def _key_strings(
        self, key: AggregateKeySpec, rows: dict[str, np.ndarray], keys: dict[str, pa.Array], context, n: int
    ) -> pa.Array:
        """The joined key text of each row (serving.encoding.join_key_columns, as training)."""
        parts = []
        for c in key.columns:
            source = key.sources[c]
            if source != "request":
                values = self.snapshots[source].raw_values(c, rows[source])
            else:
                values = keys[c] if c in self.key_snapshot else context(c)
            parts.append(values.take(pa.array(np.zeros(n, np.int64))) if len(values) == 1 and n != 1 else values)
        return join_key_columns(parts)

    def _fill_misses(
        self, rows: dict[str, np.ndarray], keys: dict[str, pa.Array], feeds: dict[str, np.ndarray], dense: np.ndarray
    ) -> None:
        """Rows whose user or item is not in its snapshot: their vocab ids (OOV bucket or a
        known id) and their single-column aggregates come from the key string itself."""
        for column, table in self.key_snapshot.items():
            found = rows[table] != self.snapshots[table].n
            if found.all():
                continue
            miss = np.broadcast_to(~found, dense.shape[:1])
            values = keys[column]  # n values, or 1 for every row
            if len(values) == 1:
                values = values.take(pa.array(np.zeros(int(miss.sum()), np.int64)))
            else:
                values = values.filter(pa.array(miss))
            for name in self.key_features[table]:
                feeds[name][miss] = self.encoders[name](values)
            for aggregate, positions in self.key_aggregates[table]:
                dense[cells(np.flatnonzero(miss), positions)] = aggregate.features(values)

    def _context_value(self, name: str, value) -> pa.Array:
        """A request's context value as a 1-row Arrow array, cached like _encode_context
        (building an Arrow array costs more than encoding it once it is cached)."""
        if not isinstance(value, (str, int, float, bool, type(None))):  # not a context value: Arrow says why
            return pa.array([value])
        key = (name, type(value), value)
        array = self._context_arrays.get(key)
        if array is None:
            array = pa.nulls(1, pa.large_string()) if value is None else pa.array([value])
            if len(self._context_arrays) < CONTEXT_CACHE_SIZE and _cacheable(value):
                self._context_arrays[key] = array
        return array
