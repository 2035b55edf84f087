"""The README's first command, end to end on a tiny config: `funnelrank demo`."""

from pathlib import Path

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_the_nightly_pipeline_and_ranks_with_the_champion(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = (ROOT / "configs" / "demo.toml").read_text()
    state_dir = f'state_dir = "{tmp_path / "state"}"'
    text = text.replace('warehouse = "state/warehouse"', f'warehouse = "state/warehouse"\n{state_dir}')
    for old, new in [
        ("days = 14", "days = 6"),
        ("users = 20000", "users = 800"),
        ("items = 5000", "items = 300"),
        ("impressions_per_day = 100000", "impressions_per_day = 6000"),
        ("window_days = 7", "window_days = 2"),
        ("epochs = 3", "epochs = 1"),
        ("batch_size = 4096", "batch_size = 512"),
        # tiny data: a gate every model passes (the gate itself is tested in test_nightly.py)
        ("min_auc = 0.55", "min_auc = 0.0"),
        ("calibration_min = 0.8", "calibration_min = 0.001"),
        ("calibration_max = 1.25", "calibration_max = 1000.0"),
        ("auc_tolerance = 0.005", "auc_tolerance = 0.99"),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    config = tmp_path / "tiny.toml"
    config.write_text(text)

    assert main(["demo", "--config", str(config), "--warehouse", str(tmp_path / "wh")]) == 0
    out = capsys.readouterr().out
    assert out.count(" examples ") == 6  # every night builds (or has no) mature day
    assert out.count(" train ") == 3 and out.count(" promote ") == 3  # the last 3 nights run every stage
    assert "v1 promoted to champion" in out
    assert (
        out.count("fine-tune all layers on the newest 1 mature day(s)") == 2
    )  # nights 2 and 3 start from the champion
    assert "promotion rule not_worse at 95% one-sided confidence, tolerance 0.99" in out  # the rule in force
    assert "the promotion rules on each night's evaluation (in force: not_worse):" in out
    assert out.count("point promotes, non_inferiority promotes, not_worse promotes") == 2  # nights 2 and 3
    assert "platt calibration (predicted / observed) click " in out
    assert "funnelrank runs" in out and "oracle" in out
    assert "champion bundle" in out and "\n  1. " in out
    assert (tmp_path / "state" / "mlflow.db").exists()
    assert sorted(p.name for p in (tmp_path / "wh" / "training").iterdir()) == [
        "date=2026-11-01",
        "date=2026-11-02",
        "date=2026-11-03",
        "date=2026-11-04",
    ]
