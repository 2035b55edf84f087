"""The run config is validated at load time and errors name the bad key."""

import datetime as dt
import tomllib
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, parse_config

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
        (lambda d: d["features"]["sparse"][2].update(dim="16"), "features.sparse[2].dim: Input should be a valid integer"),
        (lambda d: d["features"]["sparse"][0].pop("column"), "features.sparse[0].column: required value missing"),
        (lambda d: d["validate"].update(max_bad_row_share=2), "validate.max_bad_row_share"),
        (lambda d: d["features"]["sparse"][3].update(dim=6), "features.sparse[3].dim: Input should be a multiple of 4"),
        (lambda d: d["features"]["sparse"][1].update(table="orders"), "features.sparse[1].table"),
        (lambda d: d["features"].update(windows_days=[7, 1]), "features.windows_days"),
        (lambda d: d["features"]["sparse"][1].update(name="user_id"), "repeated: user_id"),
        (lambda d: d.pop("features"), "features: required value missing"),
        (lambda d: d["features"]["sparse"].append({"name": "price_bucket", "table": "items", "column": "price", "kind": "bucket"}),
         "kind = 'bucket' needs boundaries"),
        (lambda d: d["features"]["sparse"].append({"name": "price_bucket", "table": "items", "column": "price", "kind": "bucket",
                                                   "boundaries": [10.0, 10.0, 20.0]}), "strictly ascending, got [10.0, 10.0, 20.0]"),
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
    data["features"]["sparse"].append({"name": "price_bucket", "table": "items", "column": "price", "kind": "bucket",
                                       "boundaries": [10, 20.5, 40], "dim": 4})
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
