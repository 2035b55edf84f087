"""The scorer: bundle + rows -> p_<task> per task (the task's served probability) and the
blended ranking score. For the default funnel: p_click and p_conversion = P(click and
conversion).

Two kinds of bundle (models/export.py), told apart by spec.json's ``source``:

**events** (a model trained on event logs). One code path: ``score_table`` scores an
Arrow table of (user_id, item_id, context columns) rows, vectorised; ``score`` scores a
request (one user, a context, candidate items). Both find each row's user and item in the
snapshots (a hash index over the table's keys; a dict lookup per candidate for a request),
then build the model inputs with the same ``Scorer._feeds`` and run the same ONNX session.
The CLI (batch) and the HTTP server (``request_feeds`` + ``run``, coalescing concurrent
requests) use these.

Per row it
* encodes the request's id columns (user_id, item_id and the context features of the
  impressions table, e.g. device, slot) with the bundled vocabularies; unknown ids get
  their OOV bucket, exactly as in training (serving.encoding);
* looks up the user and item in the bundled snapshots (attribute ids already encoded,
  numeric features already transformed); a user or item missing from the snapshot gets
  what training gives a row whose snapshot join found nothing: padding id 0, an empty
  list, 0.0 for numeric features;
* looks up each aggregate key (user, item, user x category, ...) in its rolling-feature
  table; a key with no history gets the bundle's defaults (zero counts, global rates).

Context columns absent from a request (or null) are null, which encodes to the padding
id 0, the same as a null context value in training; a numeric context value absent is 0.0.

**table** (a model trained on the user's own feature table, ``[table]``). Rows carry every
feature column themselves, as the table source reads them (ids as integers or strings,
list columns, numeric columns): ``score_table`` encodes them with the bundled
vocabularies as features.table_source did (unseen ids -> OOV buckets, null -> padding,
the same numeric transform). There are no users or items to rank: ``score`` (and HTTP
``/v1/rank``) refuse with ``BatchOnlyError``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serving.bundle import Bundle
from serving.encoding import KeyIndex, as_strings, bucket_ids, float_values, join_key_columns, list_elements, pad_jagged, vocab_encoder

REQUIRED_COLUMNS = ("user_id", "item_id")  # of an events bundle's rows
SCORE = "score"
# Bundles written before tasks were configurable: the click -> conversion funnel.
FUNNEL_TASKS = ({"name": "click", "served": "click"}, {"name": "conversion", "served": "ctcvr"})
# The model runs on slices of this many rows: a few MB of activations stay in cache
# (measured on 2 cores: 4096-row slices ~1.7x the rows/s of one 200k-row run).
ONNX_CHUNK_ROWS = 4096
BATCH_CHUNK_ROWS = 65_536  # score_table's unit of work per thread (large enough to amortise per-call costs)
CONTEXT_CACHE_SIZE = 100_000


def _numeric(values: pa.Array | pa.ChunkedArray, transform: str) -> np.ndarray:
    """A raw numeric column as the model's dense input (features.examples' rule):
    float, log1p of the value clipped at 0 when asked, null/NaN -> 0."""
    x = float_values(values)
    x = np.where(np.isnan(x), 0.0, x)
    if transform == "log1p":
        x = np.log1p(np.maximum(x, 0.0))
    return x.astype(np.float32)


class BatchOnlyError(ValueError):
    """A ranking request for a table bundle, which scores rows in batch only."""


def _vocab_encoder(bundle: Bundle, feature: dict):
    """The feature's bundled vocabulary as a function raw ids -> embedding rows (a bucket
    feature: its boundaries, raw numbers -> bucket rows)."""
    if feature["kind"] == "bucket":
        boundaries = np.asarray(feature["boundaries"], np.float64)
        return lambda values: bucket_ids(values, boundaries)
    vocab = pq.read_table(bundle.file(feature["vocab"]), columns=["key", "index"])
    admitted = pc.greater(vocab.column("index"), 0)
    return vocab_encoder(vocab.column("key").filter(admitted), vocab.column("index").filter(admitted).to_numpy(),
                         feature["capacity"], feature["oov_buckets"])


def _columns(positions: list[int]) -> slice | list[int]:
    """Column positions as a slice when they are consecutive (an aggregate key's features
    are): writing into a slice of the dense matrix is several times faster than a list."""
    if positions and positions == list(range(positions[0], positions[-1] + 1)):
        return slice(positions[0], positions[-1] + 1)
    return positions


def _cells(rows: np.ndarray, columns: slice | list[int]) -> tuple:
    """The index of ``columns`` (from ``_columns``) of ``rows`` of a matrix."""
    return (rows, columns) if isinstance(columns, slice) else (rows[:, None], columns)


class _LazyColumns(dict):
    """A dict that builds a missing column on first access (``make(name)``): a request's
    user and item ids as Arrow arrays are needed only when one is not in its snapshot."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, name: str) -> pa.Array:
        value = self[name] = self.make(name)
        return value


def _expand(values: np.ndarray, n: int) -> np.ndarray:
    """A per-row array of ``n`` rows from a per-row one or a constant (length 1)."""
    return np.repeat(values, n, axis=0) if len(values) == 1 and n != 1 else values


class _Snapshot:
    """The users or items snapshot as per-row arrays; row ``n`` (one past the end) is the
    'not found' row (padding ids, empty lists, 0.0; its key-dependent values are filled
    per request by Scorer._fill_misses)."""

    def __init__(self, table: pa.Table, key: str) -> None:
        keys = table.column(key).combine_chunks()
        self.index = KeyIndex(keys)  # vectorised lookup for batches
        # Request path: one dict lookup per candidate beats hashing 200 strings in numpy
        # (~15 us vs ~300 us); memory ~100 bytes per key.
        self.row_of: dict[str, int] = dict(zip(as_strings(keys).to_pylist(), range(len(keys))))
        self.n = table.num_rows
        self.ids: dict[str, np.ndarray] = {}
        self.lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (padded [n+1, L], lengths [n+1])
        self.dense: dict[str, np.ndarray] = {}
        self.raw: dict[str, pa.Array] = {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            kind, _, feature = name.partition(":")
            if kind == "sparse" and (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
                lengths = np.append(pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64), 0)
                values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
                self.lists[feature] = (pad_jagged(lengths, values), lengths)
            elif kind == "sparse":
                self.ids[feature] = np.append(column.to_numpy(zero_copy_only=False).astype(np.int64), 0)
            elif kind == "dense":
                self.dense[feature] = np.append(column.to_numpy(zero_copy_only=False).astype(np.float32), np.float32(0.0))
            elif kind == "raw":
                self.raw[feature] = column

    def rows(self, keys: pa.Array) -> np.ndarray:
        pos = self.index.positions(keys)
        return np.where(pos < 0, self.n, pos)

    def raw_values(self, column: str, rows: np.ndarray) -> pa.Array:
        """A raw attribute per row; null where the row was not found."""
        return self.raw[column].take(pa.array(np.minimum(rows, max(self.n - 1, 0)), mask=rows >= self.n))

    def raw_codes(self, column: str) -> tuple[np.ndarray, pa.Array]:
        """(code per snapshot row, -1 for null and for row n; the distinct values as key text)."""
        encoded = pc.dictionary_encode(as_strings(self.raw[column]))
        codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.append(codes, -1), encoded.dictionary

    def list_ids(self, feature: str, rows: np.ndarray) -> np.ndarray:
        padded, lengths = self.lists[feature]
        width = max(1, int(lengths[rows].max(initial=0)))
        return np.ascontiguousarray(padded[rows, :width])


class _Aggregate:
    """One aggregate key's rolling features; the last matrix row holds the defaults."""

    def __init__(self, table: pa.Table, names: list[str], defaults: dict[str, float]) -> None:
        self.keys = table.column("key").combine_chunks()
        self.index = KeyIndex(self.keys)
        rows = [table.column(n).to_numpy().astype(np.float32) for n in names]
        self.matrix = np.vstack([np.column_stack(rows) if rows else np.zeros((table.num_rows, 0), np.float32),
                                 np.array([[defaults[n] for n in names]], np.float32)])
        self.default_row = len(self.matrix) - 1

    def positions(self, keys: pa.Array) -> np.ndarray:
        pos = self.index.positions(keys)
        return np.where(pos < 0, self.default_row, pos)

    def features(self, keys: pa.Array) -> np.ndarray:
        return self.matrix[self.positions(keys)]


class _CodedKey:
    """Integer lookup of a multi-column aggregate key (e.g. user x category) whose parts are
    all snapshot rows or snapshot attributes: each part is a small integer code per
    snapshot row (the row itself, or the attribute's dictionary code), so a row's key is
    one int64 found by ``searchsorted``; no strings are built per request. A row with an
    unknown part (user or item not in the snapshot, null attribute) returns -1 and is
    looked up by its joined string instead (Scorer._fill_misses)."""

    def __init__(self, aggregate: _Aggregate, parts: list[tuple[str, np.ndarray, KeyIndex]]) -> None:
        # parts: (snapshot table, code per snapshot row (-1 unknown), index of the codes' key texts)
        self.tables = [t for t, _, _ in parts]
        self.codes = [c for _, c, _ in parts]
        sizes = np.array([len(index) for _, _, index in parts], np.int64)
        self.radix = np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]]).astype(np.int64)
        split = pc.split_pattern(aggregate.keys, "\x1f")
        whole = pc.equal(pc.list_value_length(split), len(parts)).to_numpy(zero_copy_only=False)
        composite = np.zeros(len(aggregate.keys), np.int64)
        for j, (_, _, index) in enumerate(parts):
            code = index.distinct_positions(pc.list_element(pc.fill_null(split, pa.scalar([""] * len(parts), split.type)), j))
            whole &= code >= 0
            composite += np.maximum(code, 0) * self.radix[j]
        rows = np.flatnonzero(whole)
        order = np.argsort(composite[rows], kind="stable")
        self.sorted = composite[rows][order]
        self.rows = rows[order]

    def positions(self, snapshot_rows: dict[str, np.ndarray], default_row: int) -> np.ndarray:
        """The aggregate row of each request row; default_row when absent; -1 when a part is unknown."""
        composite = 0
        known = True
        for table, codes, radix in zip(self.tables, self.codes, self.radix):
            code = codes[snapshot_rows[table]]
            known = known & (code >= 0)
            composite = composite + np.maximum(code, 0) * radix
        at = np.minimum(np.searchsorted(self.sorted, composite), max(len(self.sorted) - 1, 0))
        hit = (self.sorted[at] == composite) if len(self.sorted) else np.zeros(np.shape(composite), bool)
        return np.where(known, np.where(hit, self.rows[at] if len(self.rows) else 0, default_row), -1)


class Scorer:
    """Scores request rows with a verified bundle (see the module docstring). Thread-safe.

    At load time every per-user and per-item input is precomputed per snapshot row (vocab
    ids of user_id / item_id, attribute ids, interest lists, numeric features and the
    aggregates keyed by the user or item alone), so scoring a row is a few ``np.take`` calls;
    only ids missing from a snapshot are encoded and looked up by their string.
    """

    def __init__(self, bundle: Bundle, intra_op_threads: int = 1) -> None:
        self.bundle = bundle
        spec = self.spec = bundle.spec
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads > 1:  # idle pool threads yield the core instead of spinning (the server shares 2 cores)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(bundle.file("model.onnx")), options, providers=["CPUExecutionProvider"])
        tasks = spec.get("tasks", FUNNEL_TASKS)
        self.model_outputs = [f"p_{t['served']}" for t in tasks] + [SCORE]  # the ONNX outputs run
        self.result_names = (*(f"p_{t['name']}" for t in tasks), SCORE)  # what they are returned as
        self.n_dense = len(spec["dense"])
        self.batch_only = spec.get("source", "events") == "table"
        if self.batch_only:
            self.encoders = {f["name"]: _vocab_encoder(bundle, f) for f in spec["sparse"]}
            columns = [f["column"] for f in spec["sparse"]] + [d["column"] for d in spec["dense"]]
            self.required_columns = tuple(dict.fromkeys(columns))
        else:
            self.required_columns = REQUIRED_COLUMNS
            self._load_event_features()

    def _load_event_features(self) -> None:
        """An events bundle's snapshots, aggregates and precomputed per-row inputs."""
        bundle, spec = self.bundle, self.spec
        self.snapshots = {t: _Snapshot(pq.read_table(bundle.file(s["file"])), s["key"]) for t, s in spec["snapshots"].items()}
        self.key_snapshot = {s["key"]: t for t, s in spec["snapshots"].items()}  # user_id -> users, item_id -> items
        self.encoders = {f["name"]: _vocab_encoder(bundle, f) for f in spec["sparse"] if f["table"] == "impressions"}
        dense_names = [d["name"] for d in spec["dense"]]
        self.aggregates = []  # (key spec, _Aggregate, positions of its columns in the dense input)
        for key in spec["aggregate_keys"]:
            names = [d["name"] for d in spec["dense"] if d["source"] == "aggregate" and d["key"] == key["name"]]
            table = pq.read_table(bundle.file(key["file"]))
            self.aggregates.append((key, _Aggregate(table, names, spec["defaults"][key["name"]]), _columns([dense_names.index(n) for n in names])))

        # Per snapshot row: the vocab ids of request columns that are the snapshot's key
        # (user_id, item_id) and a dense matrix holding the snapshot's numeric features and
        # its key's single-column aggregates (zeros elsewhere: the users' and items'
        # matrices are summed, which is exact).
        self.key_features: dict[str, list[str]] = {t: [] for t in self.snapshots}  # table -> impressions features keyed by it
        for f in spec["sparse"]:
            if f["table"] == "impressions" and f["column"] in self.key_snapshot:
                table = self.key_snapshot[f["column"]]
                snapshot = self.snapshots[table]
                snapshot.ids[f["name"]] = np.append(self.encoders[f["name"]](snapshot.index.keys), 0)
                self.key_features[table].append(f["name"])
        self.dense_of = {t: np.zeros((s.n + 1, self.n_dense), np.float32) for t, s in self.snapshots.items()}
        for j, d in enumerate(spec["dense"]):
            if d["source"] in self.snapshots:
                self.dense_of[d["source"]][:, j] = self.snapshots[d["source"]].dense[d["name"]]
        self.key_aggregates: dict[str, list] = {t: [] for t in self.snapshots}  # table -> [(aggregate, positions)]
        self.coded_keys: dict[str, _CodedKey] = {}
        raw_codes: dict[tuple[str, str], tuple[np.ndarray, KeyIndex]] = {}
        for key, aggregate, positions in self.aggregates:
            columns = key["columns"]
            sources = [("snapshot-key" if c in self.key_snapshot else "context") if key["sources"][c] == "request" else "raw" for c in columns]
            if len(columns) == 1 and sources[0] == "snapshot-key":
                table = self.key_snapshot[columns[0]]
                snapshot = self.snapshots[table]
                self.dense_of[table][: snapshot.n, positions] = aggregate.features(snapshot.index.keys)
                self.dense_of[table][snapshot.n, positions] = aggregate.matrix[aggregate.default_row]
                self.key_aggregates[table].append((aggregate, positions))
            elif "context" not in sources:
                parts = []
                for c, source in zip(columns, sources):
                    if source == "snapshot-key":
                        table = self.key_snapshot[c]
                        snapshot = self.snapshots[table]
                        parts.append((table, np.append(np.arange(snapshot.n), -1), snapshot.index))
                    else:
                        table = key["sources"][c]
                        if (table, c) not in raw_codes:
                            codes, values = self.snapshots[table].raw_codes(c)
                            raw_codes[(table, c)] = (codes, KeyIndex(values))
                        parts.append((table, *raw_codes[(table, c)]))
                self.coded_keys[key["name"]] = _CodedKey(aggregate, parts)

        # Request columns besides user_id/item_id: context features and aggregate-key parts.
        context = [f["column"] for f in spec["sparse"] if f["table"] == "impressions"]
        context += [d["column"] for d in spec["dense"] if d["source"] == "impressions"]
        context += [c for k in spec["aggregate_keys"] for c, src in k["sources"].items() if src == "request"]
        self.context_columns = [c for c in dict.fromkeys(context) if c not in REQUIRED_COLUMNS]
        self._context_cache: dict[tuple, np.ndarray] = {}
        self._context_arrays: dict[tuple, pa.Array] = {}

    @property
    def version(self) -> str:
        return self.bundle.version

    def _column(self, table: pa.Table, name: str) -> pa.Array:
        if name in table.column_names:
            return table.column(name).combine_chunks()
        if name in REQUIRED_COLUMNS:
            raise ValueError(f"scoring input has no column {name!r} (columns: {table.column_names})")
        return pa.nulls(table.num_rows, pa.large_string())  # absent context: null -> padding id

    def feeds(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The ONNX inputs of ``table``'s rows."""
        if self.batch_only:
            return self._table_feeds(table)
        keys = {column: self._column(table, column) for column in self.key_snapshot}
        rows = {t: self.snapshots[t].rows(keys[column]) for column, t in self.key_snapshot.items()}
        return self._feeds(table.num_rows, rows, keys, lambda name: self._column(table, name))

    def _table_feeds(self, table: pa.Table) -> dict[str, np.ndarray]:
        """A table bundle's ONNX inputs: every feature encoded from its own raw column."""
        feeds: dict[str, np.ndarray] = {}
        for f in self.spec["sparse"]:
            values = self._feature_column(table, f["column"], f["name"])
            try:
                if f["kind"] == "list":
                    lengths, elements = list_elements(values, self.spec.get("list_delimiter"))
                    feeds[f["name"]] = pad_jagged(lengths, self.encoders[f["name"]](elements))
                else:
                    feeds[f["name"]] = self.encoders[f["name"]](values)
            except (TypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise ValueError(f"scoring input column {f['column']!r} (feature {f['name']!r}): {err}") from None
        dense = np.zeros((table.num_rows, self.n_dense), np.float32)
        for j, d in enumerate(self.spec["dense"]):
            try:
                dense[:, j] = _numeric(self._feature_column(table, d["column"], d["name"]), d["transform"])
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise ValueError(f"scoring input column {d['column']!r} (feature {d['name']!r}) must hold numbers: {err}") from None
        feeds["dense"] = dense
        return feeds

    @staticmethod
    def _feature_column(table: pa.Table, column: str, feature: str) -> pa.Array:
        if column not in table.column_names:
            raise ValueError(f"scoring input has no column {column!r} (feature {feature!r}; columns: {table.column_names})")
        return table.column(column).combine_chunks()

    def _feeds(self, n: int, rows: dict[str, np.ndarray], keys: dict[str, pa.Array], context) -> dict[str, np.ndarray]:
        """The ONNX inputs of ``n`` rows given each row's snapshot rows, the snapshot-key
        columns (user_id, item_id) and ``context(name)``, a request column; each of these
        holds ``n`` values, or 1 for all rows (a request's user and context)."""
        feeds: dict[str, np.ndarray] = {}
        for f in self.spec["sparse"]:
            name, source = f["name"], f["table"]
            if source == "impressions" and f["column"] not in self.key_snapshot:
                try:
                    feeds[name] = _expand(self._encode_context(name, context(f["column"])), n)
                except TypeError as err:  # e.g. text for a bucketised number
                    raise ValueError(f"context.{f['column']} (feature {name!r}): {err}") from None
            elif source == "impressions":
                table = self.key_snapshot[f["column"]]
                feeds[name] = _expand(self.snapshots[table].ids[name][rows[table]], n)
            elif f["kind"] == "list":
                feeds[name] = _expand(self.snapshots[source].list_ids(name, rows[source]), n)
            else:
                feeds[name] = _expand(self.snapshots[source].ids[name][rows[source]], n)
        dense = _expand(self.dense_of["users"][rows["users"]] + self.dense_of["items"][rows["items"]], n)
        for j, d in enumerate(self.spec["dense"]):
            if d["source"] == "impressions":
                dense[:, j] = _numeric(context(d["column"]), d["transform"])
        for key, aggregate, positions in self.aggregates:
            coded = self.coded_keys.get(key["name"])
            if coded is not None:
                at = np.broadcast_to(coded.positions(rows, aggregate.default_row), (n,))
                dense[:, positions] = aggregate.matrix[np.maximum(at, 0)]
                unknown = at < 0  # a part not in a snapshot: look the joined string up
                if unknown.any():
                    dense[_cells(np.flatnonzero(unknown), positions)] = aggregate.features(
                        self._key_strings(key, rows, keys, context, n).filter(pa.array(unknown)))
            elif key["name"] not in self.coded_keys and not self._keyed_by_snapshot(key):
                dense[:, positions] = aggregate.features(self._key_strings(key, rows, keys, context, n))
        self._fill_misses(rows, keys, feeds, dense)
        feeds["dense"] = dense
        return feeds

    def _encode_context(self, name: str, values: pa.Array) -> np.ndarray:
        """Vocab ids of a context column; a request's one value (device, slot) is encoded
        once per distinct value and cached (the cache stops growing at CONTEXT_CACHE_SIZE)."""
        if len(values) != 1:
            return self.encoders[name](values)
        key = (name, str(values.type), values[0].as_py())
        ids = self._context_cache.get(key)
        if ids is None:
            ids = self.encoders[name](values)
            if len(self._context_cache) < CONTEXT_CACHE_SIZE:
                self._context_cache[key] = ids
        return ids

    def _keyed_by_snapshot(self, key: dict) -> bool:
        return len(key["columns"]) == 1 and key["sources"][key["columns"][0]] == "request" and key["columns"][0] in self.key_snapshot

    def _key_strings(self, key: dict, rows: dict[str, np.ndarray], keys: dict[str, pa.Array], context, n: int) -> pa.Array:
        """The joined key text of each row (serving.encoding.join_key_columns, as training)."""
        parts = []
        for c in key["columns"]:
            source = key["sources"][c]
            if source != "request":
                values = self.snapshots[source].raw_values(c, rows[source])
            else:
                values = keys[c] if c in self.key_snapshot else context(c)
            parts.append(values.take(pa.array(np.zeros(n, np.int64))) if len(values) == 1 and n != 1 else values)
        return join_key_columns(parts)

    def _fill_misses(self, rows: dict[str, np.ndarray], keys: dict[str, pa.Array], feeds: dict[str, np.ndarray], dense: np.ndarray) -> None:
        """Rows whose user or item is not in its snapshot: their vocab ids (OOV bucket or a
        known id) and their single-column aggregates come from the key string itself."""
        for column, table in self.key_snapshot.items():
            found = rows[table] != self.snapshots[table].n
            if found.all():
                continue
            miss = np.broadcast_to(~found, dense.shape[:1])
            values = keys[column]  # n values, or 1 for every row
            values = values.take(pa.array(np.zeros(int(miss.sum()), np.int64))) if len(values) == 1 else values.filter(pa.array(miss))
            for name in self.key_features[table]:
                feeds[name][miss] = self.encoders[name](values)
            for aggregate, positions in self.key_aggregates[table]:
                dense[_cells(np.flatnonzero(miss), positions)] = aggregate.features(values)

    def run(self, feeds: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, ...]:
        """The ``result_names`` values (p_<task> per task, then score) of ``n`` rows' ONNX inputs."""
        slices = [self.session.run(self.model_outputs, {k: v[a : a + ONNX_CHUNK_ROWS] for k, v in feeds.items()})
                  for a in range(0, n, ONNX_CHUNK_ROWS)]
        if len(slices) == 1:
            return tuple(slices[0])
        return tuple(np.concatenate(parts) for parts in zip(*slices))

    def score_table(self, table: pa.Table, workers: int = 1) -> pa.Table:
        """``table`` with ``result_names`` appended: p_<task> per task (the default funnel:
        p_click, p_conversion = P(click and conversion)) and score.

        ``workers`` > 1: chunks of BATCH_CHUNK_ROWS rows are encoded and scored by that many
        threads at once (Arrow, numpy and onnxruntime release the GIL), so encoding one
        chunk overlaps the model on another; build the Scorer with ``intra_op_threads=1``
        then. On 2 cores this scores ~1.4x the rows/s of one call with 2 onnxruntime
        threads, whose encoding runs on one core while the other waits."""
        n = table.num_rows
        if n == 0:
            outputs = [np.zeros(0, np.float32)] * len(self.result_names)
        elif workers <= 1 or n <= BATCH_CHUNK_ROWS:
            outputs = self.run(self.feeds(table), n)
        else:
            def score_chunk(start: int) -> tuple[np.ndarray, ...]:
                chunk = table.slice(start, BATCH_CHUNK_ROWS)
                return self.run(self.feeds(chunk), chunk.num_rows)

            with ThreadPoolExecutor(workers) as pool:
                parts = list(pool.map(score_chunk, range(0, n, BATCH_CHUNK_ROWS)))
            outputs = tuple(np.concatenate(values) for values in zip(*parts))
        for name, values in zip(self.result_names, outputs):
            table = table.append_column(name, pa.array(values, pa.float32()))
        return table

    def check_rankable(self) -> None:
        """BatchOnlyError for a table bundle: it has no users or items to rank."""
        if self.batch_only:
            raise BatchOnlyError(
                f"bundle {self.bundle.path} holds a model trained on a feature table ([table] source): it scores rows in "
                "batch, each row carrying its own feature columns (`funnelrank score --bundle B --input rows.parquet "
                "--output scores.parquet`, Scorer.score_table); it cannot rank a user's candidates")

    def request_table(self, request: dict) -> pa.Table:
        """A ``score`` request as the table ``score_table`` takes (context repeated per row)."""
        self.check_rankable()
        user_id, context, candidates = request["user_id"], request.get("context") or {}, request["candidates"]
        items = pa.array([c["item_id"] for c in candidates], pa.large_string())
        n = len(items)
        repeat = pa.array(np.zeros(n, np.int64))
        columns = {"user_id": pa.array([user_id], pa.large_string()).take(repeat), "item_id": items}
        for name in self.context_columns:
            if context.get(name) is not None:
                columns[name] = pa.array([context[name]]).take(repeat)
        return pa.table(columns)

    def request_feeds(self, request: dict) -> tuple[list[str], dict[str, np.ndarray]]:
        """(candidate item ids, ONNX inputs) of a ``score`` request: the same inputs as
        ``feeds(request_table(request))``, with the user and context looked up once and
        the candidates by dict."""
        self.check_rankable()
        user_id, context, candidates = request["user_id"], request.get("context") or {}, request["candidates"]
        item_ids = [c["item_id"] for c in candidates]
        users, items = self.snapshots["users"], self.snapshots["items"]
        n = len(item_ids)
        rows = {"users": np.array([users.row_of.get(user_id, users.n)], np.int64),
                "items": np.fromiter((items.row_of.get(i, items.n) for i in item_ids), np.int64, n)}
        keys = _LazyColumns(lambda column: pa.array([user_id] if column == "user_id" else item_ids, pa.large_string()))
        return item_ids, self._feeds(n, rows, keys, lambda name: self._context_value(name, context.get(name)))

    def _context_value(self, name: str, value) -> pa.Array:
        """A request's context value as a 1-row Arrow array, cached like _encode_context
        (building an Arrow array costs more than encoding it once it is cached)."""
        if not isinstance(value, (str, int, float, bool, type(None))):  # not a context value: Arrow says why
            return pa.array([value])
        key = (name, type(value), value)
        array = self._context_arrays.get(key)
        if array is None:
            array = pa.nulls(1, pa.large_string()) if value is None else pa.array([value])
            if len(self._context_arrays) < CONTEXT_CACHE_SIZE:
                self._context_arrays[key] = array
        return array

    def score(self, request: dict) -> list[dict]:
        """Rank ``request``'s candidates: [{item_id, p_<task>..., score}] by score desc
        (the default funnel: item_id, p_click, p_conversion, score)."""
        item_ids, feeds = self.request_feeds(request)
        return ranked(item_ids, self.result_names, self.run(feeds, len(item_ids)))


def ranked(item_ids: list[str], names: tuple[str, ...], outputs: tuple[np.ndarray, ...]) -> list[dict]:
    """Candidates with their predictions (``names``: their keys, one of them ``score``), by
    score descending (ties keep the request's order)."""
    order = np.argsort(-outputs[names.index(SCORE)], kind="stable")
    rows = [{"item_id": item_ids[k]} for k in order.tolist()]
    for name, values in zip(names, outputs):  # a column at a time: ~2x faster than dict(zip(...)) per row
        for row, value in zip(rows, values[order].tolist()):
            row[name] = value
    return rows


def merge_feeds(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several requests' ONNX inputs as one batch (list inputs padded with -1 to the widest)."""
    merged = {}
    for name in parts[0]:
        arrays = [p[name] for p in parts]
        if arrays[0].ndim == 2 and name != "dense":
            width = max(a.shape[1] for a in arrays)
            arrays = [a if a.shape[1] == width else np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-1) for a in arrays]
        merged[name] = np.concatenate(arrays)
    return merged


def score_parquet(scorer: Scorer, input_path: str | Path, output_path: str | Path, batch_rows: int = BATCH_CHUNK_ROWS,
                  workers: int = 1) -> int:
    """Score every row of a Parquet file (an events bundle: user_id, item_id, context
    columns; a table bundle: its feature columns) into ``output_path`` (the input columns
    + ``scorer.result_names``), written atomically, in batches of ``batch_rows`` per worker
    (``score_table``'s threads) so memory stays bounded. Returns the number of rows."""
    source = pq.ParquetFile(input_path)
    missing = [c for c in scorer.required_columns if c not in source.schema_arrow.names]
    if missing:
        raise ValueError(f"scoring input {input_path} has no column {missing[0]!r} (columns: {source.schema_arrow.names})")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.parent / f".tmp-{output_path.name}-{os.getpid()}"
    rows = 0
    try:
        writer = None
        for batch in source.iter_batches(batch_size=batch_rows * workers):
            scored = scorer.score_table(pa.Table.from_batches([batch]), workers)
            writer = writer or pq.ParquetWriter(tmp, scored.schema, compression="zstd")
            writer.write_table(scored)
            rows += scored.num_rows
        if writer is None:  # no rows: still a valid file with the output schema
            empty = scorer.score_table(source.schema_arrow.empty_table())
            writer = pq.ParquetWriter(tmp, empty.schema, compression="zstd")
        writer.close()
        os.replace(tmp, output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return rows
