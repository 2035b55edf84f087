"""Real data through the ordinary stages: the Ali-CCP sample -> adapter -> validate ->
features -> examples -> train, driven by configs/aliccp.toml alone."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from features.adapters import ALICCP_SAMPLES, aliccp_sample_days, aliccp_to_raw
from features.catalog import raw_dir, report_path, training_dir
from features.daily_counters import build_daily_aggregates
from features.errors import DataContractError
from features.examples import build_training_table
from features.validate import validate_day
from models.tracking import tracking_uri
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.train_stage import train_run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "aliccp.toml"
DATA = ROOT.parent / "shared" / "data" / "ali-ccp"

if not all((DATA / name).is_file() for name in ALICCP_SAMPLES):
    pytest.skip(f"Ali-CCP sample not found in {DATA} (shared/ is expected beside the repo)", allow_module_level=True)

START = dt.date(2026, 11, 1)
DAYS = [START + dt.timedelta(days=i) for i in range(3)]
CLOSING = START + dt.timedelta(days=3)


def config(tmp: Path, **overrides):
    return load_config(CONFIG, {"warehouse": str(tmp / "warehouse"), "state_dir": str(tmp / "state"), **overrides})


def csv_labels(day: dt.date) -> pl.DataFrame:
    """click, purchase of the day's CSV, with the row number the adapter puts in impression ids."""
    path = DATA / ALICCP_SAMPLES[DAYS.index(day)]
    return pl.read_csv(path, columns=["click", "purchase"]).with_row_index("row")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The whole path once: adapter, validate (4 days), features, examples, train."""
    tmp = tmp_path_factory.mktemp("aliccp")
    cfg = config(tmp)
    warehouse = cfg.warehouse
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run's own sqlite store under tmp
        summary = aliccp_to_raw(aliccp_sample_days(DATA, cfg.generate.start_date), warehouse, cfg.contract, cfg.seed)
        reports = {day: validate_day(cfg, warehouse, day) for day in [*DAYS, CLOSING]}
        for day in DAYS:
            build_daily_aggregates(cfg, warehouse, day)
        manifests = {day: build_training_table(cfg, warehouse, day + dt.timedelta(days=1)) for day in DAYS}
        result = train_run(cfg, warehouse, CLOSING, progress=False)
    return {
        "cfg": cfg,
        "warehouse": warehouse,
        "summary": summary,
        "reports": reports,
        "manifests": manifests,
        "result": result,
    }


def test_adapter_writes_one_impression_per_csv_row_and_events_for_the_labels(run) -> None:
    summary, warehouse, contract = run["summary"], run["warehouse"], run["cfg"].contract
    assert run["cfg"].contract.maturity_lag_days == 1 and summary["closing_days"] == [CLOSING.isoformat()]
    for day in DAYS:
        labels = csv_labels(day)
        counts = summary["days"][day.isoformat()]
        assert (counts["impressions"], counts["clicks"], counts["conversions"]) == (
            labels.height,
            labels["click"].sum(),
            labels["purchase"].sum(),
        )
        imps = pl.read_parquet(raw_dir(warehouse, "impressions", day))
        assert imps["impression_id"].is_unique().all() and imps["ts"].dt.date().eq(day).all()
        events = imps.join(
            pl.read_parquet(raw_dir(warehouse, "clicks", day)).rename({"ts": "click_ts"}), on="impression_id"
        ).join(
            pl.read_parquet(raw_dir(warehouse, "conversions", day)).rename({"ts": "conv_ts"}),
            on="impression_id",
            how="left",
        )
        click_delay = events["click_ts"] - events["ts"]
        conv_delay = (events["conv_ts"] - events["click_ts"]).drop_nulls()
        assert (click_delay > dt.timedelta(0)).all() and (
            click_delay <= dt.timedelta(minutes=contract.click_window_minutes)
        ).all()
        assert (conv_delay > dt.timedelta(0)).all() and (
            conv_delay <= dt.timedelta(hours=contract.attribution_window_hours)
        ).all()
        assert events["conv_ts"].drop_nulls().dt.date().eq(day).all()
    closing = pl.read_parquet(raw_dir(warehouse, "impressions", CLOSING))
    assert closing.height == 1 and pl.read_parquet(raw_dir(warehouse, "clicks", CLOSING)).height == 0

    every_row = pl.concat(
        [
            pl.read_csv(DATA / name, columns=["101", "205"], schema_overrides={"101": pl.String, "205": pl.String})
            for name in ALICCP_SAMPLES
        ]
    )
    users, items = pl.read_parquet(raw_dir(warehouse, "users")), pl.read_parquet(raw_dir(warehouse, "items"))
    assert sorted(users["user_id"]) == sorted(every_row["101"].unique())
    assert sorted(items["item_id"]) == sorted(every_row["205"].unique())
    assert summary["items"] == items.height and summary["items_with_differing_attributes"] == 2


def test_every_day_validates_without_quarantine(run) -> None:
    for day, report in run["reports"].items():
        assert report.passed, day
        assert {name: t.quarantined_rows for name, t in report.tables.items()} == dict.fromkeys(report.tables, 0), day


def test_training_tables_reconcile_and_carry_the_csv_labels_row_by_row(run) -> None:
    cfg, warehouse = run["cfg"], run["warehouse"]
    sparse, dense = [f.name for f in cfg.features.sparse], cfg.features.dense_names()
    for day, expected_rows in zip(DAYS, (100, 50, 50), strict=True):
        manifest = run["manifests"][day]
        assert manifest["date"] == day.isoformat()
        assert manifest["rows"] == {
            "impressions_in": expected_rows,
            "rows_out": expected_rows,
            "quarantined": 0,
            "validate_report": f"reports/validate/date={day.isoformat()}.json",
        }
        assert manifest["columns"]["sparse"] == sparse and manifest["columns"]["dense"] == dense
        table = pl.read_parquet(training_dir(warehouse, day) / "part-0.parquet")
        assert table.columns == [
            "impression_id",
            "ts",
            "raw_user_id",
            "click",
            "conversion",
            "conversion_value",
            *sparse,
            *dense,
        ]
        by_row = table.select(pl.col("impression_id").str.slice(-6).cast(pl.UInt32).alias("row"), "click", "conversion")
        joined = csv_labels(day).join(by_row, on="row", how="full", coalesce=True)
        assert joined.height == expected_rows
        assert joined["click"].cast(pl.Int8).equals(joined["click_right"].cast(pl.Int8))
        assert joined["purchase"].cast(pl.Int8).equals(joined["conversion"])
        # label-encoded ids are present: only the padding row would mean an unmapped raw column
        assert table.select((pl.col(name) > 0).all() for name in sparse).row(0) == (True,) * len(sparse)
    totals = {
        day: pl.read_parquet(training_dir(warehouse, day) / "part-0.parquet").select("click", "conversion").sum().row(0)
        for day in DAYS
    }
    assert totals == {DAYS[0]: (7, 1), DAYS[1]: (3, 1), DAYS[2]: (2, 1)}


def test_training_finishes_and_logs_an_mlflow_run(run) -> None:
    cfg, result = run["cfg"], run["result"]
    assert 1 <= result.epochs_run <= cfg.train.epochs and len(result.history) == result.epochs_run
    for name, value in result.val_metrics.items():
        assert isinstance(value, float) and not math.isinf(value), name  # NaN only where a class is absent
    assert math.isfinite(result.val_metrics["click_logloss"]) and math.isfinite(result.val_metrics["ctcvr_logloss"])
    assert all(math.isfinite(h["train/loss_total"]) for h in result.history)

    uri = tracking_uri(cfg.state_dir)
    assert uri.startswith("sqlite:///") and str(cfg.state_dir.resolve()) in uri
    mlflow_run = MlflowClient(uri).get_run(result.mlflow_run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["val_day"] == DAYS[2].isoformat()
    assert mlflow_run.data.tags["train_days"] == f"{DAYS[0].isoformat()},{DAYS[1].isoformat()}"
    assert mlflow_run.data.params["features.sparse"].count("'column'") == len(cfg.features.sparse)
    for name in ("val/click_auc", "val/ctcvr_auc", "val/click_logloss", "train/loss_click", "best/click_auc"):
        assert name in mlflow_run.data.metrics, name


def test_cli_adapter_writes_the_same_rows_as_the_function(run, tmp_path, capsys) -> None:
    warehouse = tmp_path / "warehouse"
    assert main(["adapt-aliccp", "--config", str(CONFIG), "--warehouse", str(warehouse), "--data-dir", str(DATA)]) == 0
    assert "2026-11-01: 100 impressions, 7 clicks, 1 conversions" in capsys.readouterr().out
    for table, day in [
        ("impressions", DAYS[0]),
        ("clicks", DAYS[1]),
        ("conversions", DAYS[2]),
        ("impressions", CLOSING),
    ]:
        ours, theirs = raw_dir(warehouse, table, day), raw_dir(run["warehouse"], table, day)
        assert pl.read_parquet(ours).equals(pl.read_parquet(theirs)), (table, day)
    assert pl.read_parquet(raw_dir(warehouse, "items")).equals(pl.read_parquet(raw_dir(run["warehouse"], "items")))


def test_a_missing_column_names_the_file(tmp_path) -> None:
    broken = tmp_path / "broken.csv"
    pl.read_csv(DATA / ALICCP_SAMPLES[0]).drop("216").write_csv(broken)
    cfg = config(tmp_path)
    with pytest.raises(DataContractError, match=r"broken\.csv lacks column\(s\) 216"):
        aliccp_to_raw({START: broken}, cfg.warehouse, cfg.contract, cfg.seed)


def test_a_purchase_without_click_is_quarantined_not_dropped(tmp_path) -> None:
    rows = pl.read_csv(DATA / ALICCP_SAMPLES[2])
    first_unclicked = rows["click"].arg_min()
    odd = tmp_path / "odd.csv"
    rows.with_columns(
        pl.when(pl.int_range(pl.len()) == first_unclicked).then(1).otherwise(pl.col("purchase")).alias("purchase")
    ).write_csv(odd)
    cfg = config(tmp_path, validate={"max_bad_row_share": 1.0})
    aliccp_to_raw({START: odd}, cfg.warehouse, cfg.contract, cfg.seed)
    report = validate_day(cfg, cfg.warehouse, START)
    assert report.tables["conversions"].reasons == {"conversion_without_click": 1}
    written = json.loads(report_path(cfg.warehouse, "validate", START).read_text())
    assert written["tables"]["conversions"]["valid_rows"] == 1


def test_the_same_sample_as_a_feature_table_trains_the_funnel_by_config_alone(tmp_path, monkeypatch):
    """configs/aliccp_table.toml: the CSVs straight through the [table] source, purchase a
    funnel step after click (ESMM): no adapter, no event logs; export parity holds."""
    from features.table_source import prepare_table
    from pipeline.export_stage import export_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    table_config = ROOT / "configs" / "aliccp_table.toml"
    paths = {s: str(DATA / name) for s, name in zip(("train", "val", "test"), ALICCP_SAMPLES, strict=True)}
    cfg = load_config(
        table_config,
        {
            "warehouse": str(tmp_path / "warehouse"),
            "state_dir": str(tmp_path / "state"),
            "table": paths,
            "train": {"epochs": 1},
        },
    )
    prepared = prepare_table(cfg, cfg.warehouse)
    assert {s: m["rows_out"] for s, m in prepared.manifest["splits"].items()} == {"train": 100, "val": 50, "test": 50}
    result = train_run(cfg, cfg.warehouse, None, progress=False)
    assert {"click_auc", "cvr_auc", "ctcvr_auc", "ctcvr_logloss"} <= set(result.val_metrics)
    assert math.isfinite(result.val_metrics["ctcvr_logloss"])
    summary = export_run(cfg, cfg.warehouse, None, result.model, result.mlflow_run_id)
    assert summary["parity_rows"] >= 50 and max(summary["parity_max_abs_diff"].values()) <= 1e-5
    assert set(summary["parity_max_abs_diff"]) == {"p_click", "p_ctcvr", "p_cvr", "score"}
