"""The Census-Income data (real, ../shared/data) through the `funnelrank` commands with a
config only: train (PLE, two independent tasks), evaluate on the test split, export, and
batch-score the raw test CSV rows; plus the errors of a table config used the wrong way."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from test_distributed import torchrun_train

from models.tracking import EXPERIMENT, tracking_uri
from pipeline.cli import main
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def census_config(tmp_path_factory) -> tuple[Path, Path]:
    """configs/census.toml with absolute table paths, a tmp warehouse and state dir, PLE,
    one epoch (a TOML file, as users pass it)."""
    base = load_config(REPO / "configs" / "census.toml")
    paths = {s: REPO / getattr(base.table, s) for s in SPLITS}
    if not all(p.is_file() for p in paths.values()):
        pytest.skip(f"census files not found beside the repo: {paths['train']}")
    tmp = tmp_path_factory.mktemp("census_cli")
    text = (REPO / "configs" / "census.toml").read_text()
    for s, p in paths.items():
        text = text.replace(f'"{getattr(base.table, s)}"', f'"{p}"')
    text = text.replace('warehouse = "state/census/warehouse"', f'warehouse = "{tmp / "warehouse"}"')
    text = text.replace('backbone = "mmoe"', 'backbone = "ple"').replace("epochs = 5", "epochs = 1")
    config = tmp / "census.toml"
    config.write_text(text)
    assert load_config(config).model.backbone == "ple"
    return config, tmp


def test_census_train_evaluate_export_score(census_config, capsys):
    config, tmp = census_config
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "income_auc" in out and "marital" in out
    cfg = load_config(config)
    client = MlflowClient(tracking_uri(cfg.state_dir))
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.stage = 'train'")
    assert run.info.run_name == "train-table" and run.data.tags["source"] == "table"
    assert {"data.train.sha256", "data.val.sha256", "data.test.sha256"} <= set(run.data.tags)
    metrics = run.data.metrics
    # one epoch on 60k real rows: far above chance on both tasks
    assert metrics["val/income_auc"] > 0.9 and metrics["val/marital_auc"] > 0.98
    assert metrics["val/gate_income_expert0"] + metrics["val/gate_income_expert1"] + metrics[
        "val/gate_income_expert2"
    ] == pytest.approx(1.0, abs=1e-4)  # PLE: 1 own expert + 2 shared
    assert "train/grad_cosine" in metrics
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/roc.png", "plots/reliability.png", "plots/gate_usage.png"} <= plots

    assert main(["evaluate", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "19,953 rows of the test split" in out
    test_auc = float(out.split("income  auc ")[1].split()[0])
    assert test_auc > 0.9
    # with its standard error from the test split's 19,953 rows (about 0.0025 for income)
    assert 0.001 < float(out.split("income  auc ")[1].split("± ")[1].split()[0]) < 0.005

    assert main(["export", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "parity on" in out and "the table's test split" in out
    bundle = Path(out.split("bundle ")[1].split()[0])

    # the raw test CSV, as a user would hand it over, scored without torch
    raw = pl.read_csv(cfg.table.test).drop("income", "marital status")
    raw.write_parquet(tmp / "to_score.parquet")
    assert (
        main(
            [
                "score",
                "--bundle",
                str(bundle),
                "--input",
                str(tmp / "to_score.parquet"),
                "--output",
                str(tmp / "scores.parquet"),
            ]
        )
        == 0
    )
    scored = pq.read_table(tmp / "scores.parquet")
    assert scored.num_rows == 19_953
    assert {"p_income", "p_marital", "score"} <= set(scored.column_names)
    truth = pl.read_csv(cfg.table.test)["income"].to_numpy()
    from models.metrics import auc

    assert auc(truth, scored.column("p_income").to_numpy()) == pytest.approx(test_auc, abs=1e-4)


def test_table_config_used_the_wrong_way(census_config, tmp_path, capsys):
    config, _ = census_config
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace('label = "income"', 'label = "no such column"'))
    assert main(["train", "--config", str(bad), "--warehouse", str(tmp_path / "wh"), "--quiet"]) == 4
    assert "'no such column'" in capsys.readouterr().err
    # event-log stages need a date; a table config's features cannot be read from logs
    assert main(["train", "--config", "configs/demo.toml", "--warehouse", str(tmp_path / "wh2")]) == 3
    assert "needs a run date (--date)" in capsys.readouterr().err
    assert main(["train", "--config", str(config.parent / "missing.toml")]) == 2
    capsys.readouterr()
    for command in (
        ["nightly", "--date", "2026-11-12"],
        ["validate", "--date", "2026-11-12"],
        ["promote", "--date", "2026-11-12"],
    ):
        assert main([*command, "--config", str(config)]) == 3
        assert "feature table ([table] section): it has no event logs" in capsys.readouterr().err


def test_census_trains_under_torchrun_with_two_ranks(census_config, tmp_path):
    """`funnelrank train` of a table config under torchrun: rank 0 prepares the table while
    the other waits, each rank reads its own row groups, metrics cover all rows."""
    config, _ = census_config
    done = torchrun_train("--config", str(config), "--warehouse", str(tmp_path / "warehouse"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count("train table-") == 1  # rank 0 reports
    income_auc = float(done.stdout.split("income  auc ")[1].split()[0])
    assert income_auc > 0.9
