"""The HTTP server as a real process on loopback: ranking, 4xx on bad requests while it
keeps serving, metrics, and bundle reloads (admin route and SIGHUP) under load."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from bundle_fixture import ROOT, START, small_model, users_and_items

from models.export import export_bundle
from serving.bundle import load_bundle


@pytest.fixture(scope="module")
def bundles(tiny_warehouse, tmp_path_factory):
    cfg, files = tiny_warehouse
    tmp = tmp_path_factory.mktemp("http")
    model = small_model(cfg, files)
    a = export_bundle(cfg, cfg.warehouse, model, tmp / "a", files)
    b = export_bundle(cfg, cfg.warehouse, model, tmp / "b", files, as_of=START + dt.timedelta(days=2))
    users, items = users_and_items(cfg)
    return tmp, a, b, [str(u) for u in users[:5]], [str(i) for i in items[:100]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(bundles):
    tmp, a, _, _, _ = bundles
    served = tmp / "served"
    shutil.copytree(a, served)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--bundle", str(served), "--port", str(port),
                             "--max-candidates", "300"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:  # poll until ready, never a fixed sleep
        try:
            if _call(port, "GET", "/healthz")[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stderr.read()}")
        time.sleep(0.05)
    yield proc, port, served
    proc.terminate()
    proc.wait(timeout=10)


def _rank(port: int, user: str, items: list[str]) -> tuple[int, dict]:
    body = json.dumps({"user_id": user, "context": {"device": "ios", "slot": 1}, "candidates": [{"item_id": i} for i in items]})
    status, data = _call(port, "POST", "/v1/rank", body.encode(), {"Content-Type": "application/json"})
    return status, json.loads(data)


def test_rank_and_readiness(server, bundles):
    _, port, _ = server
    _, a, _, users, items = bundles
    status, ready = _call(port, "GET", "/readyz")
    assert status == 200 and json.loads(ready)["model_version"] == load_bundle(a).version
    status, result = _rank(port, users[0], items[:40] + ["never-seen"])
    assert status == 200
    scores = [r["score"] for r in result["items"]]
    assert len(scores) == 41 and scores == sorted(scores, reverse=True)
    assert set(result["items"][0]) == {"item_id", "p_click", "p_conversion", "score"}


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (json.dumps({"candidates": [{"item_id": "i1"}]}).encode(), 400, "missing field user_id"),
    (json.dumps({"user_id": 7, "candidates": [{"item_id": "i1"}]}).encode(), 400, "user_id must be a non-empty string"),
    (json.dumps({"user_id": "u1", "candidates": []}).encode(), 400, "candidates is empty"),
    (json.dumps({"user_id": "u1"}).encode(), 400, "missing field candidates"),
    (json.dumps({"user_id": "u1", "candidates": "i1"}).encode(), 400, "candidates must be a list"),
    (json.dumps({"user_id": "u1", "candidates": [{"item_id": 3}]}).encode(), 400, "candidates[0] must be an object"),
    (json.dumps({"user_id": "u1", "context": [1], "candidates": [{"item_id": "i"}]}).encode(), 400, "context must be an object"),
    (json.dumps({"user_id": "u1", "context": {"slot": [1]}, "candidates": [{"item_id": "i"}]}).encode(), 400, "context.slot must be"),
    (json.dumps({"user_id": "u1", "candidates": [{"item_id": "i"}] * 301}).encode(), 413, "above the limit of 300"),
    (b"x" * ((1 << 20) + 1), 413, "above the limit of 1048576"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_requests_get_4xx_naming_the_problem_and_server_keeps_serving(server, bundles, body, status, message):
    _, port, _ = server
    _, _, _, users, items = bundles
    got, data = _call(port, "POST", "/v1/rank", body, {"Content-Type": "application/json"})
    assert got == status
    assert message in json.loads(data)["error"]
    assert _rank(port, users[1], items[:5])[0] == 200


def test_unknown_routes_and_metrics(server, bundles):
    _, port, _ = server
    _, a, _, users, items = bundles
    assert _call(port, "GET", "/nope")[0] == 404
    before = _call(port, "GET", "/metrics")[1].decode()
    for _ in range(3):
        _rank(port, users[2], items[:10])
    _call(port, "POST", "/v1/rank", b"{", {})
    metrics = _call(port, "GET", "/metrics")[1].decode()

    def count(text: str, labels: str) -> int:
        line = next((x for x in text.splitlines() if x.startswith(f"funnelrank_requests_total{{{labels}}}")), None)
        return int(line.rsplit(" ", 1)[1]) if line else 0

    assert count(metrics, 'route="/v1/rank",status="200"') == count(before, 'route="/v1/rank",status="200"') + 3
    assert count(metrics, 'route="/v1/rank",status="400"') == count(before, 'route="/v1/rank",status="400"') + 1
    assert 'funnelrank_request_duration_seconds_bucket{route="/v1/rank",le="+Inf"}' in metrics
    assert f'funnelrank_model_info{{version="{load_bundle(a).version}",bundle_sha256="{load_bundle(a).sha256}"}} 1' in metrics


def test_reload_swaps_the_model_without_failing_requests(server, bundles):
    proc, port, served = server
    _, a, b, users, items = bundles
    version_a, version_b = load_bundle(a).version, load_bundle(b).version
    assert version_a != version_b
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            status, result = _rank(port, users[3], items[:50])
            statuses.append(status)
            versions.add(result.get("model_version"))

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load) for _ in range(4)]
        shutil.rmtree(served)  # the served scorer lives in memory: replacing the folder is safe
        shutil.copytree(b, served)
        status, data = _call(port, "POST", "/admin/reload", b"", {"Content-Length": "0"})
        assert status == 200 and json.loads(data)["model_version"] == version_b
        deadline = time.monotonic() + 30
        while version_b not in versions:  # the load threads are served by b before we swap back
            assert time.monotonic() < deadline, "no request was served by the reloaded bundle"
            time.sleep(0.01)
        # SIGHUP: back to bundle a
        shutil.rmtree(served)
        shutil.copytree(a, served)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while json.loads(_call(port, "GET", "/readyz")[1])["model_version"] != version_a:
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.05)
        stop.set()
        for f in futures:
            f.result()
    assert statuses and set(statuses) == {200}
    assert {version_a, version_b} <= versions
    assert 'funnelrank_reloads_total{result="ok"} 2' in _call(port, "GET", "/metrics")[1].decode()
