"""The HTTP server as a real process on loopback: ranking, 4xx on bad requests while it
keeps serving, metrics, and bundle reloads (admin route and SIGHUP) under load."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from bundle_fixture import START, small_model, users_and_items
from serve_fixture import call, start_server, stop_server

from pipeline.bundle import export_bundle
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


ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="module")
def server(bundles):
    tmp, a, _, _, _ = bundles
    served = tmp / "served"
    shutil.copytree(a, served)
    proc, port = start_server(served, "--max-candidates", "300", env={"FUNNELRANK_ADMIN_TOKEN": ADMIN_TOKEN})
    yield proc, port, served
    stop_server(proc)


def _rank(port: int, user: str, items: list[str]) -> tuple[int, dict]:
    body = json.dumps(
        {"user_id": user, "context": {"device": "ios", "slot": 1}, "candidates": [{"item_id": i} for i in items]}
    )
    status, data = call(port, "POST", "/v1/rank", body.encode(), {"Content-Type": "application/json"})
    return status, json.loads(data)


def test_rank_and_readiness(server, bundles):
    _, port, _ = server
    _, a, _, users, items = bundles
    status, ready = call(port, "GET", "/readyz")
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
    (
        json.dumps({"user_id": "u1", "context": [1], "candidates": [{"item_id": "i"}]}).encode(),
        400,
        "context must be an object",
    ),
    (
        json.dumps({"user_id": "u1", "context": {"slot": [1]}, "candidates": [{"item_id": "i"}]}).encode(),
        400,
        "context.slot must be",
    ),
    (
        json.dumps({"user_id": "u1", "context": {"slot": "top"}, "candidates": [{"item_id": "i"}]}).encode(),
        400,
        "context.slot (feature 'slot_bucket'): bucketised values must be numbers",
    ),
    (json.dumps({"user_id": "u1", "candidates": [{"item_id": "i"}] * 301}).encode(), 413, "above the limit of 300"),
    (b"x" * ((1 << 20) + 1), 413, "above the limit of 1048576"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_requests_get_4xx_naming_the_problem_and_server_keeps_serving(server, bundles, body, status, message):
    _, port, _ = server
    _, _, _, users, items = bundles
    got, data = call(port, "POST", "/v1/rank", body, {"Content-Type": "application/json"})
    assert got == status
    assert message in json.loads(data)["error"]
    assert _rank(port, users[1], items[:5])[0] == 200


def test_unknown_routes_and_metrics(server, bundles):
    _, port, _ = server
    _, a, _, users, items = bundles
    assert call(port, "GET", "/nope")[0] == 404
    before = call(port, "GET", "/metrics")[1].decode()
    for _ in range(3):
        _rank(port, users[2], items[:10])
    call(port, "POST", "/v1/rank", b"{", {})
    metrics = call(port, "GET", "/metrics")[1].decode()

    def count(text: str, labels: str) -> int:
        line = next((x for x in text.splitlines() if x.startswith(f"funnelrank_requests_total{{{labels}}}")), None)
        return int(line.rsplit(" ", 1)[1]) if line else 0

    assert count(metrics, 'route="/v1/rank",status="200"') == count(before, 'route="/v1/rank",status="200"') + 3
    assert count(metrics, 'route="/v1/rank",status="400"') == count(before, 'route="/v1/rank",status="400"') + 1
    assert 'funnelrank_request_duration_seconds_bucket{route="/v1/rank",le="+Inf"}' in metrics
    assert (
        f'funnelrank_model_info{{version="{load_bundle(a).version}",bundle_sha256="{load_bundle(a).sha256}"}} 1'
        in metrics
    )


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
        status, data = call(port, "POST", "/admin/reload", b"", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
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
        while json.loads(call(port, "GET", "/readyz")[1])["model_version"] != version_a:
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.05)
        stop.set()
        for f in futures:
            f.result()
    assert statuses and set(statuses) == {200}
    assert {version_a, version_b} <= versions
    assert 'funnelrank_reloads_total{result="ok"} 2' in call(port, "GET", "/metrics")[1].decode()


def _mixed_requests(users: list[str], items: list[str]) -> list[dict]:
    """Requests of different sizes: known and unknown users and items, several contexts."""
    return [
        {
            "user_id": users[k % len(users)] if k % 4 else f"new-user-{k}",
            "context": {"device": "ios", "slot": k % 5},
            "candidates": [{"item_id": i} for i in items[k : k + 3 + 7 * k]]
            + ([{"item_id": f"unseen-{k}"}] if k % 3 == 0 else []),
        }
        for k in range(10)
    ]


def _same_ranking(got: list[dict], want: list[dict]) -> None:
    assert sorted(r["item_id"] for r in got) == sorted(r["item_id"] for r in want)
    by_item = {r["item_id"]: r for r in got}
    for w in want:
        for name in ("p_click", "p_conversion", "score"):
            assert by_item[w["item_id"]][name] == pytest.approx(w[name], rel=1e-5, abs=1e-7), (w["item_id"], name)


def test_micro_batcher_scores_coalesced_requests_as_one_call(bundles):
    """Requests queued while the model is busy run as one onnxruntime call and each gets
    its own rows back, equal to scoring it alone."""
    from serving.scorer import Scorer, ranked
    from serving.service import Metrics, MicroBatcher

    _, a, _, users, items = bundles
    scorer = Scorer(load_bundle(a))
    requests = _mixed_requests(users, items)
    prepared = [scorer.request_feeds(r) for r in requests]
    assert len({feeds["interests"].shape[1] for _, feeds in prepared}) > 1  # list widths differ: padding is exercised

    async def score_all() -> list:
        metrics = Metrics()
        batcher = MicroBatcher(metrics)
        tasks = [asyncio.ensure_future(batcher.run(scorer, feeds, len(ids))) for ids, feeds in prepared]
        batcher.start()  # after the requests: they are all queued when it takes its first batch
        outputs = await asyncio.gather(*tasks)
        batcher.close()
        return outputs, metrics

    outputs, metrics = asyncio.run(score_all())
    assert (metrics.model_calls, metrics.model_requests) == (1, len(requests))
    for request, (ids, _), out in zip(requests, prepared, outputs, strict=True):
        assert len(out[0]) == len(ids)
        _same_ranking(ranked(ids, scorer.result_names, out), scorer.score(request))


def test_concurrent_http_requests_match_the_in_process_scorer(server, bundles):
    _, port, _ = server
    _, a, _, users, items = bundles
    from serving.scorer import Scorer

    scorer = Scorer(load_bundle(a))
    requests = _mixed_requests(users, items) * 3

    def post(request: dict) -> tuple[int, bytes]:
        return call(port, "POST", "/v1/rank", json.dumps(request).encode(), {"Content-Type": "application/json"})

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(post, requests))
    for request, (status, data) in zip(requests, results, strict=True):
        assert status == 200, data
        _same_ranking(json.loads(data)["items"], scorer.score(request))
    metrics = call(port, "GET", "/metrics")[1].decode()
    assert "funnelrank_model_calls_total" in metrics and "funnelrank_model_requests_total" in metrics


def test_rank_response_is_the_ranking_as_json():
    """The hand-written JSON equals json.dumps of serving.scorer.ranked, up to float32
    precision, for awkward item ids; non-finite scores are an error, not invalid JSON."""
    import numpy as np

    from serving.rank_api import RequestError, rank_response
    from serving.scorer import ranked

    rng = np.random.default_rng(0)
    ids = ["plain", 'quote"d', "back\\slash", "ünïcode ✓", "tab\tnew\nline", "tie-a", "tie-b", "tiny"]
    p_click, p_ctcvr = rng.random(8).astype(np.float32), rng.random(8).astype(np.float32)
    score = (p_click * p_ctcvr).astype(np.float32)
    score[5:7] = 0.25  # ties keep the request's order
    score[7] = np.float32(1e-30)
    names = ("p_click", "p_conversion", "score")
    got = json.loads(rank_response("abc123", ids, names, (p_click, p_ctcvr, score)))
    want = ranked(ids, names, (p_click, p_ctcvr, score))
    assert got["model_version"] == "abc123"
    assert [r["item_id"] for r in got["items"]] == [r["item_id"] for r in want]
    for g, w in zip(got["items"], want, strict=True):
        for name in ("p_click", "p_conversion", "score"):
            assert np.float32(g[name]) == np.float32(w[name])  # the same float32 reads back
    score[2] = np.nan
    with pytest.raises(RequestError, match="non-finite"):
        rank_response("abc123", ids, names, (p_click, p_ctcvr, score))
