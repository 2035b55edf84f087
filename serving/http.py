"""HTTP serving of a bundle with the standard library only (``funnelrank serve``).

Routes:
* ``POST /v1/rank``   body {"user_id": str, "context": {...}, "candidates": [{"item_id": str}, ...]}
  -> 200 {"model_version": ..., "items": [{item_id, p_click, p_conversion, score}, ...]} by score;
* ``GET /healthz``    the process is up; ``GET /readyz``: a model is loaded (its version);
* ``GET /metrics``    Prometheus text: requests by route and status, latency histogram,
  model version and bundle sha256, reloads;
* ``POST /admin/reload`` (from 127.0.0.1 only) and SIGHUP: load the bundle folder again.

Bad requests (no/oversized body, bad JSON, missing or mistyped fields, empty or too many
candidates) get a 4xx JSON error {"error": "..."} naming the problem; the server goes on.
A reload builds the new Scorer completely, then swaps one reference: requests in flight
finish on the scorer they started with. A bundle that fails to load leaves the old one.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from serving.bundle import BundleError, load_bundle
from serving.scorer import Scorer

ROUTES = ("/v1/rank", "/healthz", "/readyz", "/metrics", "/admin/reload")
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTEXT_TYPES = (str, int, float, bool, type(None))


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_rank_request(body: bytes, max_candidates: int) -> dict:
    """The validated rank request of ``body``; RequestError (4xx) naming the problem."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"body is not valid JSON: {err}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "body must be a JSON object with user_id, context and candidates")
    if "user_id" not in request:
        raise RequestError(400, "missing field user_id")
    if not isinstance(request["user_id"], str) or not request["user_id"]:
        raise RequestError(400, f"user_id must be a non-empty string, got {type(request['user_id']).__name__}")
    context = request.get("context", {})
    if context is None:
        context = {}
    if not isinstance(context, dict):
        raise RequestError(400, f"context must be an object, got {type(context).__name__}")
    for name, value in context.items():
        if not isinstance(value, CONTEXT_TYPES):
            raise RequestError(400, f"context.{name} must be a string, number or null, got {type(value).__name__}")
    candidates = request.get("candidates")
    if not isinstance(candidates, list):
        raise RequestError(400, "missing field candidates (a list of {\"item_id\": str})" if candidates is None
                           else f"candidates must be a list, got {type(candidates).__name__}")
    if not candidates:
        raise RequestError(400, "candidates is empty")
    if len(candidates) > max_candidates:
        raise RequestError(413, f"candidates has {len(candidates)} items, above the limit of {max_candidates}")
    for i, c in enumerate(candidates):
        if not isinstance(c, dict) or not isinstance(c.get("item_id"), str):
            raise RequestError(400, f"candidates[{i}] must be an object with a string item_id")
    return {"user_id": request["user_id"], "context": context, "candidates": candidates}


class Metrics:
    """Counters and a latency histogram per route, rendered as Prometheus text."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.buckets: dict[str, list[int]] = defaultdict(lambda: [0] * (len(LATENCY_BUCKETS) + 1))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.reloads: dict[str, int] = defaultdict(int)

    def observe(self, route: str, status: int, seconds: float) -> None:
        slot = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
        with self.lock:
            self.requests[(route, status)] += 1
            self.buckets[route][slot] += 1
            self.latency_sum[route] += seconds

    def reloaded(self, result: str) -> None:
        with self.lock:
            self.reloads[result] += 1

    def render(self, scorer: Scorer) -> str:
        lines = [
            "# HELP funnelrank_requests_total HTTP requests by route and status.",
            "# TYPE funnelrank_requests_total counter",
        ]
        with self.lock:
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'funnelrank_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += ["# HELP funnelrank_request_duration_seconds Request latency.",
                      "# TYPE funnelrank_request_duration_seconds histogram"]
            for route, counts in sorted(self.buckets.items()):
                total = 0
                for bound, n in zip((*LATENCY_BUCKETS, "+Inf"), counts):
                    total += n
                    lines.append(f'funnelrank_request_duration_seconds_bucket{{route="{route}",le="{bound}"}} {total}')
                lines.append(f'funnelrank_request_duration_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}')
                lines.append(f'funnelrank_request_duration_seconds_count{{route="{route}"}} {total}')
            lines += ["# HELP funnelrank_reloads_total Bundle reloads by result.", "# TYPE funnelrank_reloads_total counter"]
            lines += [f'funnelrank_reloads_total{{result="{r}"}} {n}' for r, n in sorted(self.reloads.items())]
        lines += ["# HELP funnelrank_model_info The served bundle.", "# TYPE funnelrank_model_info gauge",
                  f'funnelrank_model_info{{version="{scorer.version}",bundle_sha256="{scorer.bundle.sha256}"}} 1']
        return "\n".join(lines) + "\n"


class RankingService:
    """The served scorer (one reference, swapped whole on reload), limits and metrics."""

    def __init__(self, bundle_path: Path, threads: int = 1, max_candidates: int | None = None, max_body_bytes: int | None = None) -> None:
        self.bundle_path = Path(bundle_path)
        self.threads = threads
        self.scorer = Scorer(load_bundle(self.bundle_path), intra_op_threads=threads)
        scoring = self.scorer.spec.get("scoring", {})
        self.max_candidates = max_candidates or scoring.get("max_candidates", 1000)
        self.max_body_bytes = max_body_bytes or scoring.get("max_body_bytes", 1 << 20)
        self.metrics = Metrics()
        self._reload_lock = threading.Lock()

    def reload(self) -> str:
        """Load the bundle folder again and swap it in; the version served afterwards."""
        with self._reload_lock:
            try:
                fresh = Scorer(load_bundle(self.bundle_path), intra_op_threads=self.threads)
            except (BundleError, OSError, ValueError, RuntimeError) as err:
                self.metrics.reloaded("error")
                raise RequestError(500, f"reload failed, still serving {self.scorer.version}: {err}") from None
            self.scorer = fresh  # one reference assignment: atomic for the request threads
            self.metrics.reloaded("ok")
            return fresh.version


def make_handler(service: RankingService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        server_version = "funnelrank"

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
            pass  # access logs would dominate the latency; /metrics counts requests

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: object) -> None:
            self._send(status, json.dumps(obj).encode())

        def _handle(self, route_handler) -> None:
            started = time.perf_counter()
            route = self.path.split("?", 1)[0]
            label = route if route in ROUTES else "other"
            try:
                status, obj = route_handler(route)
            except RequestError as err:
                status, obj = err.status, {"error": str(err)}
            except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
                status, obj = 500, {"error": f"internal error: {type(err).__name__}: {err}"}
            if isinstance(obj, str):
                self._send(status, obj.encode(), "text/plain; version=0.0.4")
            else:
                self._json(status, obj)
            service.metrics.observe(label, status, time.perf_counter() - started)

        def _body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                raise RequestError(411, "a Content-Length header is required")
            if int(length) > service.max_body_bytes:
                self.close_connection = True  # the unread body must not be parsed as a next request
                raise RequestError(413, f"body of {int(length)} bytes is above the limit of {service.max_body_bytes}")
            return self.rfile.read(int(length))

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            def route(path: str):
                if path == "/healthz":
                    return 200, {"status": "ok"}
                if path == "/readyz":
                    return 200, {"status": "ready", "model_version": service.scorer.version}
                if path == "/metrics":
                    return 200, service.metrics.render(service.scorer)
                raise RequestError(404, f"no route GET {path}")

            self._handle(route)

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            def route(path: str):
                if path == "/v1/rank":
                    request = parse_rank_request(self._body(), service.max_candidates)
                    scorer = service.scorer  # this request's scorer, even if a reload swaps it
                    return 200, {"model_version": scorer.version, "items": scorer.score(request)}
                if path == "/admin/reload":
                    self._body()
                    if self.client_address[0] != "127.0.0.1":
                        raise RequestError(403, "reload is accepted from 127.0.0.1 only")
                    return 200, {"model_version": service.reload()}
                self._body()
                raise RequestError(404, f"no route POST {path}")

            self._handle(route)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: the stdlib's 5 resets bursts of new connections


def make_server(service: RankingService, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    return _Server((host, port), make_handler(service))


def serve(bundle_path: str | Path, host: str = "127.0.0.1", port: int = 8080, threads: int = 1,
          max_candidates: int | None = None, max_body_bytes: int | None = None) -> int:
    """Serve until SIGINT/SIGTERM; SIGHUP reloads the bundle folder."""
    service = RankingService(Path(bundle_path), threads, max_candidates, max_body_bytes)
    server = make_server(service, host, port)
    stop = threading.Event()

    def reload_in_background(*_) -> None:
        def work() -> None:
            try:
                print(f"reloaded bundle {service.reload()}", flush=True)
            except RequestError as err:
                print(str(err), file=sys.stderr, flush=True)

        threading.Thread(target=work, daemon=True).start()

    signal.signal(signal.SIGHUP, reload_in_background)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker = threading.Thread(target=server.serve_forever, daemon=True)
    worker.start()
    print(f"funnelrank serving bundle {service.scorer.version} on http://{host}:{server.server_address[1]}", flush=True)
    while not stop.wait(0.5):  # a short wait keeps the main thread responsive to signals
        pass
    server.shutdown()
    server.server_close()
    return 0
