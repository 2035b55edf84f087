"""The scorer: bundle + rows -> p_<task> per task (the task's served probability), e_<task>
per value task (its expected value E[value | after]) and the blended ranking score. For the
default funnel: p_click and p_conversion = P(click and conversion).

A ``Scorer`` runs the bundle's ONNX model on the inputs its rows give; which inputs a row
gives depends on the bundle's ``source`` (spec.json, written by pipeline/bundle.py):

* **events** (a model trained on event logs): rows name a user, an item and a context;
  serving.event_inputs joins the bundled snapshots and aggregates to them. ``score_table``
  scores an Arrow table of such rows (the CLI's batch scoring); ``score`` ranks a request's
  candidates (one user, a context, candidate items). The HTTP server uses
  ``request_feeds`` + ``run`` (coalescing concurrent requests with ``merge_feeds``).
* **table** (a model trained on the user's own feature table, ``[table]``): rows carry
  every feature column themselves (serving.table_inputs); ``score_table`` only. There are
  no users or items to rank: ``score`` (and HTTP ``/v1/rank``) refuse with ``BatchOnlyError``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq

from serving.bundle import MODEL_FILE, Bundle
from serving.event_inputs import EventInputs
from serving.spec import SCORE, BundleError
from serving.table_inputs import TableInputs

# The model runs on slices of this many rows: a few MB of activations stay in cache
# (measured on 2 cores: 4096-row slices ~1.7x the rows/s of one 200k-row run).
ONNX_CHUNK_ROWS = 4096
BATCH_CHUNK_ROWS = 65_536  # score_table's unit of work per thread (large enough to amortise per-call costs)


class BatchOnlyError(ValueError):
    """A ranking request for a table bundle, which scores rows in batch only."""


class Scorer:
    """Scores rows with a verified bundle: the ONNX session, and the bundle's rows -> inputs
    (``inputs``: EventInputs or TableInputs by the spec's source). Thread-safe."""

    def __init__(self, bundle: Bundle, intra_op_threads: int = 1) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads > 1:  # idle pool threads yield the core instead of spinning (the server shares 2 cores)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.model_outputs = [t.output for t in self.spec.tasks] + [SCORE]  # the ONNX outputs run
        self.session = _load_model(bundle, options, self.model_outputs)
        self.result_names = (*(t.result for t in self.spec.tasks), SCORE)  # what they are returned as
        # the rows -> inputs of the bundle's source
        self.inputs: EventInputs | TableInputs = (TableInputs if self.spec.source == "table" else EventInputs)(bundle)

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def required_columns(self) -> tuple[str, ...]:
        """The columns every row to score must have."""
        return self.inputs.required_columns

    def feeds(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The ONNX inputs of ``table``'s rows."""
        return self.inputs.feeds(table)

    def run(self, feeds: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, ...]:
        """The ``result_names`` values (p_<task> or e_<task> per task, then score) of ``n`` rows' ONNX inputs."""
        slices = [
            self.session.run(self.model_outputs, {k: v[a : a + ONNX_CHUNK_ROWS] for k, v in feeds.items()})
            for a in range(0, n, ONNX_CHUNK_ROWS)
        ]
        if len(slices) == 1:
            return tuple(slices[0])
        return tuple(np.concatenate(parts) for parts in zip(*slices, strict=True))

    def score_table(self, table: pa.Table, workers: int = 1) -> pa.Table:
        """``table`` with ``result_names`` appended: p_<task> per task (the default funnel:
        p_click, p_conversion = P(click and conversion)), e_<task> per value task and score.

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
            outputs = tuple(np.concatenate(values) for values in zip(*parts, strict=True))
        for name, values in zip(self.result_names, outputs, strict=True):
            table = table.append_column(name, pa.array(values, pa.float32()))
        return table

    def check_rankable(self) -> None:
        """BatchOnlyError for a table bundle: it has no users or items to rank."""
        if not isinstance(self.inputs, EventInputs):
            raise BatchOnlyError(
                f"bundle {self.bundle.path} holds a model trained on a feature table ([table] source): it scores "
                "rows in batch, each row carrying its own feature columns (`funnelrank score --bundle B --input "
                "rows.parquet --output scores.parquet`, Scorer.score_table); it cannot rank a user's candidates"
            )

    def request_table(self, request: dict) -> pa.Table:
        """A ``score`` request as the table ``score_table`` takes (context repeated per row)."""
        self.check_rankable()
        return self.inputs.request_table(request)

    def request_feeds(self, request: dict) -> tuple[list[str], dict[str, np.ndarray]]:
        """(candidate item ids, ONNX inputs) of a ``score`` request: the same inputs as
        ``feeds(request_table(request))``, with the user and context looked up once."""
        self.check_rankable()
        return self.inputs.request_feeds(request)

    def score(self, request: dict) -> list[dict]:
        """Rank ``request``'s candidates: [{item_id, p_<task>..., e_<value task>..., score}] by
        score desc (the default funnel: item_id, p_click, p_conversion, score)."""
        item_ids, feeds = self.request_feeds(request)
        return ranked(item_ids, self.result_names, self.run(feeds, len(item_ids)))


def _load_model(bundle: Bundle, options: ort.SessionOptions, outputs: list[str]) -> ort.InferenceSession:
    """The bundle's ONNX model as a session, checked against its spec: it takes the inputs
    the scorer feeds (spec.json's sparse and dense) and gives ``outputs``; BundleError otherwise."""
    model = bundle.data(MODEL_FILE)
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime's errors (InvalidProtobuf, ...) derive from Exception only
        raise BundleError(
            f"bundle {bundle.path}: {MODEL_FILE} ({len(model):,} bytes) is not a model onnxruntime can load: {err}"
        ) from None
    spec, where = bundle.spec, f"bundle {bundle.path}: {MODEL_FILE}"
    takes = {i.name: i.shape for i in session.get_inputs()}
    fed = ["dense", *(f.name for f in spec.sparse)]
    fed += [name for q in (spec.events.sequences if spec.events else ()) for name in q.input_names]
    if sorted(takes) != sorted(fed):
        raise BundleError(
            f"{where} takes the inputs {sorted(takes)}, but spec.json's sparse and dense keys give {sorted(fed)} "
            "(its sequences' inputs included)"
        )
    width = takes["dense"][-1]
    if isinstance(width, int) and width != len(spec.dense):
        raise BundleError(f"{where} takes {width} dense features, spec.json's key 'dense' lists {len(spec.dense)}")
    gives = {o.name for o in session.get_outputs()}
    missing = [o for o in outputs if o not in gives]
    if missing:
        raise BundleError(
            f"{where} has no output {missing[0]!r} (outputs {sorted(gives)}), which spec.json's key 'tasks' serves"
        )
    return session


def ranking_order(names: tuple[str, ...], outputs: tuple[np.ndarray, ...]) -> np.ndarray:
    """The candidates' rows by score descending, ties in the request's order (``names``: the
    outputs' names, one of them ``score``)."""
    return np.argsort(-outputs[names.index(SCORE)], kind="stable")


def ranked(item_ids: list[str], names: tuple[str, ...], outputs: tuple[np.ndarray, ...]) -> list[dict]:
    """Candidates with their predictions (``names``: their keys, one of them ``score``), in
    ranking_order."""
    order = ranking_order(names, outputs)
    rows = [{"item_id": item_ids[k]} for k in order.tolist()]
    for name, values in zip(names, outputs, strict=True):  # a column at a time: ~2x faster than dict(zip(...)) per row
        for row, value in zip(rows, values[order].tolist(), strict=True):
            row[name] = value
    return rows


def merge_feeds(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several requests' ONNX inputs as one batch (list inputs padded with -1 to the widest)."""
    merged = {}
    for name in parts[0]:
        arrays = [p[name] for p in parts]
        if arrays[0].ndim == 2 and name != "dense":
            width = max(a.shape[1] for a in arrays)
            arrays = [
                a if a.shape[1] == width else np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-1)
                for a in arrays
            ]
        merged[name] = np.concatenate(arrays)
    return merged


def score_parquet(
    scorer: Scorer,
    input_path: str | Path,
    output_path: str | Path,
    batch_rows: int = BATCH_CHUNK_ROWS,
    workers: int = 1,
) -> int:
    """Score every row of a Parquet file (an events bundle: user_id, item_id, context
    columns; a table bundle: its feature columns) into ``output_path`` (the input columns
    + ``scorer.result_names``), written atomically, in batches of ``batch_rows`` per worker
    (``score_table``'s threads) so memory stays bounded. Returns the number of rows."""
    source = pq.ParquetFile(input_path)
    missing = [c for c in scorer.required_columns if c not in source.schema_arrow.names]
    if missing:
        raise ValueError(
            f"scoring input {input_path} has no column {missing[0]!r} (columns: {source.schema_arrow.names})"
        )
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
