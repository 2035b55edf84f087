"""The warehouse catalogue (features.catalog): the on-disk layout, and no other module spelling it."""

from __future__ import annotations

import ast
import datetime as dt
from pathlib import Path

import pytest

from features.catalog import (
    daily_dir,
    default_state_dir,
    lock_path,
    quarantine_dir,
    raw_dir,
    report_path,
    rolling_state_dir,
    sequence_state_dir,
    table_csv_dir,
    table_manifest_path,
    table_quarantine_dir,
    table_split_dir,
    training_dir,
    training_manifest_path,
    truth_dir,
    validated_dir,
    vocab_manifest_path,
    vocab_version_path,
    warehouse_relative,
)

ROOT = Path(__file__).resolve().parents[1]
D = dt.date(2026, 11, 1)


def test_the_layout_is_the_documented_one(tmp_path):
    # Existing warehouses, the README and the nightly records depend on these paths.
    layout = {
        raw_dir(tmp_path, "clicks", D): "raw/clicks/date=2026-11-01",
        raw_dir(tmp_path, "users"): "raw/users",
        validated_dir(tmp_path, "items", D): "validated/items/date=2026-11-01",
        quarantine_dir(tmp_path, "impressions", D): "quarantine/impressions/date=2026-11-01",
        report_path(tmp_path, "validate", D): "reports/validate/date=2026-11-01.json",
        truth_dir(tmp_path, D): "truth/impressions/date=2026-11-01",
        daily_dir(tmp_path, "user_category", D): "features/daily/user_category/date=2026-11-01",
        rolling_state_dir(tmp_path, "user", D): "features/rolling/user/date=2026-11-01",
        sequence_state_dir(tmp_path, "clicked", D): "features/sequences/clicked/date=2026-11-01",
        vocab_version_path(tmp_path, "item_id", 12): "vocab/item_id/v000012.parquet",
        vocab_manifest_path(tmp_path, "item_id"): "vocab/item_id/manifest.json",
        training_dir(tmp_path, D): "training/date=2026-11-01",
        training_manifest_path(tmp_path, D): "training/date=2026-11-01/manifest.json",
        table_split_dir(tmp_path, "val"): "table/val",
        table_quarantine_dir(tmp_path, "train"): "table/quarantine/train",
        table_csv_dir(tmp_path, "ab12"): "table/source/ab12",
        table_manifest_path(tmp_path): "table/manifest.json",
        lock_path(tmp_path): ".funnelrank.lock",
        default_state_dir(tmp_path): "state",
    }
    assert [warehouse_relative(tmp_path, path) for path in layout] == list(layout.values())


def test_raw_dir_needs_a_day_for_daily_tables_and_a_known_table(tmp_path):
    with pytest.raises(ValueError, match="'clicks' is partitioned by day"):
        raw_dir(tmp_path, "clicks")
    with pytest.raises(ValueError, match="unknown raw table 'sessions'"):
        raw_dir(tmp_path, "sessions", D)


def _root_name(node: ast.expr) -> str | None:
    """The name of a path a ``/`` starts from: ``warehouse`` in ``Path(warehouse) / "raw"``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Path" and node.args:
        node = node.args[0]
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else None


def test_no_module_but_the_catalogue_spells_a_warehouse_path():
    spelled = []
    for package in ("features", "models", "pipeline", "benchmarks"):
        for path in sorted((ROOT / package).glob("*.py")):
            if path == ROOT / "features" / "catalog.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                joins = isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                spelled_name = joins and isinstance(node.right, ast.Constant | ast.JoinedStr)
                if spelled_name and _root_name(node.left) in ("warehouse", "wh"):
                    spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not spelled, "warehouse paths spelled outside features/catalog.py (use its own):\n" + "\n".join(spelled)
