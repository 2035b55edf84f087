"""The ranking service the HTTP routes call: the served Scorer, swapped whole on reload, the
micro-batcher that runs it, and the metrics.

A reload builds the new Scorer completely, then swaps one reference: requests in flight
finish on the scorer they started with. A bundle that fails to load leaves the old one.
The micro-batcher hands every rank request that arrived while the model was busy to
onnxruntime as one batch, in one worker thread (onnxruntime releases the GIL, so parsing the
next requests overlaps the model); no lock around the model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.bundle import BundleError, load_bundle
from serving.rank_api import RequestError
from serving.scorer import Scorer, merge_feeds

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MAX_BATCH_ROWS = 8192  # rows per onnxruntime call when coalescing concurrent requests


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
        # set by the event loop only: plain ints, read whole
        self.connections_open = 0
        self.requests_in_flight = 0  # from a request's first byte to its answer
        self.connections_closed: dict[str, int] = defaultdict(int)  # closed by the server, by reason

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

    def closed(self, reason: str) -> None:
        with self.lock:
            self.connections_closed[reason] += 1

    def render(self, scorer: Scorer) -> str:
        lines = [
            "# HELP funnelrank_requests_total HTTP requests by route and status.",
            "# TYPE funnelrank_requests_total counter",
        ]
        with self.lock:
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'funnelrank_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += [
                "# HELP funnelrank_request_duration_seconds Request latency.",
                "# TYPE funnelrank_request_duration_seconds histogram",
            ]
            for route, counts in sorted(self.buckets.items()):
                total = 0
                for bound, n in zip((*LATENCY_BUCKETS, "+Inf"), counts, strict=True):
                    total += n
                    lines.append(f'funnelrank_request_duration_seconds_bucket{{route="{route}",le="{bound}"}} {total}')
                lines.append(
                    f'funnelrank_request_duration_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}'
                )
                lines.append(f'funnelrank_request_duration_seconds_count{{route="{route}"}} {total}')
            lines += [
                "# HELP funnelrank_reloads_total Bundle reloads by result.",
                "# TYPE funnelrank_reloads_total counter",
            ]
            lines += [f'funnelrank_reloads_total{{result="{r}"}} {n}' for r, n in sorted(self.reloads.items())]
            lines += [
                "# HELP funnelrank_model_calls_total onnxruntime calls (each scores one or more coalesced rank "
                "requests).",
                "# TYPE funnelrank_model_calls_total counter",
                f"funnelrank_model_calls_total {self.model_calls}",
                "# HELP funnelrank_model_requests_total Rank requests scored by those calls.",
                "# TYPE funnelrank_model_requests_total counter",
                f"funnelrank_model_requests_total {self.model_requests}",
            ]
            lines += [
                "# HELP funnelrank_connections_open Client connections open now.",
                "# TYPE funnelrank_connections_open gauge",
                f"funnelrank_connections_open {self.connections_open}",
                "# HELP funnelrank_requests_in_flight Requests begun and not yet answered (this one included).",
                "# TYPE funnelrank_requests_in_flight gauge",
                f"funnelrank_requests_in_flight {self.requests_in_flight}",
                "# HELP funnelrank_connections_closed_total Connections the server closed, by reason.",
                "# TYPE funnelrank_connections_closed_total counter",
            ]
            lines += [
                f'funnelrank_connections_closed_total{{reason="{r}"}} {n}'
                for r, n in sorted(self.connections_closed.items())
            ]
        lines += [
            "# HELP funnelrank_model_info The served bundle.",
            "# TYPE funnelrank_model_info gauge",
            f'funnelrank_model_info{{version="{scorer.version}",bundle_sha256="{scorer.bundle.sha256}"}} 1',
        ]
        return "\n".join(lines) + "\n"


class RankingService:
    """The served scorer (one reference, swapped whole on reload), limits and metrics."""

    def __init__(
        self, bundle_path: Path, threads: int = 1, scoring: dict | None = None, token: str | None = None
    ) -> None:
        """``scoring``: ScoringLimits fields over the bundle's own; ``token``: the
        admin token (None: the HTTP reload route is off)."""
        self.bundle_path = Path(bundle_path)
        self.threads = threads
        self.scorer = Scorer(load_bundle(self.bundle_path), intra_op_threads=threads)
        self.limits = dataclasses.replace(self.scorer.spec.scoring, **(scoring or {}))
        self.admin_token = token
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
