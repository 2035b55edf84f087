"""The run config is validated at load time and errors name the bad key."""

import datetime as dt
import math
import re
import tomllib
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from pipeline.config import ConfigError, FunnelConfig, load_config, parse_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


def demo_dict() -> dict:
    return tomllib.loads(DEMO.read_text())


def test_demo_config_loads():
    cfg = load_config(DEMO)
    assert cfg.seed == 7
    assert cfg.generate.start_date == dt.date(2026, 11, 1)
    assert cfg.contract.maturity_lag_days == 2  # 30 min click window + 24 h attribution
    assert [f.name for f in cfg.features.sparse][:2] == ["user_id", "item_id"]
    dense = cfg.features.dense_names()
    assert "user_ctr_7d" in dense and "user_category_cvr_28d" in dense and dense[-1] == "price"
    assert len(dense) == len(set(dense))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["generate"].update(bogus=1), "generate.bogus: unknown key"),
        (lambda d: d.update(sed=3), "sed: unknown key"),
        (
            lambda d: d["features"]["sparse"][2].update(dim="16"),
            "features.sparse[2].dim: Input should be a valid integer",
        ),
        (lambda d: d["features"]["sparse"][0].pop("column"), "features.sparse[0].column: required value missing"),
        (lambda d: d["validate"].update(max_bad_row_share=2), "validate.max_bad_row_share"),
        (lambda d: d["features"]["sparse"][3].update(dim=6), "features.sparse[3].dim: Input should be a multiple of 4"),
        (lambda d: d["features"]["sparse"][1].update(table="orders"), "features.sparse[1].table"),
        (lambda d: d["features"].update(windows_days=[7, 1]), "features.windows_days"),
        (lambda d: d["features"]["sparse"][1].update(name="user_id"), "repeated: user_id"),
        (lambda d: d.pop("features"), "features: required value missing"),
        (
            lambda d: d["features"]["sparse"].append(
                {"name": "price_bucket", "table": "items", "column": "price", "kind": "bucket"}
            ),
            "kind = 'bucket' needs boundaries",
        ),
        (
            lambda d: d["features"]["sparse"].append(
                {
                    "name": "price_bucket",
                    "table": "items",
                    "column": "price",
                    "kind": "bucket",
                    "boundaries": [10.0, 10.0, 20.0],
                }
            ),
            "strictly ascending, got [10.0, 10.0, 20.0]",
        ),
        (lambda d: d["features"]["sparse"][4].update(boundaries=[1.0]), "boundaries are for kind = 'bucket', not 'id'"),
    ],
)
def test_bad_config_names_the_key(edit, message):
    data = demo_dict()
    edit(data)
    with pytest.raises(ConfigError) as err:
        parse_config(data, "bad.toml")
    assert "bad.toml" in str(err.value)
    assert message in str(err.value)


def test_bucket_feature_has_a_row_per_bucket_and_padding():
    data = demo_dict()
    data["features"]["sparse"].append(
        {
            "name": "price_bucket",
            "table": "items",
            "column": "price",
            "kind": "bucket",
            "boundaries": [10, 20.5, 40],
            "dim": 4,
        }
    )
    feature = parse_config(data).features.sparse[-1]
    assert feature.boundaries == [10.0, 20.5, 40.0] and feature.num_embeddings == 5  # padding + 4 buckets


def test_ints_are_accepted_where_floats_are_expected():
    data = demo_dict()
    data["features"]["prior_strength"] = 20
    assert parse_config(data).features.prior_strength == 20.0


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config .*missing.toml"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(bad)


def test_overrides_merge_into_sections():
    cfg = load_config(DEMO, {"generate": {"days": 3}, "seed": 11})
    assert (cfg.generate.days, cfg.seed, cfg.generate.users) == (3, 11, 20000)


def _float_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of every float (or list of floats) of a config section, recursively; a
    list of sections by its first element."""
    keys = []
    for name, field in model.model_fields.items():
        key, kind = f"{prefix}{field.alias or name}", field.annotation
        if get_origin(kind) in (Union, UnionType):  # X | None
            kind = next(a for a in get_args(kind) if a is not type(None))
        item = get_args(kind)[0] if get_origin(kind) is list else None
        if float in (kind, item):
            keys.append(key)
        elif isinstance(kind, type) and issubclass(kind, BaseModel):
            keys += _float_keys(kind, f"{key}.")
        elif isinstance(item, type) and issubclass(item, BaseModel):
            keys += _float_keys(item, f"{key}[0].")
    return keys


def _set(data: dict, key: str, value: object) -> None:
    """``data[key] = value`` for a dotted key with list indices (``tasks[1].loss_weight``)."""
    *path, last = re.sub(r"\[(\d+)\]", r".\1", key).split(".")
    for part in path:
        data = data[int(part)] if part.isdigit() else data.setdefault(part, {})
    data[last] = value


FLOAT_KEYS = _float_keys(FunnelConfig)


def test_every_float_key_is_found():
    assert {
        "train.sparse_lr",
        "train.dense_lr",
        "tasks[0].loss_weight",
        "tasks[0].score_exponent",
        "promote.auc_tolerance",
        "promote.calibration_max",
        "promote.confidence",
        "train.negative_sampling_rate",
        "features.prior_strength",
        "features.sparse[0].boundaries",
        "generate.noise",
        "validate.max_bad_row_share",
    } <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_must_be_finite(key, value):
    data = demo_dict()
    # a list of floats gets the bad value as its one element: the error names its index
    _set(data, key, [value] if key.endswith("boundaries") else value)
    if key.endswith("boundaries"):
        data["features"]["sparse"][0]["kind"] = "bucket"
    with pytest.raises(ConfigError) as err:
        parse_config(data, "bad.toml")
    assert (
        f"{key}{'[0]' if key.endswith('boundaries') else ''}: Input should be a finite number (got {value!r})"
        in str(err.value)
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.sparse_lr", 0.0, "Input should be greater than 0"),
        ("train.dense_lr", -0.001, "Input should be greater than 0"),
        ("train.weight_decay", -1e-5, "Input should be greater than or equal to 0"),
        ("promote.auc_tolerance", 1.0, "Input should be less than 1"),
        ("promote.auc_tolerance", -0.01, "Input should be greater than or equal to 0"),
        ("promote.min_auc", 1.5, "Input should be less than or equal to 1"),
        ("promote.calibration_min", -0.5, "Input should be greater than 0"),
        ("tasks[0].loss_weight", -1.0, "Input should be greater than or equal to 0"),
        ("tasks[0].loss_weight", 1e6, "Input should be less than or equal to 1000"),
        ("tasks[1].score_exponent", -0.5, "Input should be greater than or equal to 0"),
        ("tasks[1].score_exponent", 1e6, "Input should be less than or equal to 100"),
        ("features.prior_strength", -1.0, "Input should be greater than or equal to 0"),
        ("features.prior_strength", 1e300, "Input should be less than or equal to 1000000000"),
        ("features.sparse[0].capacity", 10**12, "Input should be less than or equal to 1000000000"),
        ("features.sparse[0].dim", 1 << 20, "Input should be less than or equal to 4096"),
        ("features.sparse[2].oov_buckets", 10**9, "Input should be less than or equal to 1000000"),
        ("features.windows_days", [1, 7, 100_000], "Value error, must be distinct day counts from 1 to 3650"),
        ("model.n_experts", 10**6, "Input should be less than or equal to 256"),
        ("model.expert_dims", [128, 10**9], "Value error, layer sizes must be from 1 to 65536"),
        ("model.tower_dims", [0], "Value error, layer sizes must be from 1 to 65536"),
        ("model.cross_layers", 10**4, "Input should be less than or equal to 64"),
        ("model.dropout", 1.0, "Input should be less than 1"),
        ("model.soft_sharing_strength", 1e9, "Input should be less than or equal to 1000"),
        ("train.epochs", 10**9, "Input should be less than or equal to 10000"),
        ("train.batch_size", 10**12, "Input should be less than or equal to 16777216"),
        ("train.threads", 10**6, "Input should be less than or equal to 1024"),
        ("train.threads", -1, "Input should be greater than or equal to 0"),
        ("generate.days", 10**6, "Input should be less than or equal to 3650"),
        ("generate.users", 10**12, "Input should be less than or equal to 1000000000"),
        ("generate.noise", -0.1, "Input should be greater than or equal to 0"),
        ("contract.click_window_minutes", 10**9, "Input should be less than or equal to 10080"),
        ("train.window_days", 10**6, "Input should be less than or equal to 3650"),
        ("train.min_window_days", 10**6, "Input should be less than or equal to 3650"),
        ("validate.min_bad_rows", 10**12, "Input should be less than or equal to 1000000000"),
        ("scoring.max_candidates", 10**9, "Input should be less than or equal to 1000000"),
        ("scoring.max_body_bytes", 1 << 40, "Input should be less than or equal to 1073741824"),
        ("nightly.fine_tune_days", 10**6, "Input should be less than or equal to 3650"),
        ("train.negative_sampling_rate", 0.0, "Input should be greater than 0"),
        ("train.negative_sampling_rate", 1.5, "Input should be less than or equal to 1"),
        ("train.sample_weight", "click +", "Value error, not a SQL expression over the training table's columns"),
        ("train.sample_weight", "2.0", "Value error, names no column of the training table"),
        ("model.calibration", "beta", "Input should be 'none', 'platt' or 'isotonic'"),
        ("model.calibration_segments", 1, "Input should be greater than or equal to 2"),
        ("promote.confidence", 0.4, "Input should be greater than or equal to 0.5"),
    ],
)
def test_out_of_range_values_name_the_key(key, value, message):
    data = demo_dict()
    _set(data, key, value)
    with pytest.raises(ConfigError) as err:
        parse_config(data, "bad.toml")
    assert f"{key}: {message}" in str(err.value)


def test_calibration_bounds_must_be_ordered():
    data = demo_dict()
    _set(data, "promote.calibration_max", 0.5)
    with pytest.raises(ConfigError, match=r"promote: .*calibration_min \(0.8\) must be below calibration_max \(0.5\)"):
        parse_config(data, "bad.toml")


def test_inf_and_nan_spelled_in_toml_are_refused(tmp_path):
    path = tmp_path / "inf.toml"
    text = DEMO.read_text()
    path.write_text(text.replace("sparse_lr = 0.05", "sparse_lr = inf").replace("dense_lr = 0.001", "dense_lr = nan"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.sparse_lr: Input should be a finite number (got inf)" in str(err.value)
    assert "train.dense_lr: Input should be a finite number (got nan)" in str(err.value)


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(DEMO.read_text().replace("# funnelrank demo", "# caf\u00e9 demo", 1).encode("latin-1"))
    with pytest.raises(
        ConfigError, match=r"config .*latin1\.toml is not UTF-8 text \(TOML is\): byte 0xe9 at offset 5"
    ):
        load_config(path)
