"""The nightly DAG on a tiny synthetic warehouse: two nights train, evaluate, export and
promote (the second warm-started from the first's champion); reruns skip; ``--from``
forces; the lock refuses a second run; kill -9 during examples and during train is
resumed by the same command with the same outputs; a corrupt raw file stops the night
before anything downstream runs and leaves the champion alone."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from features.catalog import daily_dir, raw_dir, training_manifest_path
from features.synthetic import generate_logs
from models.tracking import to_toml, tracking_uri
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.nightly import STAGES, run_nights, warehouse_lock
from pipeline.registry import current_champion

ROOT = Path(__file__).resolve().parents[1]
START = dt.date(2026, 11, 1)
DAYS = [START + dt.timedelta(days=i) for i in range(7)]  # nights 2..5 backfill examples, 5 and 6 train


def tiny_config(root: Path):
    return load_config(
        ROOT / "configs" / "demo.toml",
        {
            "state_dir": str(root / "state"),
            "warehouse": str(root / "wh"),
            "generate": {
                "start_date": START,
                "days": len(DAYS),
                "users": 800,
                "items": 300,
                "impressions_per_day": 6000,
            },
            # a DIN click sequence rides along: warm start, --from, resume and the gate with it
            "features": {"sequences": [{"name": "clicked", "items": ["item_id", "category_id"], "max_length": 10}]},
            "train": {"window_days": 3, "epochs": 2, "batch_size": 512, "patience": 5},
            # tiny data: a gate every model passes; the gate's own rules are tested below
            "promote": {"min_auc": 0.0, "calibration_min": 0.001, "calibration_max": 1000.0, "auc_tolerance": 0.99},
        },
    )


def write_config(cfg, path: Path) -> Path:
    path.write_text(to_toml(cfg.model_dump(by_alias=True)))
    return path


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """Generate 7 days, backfill the examples of nights 1..4, run nights 5 and 6 in full."""
    root = tmp_path_factory.mktemp("nightly")
    cfg = tiny_config(root)
    generate_logs(cfg, cfg.warehouse, progress=False)
    lines: list[str] = []
    run_nights(cfg, cfg.warehouse, DAYS[0], DAYS[4], last="examples", echo=lines.append)
    results = run_nights(cfg, cfg.warehouse, DAYS[5], DAYS[6], echo=lines.append)
    return cfg, results, lines


def test_two_nights_train_evaluate_export_and_promote(nights):
    cfg, results, lines = nights
    first, second = results[DAYS[5]], results[DAYS[6]]
    assert [line.split()[1] for line in lines[-14:]] == list(STAGES) * 2
    assert first["train"]["warm_start"] == "none" and "no champion" in first["train"]["warm_start_reason"]
    assert first["promote"]["promoted"] and first["promote"]["version"] == 1
    assert first["evaluate"]["champion"] is None
    # the second night fine-tunes the champion on the newest mature day and is compared with it
    assert second["train"]["warm_start"] == "champion" and second["train"]["warm_start_version"] == "1"
    assert second["train"]["window_days"] == cfg.nightly.fine_tune_days + 1
    assert set(second["evaluate"]["champion"]) == set(second["evaluate"]["candidate"])
    # the AUC's change comes with its own (paired) standard error, logged and printed
    change_se = second["evaluate"]["delta_auc_se"]
    assert set(change_se) == set(cfg.views()) and 0 < change_se["click"] < 0.05
    assert "| change " in lines[-14 + STAGES.index("evaluate") + len(STAGES)]
    assert second["promote"]["version"] == 2
    champion = current_champion(cfg)
    assert champion.version == (2 if second["promote"]["promoted"] else 1)

    client = MlflowClient(tracking_uri(cfg.state_dir))
    version = client.get_model_version(cfg.promote.model_name, "2")
    assert version.run_id == second["train"]["mlflow_run_id"]
    assert version.tags["promotion"] in ("champion", "rejected") and version.tags["promotion_reason"]
    assert version.tags["warm_start"] == "champion"
    evaluated = client.get_run(second["evaluate"]["mlflow_run_id"]).data.metrics
    assert evaluated["delta/click_auc_se"] == pytest.approx(change_se["click"])
    assert evaluated["candidate/click_auc_se"] > 0
    # one parent run per night with the training and evaluation runs as children
    for day, night in results.items():
        children = client.search_runs(
            [client.get_run(night["train"]["mlflow_run_id"]).info.experiment_id],
            "tags.mlflow.parentRunId = "
            f"'{client.get_run(night['evaluate']['mlflow_run_id']).data.tags['mlflow.parentRunId']}'",
        )
        assert {r.data.tags["stage"] for r in children} == {"train", "evaluate"}
        parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
        assert parent.info.run_name == f"nightly-{day}" and parent.info.status == "FINISHED"
        assert parent.data.tags["outcome"] == night["promote"]["detail"]
        assert parent.data.metrics["stage/train/rows"] > 0
    # the champion's bundle, straight from the registry, is the one its night exported
    from serving.bundle import load_bundle_from_mlflow
    from serving.scorer import Scorer

    bundle = load_bundle_from_mlflow(
        f"models:/{cfg.promote.model_name}@champion", tracking_uri=tracking_uri(cfg.state_dir)
    )
    exported = results[DAYS[5] if champion.version == 1 else DAYS[6]]["export"]
    assert bundle.sha256 == exported["bundle_sha256"]
    assert Scorer(bundle).score({"user_id": "nobody", "candidates": [{"item_id": "i1"}, {"item_id": "i2"}]})


def test_rerun_skips_finished_stages_and_from_forces(nights):
    cfg, _, _ = nights
    lines: list[str] = []
    run_nights(cfg, cfg.warehouse, DAYS[6], DAYS[6], echo=lines.append)
    assert [line.split()[2] for line in lines] == ["skipped"] * 5 + ["skipped", "skipped"]
    lines.clear()
    run_nights(cfg, cfg.warehouse, DAYS[6], DAYS[6], rerun_from="evaluate", echo=lines.append)
    statuses = [line.split()[2] for line in lines]
    # export runs again but finds its verified bundle from the same weights: it keeps it
    assert statuses == ["skipped"] * 4 + ["done", "skipped", "done"]
    versions = MlflowClient(tracking_uri(cfg.state_dir)).search_model_versions(f"name='{cfg.promote.model_name}'")
    assert len(versions) == 2  # registering the same training run again does not add a version


def test_lock_keeps_a_second_run_off_the_warehouse(nights, capsys):
    cfg, _, _ = nights
    config = write_config(cfg, cfg.warehouse.parent / "cfg.toml")
    with warehouse_lock(cfg.warehouse):
        code = main(["nightly", "--config", str(config), "--date", str(DAYS[6])])
    assert code == 5
    assert "another run holds the lock" in capsys.readouterr().err


def _nightly_process(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "nightly", "--config", str(config), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_when(process: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"finished before the kill point:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_killed_examples_and_train_resume_to_the_same_outputs(nights, tmp_path):
    reference, results, _ = nights
    cfg = tiny_config(tmp_path)
    for part in ("raw", "truth"):
        shutil.copytree(reference.warehouse / part, cfg.warehouse / part)
    config = write_config(cfg, tmp_path / "cfg.toml")

    # kill -9 as soon as the first night with a mature day starts writing its training table
    records = Path(cfg.state_dir) / "nightly" / str(DAYS[2])
    proc = _nightly_process(config, "--start", str(DAYS[0]), "--end", str(DAYS[4]), "--to", "examples")
    _kill_when(proc, lambda: (records / "features.json").exists())
    assert not (records / "examples.json").exists()
    assert (
        main(["nightly", "--config", str(config), "--start", str(DAYS[0]), "--end", str(DAYS[4]), "--to", "examples"])
        == 0
    )

    # kill -9 after the first epoch's checkpoint of night 5's training
    checkpoints = Path(cfg.state_dir) / "checkpoints"
    proc = _nightly_process(config, "--date", str(DAYS[5]))
    _kill_when(proc, lambda: any(checkpoints.glob("*/last.pt")))
    assert main(["nightly", "--config", str(config), "--date", str(DAYS[5])]) == 0

    for day in DAYS[:3]:
        ours = json.loads(training_manifest_path(cfg.warehouse, day).read_text())
        theirs = json.loads(training_manifest_path(reference.warehouse, day).read_text())
        assert ours["content_sha256"] == theirs["content_sha256"]
    resumed = json.loads((Path(cfg.state_dir) / "nightly" / str(DAYS[5]) / "train.json").read_text())["outputs"]
    assert resumed["val"] == pytest.approx(results[DAYS[5]]["train"]["val"], abs=1e-6)
    assert current_champion(cfg).version == 1


def test_corrupt_raw_file_stops_the_night_and_keeps_the_champion(nights, tmp_path, capsys):
    reference, _, _ = nights
    cfg = reference
    night = DAYS[6] + dt.timedelta(days=1)
    # a new day whose impressions file is not Parquet at all
    bad = raw_dir(cfg.warehouse, "impressions", night) / "part-0.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PAR1 this is not a parquet file")
    for table in ("clicks", "conversions"):
        shutil.copytree(raw_dir(cfg.warehouse, table, DAYS[6]), raw_dir(cfg.warehouse, table, night))
    champion = current_champion(cfg)
    config = write_config(cfg, tmp_path / "cfg.toml")
    try:
        assert main(["nightly", "--config", str(config), "--date", str(night)]) == 4
        assert "part-0.parquet" in capsys.readouterr().err
        records = Path(cfg.state_dir) / "nightly" / str(night)
        assert not [p.name for p in records.glob("*.json") if p.stem in STAGES]  # not even validate finished
        assert not daily_dir(cfg.warehouse, "user", night).exists()
        assert current_champion(cfg) == champion
    finally:
        for table in ("impressions", "clicks", "conversions"):
            shutil.rmtree(raw_dir(cfg.warehouse, table, night), ignore_errors=True)


def test_gate_rules():
    from pipeline.config import parse_config
    from pipeline.registry import gate

    rules = parse_config(
        {
            "features": {"sparse": [{"name": "a", "table": "impressions", "column": "a"}]},
            "promote": {"auc_tolerance": 0.01, "min_auc": 0.6},
        }
    )
    good = {"click_auc": 0.70, "cvr_auc": 0.65, "ctcvr_auc": 0.72, "click_calibration": 1.0, "ctcvr_calibration": 1.1}
    assert gate(good, None, rules).promote
    assert not gate(good | {"cvr_auc": 0.59}, None, rules).promote  # first model below min_auc
    decision = gate(good | {"ctcvr_calibration": 1.4}, None, rules)
    assert not decision.promote and "ctcvr_calibration 1.400" in decision.reason
    champion = good | {"click_auc": 0.705}
    assert gate(good, champion, rules).promote  # a 0.005 drop is within the tolerance
    decision = gate(good, champion | {"ctcvr_auc": 0.74}, rules)
    assert not decision.promote and "ctcvr_auc 0.7200 fell 0.0200" in decision.reason
    assert not gate(good | {"click_auc": float("nan")}, champion, rules).promote
    # standard errors of the changes annotate the reason and decide nothing
    noisy = gate(good, champion | {"ctcvr_auc": 0.74}, rules, {"ctcvr": 0.031, "click": 0.002})
    assert not noisy.promote and "ctcvr_auc 0.7200 fell 0.0200 ± 0.0310 below" in noisy.reason
    assert "click_auc -0.0050 ± 0.0020" in gate(good, champion, rules, {"click": 0.002}).reason


def test_runs_compare_prints_metrics_differing_config_and_writes_the_trend(nights, capsys):
    cfg, results, _ = nights
    config = write_config(cfg, cfg.warehouse.parent / "cfg-compare.toml")
    picture = cfg.warehouse.parent / "trend.png"
    assert main(["runs", "compare", "--config", str(config), "--last", "2", "--output", str(picture)]) == 0
    out = capsys.readouterr().out
    assert f"train-{DAYS[5]}" in out and f"train-{DAYS[6]}" in out
    assert "click_auc" in out and "ctcvr_calibration" in out
    assert re.search(r"0\.\d{4} ± 0\.0\d{3}", out)  # an AUC with its standard error
    assert "config: train.window_days" in out  # the warm start trained on a shorter window
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # explicit run ids; the trend goes to the newest run's artifacts
    run_ids = [results[d]["train"]["mlflow_run_id"] for d in (DAYS[5], DAYS[6])]
    assert main(["runs", "compare", "--config", str(config), *run_ids]) == 0
    assert "reports/compare_2_runs.png" in capsys.readouterr().out
    artifacts = MlflowClient(tracking_uri(cfg.state_dir)).list_artifacts(run_ids[1], "reports")
    assert [a.path for a in artifacts] == ["reports/compare_2_runs.png"]
    assert main(["runs", "compare", "--config", str(config), "no-such-run"]) == 3
    assert "no MLflow run 'no-such-run'" in capsys.readouterr().err


def test_same_architecture_names_what_does_not_fit():
    from pipeline.config import parse_config
    from pipeline.registry import same_architecture

    base = {"features": {"sparse": [{"name": "a", "table": "impressions", "column": "a", "capacity": 10}]}}
    cfg = parse_config(base)
    grown = parse_config(
        {"features": {"sparse": [{"name": "a", "table": "impressions", "column": "a", "capacity": 99}]}}
    )
    assert same_architecture(cfg, grown) is None  # vocabularies may grow
    assert "tasks differ" in same_architecture(
        cfg,
        parse_config(
            {
                **base,
                "tasks": [
                    {"name": "click"},
                    {
                        "name": "buy",
                        "label": "conversion",
                        "after": "click",
                        "joint_name": "ctcvr",
                        "conditional_name": "cvr",
                    },
                ],
            }
        ),
    )
    assert "[model]" in same_architecture(cfg, parse_config({**base, "model": {"backbone": "ple"}}))
    assert "does not validate" in same_architecture(None, cfg)  # a champion of an older config schema
    bucket = {"name": "p", "table": "items", "column": "price", "kind": "bucket", "boundaries": [1.0, 2.0]}
    with_buckets = parse_config({"features": {"sparse": [*base["features"]["sparse"], bucket]}})
    moved = parse_config({"features": {"sparse": [*base["features"]["sparse"], bucket | {"boundaries": [1.0, 3.0]}]}})
    assert "bucket boundaries" in same_architecture(with_buckets, moved)  # the rows would mean other buckets
    item = {"name": "item_id", "table": "impressions", "column": "item_id", "capacity": 10}
    clicked = {"name": "clicked", "items": ["item_id"], "max_length": 5}
    with_sequence = parse_config({"features": {"sparse": [item], "sequences": [clicked]}})
    longer = parse_config({"features": {"sparse": [item], "sequences": [clicked | {"max_length": 50}]}})
    assert same_architecture(with_sequence, longer) is None  # more elements, the same weights
    other_encoder = parse_config({"features": {"sparse": [item], "sequences": [clicked | {"encoder": "mean"}]}})
    assert "sequences" in same_architecture(with_sequence, other_encoder)
    assert "sequences" in same_architecture(parse_config({"features": {"sparse": [item]}}), with_sequence)
