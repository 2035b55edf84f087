"""Recorded sha256 digests: trusted while they describe the file, recomputed otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from features.io import (
    SHA256_XATTR,
    atomic_dir,
    atomic_write_json,
    recorded_sha256,
    sha256_dir,
    sha256_file,
    write_parquet_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def _xattrs_work(path) -> bool:
    try:
        os.setxattr(path, "user.funnelrank.probe", b"1")
        return True
    except (OSError, AttributeError):
        return False


def test_write_parquet_dir_records_the_digest_the_hash_functions_reuse(tmp_path):
    target = write_parquet_dir(tmp_path / "part", pa.table({"x": list(range(100))}))
    data = target / "part-0.parquet"
    if not _xattrs_work(data):
        pytest.skip("this file system keeps no extended attributes")
    true = sha256_file(data)
    assert os.getxattr(data, SHA256_XATTR).decode().split()[0] == true
    assert recorded_sha256(data) == true
    # The record is what is returned while size and mtime match: a forged one shows through...
    stat = data.stat()
    os.setxattr(data, SHA256_XATTR, f"{'0' * 64} {stat.st_size} {stat.st_mtime_ns}".encode())
    assert recorded_sha256(data) == "0" * 64
    # ...and stops counting once the file changes, so a rewritten partition is hashed anew.
    data.write_bytes(data.read_bytes() + b"x")
    assert recorded_sha256(data) == sha256_file(data) != true


def test_sha256_dir_is_the_same_with_or_without_records(tmp_path):
    first = write_parquet_dir(tmp_path / "a", pa.table({"x": [1, 2, 3]}))
    copy = tmp_path / "b"
    copy.mkdir()
    (copy / "part-0.parquet").write_bytes((first / "part-0.parquet").read_bytes())  # a copy without attributes
    assert sha256_dir(first) == sha256_dir(copy)
    assert not any(p.name.startswith(".") for p in first.iterdir())  # readers of the folder see only the data


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    """kill -9 inside atomic_dir (e.g. during export) leaves its .tmp- folder; the next
    write into the same folder removes it, and keeps those of live writers."""
    bundles = tmp_path / "bundles"
    code = (
        "import os, signal, sys\nfrom features.io import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n    (tmp / 'model.onnx').write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.Popen([sys.executable, "-c", code, str(bundles / "run-a")], cwd=ROOT)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert [p.name for p in bundles.iterdir()] == [f".tmp-run-a-{killed.pid}"]
    (bundles / f".tmp-state.json-{killed.pid}").write_text("{")  # a half-written file of the same process
    live = bundles / f".tmp-run-c-{os.getpid()}"
    live.mkdir()

    with atomic_dir(bundles / "run-b") as tmp:
        (tmp / "model.onnx").write_bytes(b"y")
    assert sorted(p.name for p in bundles.iterdir()) == sorted(["run-b", live.name])
    atomic_write_json(bundles / "run-b.json", {"ok": True})
    assert live.exists()
