"""The README's first command, end to end on a tiny config: `funnelrank demo`."""

from pathlib import Path

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_every_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = (ROOT / "configs" / "demo.toml").read_text()
    text = text.replace('state_dir = "state"', f'state_dir = "{tmp_path / "state"}"')
    for old, new in [("days = 14", "days = 5"), ("users = 20000", "users = 800"), ("items = 5000", "items = 300"),
                     ("impressions_per_day = 100000", "impressions_per_day = 6000"),
                     ("window_days = 7", "window_days = 2"), ("epochs = 3", "epochs = 1"), ("batch_size = 4096", "batch_size = 512")]:
        assert old in text, old
        text = text.replace(old, new)
    config = tmp_path / "tiny.toml"
    config.write_text(text)

    assert main(["demo", "--config", str(config), "--warehouse", str(tmp_path / "wh")]) == 0
    out = capsys.readouterr().out
    assert out.count("validate ok") == 5
    assert out.count("examples 6,000 rows") == 3  # days 3-5 build the mature days 1-3
    assert "trained mmoe / esmm" in out and "oracle" in out
    assert (tmp_path / "state" / "mlflow.db").exists()
    assert sorted(p.name for p in (tmp_path / "wh" / "training").iterdir()) == [
        "date=2026-11-01", "date=2026-11-02", "date=2026-11-03",
    ]
