"""A tiny real warehouse (synthetic logs -> validate -> features -> examples) and a
small untrained MultiTaskNet, shared by the export, scorer and HTTP tests (the
warehouse is built once per session by tests/conftest.py). Random weights are fine: these
tests check plumbing and parity, not quality."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import torch

from features.catalog import raw_dir, training_dir
from features.config import SequenceFeature, SparseFeature
from features.daily_counters import build_daily_aggregates
from features.examples import build_training_table, mature_day
from features.synthetic import generate_logs
from features.validate import validate_day
from models.loader import parquet_files
from models.nets import MultiTaskNet, dense_stats
from pipeline.config import FunnelConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
START = dt.date(2026, 11, 1)
DAYS = 4

# The demo spec with small capacities and sizes; one-hour attribution -> maturity lag 1.
OVERRIDES = {
    "seed": 11,
    "generate": {
        "start_date": START,
        "days": DAYS,
        "users": 300,
        "items": 120,
        "impressions_per_day": 4000,
        "categories": 6,
        "brands": 20,
        "shops": 30,
        "cities": 8,
    },
    "contract": {"attribution_window_hours": 1},
    "features": {"windows_days": [1, 2]},
    "model": {"expert_dims": [16, 8], "tower_dims": [4], "n_experts": 2},
}
CAPACITY = {"user_id": 200, "item_id": 80, "city": 5}


# A bucketised snapshot attribute and a bucketised request column ride along, so the event
# path (examples, the bundle's snapshot, the scorer's context) carries kind = "bucket" features too.
BUCKETS = [
    SparseFeature(
        name="price_bucket", table="items", column="price", kind="bucket", boundaries=[20.0, 40.0, 80.0, 160.0], dim=4
    ),
    SparseFeature(name="slot_bucket", table="impressions", column="slot", kind="bucket", boundaries=[2.0, 5.0], dim=4),
]


# A click history (item and category, 5 long) rides along, so the bundle carries each user's
# sequence and the scorer rebuilds the training table's sequence columns.
CLICKED = SequenceFeature(name="clicked", event="click", items=["item_id", "category_id"], max_length=5)


def tiny_config(tmp: Path, backbone: str = "mmoe") -> FunnelConfig:
    cfg = load_config(
        ROOT / "configs" / "demo.toml", OVERRIDES | {"model": OVERRIDES["model"] | {"backbone": backbone}}
    )
    sparse = [
        f.model_copy(update={"capacity": CAPACITY.get(f.name, f.capacity)}) for f in cfg.features.sparse
    ] + BUCKETS
    features = cfg.features.model_copy(update={"sparse": sparse, "sequences": [CLICKED]})
    return cfg.model_copy(update={"features": features, "warehouse": tmp / "warehouse", "state_dir": tmp / "state"})


def build_warehouse(cfg: FunnelConfig) -> list[Path]:
    """Run the feature stages over every generated day; return the newest training table's files."""
    generate_logs(cfg, cfg.warehouse, progress=False)
    days = [cfg.generate.start_date + dt.timedelta(days=i) for i in range(cfg.generate.days)]
    for day in days:
        validate_day(cfg, cfg.warehouse, day)
        build_daily_aggregates(cfg, cfg.warehouse, day)
        if mature_day(cfg, day) >= days[0]:
            build_training_table(cfg, cfg.warehouse, day)
    return parquet_files(training_dir(cfg.warehouse, mature_day(cfg, days[-1])))


def small_model(cfg: FunnelConfig, files: list[Path]) -> MultiTaskNet:
    torch.manual_seed(cfg.seed)
    mean, std = dense_stats(files, cfg.features.dense_names())
    model = MultiTaskNet(cfg.features, cfg.model, cfg.tasks, mean, std).eval()
    # torchrec initialises tables uniformly in a tiny range, and torch's default Linear
    # init shrinks the signal at every ReLU layer (deep backbones like PLE end up nearly
    # constant): widen the tables and give the layers He init, so the inputs move the
    # outputs and a parity check has something to catch.
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for table in model.tables().values():
            table.normal_(0.0, 0.5, generator=generator)
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, (2.0 / layer.in_features) ** 0.5, generator=generator)
    return model


def users_and_items(cfg: FunnelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Known raw user and item ids (from the raw snapshots)."""
    import pyarrow.parquet as pq

    users = pq.read_table(raw_dir(cfg.warehouse, "users")).column("user_id").to_numpy(zero_copy_only=False)
    items = pq.read_table(raw_dir(cfg.warehouse, "items")).column("item_id").to_numpy(zero_copy_only=False)
    return users, items
