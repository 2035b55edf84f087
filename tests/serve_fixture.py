"""`funnelrank serve` as a real process on loopback for the HTTP tests, and plain calls to it."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, host: str = "127.0.0.1"
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def start_server(
    bundle: Path, *flags: str, env: dict | None = None, host: str = "127.0.0.1", preexec_fn=None
) -> tuple[subprocess.Popen, int]:
    """``funnelrank serve --bundle B --port P FLAGS...`` (``env``: variables added to ours),
    once /healthz answers; (the process, P)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "serve",
            "--bundle",
            str(bundle),
            "--host",
            host,
            "--port",
            str(port),
            *flags,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=preexec_fn,
    )
    deadline = time.monotonic() + 60
    while True:  # poll until ready, never a fixed sleep
        try:
            if call(port, "GET", "/healthz", host=host)[0] == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.communicate()[1]}")
        time.sleep(0.05)


def stop_server(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM, wait; (stdout, stderr)."""
    proc.terminate()
    try:
        return proc.communicate(timeout=60)
    finally:
        proc.kill()
