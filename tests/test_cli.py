"""Every subcommand answers --help, takes --config/--warehouse, and bad config exits 2."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(action.choices) if action else {}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return _children(build_parser())


def commands() -> list[str]:
    """Every runnable command line prefix: ``validate``, ``runs compare``, ..."""
    return [
        f"{name} {child}" if child else name
        for name, parser in subcommands().items()
        for child in (_children(parser) or {"": None})
    ]


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0
    for name in subcommands():
        assert name in res.stdout


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_stage_has_help_and_common_flags(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*name.split(), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--warehouse" in out


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "configs" / "demo.toml").read_text().replace("[validate]", "[validate]\nmax_bad_rows = 3"))
    assert main(["validate", "--config", str(bad), "--date", "2026-11-01"]) == 2
    assert "validate.max_bad_rows: unknown key" in capsys.readouterr().err


def test_infinite_value_and_non_utf8_config_exit_2_naming_key_and_file(tmp_path, capsys):
    text = (ROOT / "configs" / "demo.toml").read_text()
    inf = tmp_path / "inf.toml"
    inf.write_text(text.replace("prior_strength = 20.0", "prior_strength = inf"))
    assert main(["examples", "--config", str(inf), "--warehouse", str(tmp_path / "wh"), "--date", "2026-11-03"]) == 2
    assert "features.prior_strength: Input should be a finite number (got inf)" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(text.replace("# funnelrank demo", "# caf\u00e9 demo", 1).encode("latin-1"))
    assert main(["train", "--config", str(latin1), "--warehouse", str(tmp_path / "wh"), "--date", "2026-11-10"]) == 2
    assert f"config {latin1} is not UTF-8 text" in capsys.readouterr().err


def test_bad_date_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--date", "yesterday"])
    assert exit_.value.code == 2
    assert "not a date" in capsys.readouterr().err


@pytest.fixture
def held_lock(tmp_path):
    """The warehouse lock held by another process (as a running nightly holds it)."""
    warehouse = tmp_path / "wh"
    code = (
        "import sys\nfrom pipeline.nightly import warehouse_lock\n"
        "with warehouse_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(warehouse)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        yield warehouse
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--days", "1"],
        ["validate", "--date", "2026-11-01"],
        ["features", "--date", "2026-11-01"],
        ["examples", "--date", "2026-11-03"],
        ["train", "--date", "2026-11-03"],
        ["export", "--date", "2026-11-03"],
        ["evaluate", "--date", "2026-11-03"],
        ["nightly", "--date", "2026-11-03"],
    ],
)
def test_writing_stages_wait_for_no_one_while_the_warehouse_is_locked(held_lock, command, capsys):
    assert main([*command, "--warehouse", str(held_lock)]) == 5
    assert "another run holds the lock" in capsys.readouterr().err
    assert sorted(p.name for p in held_lock.iterdir()) == [".funnelrank.lock"]  # nothing written
