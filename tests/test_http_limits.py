"""The HTTP server against hostile clients, as a real process on loopback: what one client
can hold is bounded (memory, idle and half-sent connections, the connection cap),
framing it cannot trust is refused and the connection closed, client errors are 4xx,
SIGTERM answers what is in flight, the admin route needs a token and refuses cross-origin
requests, and start-up errors are one line. Every test sends to 127.0.0.1 (or ::1) only,
a bounded number of requests."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bundle_fixture import small_model
from serve_fixture import ROOT, call, start_server, stop_server

from pipeline.bundle import export_bundle, serving_spec
from pipeline.config import ScoringConfig
from serving.bundle import load_bundle
from serving.spec import ScoringLimits

TOKEN = "limits-test-token"
RANK = json.dumps({"user_id": "u1", "context": {"device": "ios", "slot": 1}, "candidates": [{"item_id": "i1"}]})
RANK = RANK.encode()


@pytest.fixture(scope="module")
def bundle(tiny_warehouse, tmp_path_factory):
    cfg, files = tiny_warehouse
    folder = tmp_path_factory.mktemp("limits") / "bundle"
    return export_bundle(cfg, cfg.warehouse, small_model(cfg, files), folder, files)


@pytest.fixture(scope="module")
def server(bundle):
    """Default limits, the admin route on."""
    proc, port = start_server(bundle, env={"FUNNELRANK_ADMIN_TOKEN": TOKEN})
    yield proc, port
    stop_server(proc)


def _config(tmp_path: Path, **scoring: float) -> str:
    """configs/demo.toml with these [scoring] keys, as a --config path."""
    text = (ROOT / "configs" / "demo.toml").read_text()
    for name in scoring:
        text = re.sub(rf"^{name} = .*\n", "", text, flags=re.MULTILINE)
    keys = "".join(f"{name} = {value!r}\n" for name, value in scoring.items())
    path = tmp_path / "serve.toml"
    path.write_text(re.sub(r"^\[scoring\].*\n", lambda m: m.group(0) + keys, text, count=1, flags=re.MULTILINE))
    return str(path)


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def _metric(port: int, name: str, conn: http.client.HTTPConnection | None = None) -> float:
    """A value of /metrics (0 when absent), asked on ``conn`` or on a new connection."""
    if conn is None:
        text = call(port, "GET", "/metrics")[1].decode()
    else:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    line = next((x for x in text.splitlines() if x.startswith(name + " ")), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection; everything answered until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        return _read_all(sock)


def test_long_context_values_are_refused_and_memory_stays_bounded(server):
    """The issue's probe: 200 requests on one connection, each with a distinct 1 MB
    context.device (before: +547 MB of RSS that never came back)."""
    proc, port = server
    assert call(port, "POST", "/v1/rank", RANK.replace(b'"ios"', b'"' + b"d" * 256 + b'"'))[0] == 200  # at the limit
    before = _rss_mb(proc.pid)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for k in range(200):
        device = f"{k:06d}" + "x" * 999_994
        body = json.dumps({"user_id": "u1", "context": {"device": device}, "candidates": [{"item_id": "i1"}]})
        conn.request("POST", "/v1/rank", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 400 and "context.device has 1,000,000 characters, above the limit of 256" in error
    conn.close()
    assert _rss_mb(proc.pid) - before < 100


def test_scorer_caches_hold_no_long_context_values(bundle):
    """In process too (Scorer.score, no HTTP limit in front): context values are cached by
    value, so long ones must not be kept."""
    from serving.scorer import Scorer

    scorer = Scorer(load_bundle(bundle))
    before = _rss_mb(os.getpid())
    for k in range(200):
        device = f"{k:06d}" + "x" * 499_994
        scorer.score({"user_id": "u1", "context": {"device": device}, "candidates": [{"item_id": "i1"}]})
    assert _rss_mb(os.getpid()) - before < 50


CLIENT_ERRORS = [  # each was a 500 (OverflowError, ValueError, RecursionError)
    (
        b'{"user_id": "u1", "context": {"slot": 123456789012345678901234567890}, "candidates": [{"item_id": "i1"}]}',
        "context.slot is an integer outside the 64-bit range",
    ),
    (
        b'{"user_id": "u1", "context": {"slot": -123456789012345678901234567890}, "candidates": [{"item_id": "i1"}]}',
        "context.slot is an integer outside the 64-bit range",
    ),
    (
        b'{"user_id": "u1", "context": {"slot": ' + b"9" * 5000 + b'}, "candidates": [{"item_id": "i1"}]}',
        f"body holds an integer of more than {sys.get_int_max_str_digits()} digits",
    ),
    (b"[" * 100_000 + b"]" * 100_000, "body is nested too deeply"),
    # non-finite numbers never reach the model (each was served)
    (
        b'{"user_id": "u1", "context": {"slot": NaN}, "candidates": [{"item_id": "i1"}]}',
        "body holds NaN, which is not JSON (numbers must be finite)",
    ),
    (
        b'{"user_id": "u1", "context": {"slot": -Infinity}, "candidates": [{"item_id": "i1"}]}',
        "body holds -Infinity, which is not JSON (numbers must be finite)",
    ),
    (
        b'{"user_id": "u1", "context": {"slot": 1e999}, "candidates": [{"item_id": "i1"}]}',
        "context.slot is not a finite number",
    ),
]


@pytest.mark.parametrize(
    ("body", "message"),
    CLIENT_ERRORS,
    ids=["30 digits", "-30 digits", "5000 digits", "nested 100000 deep", "NaN", "-Infinity", "1e999"],
)
def test_client_errors_are_400_not_500(server, body, message):
    _, port = server
    status, data = call(port, "POST", "/v1/rank", body, {"Content-Type": "application/json"})
    assert (status, json.loads(data)["error"]) == (400, message)
    assert call(port, "POST", "/v1/rank", RANK)[0] == 200


SMUGGLED = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(RANK), RANK)
FRAMING = [
    (b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(RANK), RANK, "Transfer-Encoding is not supported"),
    (b"Transfer-Encoding: chunked\r\n", CHUNKED, "Transfer-Encoding is not supported"),
    (b"Content-Length: 5\r\nContent-Length: %d\r\n" % len(RANK), RANK, "differing Content-Length headers: 5, "),
    (b"Content-Length: \xb9\r\n", b"x", "Content-Length '\u00b9' is not a number of bytes"),  # latin-1 superscript one
    (b"Content-Length : %d\r\n" % len(RANK), RANK, "malformed header line"),
]


@pytest.mark.parametrize(
    ("headers", "body", "message"), FRAMING, ids=["TE and CL", "TE", "two CL", "non-ASCII digit", "space before colon"]
)
def test_untrusted_framing_is_400_and_closes_without_serving_what_follows(server, headers, body, message):
    """A second request hidden after the body (request smuggling) gets no answer of its own."""
    _, port = server
    answer = _exchange(
        port,
        b"POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + headers
        + b"\r\n"
        + body
        + SMUGGLED,
    )
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"\r\nConnection: close" in head
    assert answer.count(b"HTTP/1.1 ") == 1  # nothing else answered
    assert message in json.loads(payload)["error"]


def test_idle_and_half_sent_connections_are_closed_and_healthz_answers(bundle, tmp_path):
    """Held connections of each kind (before: never closed); /healthz answers meanwhile."""
    config = _config(tmp_path, header_timeout_s=1.0, body_timeout_s=1.0, idle_timeout_s=1.0)
    proc, port = start_server(bundle, "--config", config)
    try:
        kinds = {
            "idle": b"",
            "idle after a request": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            "half-sent headers": b"POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Le",
            "half-sent body": b'POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"user_id"',
        }
        held = []
        for kind, data in kinds.items():
            for _ in range(30):
                sock = socket.create_connection(("127.0.0.1", port), timeout=15)
                sock.sendall(data)
                held.append((kind, sock, time.monotonic()))
        assert call(port, "GET", "/healthz")[0] == 200
        for kind, sock, opened in held:
            answer = _read_all(sock)  # until the server closes it
            assert time.monotonic() - opened < 1.0 + 4.0, kind
            if kind.startswith("half-sent"):
                assert answer.startswith(b"HTTP/1.1 408 "), (kind, answer[:100])
            sock.close()
        for reason in ("idle_timeout", "header_timeout", "body_timeout"):
            assert _metric(port, f'funnelrank_connections_closed_total{{reason="{reason}"}}') >= 30
    finally:
        stop_server(proc)


def test_default_timeouts_close_idle_and_half_sent_connections_within_35_s():
    """The bar of the issue, for the defaults (serving's own match the config's)."""
    scoring = ScoringConfig()
    assert scoring.idle_timeout_s <= 35 and scoring.header_timeout_s + scoring.body_timeout_s <= 35
    assert ScoringLimits() == ScoringLimits(**scoring.model_dump())
    assert list(ScoringConfig.model_fields) == [f.name for f in dataclasses.fields(ScoringLimits)]


def test_export_writes_every_limit_of_the_config_into_the_bundle(tiny_warehouse):
    """What serve reads by default: the [scoring] of the config the bundle was exported with."""
    cfg, _ = tiny_warehouse
    scoring = ScoringConfig(
        max_context_value_chars=8,
        header_timeout_s=1.5,
        body_timeout_s=2.5,
        idle_timeout_s=3.5,
        max_connections=9,
        drain_timeout_s=0.0,
    )
    spec = serving_spec(cfg.model_copy(update={"scoring": scoring}), {f.name: 1 for f in cfg.features.sparse})
    assert json.loads(spec.to_json())["scoring"] == scoring.model_dump()


def _limit_files(n: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def test_connection_cap_under_a_file_limit_keeps_healthz_answering(bundle):
    """The issue's probe: 256 file descriptors, 300 idle sockets held (before: /healthz timed
    out). The cap is lowered below the file limit; the longest idle connection makes room."""
    proc, port = start_server(bundle, preexec_fn=_limit_files(256))
    held = []
    try:
        for _ in range(300):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=15))
        assert call(port, "GET", "/healthz")[0] == 200
        assert _metric(port, 'funnelrank_connections_closed_total{reason="evicted"}') >= 300 - 192
    finally:
        for sock in held:
            sock.close()
        out, _ = stop_server(proc)
    assert "max_connections 256 lowered to 192: the process may open 256 files (ulimit -n)" in out


def test_over_the_cap_with_nothing_idle_a_new_connection_gets_503(bundle, tmp_path):
    proc, port = start_server(bundle, "--config", _config(tmp_path, max_connections=2, header_timeout_s=60.0))
    first = socket.create_connection(("127.0.0.1", port), timeout=15)
    second = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        first.sendall(b"GET /healthz HTTP/1.1\r\n")  # half-sent headers: busy, so not closed to make room
        deadline = time.monotonic() + 30
        while _metric(port, "funnelrank_requests_in_flight", second) < 2:  # first's request and this one
            assert time.monotonic() < deadline
        # the second busy too; the server reads these bytes before it takes the next connection
        second.sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        with socket.create_connection(("127.0.0.1", port), timeout=15) as third:
            answer = _read_all(third)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 1\r\n" in answer, answer[:200]
        first.sendall(b"Connection: close\r\n\r\n")  # the held requests are still served
        assert _read_all(first).startswith(b"HTTP/1.1 200 ")
    finally:
        first.close()
        second.close()
        stop_server(proc)


def test_sigterm_answers_the_requests_in_flight_then_exits_0(bundle, tmp_path):
    """20 requests in flight (their bodies half sent) when SIGTERM comes: all 20 answered,
    new connections refused, a request stalled past drain_timeout_s cut off, exit 0, no
    traceback (before: 20 of 20 dropped, 20 tracebacks)."""
    proc, port = start_server(bundle, "--config", _config(tmp_path, drain_timeout_s=3.0))
    socks: list[socket.socket] = []
    try:
        socks += [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(21)]
        head = b"POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(RANK)
        for sock in socks:
            sock.sendall(head + RANK[:10])
        deadline = time.monotonic() + 30
        while _metric(port, "funnelrank_requests_in_flight") < 21 + 1:  # (the /metrics request is in flight too)
            assert time.monotonic() < deadline, "the requests never got in flight"
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:  # the listening socket closes: stop accepting
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except (ConnectionRefusedError, ConnectionResetError):  # no listener, or it closed with this one queued
                break
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        for sock in socks[:20]:
            sock.sendall(RANK[10:])

        def answer(sock: socket.socket) -> bytes:
            with sock:
                return _read_all(sock)

        with ThreadPoolExecutor(21) as pool:
            answers = list(pool.map(answer, socks))
        for got in answers[:20]:
            assert got.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in got and b'"items"' in got
        assert answers[20] == b""  # stalled: cut off at the drain deadline
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert time.monotonic() - stopped < 3.0 + 5.0
        assert "Traceback" not in err, err
        assert "stopping: answering" in out
    finally:
        for sock in socks:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _reload(port: int, headers: dict) -> tuple[int, dict]:
    status, data = call(port, "POST", "/admin/reload", b"", headers)
    return status, json.loads(data)


def test_admin_reload_needs_the_token_and_refuses_cross_origin_requests(server, bundle):
    _, port = server
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert _reload(port, {})[0] == 401
    assert _reload(port, {"Authorization": "Bearer wrong"})[0] == 401
    # what a page on another site can send: a form / text/plain POST, a fetch with its Origin
    status, data = _reload(port, {**bearer, "Content-Type": "text/plain"})
    assert status == 415 and "text/plain" in data["error"]
    status, data = _reload(port, {**bearer, "Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in data["error"]
    status, data = _reload(port, {**bearer, "Origin": f"http://127.0.0.1:{port}", "Content-Type": "application/json"})
    assert status == 200 and data["model_version"] == load_bundle(bundle).version


def test_without_a_token_the_reload_route_is_off_and_ipv6_hosts_work(bundle):
    """Over ``--host ::1`` (before: ::1 got 403, only 127.0.0.1 passed the peer check); the
    same server without a token refuses the route whatever is sent."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    proc, port = start_server(bundle, host="::1", env={"FUNNELRANK_ADMIN_TOKEN": TOKEN})
    try:
        status, data = call(port, "POST", "/admin/reload", b"", {"Authorization": f"Bearer {TOKEN}"}, host="::1")
        assert status == 200, data
    finally:
        stop_server(proc)
    env = {k: v for k, v in os.environ.items() if k != "FUNNELRANK_ADMIN_TOKEN"}
    proc, port = start_server(bundle, env=env)
    try:
        status, data = _reload(port, {"Authorization": "Bearer "})
        assert status == 403 and "reload over HTTP is off" in data["error"]
    finally:
        stop_server(proc)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("HEAD", "/healthz", "GET"),
        ("PUT", "/v1/rank", "POST"),
        ("DELETE", "/admin/reload", "POST"),
        ("OPTIONS", "/v1/rank", "POST"),
        ("GET", "/v1/rank", "POST"),
    ],
)
def test_other_methods_get_405_with_allow(server, method, path, allow):
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = _read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 ") and f"\r\nAllow: {allow}\r\n".encode() in head + b"\r\n"
    assert (body == b"") == (method == "HEAD")


def test_serve_start_errors_are_one_line_and_exit_2(bundle, tmp_path):
    """Bind attempts only: a port in use, a port out of range, an address of no interface
    here (TEST-NET-1), an unreadable admin token file."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = {
            ("--host", "127.0.0.1", "--port", str(taken.getsockname()[1])): "address already in use",
            ("--host", "127.0.0.1", "--port", "99999"): "port 99999 is not in 0..65535",
            ("--host", "192.0.2.1", "--port", "0"): "cannot assign requested address",
            ("--port", "0", "--admin-token-file", str(tmp_path / "missing")): "cannot read the admin token file",
        }
        procs = {
            args: subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "serve", "--bundle", str(bundle), *args],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for args in cases
        }
        try:
            results = {args: (p.wait(timeout=120), p.communicate()) for args, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:  # it started after all: do not leave it behind
                    p.kill()
    for args, message in cases.items():
        code, (_, err) = results[args]
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("funnelrank serve: ") and message in err.lower(), (args, err)
