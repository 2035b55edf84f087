"""HTTP serving of a bundle with the standard library only (``funnelrank serve``).

Routes:
* ``POST /v1/rank``   body {"user_id": str, "context": {...}, "candidates": [{"item_id": str}, ...]}
  -> 200 {"model_version": ..., "items": [{item_id, p_<task>..., score}, ...]} by score
  (the default funnel: p_click, p_conversion); 501 for a table bundle (batch scoring only);
* ``GET /healthz``    the process is up; ``GET /readyz``: a model is loaded (its version);
* ``GET /metrics``    Prometheus text: requests by route and status, latency histogram,
  model version and bundle sha256, reloads;
* ``POST /admin/reload`` (from 127.0.0.1 only) and SIGHUP: load the bundle folder again.

Bad requests (no/oversized body, bad JSON, missing or mistyped fields, empty or too many
candidates) get a 4xx JSON error {"error": "..."} naming the problem; the server goes on.
A reload builds the new Scorer completely, then swaps one reference: requests in flight
finish on the scorer they started with. A bundle that fails to load leaves the old one.

Design (for latency under concurrency on a few cores): one asyncio event loop parses
HTTP/1.1 (keep-alive) and JSON and builds each request's model inputs from the scorer's
precomputed per-user / per-item arrays; a micro-batcher hands every rank request that
arrived while the model was busy to onnxruntime as one batch, in one worker thread
(onnxruntime releases the GIL, so parsing the next requests overlaps the model). No
thread per connection, no lock around the model.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from json.encoder import encode_basestring_ascii
from pathlib import Path

import numpy as np

from serving.bundle import BundleError, load_bundle
from serving.scorer import SCORE, BatchOnlyError, Scorer, merge_feeds

ROUTES = ("/v1/rank", "/healthz", "/readyz", "/metrics", "/admin/reload")
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTEXT_TYPES = (str, int, float, bool, type(None))
MAX_BATCH_ROWS = 8192  # rows per onnxruntime call when coalescing concurrent requests
MAX_HEADER_BYTES = 64 * 1024
LINGER_S = 1.0  # after an error that closes the connection, how long to drain the unread body


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


@functools.lru_cache(maxsize=16)
def _item_template(names: tuple[str, ...]) -> str:
    """'{"item_id":%s,"p_click":%.9g,...}': one ranked candidate (names are identifiers)."""
    return '{"item_id":%s,' + ",".join(f'"{name}":%.9g' for name in names) + "}"


def rank_response(model_version: str, item_ids: list[str], names: tuple[str, ...], outputs: tuple[np.ndarray, ...]) -> bytes:
    """The /v1/rank response body: candidates by score descending (ties keep the request's
    order), as serving.scorer.ranked, written straight to JSON text. The model's float32
    outputs are written with 9 significant digits (they read back as the same float32):
    ~3x faster than json.dumps of Python floats, whose shortest repr of a float32 widened
    to float64 takes 17 digits. A non-finite output is an error, never invalid JSON."""
    if not all(np.isfinite(o).all() for o in outputs):
        raise RequestError(500, f"model {model_version} returned non-finite scores")
    order = np.argsort(-outputs[names.index(SCORE)], kind="stable")
    template = _item_template(names)
    ids = [encode_basestring_ascii(item_ids[k]) for k in order.tolist()]
    items = ",".join([template % row for row in zip(ids, *(o[order].tolist() for o in outputs))])
    return b'{"model_version":%s,"items":[%s]}' % (encode_basestring_ascii(model_version).encode(), items.encode())


class Metrics:
    """Counters and a latency histogram per route, rendered as Prometheus text."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.buckets: dict[str, list[int]] = defaultdict(lambda: [0] * (len(LATENCY_BUCKETS) + 1))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.reloads: dict[str, int] = defaultdict(int)
        self.model_calls = 0  # onnxruntime calls for rank requests; requests / calls = mean batch
        self.model_requests = 0

    def observe(self, route: str, status: int, seconds: float) -> None:
        slot = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
        with self.lock:
            self.requests[(route, status)] += 1
            self.buckets[route][slot] += 1
            self.latency_sum[route] += seconds

    def batched(self, requests: int) -> None:
        with self.lock:
            self.model_calls += 1
            self.model_requests += requests

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
            lines += ["# HELP funnelrank_model_calls_total onnxruntime calls (each scores one or more coalesced rank requests).",
                      "# TYPE funnelrank_model_calls_total counter", f"funnelrank_model_calls_total {self.model_calls}",
                      "# HELP funnelrank_model_requests_total Rank requests scored by those calls.",
                      "# TYPE funnelrank_model_requests_total counter", f"funnelrank_model_requests_total {self.model_requests}"]
        lines += ["# HELP funnelrank_model_info The served bundle.", "# TYPE funnelrank_model_info gauge",
                  f'funnelrank_model_info{{version="{scorer.version}",bundle_sha256="{scorer.bundle.sha256}"}} 1']
        return "\n".join(lines) + "\n"


class RankingService:
    """The served scorer (one reference, swapped whole on reload), limits and metrics."""

    def __init__(self, bundle_path: Path, threads: int = 1, max_candidates: int | None = None, max_body_bytes: int | None = None) -> None:
        self.bundle_path = Path(bundle_path)
        self.threads = threads
        self.scorer = Scorer(load_bundle(self.bundle_path), intra_op_threads=threads)
        scoring = self.scorer.spec.scoring
        self.max_candidates = max_candidates or scoring.max_candidates
        self.max_body_bytes = max_body_bytes or scoring.max_body_bytes
        self.metrics = Metrics()
        self._reload_lock = threading.Lock()

    def reload(self) -> str:
        """Load the bundle folder again and swap it in; the version served afterwards."""
        with self._reload_lock:
            try:
                fresh = Scorer(load_bundle(self.bundle_path), intra_op_threads=self.threads)
            except Exception as err:  # noqa: BLE001 - whatever breaks the new bundle, the old one keeps serving
                self.metrics.reloaded("error")
                reason = str(err) if isinstance(err, BundleError) else f"{type(err).__name__}: {err}"
                raise RequestError(500, f"reload failed, still serving {self.scorer.version}: {reason}") from None
            self.scorer = fresh  # one reference assignment: atomic for the request threads
            self.metrics.reloaded("ok")
            return fresh.version


@dataclass
class _Pending:
    scorer: Scorer
    feeds: dict[str, np.ndarray]
    rows: int
    done: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Coalesces the rank requests waiting while onnxruntime is busy into one call.

    Requests queue up while a batch runs in the worker thread; the next batch takes all of
    them (up to MAX_BATCH_ROWS rows), so batches grow with the load and a lone request
    runs at once. Requests of different scorers (during a reload) are run separately.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="funnelrank-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def run(self, scorer: Scorer, feeds: dict[str, np.ndarray], rows: int) -> tuple[np.ndarray, ...]:
        pending = _Pending(scorer, feeds, rows, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(pending)
        return await pending.done

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            rows = batch[0].rows
            while not self.queue.empty() and rows < MAX_BATCH_ROWS:
                batch.append(self.queue.get_nowait())
                rows += batch[-1].rows
            for scorer in {id(p.scorer): p.scorer for p in batch}.values():
                group = [p for p in batch if p.scorer is scorer]
                self.metrics.batched(len(group))
                try:
                    feeds = group[0].feeds if len(group) == 1 else merge_feeds([p.feeds for p in group])
                    outputs = await loop.run_in_executor(self.executor, scorer.run, feeds, sum(p.rows for p in group))
                except Exception as err:  # noqa: BLE001 - fail these requests, keep serving
                    for p in group:
                        if not p.done.done():
                            p.done.set_exception(err)
                    continue
                start = 0
                for p in group:
                    if not p.done.done():  # a cancelled request (server stopping) takes no result
                        p.done.set_result(tuple(o[start : start + p.rows] for o in outputs))
                    start += p.rows

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    peer: str


class HttpServer:
    """HTTP/1.1 with keep-alive on an asyncio loop; routes as in the module docstring."""

    def __init__(self, service: RankingService) -> None:
        self.service = service
        self.batcher = MicroBatcher(service.metrics)
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port`` 0 picks a free one)."""
        self.batcher.start()
        # backlog: bursts of new connections must queue, not be reset
        self.server = await asyncio.start_server(self._connection, host, port, backlog=1024, limit=MAX_HEADER_BYTES)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.batcher.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("",))[0]
        try:
            while await self._one_request(reader, writer, peer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> bool:
        """Serve one request of the connection; False when the connection is to be closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # closed between requests
        except asyncio.LimitOverrunError:
            await self._respond(writer, time.perf_counter(), "other", 431, {"error": f"request headers above {MAX_HEADER_BYTES} bytes"}, close=True)
            return False
        started = time.perf_counter()
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._respond(writer, started, "other", 400, {"error": f"malformed request line {lines[0][:100]!r}"}, close=True)
            return False
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        path = target.split("?", 1)[0]
        label = path if path in ROUTES else "other"
        request = _Request(method, path, headers, peer)
        try:
            body = await self._body(reader, request)
            status, obj = await self._route(request, body)
        except RequestError as err:
            status, obj = err.status, {"error": str(err)}
            if status in (411, 413):  # the body was not read: it must not be parsed as a next request
                await self._respond(writer, started, label, status, obj, close=True)
                await self._linger(reader, headers.get("content-length"))
                return False
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            status, obj = 500, {"error": f"internal error: {type(err).__name__}: {err}"}
        await self._respond(writer, started, label, status, obj, close=not keep_alive)
        return keep_alive

    async def _body(self, reader: asyncio.StreamReader, request: _Request) -> bytes:
        length = request.headers.get("content-length")
        if length is None:
            if request.method == "POST":
                raise RequestError(411, "a Content-Length header is required")
            return b""
        if not length.isdigit():
            raise RequestError(411, "a Content-Length header is required")
        if int(length) > self.service.max_body_bytes:
            raise RequestError(413, f"body of {int(length)} bytes is above the limit of {self.service.max_body_bytes}")
        return await reader.readexactly(int(length))

    async def _route(self, request: _Request, body: bytes) -> tuple[int, object]:
        service, path = self.service, request.path
        if request.method == "GET":
            if path == "/healthz":
                return 200, {"status": "ok"}
            if path == "/readyz":
                return 200, {"status": "ready", "model_version": service.scorer.version}
            if path == "/metrics":
                return 200, service.metrics.render(service.scorer)
        elif request.method == "POST":
            if path == "/v1/rank":
                scorer = service.scorer  # this request's scorer, even if a reload swaps it
                try:
                    scorer.check_rankable()
                except BatchOnlyError as err:  # a table bundle: nothing wrong with the request itself
                    raise RequestError(501, str(err)) from None
                rank = parse_rank_request(body, service.max_candidates)
                try:
                    item_ids, feeds = scorer.request_feeds(rank)
                except ValueError as err:  # a context value the features cannot take
                    raise RequestError(400, str(err)) from None
                outputs = await self.batcher.run(scorer, feeds, len(item_ids))
                return 200, rank_response(scorer.version, item_ids, scorer.result_names, outputs)
            if path == "/admin/reload":
                if request.peer != "127.0.0.1":
                    raise RequestError(403, "reload is accepted from 127.0.0.1 only")
                return 200, {"model_version": await asyncio.get_running_loop().run_in_executor(None, service.reload)}
        raise RequestError(404, f"no route {request.method} {path}")

    async def _respond(self, writer: asyncio.StreamWriter, started: float, label: str, status: int, obj: object, close: bool) -> None:
        if isinstance(obj, bytes):  # JSON written by rank_response
            body, content_type = obj, "application/json"
        elif isinstance(obj, str):
            body, content_type = obj.encode(), "text/plain; version=0.0.4"
        else:
            body, content_type = json.dumps(obj).encode(), "application/json"
        connection = "Connection: close\r\n" if close else ""
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nServer: funnelrank\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{connection}\r\n")
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        self.service.metrics.observe(label, status, time.perf_counter() - started)

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, length: str | None) -> None:
        """Read and drop an unread body for a moment before closing, so the client gets
        the error response instead of a connection reset."""
        remaining = int(length) if length and length.isdigit() else 0
        deadline = time.monotonic() + LINGER_S
        while remaining > 0 and time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(min(remaining, 1 << 16)), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                return
            if not chunk:
                return
            remaining -= len(chunk)


def serve(bundle_path: str | Path, host: str = "127.0.0.1", port: int = 8080, threads: int = 1,
          max_candidates: int | None = None, max_body_bytes: int | None = None) -> int:
    """Serve until SIGINT/SIGTERM; SIGHUP reloads the bundle folder."""
    service = RankingService(Path(bundle_path), threads, max_candidates, max_body_bytes)
    asyncio.run(_serve(service, host, port))
    return 0


async def _serve(service: RankingService, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = HttpServer(service)
    bound = await server.start(host, port)
    stop = asyncio.Event()

    def reload_in_background() -> None:
        def work() -> None:
            try:
                print(f"reloaded bundle {service.reload()}", flush=True)
            except RequestError as err:
                print(str(err), file=sys.stderr, flush=True)

        threading.Thread(target=work, daemon=True).start()

    loop.add_signal_handler(signal.SIGHUP, reload_in_background)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"funnelrank serving bundle {service.scorer.version} on http://{host}:{bound}", flush=True)
    await stop.wait()
    await server.stop()
