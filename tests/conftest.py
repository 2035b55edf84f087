"""Fixtures shared by the export, scorer and HTTP tests."""

import pytest
from bundle_fixture import build_warehouse, tiny_config


@pytest.fixture(scope="session")
def tiny_warehouse(tmp_path_factory):
    """A small real warehouse (generate -> validate -> features -> examples), built once.

    Tests only read it; what they write goes under their own tmp folders."""
    cfg = tiny_config(tmp_path_factory.mktemp("tiny"))
    return cfg, build_warehouse(cfg)
