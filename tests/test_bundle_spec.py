"""The typed contract between export and scorer: spec.json read back exactly as written,
refused with the file and key named when a key is missing or mistyped; the aggregate
feature names; and the numeric transforms, which give the training table and the scorer
the very same float32 bits."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from features.examples import numeric_feature_expr
from serving.encoding import NUMERIC_TRANSFORMS, numeric_values
from serving.spec import (
    FUNNEL_TASKS,
    AggregateInput,
    AggregateKeySpec,
    BundleError,
    BundleSpec,
    EventFeatures,
    NumericInput,
    ScoringLimits,
    SnapshotSpec,
    SparseInput,
    TaskOutput,
    aggregate_feature_names,
)


def _spec() -> BundleSpec:
    names = aggregate_feature_names("user_category", [1, 7])
    return BundleSpec(
        format=1,
        source="events",
        inputs=("dense", "user_id", "price_bucket"),
        outputs=("p_click", "score"),
        tasks=(TaskOutput("click", "click", 1.0),),
        sparse=(
            SparseInput("user_id", "impressions", "user_id", "id", 100, 4, "sum", 3, vocab="vocab/user_id.parquet"),
            SparseInput("price_bucket", "items", "price", "bucket", 0, 0, "sum", 0, boundaries=(1.0, 10.0)),
        ),
        dense=(*(AggregateInput(n, "user_category") for n in names), NumericInput("price", "items", "price", "log1p")),
        scoring=ScoringLimits(1000, 1 << 20),
        events=EventFeatures(
            aggregate_keys=(
                AggregateKeySpec(
                    "user_category",
                    ("user_id", "category_id"),
                    {"user_id": "request", "category_id": "items"},
                    "features/aggregates/user_category.parquet",
                ),
            ),
            snapshots={
                "users": SnapshotSpec("features/users.parquet", "user_id"),
                "items": SnapshotSpec("features/items.parquet", "item_id"),
            },
            features_as_of=dt.date(2026, 11, 5),
            snapshot_day=dt.date(2026, 11, 4),
            defaults={"user_category": {n: 0.25 for n in names}},
        ),
    )


def test_spec_json_reads_back_as_written():
    spec = _spec()
    text = spec.to_json()
    assert BundleSpec.from_dict(json.loads(text)) == spec
    assert BundleSpec.from_dict(json.loads(text)).to_json() == text
    table = dataclasses.replace(
        spec, source="table", events=None, list_delimiter="|", dense=(NumericInput("price", "table", "price", "none"),)
    )
    assert BundleSpec.from_dict(json.loads(table.to_json())) == table
    assert "snapshots" not in json.loads(table.to_json())


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (("dense",), r"/b/spec\.json: key 'dense' is missing"),
        (("sparse", 1, "boundaries"), r"/b/spec\.json: key 'sparse\[1\]\.boundaries' is missing"),
        (("snapshots", "items", "key"), r"/b/spec\.json: key 'snapshots\.items\.key' is missing"),
        (
            ("aggregate_keys", 0, "sources", "category_id"),
            r"key 'aggregate_keys\[0\]\.sources\.category_id' is missing",
        ),
        (
            ("defaults", "user_category", "user_category_cvr_7d"),
            r"key 'defaults\.user_category\.user_category_cvr_7d' is missing",
        ),
    ],
)
def test_a_missing_key_is_named(path, message):
    spec = _spec().to_dict()
    parent = spec
    for part in path[:-1]:
        parent = parent[part]
    del parent[path[-1]]
    with pytest.raises(BundleError, match=message):
        BundleSpec.from_dict(spec, "/b/spec.json")


def test_a_mistyped_key_is_named():
    for change, message in [
        (
            lambda s: s["sparse"][0].update(capacity="100"),
            r"spec\.json: key 'sparse\[0\]\.capacity' must be an integer, got '100'",
        ),
        (
            lambda s: s["sparse"][0].update(kind="hashed"),
            r"key 'sparse\[0\]\.kind' must be one of \['id', 'list', 'bucket'\]",
        ),
        (
            lambda s: s["dense"][-1].update(transform="sqrt"),
            r"key 'dense\[10\]\.transform' must be one of \['none', 'log1p'\]",
        ),
        (lambda s: s.update(features_as_of="5 Nov"), r"key 'features_as_of' must be a day \(YYYY-MM-DD\), got '5 Nov'"),
        (lambda s: s.update(scoring=[1000]), r"spec\.json: scoring must be a JSON object, got list"),
    ]:
        spec = _spec().to_dict()
        change(spec)
        with pytest.raises(BundleError, match=message):
            BundleSpec.from_dict(spec)


def test_a_spec_from_before_the_server_timeouts_gets_the_default_limits():
    limits = ScoringLimits(5, 2048, 8, 1.5, 2.5, 3.5, 9, 0.0)
    assert BundleSpec.from_dict(dataclasses.replace(_spec(), scoring=limits).to_dict()).scoring == limits
    spec = _spec().to_dict()
    spec["scoring"] = {"max_candidates": 10, "max_body_bytes": 4096}
    assert BundleSpec.from_dict(spec).scoring == dataclasses.replace(
        ScoringLimits(), max_candidates=10, max_body_bytes=4096
    )
    for value in (0, -1.0, float("inf"), "5"):
        spec["scoring"]["idle_timeout_s"] = value
        with pytest.raises(BundleError, match=r"key 'scoring\.idle_timeout_s' must be a number of seconds above 0"):
            BundleSpec.from_dict(spec)
    spec["scoring"]["idle_timeout_s"] = 1.0
    spec["scoring"]["drain_timeout_s"] = 0  # no drain: allowed
    assert BundleSpec.from_dict(spec).scoring.drain_timeout_s == 0


def test_a_spec_from_before_configurable_tasks_is_the_funnel():
    spec = _spec().to_dict()
    del spec["tasks"], spec["source"]
    old = BundleSpec.from_dict(spec)
    assert old.tasks == FUNNEL_TASKS and old.source == "events"


def test_aggregate_feature_names_are_window_then_metric():
    assert aggregate_feature_names("user", [1, 7]) == [
        "user_imps_1d",
        "user_clicks_1d",
        "user_convs_1d",
        "user_ctr_1d",
        "user_cvr_1d",
        "user_imps_7d",
        "user_clicks_7d",
        "user_convs_7d",
        "user_ctr_7d",
        "user_cvr_7d",
    ]


EDGES = [
    0.0,
    -0.0,
    1.0,
    0.5,
    2.5,
    123456.789,
    -1.0,
    -0.5,
    -1e308,
    1e308,
    3.4028235e38,
    1e39,
    5e-324,
    -5e-324,
    1e-45,
    float("inf"),
    float("-inf"),
    float("nan"),
    None,
]


@pytest.mark.parametrize("transform", sorted(NUMERIC_TRANSFORMS))
def test_training_and_scorer_transform_numbers_to_the_same_bits(transform):
    """The examples stage (polars) and the scorer (pyarrow) give bit-identical float32,
    -0.0, overflow to inf, null and NaN included; ints are read as their float value."""
    values = pl.DataFrame({"x": pl.Series(EDGES, dtype=pl.Float64)})
    training = values.select(numeric_feature_expr("x", transform)).to_series()
    assert training.dtype == pl.Float32
    serving = numeric_values(pa.array(EDGES, pa.float64()), transform)
    assert serving.dtype == np.float32
    np.testing.assert_array_equal(training.to_numpy().view(np.uint32), serving.view(np.uint32))

    x = np.array([np.nan if v is None else v for v in EDGES])
    with np.errstate(over="ignore"):
        transformed = np.log1p(np.where(x < 0, 0.0, x)) if transform == "log1p" else x
        want = np.where(np.isnan(x), 0.0, transformed).astype(np.float32)
    np.testing.assert_array_equal(serving.view(np.uint32), want.view(np.uint32))
    assert np.signbit(serving[1])  # EDGES[1] = -0.0 stays -0.0 (the training tables always had it)

    ints = [0, -3, 7, None]
    training = pl.DataFrame({"x": ints}).select(numeric_feature_expr("x", transform)).to_series().to_numpy()
    np.testing.assert_array_equal(training, numeric_values(pa.array(ints, pa.int64()), transform))
