"""Value as a task: a regression on conversion_value after the conversion task. The config
is validated at load, the losses and metrics do what they say, a trained value head beats
the constant predictor on a held-out day, the ONNX graph and the scorer carry e_<task> and
blend it into the score, and the gate can judge a value task's metrics."""

from __future__ import annotations

import datetime as dt
import json
import tomllib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from bundle_fixture import ROOT, START, build_warehouse, tiny_config, users_and_items

from features.catalog import raw_dir, training_dir
from features.config import ConfigError, TaskConfig
from features.errors import DataContractError, StageError
from features.synthetic import AGE_BUCKETS, BASKET_SIZE
from features.table_source import prepare_table
from models.calibration import ServedProbabilities
from models.loader import parquet_files, table_loader
from models.losses import task_losses
from models.metrics import mae, normalized_gini, rmse, value_metrics
from models.nets import ModelOutput
from models.predict import predict
from models.tracking import to_toml
from pipeline.bundle import export_bundle
from pipeline.config import load_config, parse_config
from pipeline.registry import gate
from pipeline.train_stage import train_run
from serving.bundle import load_bundle
from serving.scorer import Scorer
from serving.spec import BundleError, BundleSpec, TaskOutput, value_output

FUNNEL = [
    {"name": "click"},
    {"name": "conversion", "after": "click", "joint_name": "ctcvr", "conditional_name": "cvr"},
]
REVENUE = {"name": "revenue", "kind": "value", "label": "conversion_value", "after": "conversion"}


def demo_with(tasks: list[dict], **sections):
    return load_config(ROOT / "configs" / "demo.toml", {"tasks": tasks, **sections})


def value_tasks(**revenue) -> list[TaskConfig]:
    return [TaskConfig(**t) for t in FUNNEL] + [TaskConfig(**(REVENUE | revenue))]


# ---------------------------------------------------------------- config


def test_a_value_task_loads_with_its_views_labels_and_metrics():
    cfg = demo_with(
        [*FUNNEL, REVENUE | {"score_exponent": 0.5}],
        train={"early_stopping_metric": "revenue_rmse"},
        promote={"rule": "point", "gate_metrics": ["ctcvr_auc", "revenue_gini", "revenue_mae"]},
    )
    assert list(cfg.views()) == ["click", "ctcvr", "cvr"]  # a value is no probability view
    view = cfg.value_views()["revenue"]
    assert (view.label, view.after_label, view.after_view) == ("conversion_value", "conversion", "ctcvr")
    assert cfg.label_columns == ["click", "conversion", "conversion_value"]
    assert cfg.value_label_columns == ["conversion_value"]
    # a dumped config (what a run logs to MLflow as config.toml) loads again
    assert parse_config(tomllib.loads(to_toml(cfg.model_dump(by_alias=True)))) == cfg
    # sampling the click negatives keeps every conversion, so the value task's rows are exact
    assert demo_with([*FUNNEL, REVENUE], train={"negative_sampling_rate": 0.5}).train.negative_sampling_rate == 0.5


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([*FUNNEL, REVENUE | {"after": None}], "kind = 'value' needs after"),
        ([*FUNNEL, REVENUE | {"after": "purchase"}], "tasks[2].after: 'purchase' is not a task"),
        ([*FUNNEL, REVENUE, REVENUE | {"name": "margin", "after": "revenue"}], "tasks[3].after: 'revenue' is a value"),
        ([*FUNNEL, REVENUE | {"label": "price"}], "tasks[2].label: 'price' is not a numeric column"),
        ([*FUNNEL, REVENUE | {"joint_name": "x", "conditional_name": "y"}], "has no joint_name"),
        ([FUNNEL[0] | {"value_loss": "tweedie"}, FUNNEL[1]], "value_loss are for kind = 'value'"),
        ([FUNNEL[0], FUNNEL[1] | {"tweedie_power": 1.2}], "tweedie_power are for kind = 'value'"),
        ([REVENUE | {"after": "click"}, *FUNNEL], "tasks[0]: the first task 'revenue' must be binary"),
        ([*FUNNEL, REVENUE | {"value_loss": "poisson"}], "tasks[2].value_loss"),
        ([*FUNNEL, REVENUE | {"value_loss": "tweedie", "tweedie_power": 2.5}], "tasks[2].tweedie_power"),
        ([*FUNNEL, REVENUE | {"name": "ctcvr"}], "repeated: ctcvr"),
    ],
)
def test_a_bad_value_task_is_refused_naming_the_key(tasks, message):
    with pytest.raises(ConfigError) as err:
        demo_with(tasks)
    assert message in str(err.value)


def test_value_metrics_are_known_to_the_gate_and_early_stopping_only_for_value_tasks():
    with pytest.raises(ConfigError, match=r"promote.gate_metrics: unknown metric revenue_auc"):
        demo_with([*FUNNEL, REVENUE], promote={"rule": "point", "gate_metrics": ["revenue_auc"]})
    with pytest.raises(ConfigError, match=r"promote.gate_metrics: unknown metric click_rmse"):
        demo_with([*FUNNEL, REVENUE], promote={"rule": "point", "gate_metrics": ["click_rmse"]})
    with pytest.raises(ConfigError, match=r"train.early_stopping_metric: unknown metric revenue_calibration"):
        demo_with([*FUNNEL, REVENUE], train={"early_stopping_metric": "revenue_calibration"})
    with pytest.raises(ConfigError, match=r"only AUCs have: revenue_gini"):  # the demo's rule is not_worse
        demo_with([*FUNNEL, REVENUE], promote={"gate_metrics": ["click_auc", "revenue_gini"]})
    with pytest.raises(ConfigError, match=r"promote.value_error_tolerance"):
        demo_with([*FUNNEL, REVENUE], promote={"value_error_tolerance": -0.1})


def _table_source(tmp_path, amount: list[float]):
    """A [table] source with a purchase funnel and a revenue task on its ``amount`` column."""
    pq.write_table(
        pa.table(
            {
                "item": ["a", "b", "a", "c", "b", "a"],
                "price": [1.0, 2.0, 1.0, 3.0, 2.0, 1.0],
                "click": [1, 1, 0, 1, 0, 1],
                "buy": [1, 0, 0, 1, 0, 0],
                "amount": amount,
                "part": ["tr", "tr", "tr", "va", "te", "tr"],
            }
        ),
        tmp_path / "all.parquet",
    )
    return parse_config(
        {
            "warehouse": str(tmp_path / "wh"),
            "table": {"path": str(tmp_path / "all.parquet"), "split_column": "part"}
            | {"split_values": {"train": "tr", "val": "va", "test": "te"}},
            "features": {
                "sparse": [{"name": "item_id", "table": "table", "column": "item", "capacity": 10}],
                "numeric": [{"name": "price", "table": "table", "column": "price"}],
            },
            "tasks": [
                {"name": "click"},
                {
                    "name": "purchase",
                    "label": "buy",
                    "after": "click",
                    "joint_name": "ctcvr",
                    "conditional_name": "cvr",
                },
                {"name": "revenue", "kind": "value", "label": "amount", "after": "purchase", "value_loss": "tweedie"},
            ],
        }
    )


def test_a_table_source_carries_a_numeric_value_label_and_refuses_a_negative_one(tmp_path):
    cfg = _table_source(tmp_path, [12.5, 0.0, 0.0, 40.0, 0.0, 0.0])
    prepared = prepare_table(cfg, cfg.warehouse)
    train = pq.read_table(prepared.files["train"])
    assert train.schema.field("amount").type == pa.float64() and train.column("amount").to_pylist()[0] == 12.5
    (batch,) = table_loader(cfg, prepared.files["train"], batch_size=8, shuffle=False, prefetch=0)
    assert batch.labels["amount"].tolist() == [12.5, 0.0, 0.0, 0.0]
    (tmp_path / "bad").mkdir()
    bad = _table_source(tmp_path / "bad", [12.5, -3.0, 0.0, 40.0, 0.0, 0.0])
    with pytest.raises(
        DataContractError, match=r"label column 'amount' \(task 'revenue'\) has 1 rows that are not finite"
    ):
        prepare_table(bad, bad.warehouse)


# ---------------------------------------------------------------- losses and metrics


def _output(logits: dict[str, torch.Tensor]) -> ModelOutput:
    return ModelOutput(logits, {}, torch.zeros(len(next(iter(logits.values()))), 1))


def test_log_mse_is_the_squared_log1p_error_on_the_after_positives_only():
    tasks = value_tasks()
    z = torch.tensor([1.0, 2.0, 3.0, 4.0])
    labels = {
        "click": torch.tensor([1.0, 1.0, 1.0, 0.0]),
        "conversion": torch.tensor([1.0, 0.0, 1.0, 0.0]),
        "conversion_value": torch.tensor([10.0, 0.0, 30.0, 0.0]),
    }
    zeros = torch.zeros(4)
    losses = task_losses(_output({"click": zeros, "conversion": zeros, "revenue": z}), labels, tasks, "esmm")
    want = ((1.0 - np.log1p(10.0)) ** 2 + (3.0 - np.log1p(30.0)) ** 2) / 2
    assert losses["revenue"].item() == pytest.approx(want, rel=1e-6)
    no_conversion = {**labels, "conversion": torch.zeros(4)}
    empty = task_losses(_output({"click": zeros, "conversion": zeros, "revenue": z}), no_conversion, tasks, "esmm")
    assert empty["revenue"].item() == 0.0  # a batch without conversions: 0, not NaN


def test_tweedie_loss_is_smallest_at_the_log_of_the_mean_value():
    tasks = value_tasks(value_loss="tweedie", tweedie_power=1.3)
    y = torch.tensor([0.0, 5.0, 20.0, 100.0, 0.0, 40.0])
    labels = {"click": torch.ones(6), "conversion": torch.ones(6), "conversion_value": y}
    z = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.LBFGS([z], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        out = _output({"click": torch.zeros(6), "conversion": torch.zeros(6), "revenue": z.expand(6)})
        loss = task_losses(out, labels, tasks, "esmm")
        loss["revenue"].backward()
        return loss["revenue"]

    optimiser.step(closure)
    assert z.item() == pytest.approx(np.log(y.mean().item()), abs=1e-3)


def test_normalized_gini_is_one_for_the_best_order_minus_one_reversed_and_zero_constant():
    rng = np.random.default_rng(0)
    actual = np.where(rng.random(500) < 0.2, rng.gamma(2.0, 30.0, 500), 0.0)
    assert normalized_gini(actual, actual) == pytest.approx(1.0)
    assert normalized_gini(actual, -actual) == pytest.approx(-1.0, abs=0.05)  # zeros tie at the bottom either way
    assert normalized_gini(actual, np.ones(500)) == pytest.approx(0.0, abs=1e-12)
    # against the textbook definition: the cumulative share of the actual total, by score descending
    scores = actual + rng.normal(0.0, 20.0, 500)
    order = np.argsort(-scores)
    lorenz = np.cumsum(actual[order]) / actual.sum()
    raw = lorenz.sum() / 500 - 501 / 1000
    best = np.cumsum(np.sort(actual)[::-1]) / actual.sum()
    assert normalized_gini(actual, scores) == pytest.approx(raw / (best.sum() / 500 - 501 / 1000))
    assert np.isnan(normalized_gini(np.zeros(5), np.arange(5)))


def test_value_metrics_measure_errors_on_converted_rows_and_the_gini_of_expected_revenue():
    cfg = demo_with([*FUNNEL, REVENUE])
    labels = {
        "click": np.array([1, 1, 1, 0, 1]),
        "conversion": np.array([1, 0, 1, 0, 1]),
        "conversion_value": np.array([10.0, 0.0, 30.0, 0.0, 20.0]),
    }
    predicted = np.array([12.0, 50.0, 24.0, 70.0, 20.0])
    probs = {"ctcvr": np.array([0.5, 0.1, 0.4, 0.01, 0.3])}
    m = value_metrics(cfg.value_views(), labels, {"revenue": predicted}, probs)
    errors = np.array([2.0, -6.0, 0.0])
    assert m["revenue_rmse"] == pytest.approx(rmse(np.zeros(3), errors))
    assert m["revenue_mae"] == pytest.approx(mae(np.zeros(3), errors)) == pytest.approx(8.0 / 3)
    assert m["revenue_calibration"] == pytest.approx(56.0 / 60.0)
    realised = np.array([10.0, 0.0, 30.0, 0.0, 20.0])
    assert m["revenue_gini"] == pytest.approx(normalized_gini(realised, probs["ctcvr"] * predicted))
    missing = value_metrics(cfg.value_views(), labels, {}, probs)
    assert set(missing) == set(m) and all(np.isnan(v) for v in missing.values())


def test_the_value_scale_is_fitted_so_the_mean_served_value_matches_the_observed():
    for loss in ("log_mse", "tweedie"):
        served = ServedProbabilities(value_tasks(value_loss=loss), "platt", 1)
        rng = np.random.default_rng(1)
        z = rng.normal(3.0, 0.5, 2000).astype(np.float32)
        conversion = (rng.random(2000) < 0.3).astype(np.float32)
        value = np.where(conversion > 0, np.exp(z + rng.normal(0.3, 0.4, 2000)), 0.0)
        logits = {"click": rng.normal(size=2000).astype(np.float32), "conversion": np.zeros(2000, np.float32)}
        logits["revenue"] = z
        from models.calibration import fit_calibration

        report = fit_calibration(
            served, logits, {"click": np.ones(2000), "conversion": conversion, "conversion_value": value}
        )
        e = served.values_of_logits(logits)["revenue"]
        assert report["revenue"]["rows"] == int(conversion.sum())
        assert e[conversion > 0].mean() == pytest.approx(value[conversion > 0].mean(), rel=1e-4), loss


def test_a_negative_value_label_is_refused_naming_the_column(tiny_warehouse, tmp_path):
    cfg, files = tiny_warehouse
    cfg = cfg.model_copy(update={"tasks": value_tasks()})
    table = pq.read_table(files[0])
    values = table.column("conversion_value").to_numpy().copy()
    values[3] = -5.0
    table = table.set_column(table.schema.get_field_index("conversion_value"), "conversion_value", pa.array(values))
    pq.write_table(table, tmp_path / "part-0.parquet")
    with pytest.raises(StageError, match=r"value label column 'conversion_value' has 1 values that are negative"):
        list(table_loader(cfg, [tmp_path / "part-0.parquet"], batch_size=512, shuffle=False, prefetch=0))


# ---------------------------------------------------------------- trained, exported, served


DAYS = 6
RUN_DATE = START + dt.timedelta(days=4)  # validation day START + 3; held-out day START + 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A warehouse with enough conversions to learn values from (high CTR and CVR), a model
    with a revenue task trained on days 0-2 (day 3 validates), and day 4 held out."""
    tmp = tmp_path_factory.mktemp("value")
    cfg = tiny_config(tmp)
    cfg = cfg.model_copy(
        update={
            "generate": cfg.generate.model_copy(
                update={"days": DAYS, "impressions_per_day": 12_000, "target_ctr": 0.2, "target_cvr": 0.3}
            ),
            "tasks": value_tasks(score_exponent=0.5),
            "train": cfg.train.model_copy(
                update={"window_days": 4, "epochs": 4, "batch_size": 1024, "dense_lr": 0.005, "threads": 2}
            ),
        }
    )
    build_warehouse(cfg)
    result = train_run(cfg, cfg.warehouse, RUN_DATE, progress=False)
    held_out = parquet_files(training_dir(cfg.warehouse, RUN_DATE))
    return cfg, result, held_out, tmp


def test_synthetic_conversion_values_follow_price_and_the_users_age(trained):
    cfg = trained[0]

    def daily(table: str, columns: list[str]) -> pa.Table:
        return pa.concat_tables(
            pq.read_table(f, columns=columns) for f in sorted((cfg.warehouse / "raw" / table).rglob("*.parquet"))
        )

    conversions = daily("conversions", ["impression_id", "value"])
    impressions = daily("impressions", ["impression_id", "user_id", "item_id"])
    users = pq.read_table(raw_dir(cfg.warehouse, "users")).select(["user_id", "age_bucket"])
    items = pq.read_table(raw_dir(cfg.warehouse, "items")).select(["item_id", "price"])
    rows = conversions.join(impressions, "impression_id").join(users, "user_id").join(items, "item_id")
    quantity = rows.column("value").to_numpy() / rows.column("price").to_numpy()
    assert 0.8 < quantity.min() and quantity.mean() > 1.2  # price x a quantity of at least 1, with a little noise
    age = rows.column("age_bucket").to_numpy(zero_copy_only=False)
    means = [quantity[age == a].mean() for a in AGE_BUCKETS]
    assert min((age == a).sum() for a in AGE_BUCKETS) >= 100
    np.testing.assert_allclose(means, BASKET_SIZE, rtol=0.15)  # the mean quantity by the user's age bucket


def test_the_value_head_beats_the_constant_mean_on_a_held_out_day(trained):
    cfg, result, held_out, _ = trained
    pred = predict(result.model, table_loader(cfg, held_out, batch_size=4096, shuffle=False), torch.device("cpu"))
    converted = pred["label_conversion"] > 0
    value, e = pred["label_conversion_value"].astype(np.float64), pred[value_output("revenue")].astype(np.float64)
    assert converted.sum() >= 300
    train_files = [f for d in range(3) for f in parquet_files(training_dir(cfg.warehouse, START + dt.timedelta(d)))]
    train = pq.read_table(train_files, columns=["conversion", "conversion_value"]).to_pandas()
    constant = train.conversion_value[train.conversion > 0].mean()  # the training rows' mean value
    realised = np.where(converted, value, 0.0)
    model = {
        "rmse": rmse(value[converted], e[converted]),
        "mae": mae(value[converted], e[converted]),
        "gini": normalized_gini(realised, pred["p_ctcvr"] * e),
    }
    base = {
        "rmse": rmse(value[converted], np.full(converted.sum(), constant)),
        "mae": mae(value[converted], np.full(converted.sum(), constant)),
        "gini": normalized_gini(realised, pred["p_ctcvr"] * constant),
    }
    print(f"\nheld-out day, {converted.sum()} conversions: value head {model} vs constant mean {constant:.2f} {base}")
    assert model["rmse"] < 0.8 * base["rmse"]
    assert model["mae"] < 0.8 * base["mae"]
    assert model["gini"] > base["gini"] + 0.05
    # the validation metrics carry the value task's; its scale was fitted on the validation day
    assert result.val_metrics["revenue_calibration"] == pytest.approx(1.0, abs=1e-3)
    assert result.val_metrics["revenue_rmse"] < base["rmse"]
    assert "log_scale" in result.calibration["tasks"]["revenue"]


@pytest.fixture(scope="module")
def bundle(trained):
    cfg, result, held_out, tmp = trained
    return load_bundle(export_bundle(cfg, cfg.warehouse, result.model, tmp / "bundle", held_out))


def test_onnx_and_the_scorer_serve_the_expected_value_and_blend_it_into_the_score(trained, bundle):
    cfg = trained[0]
    parity = bundle.manifest["parity"]["max_abs_diff"]
    assert set(parity) == {"p_click", "p_ctcvr", "p_cvr", "e_revenue", "score"}
    assert max(parity.values()) <= 1e-5, parity
    print(f"\nONNX parity with the value head: {json.dumps(parity)}")
    assert bundle.spec.tasks[2] == TaskOutput("revenue", "revenue", 0.5, "value")
    assert "e_revenue" in bundle.spec.outputs
    scorer = Scorer(bundle)
    users, items = users_and_items(cfg)
    rows = pa.table({"user_id": [str(users[4])] * 60, "item_id": [str(i) for i in items[:60]]})
    scored = scorer.score_table(rows)
    assert scored.column_names == ["user_id", "item_id", "p_click", "p_conversion", "e_revenue", "score"]
    p_click, p_conv, e, score = (scored.column(c).to_numpy() for c in ("p_click", "p_conversion", "e_revenue", "score"))
    assert (e > 0).all() and e.std() > 0
    np.testing.assert_allclose(score, p_click * p_conv * np.sqrt(e), rtol=1e-5)
    ranked = scorer.score({"user_id": str(users[4]), "candidates": [{"item_id": str(i)} for i in items[:60]]})
    assert list(ranked[0]) == ["item_id", "p_click", "p_conversion", "e_revenue", "score"]
    assert [r["score"] for r in ranked] == sorted(score.tolist(), reverse=True)


def test_a_spec_without_task_kinds_reads_binary_tasks_and_a_bad_kind_is_refused(bundle):
    spec = json.loads((bundle.path / "spec.json").read_text())
    assert [t.get("kind") for t in spec["tasks"]] == [None, None, "value"]
    spec["tasks"][2]["kind"] = "money"
    with pytest.raises(BundleError, match=r"key 'tasks\[2\].kind' must be one of \['binary', 'value'\]"):
        BundleSpec.from_dict(spec)


# ---------------------------------------------------------------- the gate


def test_the_gate_judges_value_errors_by_their_relative_rise_and_gini_by_its_bound():
    cfg = demo_with(
        [*FUNNEL, REVENUE],
        promote={"rule": "point", "gate_metrics": ["click_auc", "revenue_gini", "revenue_rmse"], "min_gini": 0.2},
    )
    good = {
        "click_auc": 0.7,
        "revenue_gini": 0.5,
        "revenue_rmse": 40.0,
        **{f"{v}_calibration": 1.0 for v in ("click", "ctcvr", "revenue")},
    }
    assert gate(good, None, cfg).promote  # the first model: no absolute bound on an rmse
    low = gate(good | {"revenue_gini": 0.1}, None, cfg)
    assert not low.promote and "revenue_gini 0.1000 below the first model's bound 0.2" in low.reason
    assert gate(good | {"revenue_rmse": 41.9}, good, cfg).promote  # +4.75% < 5%
    worse = gate(good | {"revenue_rmse": 42.4}, good, cfg)
    assert not worse.promote and "revenue_rmse 42.4000 rose 6.0% above the champion's 40.0000" in worse.reason
    biased = gate(good | {"revenue_calibration": 0.6}, good, cfg)
    assert not biased.promote and "revenue_calibration 0.600 outside" in biased.reason
