"""The synthetic raw-log generator: contract layout, determinism, funnel realism."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import features.synthetic as synthetic
from features.catalog import raw_dir, truth_dir
from features.config import ConfigError
from features.contract import DAILY_TABLES, REQUIRED, required_columns
from features.io import sha256_dir
from pipeline.cli import main
from pipeline.config import FunnelConfig, load_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
START = dt.date(2026, 11, 1)


def make_config(**generate: object) -> FunnelConfig:
    seed = generate.pop("seed", 11)
    base = {"start_date": START, "days": 3, "users": 4000, "items": 2000, "impressions_per_day": 20_000}
    return load_config(DEMO, {"seed": seed, "generate": {**base, **generate}})


def read(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(folder.glob("*.parquet")))


def read_daily(warehouse: Path, table: str, days: int) -> pl.DataFrame:
    frames = [read(raw_dir(warehouse, table, START + dt.timedelta(days=d))).with_columns(
        pl.lit(START + dt.timedelta(days=d)).alias("partition")) for d in range(days)]  # fmt: skip
    return pl.concat(frames)


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    positives = labels.sum()
    negatives = len(labels) - positives
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def true_logits(warehouse: Path, days: int) -> tuple[np.ndarray, np.ndarray]:
    truth = pl.concat([read(truth_dir(warehouse, START + dt.timedelta(days=d))) for d in range(days)])
    logit = lambda p: np.log(p / (1.0 - p))  # noqa: E731
    return logit(truth["p_click"].to_numpy()), logit(truth["p_conversion_given_click"].to_numpy())


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[FunnelConfig, Path, synthetic.GenerateSummary]:
    cfg = make_config()
    warehouse = tmp_path_factory.mktemp("warehouse")
    return cfg, warehouse, synthetic.generate_logs(cfg, warehouse, progress=False)


def test_tables_follow_the_contract(generated) -> None:
    cfg, warehouse, summary = generated
    for table in (*DAILY_TABLES, "users", "items"):
        days = range(cfg.generate.days) if table in DAILY_TABLES else [None]
        for d in days:
            folder = raw_dir(warehouse, table, None if d is None else START + dt.timedelta(days=d))
            schema = pq.read_schema(folder / "part-0.parquet")
            for column, arrow_type in REQUIRED[table].items():
                assert schema.field(column).type == arrow_type, (table, column)
            assert set(required_columns(table, cfg.features)) <= set(schema.names), table
    assert not raw_dir(warehouse, "impressions", START + dt.timedelta(days=cfg.generate.days)).exists()

    impressions = read_daily(warehouse, "impressions", cfg.generate.days)
    assert impressions.height == summary.rows["impressions"] == 3 * 20_000
    assert impressions["impression_id"].n_unique() == impressions.height
    assert (impressions["ts"].dt.date() == impressions["partition"]).all()
    assert impressions["slot"].dtype == pl.Int64 and impressions["slot"].is_between(0, cfg.generate.slots - 1).all()
    devices = impressions["device"].value_counts(normalize=True).sort("proportion")
    assert set(devices["device"]) == {"ios", "android", "web"} and devices["proportion"][0] < 0.25

    users, items = read(raw_dir(warehouse, "users")), read(raw_dir(warehouse, "items"))
    assert users.height == cfg.generate.users and users["user_id"].n_unique() == users.height
    assert items.height == cfg.generate.items and items["item_id"].n_unique() == items.height
    assert users["interests"].list.len().is_between(1, 5).all()
    assert (users["interests"].list.n_unique() == users["interests"].list.len()).all()  # multi-hot: no repeats
    assert set(users["interests"].explode()) <= {f"cat{k:02d}" for k in range(cfg.generate.categories)}
    assert items["price"].dtype == pl.Float64 and (items["price"] > 0).all()
    assert impressions["user_id"].is_in(users["user_id"].implode()).all()
    assert impressions["item_id"].is_in(items["item_id"].implode()).all()

    # The truth sits beside raw/, never inside it, and covers every impression.
    truth = pl.concat([read(truth_dir(warehouse, START + dt.timedelta(days=d))) for d in range(cfg.generate.days)])
    assert not any("truth" in p.as_posix() for p in (warehouse / "raw").rglob("*"))
    assert not any("p_click" in pq.read_schema(p).names for p in (warehouse / "raw").rglob("*.parquet"))
    assert truth.columns == [
        "impression_id",
        "p_click",
        "p_conversion_given_click",
        "click_logit_observable",
        "conversion_logit_observable",
    ]
    assert truth["impression_id"].sort().equals(impressions["impression_id"].sort())
    assert truth["p_click"].is_between(0.0, 1.0, closed="none").all()


def test_funnel_rates_and_event_times(generated) -> None:
    cfg, warehouse, summary = generated
    days = cfg.generate.days
    impressions = read_daily(warehouse, "impressions", days).select("impression_id", imp_ts="ts")
    clicks = read_daily(warehouse, "clicks", days)
    conversions = read_daily(warehouse, "conversions", days)

    assert 0.02 <= summary.ctr <= 0.08 and 0.05 <= summary.cvr_after_click <= 0.20
    assert 0.02 <= clicks.height / impressions.height <= 0.08
    assert clicks["impression_id"].n_unique() == clicks.height
    assert conversions["impression_id"].n_unique() == conversions.height

    clicks = clicks.join(impressions, on="impression_id", how="left")
    assert clicks["imp_ts"].null_count() == 0
    delay = clicks["ts"] - clicks["imp_ts"]
    assert (delay > dt.timedelta(0)).all() and (delay <= dt.timedelta(minutes=cfg.contract.click_window_minutes)).all()
    assert (clicks["ts"].dt.date() == clicks["partition"]).all()  # a click lives in its own day's partition
    assert (clicks["partition"] > clicks["imp_ts"].dt.date()).any()  # some cross midnight

    conversions = conversions.join(clicks.select("impression_id", click_ts="ts", click_day="partition"),
                                   on="impression_id", how="left")  # fmt: skip
    assert conversions["click_ts"].null_count() == 0  # no conversion without a click
    cvr = conversions.height / clicks.height
    assert 0.04 <= cvr <= 0.2
    delay = conversions["ts"] - conversions["click_ts"]
    window = dt.timedelta(hours=cfg.contract.attribution_window_hours)
    assert (delay > dt.timedelta(0)).all() and (delay <= window).all()
    assert delay.median() > dt.timedelta(minutes=30)  # hours after the click, not seconds
    assert (conversions["ts"].dt.date() == conversions["partition"]).all()
    assert (conversions["partition"] > conversions["click_day"]).any()
    assert 0 < summary.late_conversion_share < 0.6
    assert (conversions["value"] > 0).all()


def test_popularity_and_activity_follow_a_power_law(generated) -> None:
    cfg, warehouse, _ = generated
    impressions = read_daily(warehouse, "impressions", cfg.generate.days)

    def top_percent_share(column: str, population: int) -> float:
        counts = impressions[column].value_counts()["count"].sort(descending=True)
        return counts[: population // 100].sum() / impressions.height

    # Uniform traffic would give the top 1% about 1%.
    assert top_percent_share("item_id", cfg.generate.items) > 0.15
    assert top_percent_share("user_id", cfg.generate.users) > 0.10


def test_oracle_auc_is_informative_but_not_perfect(generated) -> None:
    cfg, warehouse, _ = generated
    impressions = read_daily(warehouse, "impressions", cfg.generate.days).select("impression_id")
    truth = pl.concat([read(truth_dir(warehouse, START + dt.timedelta(days=d))) for d in range(cfg.generate.days)])
    clicked = read_daily(warehouse, "clicks", cfg.generate.days)["impression_id"].implode()
    joined = impressions.join(truth, on="impression_id").with_columns(click=pl.col("impression_id").is_in(clicked))
    auc = rank_auc(joined["click"].to_numpy(), joined["p_click"].to_numpy())
    assert 0.65 < auc < 0.95
    # Without the unobservable noise the ranking is worse than with it, but still informative:
    # that is the ceiling for a model that sees every feature.
    observable = rank_auc(joined["click"].to_numpy(), joined["click_logit_observable"].to_numpy())
    assert 0.6 < observable < auc


def test_task_correlation_knob_moves_the_logits_correlation(tmp_path: Path) -> None:
    correlation = {}
    for p in (0.1, 0.9):
        cfg = make_config(days=1, task_correlation=p)
        synthetic.generate_logs(cfg, tmp_path / str(p), progress=False)
        click, conversion = true_logits(tmp_path / str(p), 1)
        correlation[p] = np.corrcoef(click, conversion)[0, 1]
    assert correlation[0.9] > correlation[0.1] + 0.15


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    small = {"days": 2, "impressions_per_day": 5000, "users": 500, "items": 300}
    hashes = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthetic.generate_logs(make_config(seed=seed, **small), tmp_path / name, progress=False)
        hashes[name] = (sha256_dir(tmp_path / name / "raw"), sha256_dir(tmp_path / name / "truth"))
    assert hashes["a"] == hashes["b"]
    assert hashes["a"][0] != hashes["c"][0] and hashes["a"][1] != hashes["c"][1]

    # Day 0's impressions do not depend on how many days the run generates.
    synthetic.generate_logs(make_config(seed=3, **{**small, "days": 1}), tmp_path / "one", progress=False)
    first_day = lambda wh: sha256_dir(raw_dir(wh, "impressions", START))  # noqa: E731
    assert first_day(tmp_path / "one") == first_day(tmp_path / "a")


def test_large_days_are_written_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic, "CHUNK_ROWS", 3000)
    cfg = make_config(days=1, impressions_per_day=10_000)
    summary = synthetic.generate_logs(cfg, tmp_path, progress=False)
    path = raw_dir(tmp_path, "impressions", START) / "part-0.parquet"
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    impressions = pl.read_parquet(path)
    assert impressions.height == summary.rows["impressions"] == 10_000
    assert impressions["impression_id"].n_unique() == 10_000 and impressions["ts"].is_sorted()
    assert read(truth_dir(tmp_path, START)).height == 10_000


def test_negative_seed_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="seed"):
        synthetic.generate_logs(make_config(seed=-1), tmp_path, progress=False)


def test_cli_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--config", str(DEMO), "--warehouse", str(tmp_path), "--days", "2",
            "--impressions-per-day", "5000", "--users", "500", "--items", "200", "--seed", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    start = load_config(DEMO).generate.start_date
    for day in (start, start + dt.timedelta(days=1)):
        for table in DAILY_TABLES:
            assert (raw_dir(tmp_path, table, day) / "part-0.parquet").is_file()
        assert (truth_dir(tmp_path, day) / "part-0.parquet").is_file()
    assert read(raw_dir(tmp_path, "impressions", start)).height == 5000
    assert read(raw_dir(tmp_path, "users")).height == 500
    assert "impressions" in capsys.readouterr().out
