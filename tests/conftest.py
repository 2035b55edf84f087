"""Fixtures shared by the export, scorer and HTTP tests."""

import pytest
from bundle_fixture import build_warehouse, tiny_config

from models.tracking import to_toml
from pipeline.config import load_config


@pytest.fixture(scope="session")
def tiny_warehouse(tmp_path_factory):
    """A small real warehouse (generate -> validate -> features -> examples), built once.

    Tests only read it; what they write goes under their own tmp folders."""
    cfg = tiny_config(tmp_path_factory.mktemp("tiny"))
    return cfg, build_warehouse(cfg)


@pytest.fixture(scope="session")
def tiny_run(tiny_warehouse, tmp_path_factory):
    """The tiny config with its own state dir (MLflow sqlite store, checkpoints, bundles),
    written to a TOML file that loads back to the same config (so the CLI finds the run).
    Its nightly run is trained by the first test that needs it (``train_run`` then skips)."""
    cfg, _ = tiny_warehouse
    tmp = tmp_path_factory.mktemp("tiny_run")
    train = cfg.train.model_copy(update={"window_days": 2, "epochs": 2, "batch_size": 512, "threads": 2, "patience": 5})
    cfg = cfg.model_copy(update={"state_dir": tmp / "state", "train": train})
    path = tmp / "config.toml"
    path.write_text(to_toml(cfg.model_dump(by_alias=True)))
    assert load_config(path).model_dump(mode="json") == cfg.model_dump(mode="json")
    return cfg, path
