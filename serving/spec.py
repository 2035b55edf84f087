"""The bundle's ``spec.json``, typed: the one contract between export (which writes it) and
the scorer (which reads it). Frozen dataclasses, plain JSON, no torch and no pydantic.

What it holds: the model's ONNX inputs and outputs; the tasks (served view, score
exponent); how each sparse input is encoded from a raw column (kind, capacity, OOV
buckets, the vocabulary file or the bucket boundaries); each dense input (an aggregate
key's rolling feature, or a raw numeric column and its transform); the HTTP limits; and,
for a model trained on event logs (``source = "events"``), the snapshots and aggregate
tables the scorer joins to a request and the users' behaviour sequences as of the
bundle's day (``EventFeatures``). A ``[table]`` model's rows
carry every feature column themselves (``source = "table"``).

``BundleSpec.from_dict`` refuses a spec with a missing or mistyped key by a BundleError
naming the file and the key (``sparse[2].capacity``). Bundles written before tasks were
configurable have no ``tasks`` (the click -> conversion funnel) and no ``source``
(events); bundles written before behaviour sequences have no ``sequences`` (none); a
task without ``kind`` is binary (value tasks came later).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from serving.encoding import NUMERIC_TRANSFORMS, NumericTransform

SPEC_FILE = "spec.json"
SCORE = "score"  # the ranking score's output: product over tasks of p[served] ** score_exponent (value tasks: E[value])
TASK_KINDS = ("binary", "value")
# Point-in-time metrics kept per aggregate key and window, in dense-input order.
AGGREGATE_METRICS = ("imps", "clicks", "convs", "ctr", "cvr")
SOURCES = ("events", "table")
SPARSE_KINDS = ("id", "list", "bucket")
POOLINGS = ("sum", "mean")
KEY_SOURCES = ("request", "users", "items")  # where an aggregate-key column comes from when scoring
EVENT_TABLES = ("impressions", "users", "items")  # where an events bundle's input columns come from
SEQUENCE_EVENTS = ("click", "conversion")  # the events that fill a behaviour sequence
# where a feature carried per sequence element comes from: the element's item id, the
# item's attribute in the items snapshot, or the value on the impression clicked
SEQUENCE_SOURCES = ("item", "items", "impressions")


class BundleError(RuntimeError):
    """A bundle that cannot be served; the message names the file (and the key of spec.json)."""


def aggregate_feature_names(key: str, windows_days: Sequence[int]) -> list[str]:
    """The dense features of aggregate key ``key``, in model-input order: per window, per
    metric of AGGREGATE_METRICS, ``<key>_<metric>_<w>d`` (e.g. ``user_ctr_7d``)."""
    return [f"{key}_{metric}_{w}d" for w in windows_days for metric in AGGREGATE_METRICS]


def sequence_column(sequence: str, feature: str) -> str:
    """The training-table column of behaviour sequence ``sequence``'s elements encoded as
    sparse feature ``feature`` (a list of embedding rows per row, newest first)."""
    return f"{sequence}__{feature}"


def sequence_age_column(sequence: str) -> str:
    """The training-table column of each element's age in days (the row's day minus the
    event's day, >= 1), aligned with the sequence's ``sequence_column`` lists."""
    return f"{sequence}__age_days"


def probability_output(view: str) -> str:
    """The model output (and prediction column) of task view ``view``'s served probability."""
    return f"p_{view}"


def value_output(task: str) -> str:
    """The model output, prediction column and scorer result of value task ``task``'s
    expected value E[value | after] (e.g. ``e_revenue``)."""
    return f"e_{task}"


@dataclass(frozen=True)
class TaskOutput:
    """A task as the scorer returns it: a binary task's ``p_<name>`` is the model's output
    ``p_<served>``; a value task's (``kind = "value"``, served = its name) ``e_<name>`` is the
    output ``e_<name>``."""

    name: str
    served: str  # the task view served (a funnel step's joint probability, e.g. ctcvr)
    score_exponent: float
    kind: Literal["binary", "value"] = "binary"

    @property
    def output(self) -> str:
        """The ONNX output the scorer runs for it."""
        return value_output(self.served) if self.kind == "value" else probability_output(self.served)

    @property
    def result(self) -> str:
        """The name the scorer returns it under."""
        return value_output(self.name) if self.kind == "value" else probability_output(self.name)

    def to_dict(self) -> dict:
        out = {"name": self.name, "served": self.served, "score_exponent": self.score_exponent}
        return out | ({"kind": self.kind} if self.kind != "binary" else {})  # older readers: binary tasks only


# Bundles written before tasks were configurable: the click -> conversion funnel.
FUNNEL_TASKS = (TaskOutput("click", "click", 1.0), TaskOutput("conversion", "ctcvr", 1.0))


@dataclass(frozen=True)
class SparseInput:
    """An ONNX id input (named ``name``) encoded from raw ``column`` of ``table``: with the
    vocabulary file ``vocab`` (kind id or list) or into buckets by ``boundaries`` (kind bucket)."""

    name: str
    table: str  # impressions (a request column), users, items, or table
    column: str
    kind: Literal["id", "list", "bucket"]
    capacity: int
    oov_buckets: int
    pooling: Literal["sum", "mean"]
    vocab_version: int
    boundaries: tuple[float, ...] | None = None  # kind bucket
    vocab: str | None = None  # other kinds: the bundle file of the vocabulary


@dataclass(frozen=True)
class AggregateInput:
    """A dense input: one rolling feature of aggregate key ``key`` (its bundled table's column ``name``)."""

    name: str
    key: str


@dataclass(frozen=True)
class NumericInput:
    """A dense input: raw numeric ``column`` of ``table`` after ``transform``
    (serving.encoding.numeric_values). spec.json calls the table ``source``."""

    name: str
    table: str  # impressions (a request column), users, items, or table
    column: str
    transform: NumericTransform


@dataclass(frozen=True)
class ScoringLimits:
    """What the HTTP server (serving.http) lets one client hold. Export writes the training
    config's ``[scoring]`` (pipeline.config.ScoringConfig, whose defaults are these);
    ``funnelrank serve --config`` overrides them. A bundle written before a key existed
    gets its default here."""

    max_candidates: int = 1000  # per request
    max_body_bytes: int = 1 << 20
    max_context_value_chars: int = 256  # a longer context value is a 400
    header_timeout_s: float = 5.0  # from a request's first byte to the end of its headers (408, closed)
    body_timeout_s: float = 30.0  # to receive the body after the headers (408), and for the client to take the response
    idle_timeout_s: float = 30.0  # a keep-alive connection waiting this long for a request is closed
    max_connections: int = 256  # open at most: the longest idle one is closed to make room, else 503
    drain_timeout_s: float = 20.0  # on SIGTERM, for the requests in flight to be answered
    max_recent_events: int = 100  # a rank request's "recent" events at most (413 above)


@dataclass(frozen=True)
class AggregateKeySpec:
    """An aggregate key's bundled table (``file``: a ``key`` column of the joined key text,
    then its rolling features) and where each key column comes from when scoring."""

    name: str
    columns: tuple[str, ...]
    sources: dict[str, str]  # column -> "request" (a request column) or the snapshot holding it
    file: str


@dataclass(frozen=True)
class SnapshotSpec:
    """A bundled users or items snapshot and its key column (user_id, item_id)."""

    file: str
    key: str


@dataclass(frozen=True)
class SequenceItem:
    """A feature carried per element of a behaviour sequence: sparse input ``feature`` (whose
    vocabulary encodes it), read from ``source`` (SEQUENCE_SOURCES) ``column``."""

    feature: str
    source: Literal["item", "items", "impressions"]
    column: str


@dataclass(frozen=True)
class SequenceSpec:
    """A behaviour sequence: per ``key`` value (the user), its newest ``max_length`` events
    of kind ``event`` before the bundle's ``features_as_of`` day, no older than
    ``max_age_days`` (0: any age), in the bundled history ``file``: one row per element,
    by key, newest first: ``key`` (text), ``ts``, raw ``item_id``, then the ONNX inputs'
    values (``input_names``: each carried feature's embedding row, then the age in days)."""

    name: str
    event: Literal["click", "conversion"]
    key: str
    items: tuple[SequenceItem, ...]  # the first: the item id (source "item")
    max_length: int
    max_age_days: int
    file: str

    @property
    def input_names(self) -> tuple[str, ...]:
        """Its ONNX inputs: ``<name>__<feature>`` per carried feature, then ``<name>__age_days``."""
        return (*(sequence_column(self.name, i.feature) for i in self.items), sequence_age_column(self.name))


@dataclass(frozen=True)
class EventFeatures:
    """What an events bundle's scorer joins to a request: snapshots, aggregate tables and
    behaviour sequences."""

    aggregate_keys: tuple[AggregateKeySpec, ...]
    snapshots: dict[str, SnapshotSpec]  # users, items
    features_as_of: dt.date  # the aggregates' rolling features (and the sequences) as of the start of this day
    snapshot_day: dt.date
    defaults: dict[str, dict[str, float]]  # aggregate key -> feature -> value for a key with no history
    sequences: tuple[SequenceSpec, ...] = ()


@dataclass(frozen=True)
class BundleSpec:
    """The typed ``spec.json`` (see the module docstring)."""

    format: int
    source: Literal["events", "table"]
    inputs: tuple[str, ...]  # ONNX inputs: dense, the sparse inputs, then each sequence's
    outputs: tuple[str, ...]  # ONNX outputs: p_<view> per task view, then score
    tasks: tuple[TaskOutput, ...]
    sparse: tuple[SparseInput, ...]
    dense: tuple[AggregateInput | NumericInput, ...]  # the columns of the ONNX input ``dense``
    scoring: ScoringLimits
    list_delimiter: str | None = None  # a table bundle: the delimiter of a list cell read as text
    events: EventFeatures | None = None  # an events bundle's joins; None for a table bundle

    def to_dict(self) -> dict:
        """spec.json's content (the keys ``from_dict`` reads)."""
        out = {
            "format": self.format,
            "source": self.source,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "tasks": [t.to_dict() for t in self.tasks],
            "sparse": [_sparse_dict(f) for f in self.sparse],
            "dense": [
                {"name": d.name, "source": "aggregate", "key": d.key}
                if isinstance(d, AggregateInput)
                else {"name": d.name, "source": d.table, "column": d.column, "transform": d.transform}
                for d in self.dense
            ],
            "scoring": asdict(self.scoring),
        }
        if self.list_delimiter is not None:
            out["list_delimiter"] = self.list_delimiter
        if self.events is not None:
            e = self.events
            out["aggregate_keys"] = [
                {"name": k.name, "columns": list(k.columns), "sources": dict(k.sources), "file": k.file}
                for k in e.aggregate_keys
            ]
            out["snapshots"] = {t: {"file": s.file, "key": s.key} for t, s in e.snapshots.items()}
            out["features_as_of"] = e.features_as_of.isoformat()
            out["snapshot_day"] = e.snapshot_day.isoformat()
            out["defaults"] = {k: dict(v) for k, v in e.defaults.items()}
            out["sequences"] = [
                {
                    "name": q.name,
                    "event": q.event,
                    "key": q.key,
                    "items": [{"feature": i.feature, "source": i.source, "column": i.column} for i in q.items],
                    "max_length": q.max_length,
                    "max_age_days": q.max_age_days,
                    "file": q.file,
                }
                for q in e.sequences
            ]
        return out

    def to_json(self) -> str:
        """The text of spec.json."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def files(self) -> list[tuple[str, str]]:
        """(key of spec.json, bundle file) of every file the spec names: vocabularies,
        snapshots, aggregate tables and sequence histories."""
        out = [(f"sparse[{i}].vocab", f.vocab) for i, f in enumerate(self.sparse) if f.vocab is not None]
        if self.events is not None:
            out += [(f"snapshots.{t}.file", s.file) for t, s in self.events.snapshots.items()]
            out += [(f"aggregate_keys[{i}].file", k.file) for i, k in enumerate(self.events.aggregate_keys)]
            out += [(f"sequences[{i}].file", q.file) for i, q in enumerate(self.events.sequences)]
        return out

    @classmethod
    def from_dict(cls, spec: object, file: str = SPEC_FILE) -> BundleSpec:
        """The spec of spec.json's parsed content; BundleError naming ``file`` and the key
        when one is missing or of the wrong type."""
        top = _Object(spec, file, "")
        source = top.choice("source", SOURCES, default="events")
        tasks = top.objects("tasks", default=None)
        tables = EVENT_TABLES if source == "events" else None  # a table bundle's rows carry every column
        dense = tuple(_dense(d, tables) for d in top.objects("dense"))
        sparse = tuple(_sparse(f, tables) for f in top.objects("sparse"))
        if source == "table" and any(isinstance(d, AggregateInput) for d in dense):
            raise BundleError(f"{file}: a table bundle's dense inputs are numeric columns, got aggregate features")
        return cls(
            format=top.integer("format"),
            source=source,
            inputs=top.texts("inputs"),
            outputs=top.texts("outputs"),
            tasks=FUNNEL_TASKS
            if tasks is None
            else tuple(
                TaskOutput(
                    t.text("name"),
                    t.text("served"),
                    t.number("score_exponent"),
                    t.choice("kind", TASK_KINDS, default="binary"),
                )
                for t in tasks
            ),
            sparse=sparse,
            dense=dense,
            scoring=_scoring_limits(top.object("scoring")),
            list_delimiter=top.text("list_delimiter", default=None),
            events=_event_features(top, dense, sparse) if source == "events" else None,
        )


def _scoring_limits(o: _Object) -> ScoringLimits:
    """Every bundle has max_candidates and max_body_bytes; the other limits came later, and
    a bundle without them gets their defaults."""
    default = ScoringLimits()
    return ScoringLimits(
        max_candidates=o.integer("max_candidates", minimum=1),
        max_body_bytes=o.integer("max_body_bytes", minimum=1),
        max_context_value_chars=o.integer(
            "max_context_value_chars", minimum=1, default=default.max_context_value_chars
        ),
        header_timeout_s=o.seconds("header_timeout_s", default.header_timeout_s),
        body_timeout_s=o.seconds("body_timeout_s", default.body_timeout_s),
        idle_timeout_s=o.seconds("idle_timeout_s", default.idle_timeout_s),
        max_connections=o.integer("max_connections", minimum=1, default=default.max_connections),
        drain_timeout_s=o.seconds("drain_timeout_s", default.drain_timeout_s, zero_ok=True),
        max_recent_events=o.integer("max_recent_events", minimum=0, default=default.max_recent_events),
    )


def _sparse_dict(f: SparseInput) -> dict:
    out = {
        "name": f.name,
        "table": f.table,
        "column": f.column,
        "kind": f.kind,
        "capacity": f.capacity,
        "oov_buckets": f.oov_buckets,
        "pooling": f.pooling,
        "vocab_version": f.vocab_version,
    }
    if f.kind == "bucket":
        out["boundaries"] = list(f.boundaries or ())
    else:
        out["vocab"] = f.vocab
    return out


def _table(o: _Object, key: str, tables: tuple[str, ...] | None) -> str:
    """The table an input comes from: one of ``tables`` (None: any)."""
    return o.text(key) if tables is None else o.choice(key, tables)


def _sparse(f: _Object, tables: tuple[str, ...] | None) -> SparseInput:
    kind = f.choice("kind", SPARSE_KINDS)
    least = None if kind == "bucket" else 1  # a bucket feature's rows come from its boundaries
    return SparseInput(
        name=f.text("name"),
        table=_table(f, "table", tables),
        column=f.text("column"),
        kind=kind,
        capacity=f.integer("capacity", least),
        oov_buckets=f.integer("oov_buckets", least),
        pooling=f.choice("pooling", POOLINGS),
        vocab_version=f.integer("vocab_version"),
        boundaries=f.numbers("boundaries") if kind == "bucket" else None,
        vocab=f.text("vocab") if kind != "bucket" else None,
    )


def _dense(d: _Object, tables: tuple[str, ...] | None) -> AggregateInput | NumericInput:
    source = _table(d, "source", None if tables is None else ("aggregate", *tables))
    if source == "aggregate":
        return AggregateInput(d.text("name"), d.text("key"))
    transform = d.choice("transform", tuple(NUMERIC_TRANSFORMS))
    return NumericInput(d.text("name"), source, d.text("column"), transform)


def _event_features(
    top: _Object, dense: tuple[AggregateInput | NumericInput, ...], sparse: tuple[SparseInput, ...]
) -> EventFeatures:
    keys = tuple(_aggregate_key(k) for k in top.objects("aggregate_keys"))
    snapshots = top.object("snapshots")
    defaults = top.object("defaults")
    # Every aggregate input needs its no-history value: the scorer fills it in for unseen keys.
    wanted = {k.name: [d.name for d in dense if isinstance(d, AggregateInput) and d.key == k.name] for k in keys}
    return EventFeatures(
        aggregate_keys=keys,
        snapshots={
            t: SnapshotSpec(snapshots.object(t).text("file"), snapshots.object(t).text("key"))
            for t in ("users", "items")
        },
        features_as_of=top.day("features_as_of"),
        snapshot_day=top.day("snapshot_day"),
        defaults={k: {n: defaults.object(k).number(n) for n in names} for k, names in wanted.items()},
        sequences=tuple(_sequence(q, sparse) for q in top.objects("sequences", default=[])),
    )


def _sequence(q: _Object, sparse: tuple[SparseInput, ...]) -> SequenceSpec:
    """A sequence whose carried features are id inputs of the spec, the first its item id."""
    ids = {f.name for f in sparse if f.kind == "id"}
    items = []
    for i in q.objects("items"):
        feature = i.text("feature")
        if feature not in ids:
            raise BundleError(
                f"{q.file}: key {i._key('feature')!r} names {feature!r}, which is not an id input of key 'sparse'"
            )
        items.append(SequenceItem(feature, i.choice("source", SEQUENCE_SOURCES), i.text("column")))
    if not items or items[0].source != "item" or any(i.source == "item" for i in items[1:]):
        raise BundleError(f"{q.file}: key {q._key('items')!r} must start with the item id (source 'item'), and only it")
    return SequenceSpec(
        name=q.text("name"),
        event=q.choice("event", SEQUENCE_EVENTS),
        key=q.text("key"),
        items=tuple(items),
        max_length=q.integer("max_length", minimum=1),
        max_age_days=q.integer("max_age_days", minimum=0),
        file=q.text("file"),
    )


def _aggregate_key(k: _Object) -> AggregateKeySpec:
    columns = k.texts("columns")
    sources = k.object("sources")
    return AggregateKeySpec(
        k.text("name"), columns, {c: sources.choice(c, KEY_SOURCES) for c in columns}, k.text("file")
    )


_REQUIRED = object()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Object:
    """One JSON object of spec.json; each getter checks the value's type and raises a
    BundleError naming the file and the key's path (``sparse[2].capacity``) when it is
    missing (and has no default) or mistyped."""

    def __init__(self, value: object, file: str, path: str) -> None:
        if not isinstance(value, dict):
            raise BundleError(f"{file}: {path or 'the top level'} must be a JSON object, got {type(value).__name__}")
        self.value, self.file, self.path = value, file, path

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, ok, what: str, default=_REQUIRED):
        if key not in self.value:
            if default is _REQUIRED:
                raise BundleError(f"{self.file}: key {self._key(key)!r} is missing")
            return default
        value = self.value[key]
        if not ok(value):
            raise BundleError(f"{self.file}: key {self._key(key)!r} must be {what}, got {value!r}")
        return value

    def text(self, key: str, default=_REQUIRED) -> str:
        return self._get(key, lambda v: isinstance(v, str), "a string", default)

    def integer(self, key: str, minimum: int | None = None, default=_REQUIRED) -> int:
        value = self._get(key, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", default)
        if minimum is not None and value < minimum:
            raise BundleError(f"{self.file}: key {self._key(key)!r} must be at least {minimum}, got {value!r}")
        return value

    def number(self, key: str) -> float:
        return self._get(key, _is_number, "a number")

    def seconds(self, key: str, default=_REQUIRED, zero_ok: bool = False) -> float:
        """A finite duration, above 0 (at least 0 when ``zero_ok``)."""
        least = "at least 0" if zero_ok else "above 0"
        return self._get(
            key,
            lambda v: _is_number(v) and math.isfinite(v) and (v > 0 or zero_ok and v == 0),
            f"a number of seconds {least}",
            default,
        )

    def choice(self, key: str, allowed: tuple[str, ...], default=_REQUIRED) -> str:
        return self._get(key, lambda v: v in allowed, f"one of {list(allowed)}", default)

    def day(self, key: str) -> dt.date:
        text = self.text(key)
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            raise BundleError(f"{self.file}: key {self._key(key)!r} must be a day (YYYY-MM-DD), got {text!r}") from None

    def texts(self, key: str) -> tuple[str, ...]:
        return tuple(
            self._get(key, lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings")
        )

    def numbers(self, key: str) -> tuple[float, ...]:
        return tuple(self._get(key, lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list of numbers"))

    def object(self, key: str) -> _Object:
        return _Object(self._get(key, lambda v: True, ""), self.file, self._key(key))

    def objects(self, key: str, default=_REQUIRED) -> list[_Object] | None:
        values = self._get(key, lambda v: isinstance(v, list), "a list", default)
        if values is default:
            return default
        return [_Object(v, self.file, f"{self._key(key)}[{i}]") for i, v in enumerate(values)]
