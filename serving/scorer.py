"""The scorer: bundle + request rows -> p_click, p_conversion and the blended score.

One code path: ``score_table`` scores an Arrow table of (user_id, item_id, context
columns) rows, vectorised; ``score`` (one user, a context, candidate items) builds such a
table and calls it; the CLI and the HTTP server use these two.

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
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serving.bundle import Bundle
from serving.encoding import KeyIndex, join_key_columns, pad_jagged, vocab_encoder

REQUIRED_COLUMNS = ("user_id", "item_id")
RESULT_COLUMNS = ("p_click", "p_conversion", "score")
# The model runs on slices of this many rows: a few MB of activations stay in cache
# (measured on 2 cores: 4096-row slices ~1.7x the rows/s of one 200k-row run).
ONNX_CHUNK_ROWS = 4096


def _numeric(values: pa.Array | pa.ChunkedArray, transform: str) -> np.ndarray:
    """A raw numeric column as the model's dense input (features.examples' rule):
    float, log1p of the value clipped at 0 when asked, null/NaN -> 0."""
    x = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
    x = np.where(np.isnan(x), 0.0, x)  # nulls arrive as NaN
    if transform == "log1p":
        x = np.log1p(np.maximum(x, 0.0))
    return x.astype(np.float32)


def _per_snapshot_row(rows: np.ndarray, at_load: np.ndarray, values: pa.Array, lookup) -> np.ndarray:
    """``at_load[rows]`` (a value precomputed per snapshot row), with ``lookup(values)`` for
    the rows whose key is not in the snapshot (row ``len(at_load)``: unknown or null key)."""
    n = len(at_load)
    miss = rows >= n
    if not miss.any():
        return at_load[rows]
    if n == 0:
        return lookup(values)
    out = at_load[np.minimum(rows, n - 1)]
    out[miss] = lookup(values.filter(pa.array(miss)))
    return out


class _Snapshot:
    """The users or items snapshot; row ``n`` (one past the end) is the 'not found' row."""

    def __init__(self, table: pa.Table, key: str) -> None:
        self.index = KeyIndex(table.column(key))
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

    def list_ids(self, feature: str, rows: np.ndarray) -> np.ndarray:
        padded, lengths = self.lists[feature]
        width = max(1, int(lengths[rows].max(initial=0)))
        return np.ascontiguousarray(padded[rows, :width])


class _Aggregate:
    """One aggregate key's rolling features; the last matrix row holds the defaults."""

    def __init__(self, table: pa.Table, names: list[str], defaults: dict[str, float]) -> None:
        self.index = KeyIndex(table.column("key"))
        rows = [table.column(n).to_numpy().astype(np.float32) for n in names]
        self.matrix = np.vstack([np.column_stack(rows) if rows else np.zeros((table.num_rows, 0), np.float32),
                                 np.array([[defaults[n] for n in names]], np.float32)])

    def features(self, keys: pa.Array) -> np.ndarray:
        pos = self.index.positions(keys)
        return self.matrix[np.where(pos < 0, len(self.matrix) - 1, pos)]


class Scorer:
    """Scores request rows with a verified bundle (see the module docstring). Thread-safe."""

    def __init__(self, bundle: Bundle, intra_op_threads: int = 1) -> None:
        self.bundle = bundle
        spec = self.spec = bundle.spec
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(bundle.file("model.onnx")), options, providers=["CPUExecutionProvider"])
        self.snapshots = {t: _Snapshot(pq.read_table(bundle.file(s["file"])), s["key"]) for t, s in spec["snapshots"].items()}
        self.encoders = {}
        for f in spec["sparse"]:
            if f["table"] == "impressions":
                vocab = pq.read_table(bundle.file(f["vocab"]), columns=["key", "index"])
                admitted = pc.greater(vocab.column("index"), 0)
                self.encoders[f["name"]] = vocab_encoder(
                    vocab.column("key").filter(admitted), vocab.column("index").filter(admitted).to_numpy(), f["capacity"], f["oov_buckets"]
                )
        dense_names = [d["name"] for d in spec["dense"]]
        self.n_dense = len(dense_names)
        self.aggregates = []  # (key spec, _Aggregate, positions of its columns in the dense input)
        for key in spec["aggregate_keys"]:
            names = [d["name"] for d in spec["dense"] if d["source"] == "aggregate" and d["key"] == key["name"]]
            table = pq.read_table(bundle.file(key["file"]))
            self.aggregates.append((key, _Aggregate(table, names, spec["defaults"][key["name"]]), [dense_names.index(n) for n in names]))
        # A request column that is a snapshot's key (user_id, item_id) is looked up once, in
        # that snapshot; its vocabulary ids and its single-column aggregates are precomputed
        # per snapshot row here, so only keys missing from the snapshot are looked up again.
        self.key_snapshot = {s["key"]: t for t, s in spec["snapshots"].items()}
        self.encoded_at_load = {name: self.encoders[name](self.snapshots[self.key_snapshot[column]].index.keys)
                                for name, column in ((f["name"], f["column"]) for f in spec["sparse"] if f["table"] == "impressions")
                                if column in self.key_snapshot}
        self.aggregate_at_load = {key["name"]: aggregate.features(self.snapshots[self.key_snapshot[key["columns"][0]]].index.keys)
                                  for key, aggregate, _ in self.aggregates if self._keyed_by_snapshot(key)}
        # Request columns besides user_id/item_id: context features and aggregate-key parts.
        context = [f["column"] for f in spec["sparse"] if f["table"] == "impressions"]
        context += [d["column"] for d in spec["dense"] if d["source"] == "impressions"]
        context += [c for k in spec["aggregate_keys"] for c, src in k["sources"].items() if src == "request"]
        self.context_columns = [c for c in dict.fromkeys(context) if c not in REQUIRED_COLUMNS]

    def _keyed_by_snapshot(self, key: dict) -> bool:
        columns = key["columns"]
        return len(columns) == 1 and key["sources"][columns[0]] == "request" and columns[0] in self.key_snapshot

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
        n = table.num_rows
        keys = {column: self._column(table, column) for column in self.key_snapshot}
        rows = {t: self.snapshots[t].rows(keys[column]) for column, t in self.key_snapshot.items()}
        feeds: dict[str, np.ndarray] = {}
        for f in self.spec["sparse"]:
            name, source = f["name"], f["table"]
            if name in self.encoded_at_load:
                column = f["column"]
                feeds[name] = _per_snapshot_row(rows[self.key_snapshot[column]], self.encoded_at_load[name], keys[column], self.encoders[name])
            elif source == "impressions":
                feeds[name] = self.encoders[name](self._column(table, f["column"]))
            elif f["kind"] == "list":
                feeds[name] = self.snapshots[source].list_ids(name, rows[source])
            else:
                feeds[name] = self.snapshots[source].ids[name][rows[source]]
        dense = np.empty((n, self.n_dense), np.float32)
        for j, d in enumerate(self.spec["dense"]):
            if d["source"] == "impressions":
                dense[:, j] = _numeric(self._column(table, d["column"]), d["transform"])
            elif d["source"] in self.snapshots:
                dense[:, j] = self.snapshots[d["source"]].dense[d["name"]][rows[d["source"]]]
        for key, aggregate, positions in self.aggregates:
            if key["name"] in self.aggregate_at_load:
                column = key["columns"][0]
                dense[:, positions] = _per_snapshot_row(rows[self.key_snapshot[column]], self.aggregate_at_load[key["name"]],
                                                        keys[column], aggregate.features)
                continue
            parts = [self._column(table, c) if src == "request" else self.snapshots[src].raw_values(c, rows[src])
                     for c, src in ((c, key["sources"][c]) for c in key["columns"])]
            dense[:, positions] = aggregate.features(join_key_columns(parts))
        feeds["dense"] = dense
        return feeds

    def score_table(self, table: pa.Table) -> pa.Table:
        """``table`` with p_click, p_conversion (= P(click and conversion)) and score appended."""
        if table.num_rows == 0:
            return table.append_column("p_click", pa.array([], pa.float32())).append_column(
                "p_conversion", pa.array([], pa.float32())).append_column("score", pa.array([], pa.float32()))
        feeds = self.feeds(table)
        slices = [self.session.run(["p_click", "p_ctcvr", "score"], {k: v[a : a + ONNX_CHUNK_ROWS] for k, v in feeds.items()})
                  for a in range(0, table.num_rows, ONNX_CHUNK_ROWS)]
        p_click, p_ctcvr, score = (np.concatenate(parts) for parts in zip(*slices))
        for name, values in zip(RESULT_COLUMNS, (p_click, p_ctcvr, score)):
            table = table.append_column(name, pa.array(values, pa.float32()))
        return table

    def request_table(self, request: dict) -> pa.Table:
        """A ``score`` request as the table ``score_table`` takes (context repeated per row)."""
        user_id, context, candidates = request["user_id"], request.get("context") or {}, request["candidates"]
        items = pa.array([c["item_id"] for c in candidates], pa.large_string())
        n = len(items)
        repeat = pa.array(np.zeros(n, np.int64))
        columns = {"user_id": pa.array([user_id], pa.large_string()).take(repeat), "item_id": items}
        for name in self.context_columns:
            if context.get(name) is not None:
                columns[name] = pa.array([context[name]]).take(repeat)
        return pa.table(columns)

    def score(self, request: dict) -> list[dict]:
        """Rank ``request``'s candidates: [{item_id, p_click, p_conversion, score}] by score desc."""
        scored = self.score_table(self.request_table(request))
        order = np.argsort(-scored.column("score").to_numpy(), kind="stable")
        columns = [scored.column(c).to_numpy()[order].tolist() for c in ("p_click", "p_conversion", "score")]
        items = scored.column("item_id").take(pa.array(order)).to_pylist()
        return [{"item_id": i, "p_click": a, "p_conversion": b, "score": s} for i, a, b, s in zip(items, *columns)]


def score_parquet(scorer: Scorer, input_path: str | Path, output_path: str | Path, batch_rows: int = 65_536) -> int:
    """Score every row of a Parquet file (user_id, item_id, context columns) into
    ``output_path`` (the input columns + RESULT_COLUMNS), written atomically, in batches
    of ``batch_rows`` so memory stays bounded. Returns the number of rows."""
    source = pq.ParquetFile(input_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in source.schema_arrow.names]
    if missing:
        raise ValueError(f"scoring input {input_path} has no column {missing[0]!r} (columns: {source.schema_arrow.names})")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.parent / f".tmp-{output_path.name}-{os.getpid()}"
    rows = 0
    try:
        writer = None
        for batch in source.iter_batches(batch_size=batch_rows):
            scored = scorer.score_table(pa.Table.from_batches([batch]))
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
