"""The HTTP/1.1 server of a bundle, standard library only, and its entry point ``serve``
(``funnelrank serve``).

Routes:
* ``POST /v1/rank``   body {"user_id": str, "context": {...}, "candidates": [{"item_id": str}, ...],
  "recent": [{"item_id": str, "event": str, "ts": str}, ...] (optional, serving.rank_api)}
  -> 200 {"model_version": ..., "items": [{item_id, p_<task>..., e_<value task>..., score}, ...]}
  by score (the default funnel: p_click, p_conversion; a value task adds its expected value,
  e.g. e_revenue); 501 for a table bundle (batch scoring only);
* ``GET /healthz``    the process is up; ``GET /readyz``: a model is loaded (its version);
* ``GET /metrics``    Prometheus text: requests by route and status, latency histogram,
  open connections, requests in flight, connections the server closed and why,
  model version and bundle sha256, reloads;
* ``POST /admin/reload`` with ``Authorization: Bearer <admin token>``, and SIGHUP: load the
  bundle folder again. Without a token (FUNNELRANK_ADMIN_TOKEN or ``--admin-token-file``)
  the route is off and only SIGHUP reloads; a request with a foreign ``Origin`` or a
  non-JSON ``Content-Type`` is refused (a browser's cross-site form or fetch cannot reload).
A route asked with another method gets 405 and ``Allow`` (HEAD: no body).

Bad requests (no/oversized body, bad JSON, missing or mistyped fields, context values too
long or out of range, empty or too many candidates, bad or too many recent events) get a
4xx JSON error {"error": "..."} naming the problem; the server goes on. Framing it cannot
trust (Transfer-Encoding, differing or malformed Content-Length) is a 400 that closes the
connection, so no bytes of it are read as a next request.

What one client can hold is bounded (``serving.spec.ScoringLimits``, the ``[scoring]`` keys): a
connection waiting for its next request is closed after ``idle_timeout_s``, a request
must send its headers within ``header_timeout_s`` of its first byte and its body within
``body_timeout_s`` (408, closed), a response the client does not take within
``body_timeout_s`` closes the connection; at most ``max_connections`` are open (lowered
to what the process's file descriptors allow): over it the connection idle the longest
is closed to make room, and when none is idle the new one gets 503 and is closed.

A reload swaps the scorer whole (serving.service): requests in flight finish on the one they
started with. SIGTERM or SIGINT: stop accepting, close idle connections, answer the requests
in flight (``Connection: close``) for up to ``drain_timeout_s``, then exit 0.

Design (for latency under concurrency on a few cores): one asyncio event loop parses
HTTP/1.1 (keep-alive) and JSON (serving.rank_api) and builds each request's model inputs
from the scorer's precomputed per-user / per-item arrays; serving.service's micro-batcher
runs the model in one worker thread. No thread per connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import resource
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from serving.rank_api import RequestError, parse_rank_request, rank_response
from serving.scorer import BatchOnlyError
from serving.service import MicroBatcher, RankingService

# route -> the one method it answers
ROUTE_METHODS = {"/v1/rank": "POST", "/healthz": "GET", "/readyz": "GET", "/metrics": "GET", "/admin/reload": "POST"}
MAX_HEADER_BYTES = 64 * 1024
LINGER_S = 1.0  # after an error that closes the connection, how long to drain the unread bytes
ACCEPT_RETRY_S = 1.0  # after accept() failed for want of resources
FD_RESERVE = 64  # file descriptors kept for all but client connections (bundle files, threads, a refusal)
ADMIN_TOKEN_ENV = "FUNNELRANK_ADMIN_TOKEN"


class ServerStartError(Exception):
    """The server cannot start as asked (the address, the admin token file): a one-line message."""


def admin_token(token_file: str | Path | None) -> str | None:
    """The admin token: the first line of ``token_file``, else FUNNELRANK_ADMIN_TOKEN; None
    when neither is set (the HTTP reload route is off)."""
    if token_file is None:
        return os.environ.get(ADMIN_TOKEN_ENV) or None
    try:
        token = Path(token_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ServerStartError(f"cannot read the admin token file {token_file}: {err}") from None
    if not token:
        raise ServerStartError(f"the admin token file {token_file} is empty")
    return token


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]


class _Connection:
    """A client connection, the phase it is in (idle: waiting for a request's first byte;
    header, body: receiving them; write: waiting for the client to take a response; busy:
    answering) and its deadline in it (time.monotonic(); HttpServer closes it past that)."""

    __slots__ = ("task", "writer", "phase", "since", "deadline")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.task: asyncio.Task | None = None
        self.writer = writer
        self.enter("busy", math.inf)

    def enter(self, phase: str, timeout: float) -> None:
        # a float per phase rather than a timer per phase (asyncio.timeout: ~8 us each)
        self.phase, self.since = phase, time.monotonic()
        self.deadline = self.since + timeout


class _Framing(RequestError):
    """A request whose length cannot be trusted: answered, then the connection is closed
    unread (its remaining bytes must not be taken for a next request)."""


def _header_lines(lines: list[str]) -> tuple[dict[str, str], list[str]]:
    """(headers by lower-case name, every Content-Length value) of a request's header lines."""
    headers: dict[str, str] = {}
    lengths: list[str] = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or " " in name or "\t" in name:  # also folded lines, "Name :"
            raise _Framing(400, f"malformed header line {line[:100]!r}")
        name = name.lower()
        if name == "content-length":
            lengths.append(value.strip())
        else:
            headers[name] = value.strip()
    return headers, lengths


def _content_length(headers: dict[str, str], lengths: list[str], method: str, max_body_bytes: int) -> int:
    """The body's length in bytes; _Framing when it cannot be trusted, 411/413 when there is
    none for a POST or it is above the limit."""
    if "transfer-encoding" in headers:  # chunked bodies are not read: refuse, never guess the framing
        raise _Framing(400, "Transfer-Encoding is not supported: send the body with a Content-Length")
    if not lengths:
        if method == "POST":
            raise _Framing(411, "a Content-Length header is required")
        return 0
    if len(set(lengths)) > 1:
        raise _Framing(400, f"differing Content-Length headers: {', '.join(v[:20] for v in lengths[:4])}")
    text = lengths[0]
    if not (text.isascii() and text.isdigit()):  # str.isdigit alone admits '²' and other non-ASCII digits
        raise _Framing(400, f"Content-Length {text[:40]!r} is not a number of bytes")
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(max_body_bytes)) or int(digits) > max_body_bytes:  # int() of few digits only
        raise _Framing(413, f"body of {text[:40]} bytes is above the limit of {max_body_bytes}")
    return int(digits)


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (as asyncio.start_server binds them;
    ``port`` 0 picks a free one). ServerStartError when the address cannot be listened on.
    ``serve`` binds before it loads the bundle: an address error costs no model load and
    leaves no runtime threads to tear down."""
    if not 0 <= port <= 65535:
        raise ServerStartError(f"port {port} is not in 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as err:  # an unknown host name
        raise ServerStartError(f"cannot listen on {host} port {port}: {err.strerror or err}") from None
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            listeners.append(sock := socket.socket(family, kind, proto))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(1024)  # bursts of new connections must queue, not be reset
            sock.setblocking(False)
    except OSError as err:  # in use, no such address here
        for sock in listeners:
            sock.close()
        raise ServerStartError(f"cannot listen on {host} port {port}: {err.strerror or err}") from None
    return listeners


def _connection_cap(wanted: int) -> tuple[int, str | None]:
    """(connections the server may hold, a line saying why when fewer than ``wanted``): each
    needs a file descriptor, so the soft limit is raised towards the hard one first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + FD_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted, None
    soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    cap = max(1, soft - FD_RESERVE)
    if cap >= wanted:
        return wanted, None
    return cap, f"max_connections {wanted} lowered to {cap}: the process may open {soft} files (ulimit -n)"


class HttpServer:
    """HTTP/1.1 with keep-alive on an asyncio loop; routes and limits as in the module docstring.

    It accepts connections itself, one at a time, so the cap holds before a file descriptor
    is spent (asyncio's server accepts a whole burst at once and fails with EMFILE)."""

    def __init__(self, service: RankingService) -> None:
        self.service = service
        self.limits = service.limits
        self.batcher = MicroBatcher(service.metrics)
        self.listeners: list[socket.socket] = []
        self.accepting: list[asyncio.Task] = []
        self.connections: set[_Connection] = set()
        self.room = asyncio.Event()  # set whenever a connection is gone
        self.max_connections, self.cap_note = _connection_cap(self.limits.max_connections)
        self.timeouts = {
            "idle": self.limits.idle_timeout_s,
            "header": self.limits.header_timeout_s,
            "body": self.limits.body_timeout_s,
            "write": self.limits.body_timeout_s,
        }
        self.sweeper: asyncio.Task | None = None
        self.stopping = False
        self.accept_failed = False  # the last accept ran out of files or memory

    async def start(self, listeners: list[socket.socket]) -> int:
        """Serve on ``listeners`` (``listen``); returns the bound port."""
        self.listeners = listeners
        loop = asyncio.get_running_loop()
        self.accepting = [loop.create_task(self._accept(sock)) for sock in self.listeners]
        self.sweeper = loop.create_task(self._close_overdue())
        self.batcher.start()
        return self.listeners[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, close the connections waiting for a request, give the requests in
        flight ``drain_timeout_s`` to be answered, then close what is left."""
        self.stopping = True
        for task in self.accepting:
            task.cancel()
        await asyncio.gather(*self.accepting, return_exceptions=True)
        for sock in self.listeners:
            sock.close()
        for conn in [c for c in self.connections if c.phase == "idle"]:
            self._drop(conn, "stopping")
        tasks = [c.task for c in self.connections]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.limits.drain_timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            for _ in late:
                self.service.metrics.closed("drain_timeout")
        if self.sweeper is not None:
            self.sweeper.cancel()
        self.batcher.close()

    async def _accept(self, listener: socket.socket) -> None:
        # Our own reader callback, not loop.sock_accept: stop() cancels this task, and a
        # sock_accept whose reader callback was already queued then accepts a connection for
        # a cancelled future (asyncio logs InvalidStateError and the connection leaks).
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(listener.fileno(), readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                while (client := self._accept_one(listener)) is not None:
                    try:
                        await self._admit(client)
                    except OSError:  # the client went away before its connection was set up
                        client.close()
                    except asyncio.CancelledError:  # stop() while it waited for room
                        client.close()
                        raise
                if self.accept_failed:
                    await asyncio.sleep(ACCEPT_RETRY_S)
                    readable.set()  # the backlog waited meanwhile: look again
        finally:
            loop.remove_reader(listener.fileno())

    def _accept_one(self, listener: socket.socket) -> socket.socket | None:
        """A waiting connection, non-blocking; None when there is none (or accepting failed:
        out of files or memory, ``accept_failed`` is set and the connections wait in the
        backlog meanwhile)."""
        self.accept_failed = False
        while True:
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except ConnectionAbortedError:
                continue
            except OSError as err:
                print(
                    f"accepting a connection failed ({err}); trying again in {ACCEPT_RETRY_S} s",
                    file=sys.stderr,
                    flush=True,
                )
                self.accept_failed = True
                return None
            client.setblocking(False)
            return client

    async def _admit(self, client: socket.socket) -> None:
        """Serve ``client`` as a connection, or refuse it (503) at the cap when none is idle."""
        if not await self._room_for_one_more():
            self.service.metrics.closed("over_capacity")
            error = {"error": f"the server holds {self.max_connections} connections, its limit; retry later"}
            try:  # a few hundred bytes into an empty socket buffer: never blocks
                client.send(_response_bytes(503, error, close=True, extra={"Retry-After": "1"}))
            finally:
                client.close()
            return
        reader, writer = await asyncio.open_connection(sock=client, limit=MAX_HEADER_BYTES)
        conn = _Connection(writer)
        self.connections.add(conn)
        conn.task = asyncio.get_running_loop().create_task(self._connection(reader, conn))

    async def _room_for_one_more(self) -> bool:
        """At the cap, close the connection idle the longest and wait until it is gone;
        False when none is idle."""
        while len(self.connections) >= self.max_connections:
            if not self._close_longest_idle():
                return False
            self.room.clear()
            await self.room.wait()
        return True

    async def _connection(self, reader: asyncio.StreamReader, conn: _Connection) -> None:
        metrics = self.service.metrics
        metrics.connections_open += 1
        try:
            while await self._one_request(reader, conn):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except asyncio.CancelledError:
            pass  # stop(): the drain deadline passed
        finally:
            await self._close(conn.writer)
            self.connections.discard(conn)
            metrics.connections_open -= 1
            self.room.set()

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        """Close and wait until the socket is closed; a client that does not take what is
        still buffered for it gets a reset after LINGER_S."""
        writer.close()
        try:
            async with asyncio.timeout(LINGER_S):
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()
        except (ConnectionError, asyncio.CancelledError):
            pass

    def _close_longest_idle(self) -> bool:
        """Close the connection waiting longest for its next request; False when none waits."""
        idle = [c for c in self.connections if c.phase == "idle"]
        if idle:
            self._drop(min(idle, key=lambda c: c.since), "evicted")
        return bool(idle)

    async def _close_overdue(self) -> None:
        """Close every connection past its phase's deadline, checked a few times a second."""
        tick = min(0.5, max(0.01, min(self.timeouts.values()) / 4))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for conn in [c for c in self.connections if c.deadline <= now]:
                self._drop(conn, f"{conn.phase}_timeout")

    def _drop(self, conn: _Connection, reason: str) -> None:
        """Close ``conn`` now; its handler sees the end of the stream. A request half received
        gets a 408 first; a response the client does not take is discarded."""
        self.service.metrics.closed(reason)
        if conn.phase in ("header", "body"):
            what = "headers" if conn.phase == "header" else "body"
            timeout = self.timeouts[conn.phase]
            self.service.metrics.observe("other", 408, timeout)
            conn.writer.write(_response_bytes(408, {"error": f"request {what} not received within {timeout} s"}, True))
        if conn.phase == "write":
            conn.writer.transport.abort()
        else:
            conn.writer.transport.close()
        conn.enter("closing", math.inf)

    async def _one_request(self, reader: asyncio.StreamReader, conn: _Connection) -> bool:
        """Serve one request of the connection; False when the connection is to be closed."""
        if self.stopping:
            return False
        conn.enter("idle", self.limits.idle_timeout_s)
        try:
            first = await reader.readexactly(1)
        except asyncio.IncompleteReadError:
            return False  # closed between requests (by the client, or by _drop: idle too long, room, stopping)
        conn.enter("header", self.limits.header_timeout_s)
        metrics = self.service.metrics
        metrics.requests_in_flight += 1
        try:
            return await self._answer(reader, conn, first)
        finally:
            metrics.requests_in_flight -= 1

    async def _answer(self, reader: asyncio.StreamReader, conn: _Connection, first: bytes) -> bool:
        """Read the rest of a request whose first byte is ``first``, answer it; False when the
        connection is to be closed."""
        limits = self.limits
        started = time.perf_counter()
        try:
            head = first + await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            conn.enter("busy", math.inf)
            error = {"error": f"request headers above {MAX_HEADER_BYTES} bytes"}
            await self._respond(conn, started, "other", 431, error, close=True)
            return False
        conn.enter("busy", math.inf)
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            error = {"error": f"malformed request line {lines[0][:100]!r}"}
            await self._respond(conn, started, "other", 400, error, close=True)
            await self._linger(reader)
            return False
        method, target, version = parts
        path = target.split("?", 1)[0]
        label = path if path in ROUTE_METHODS else "other"
        head_only = method == "HEAD"
        try:
            headers, lengths = _header_lines(lines[1:])
            length = _content_length(headers, lengths, method, limits.max_body_bytes)
        except _Framing as err:
            await self._respond(conn, started, label, err.status, {"error": str(err)}, close=True, head_only=head_only)
            await self._linger(reader)
            return False
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        body = b""
        if length:
            conn.enter("body", limits.body_timeout_s)
            body = await reader.readexactly(length)
            conn.enter("busy", math.inf)
        extra: dict[str, str] = {}
        try:
            status, obj = await self._route(_Request(method, path, headers), body)
        except RequestError as err:
            status, obj, extra = err.status, {"error": str(err)}, err.headers
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            status, obj = 500, {"error": f"internal error: {type(err).__name__}: {err}"}
        keep_alive = keep_alive and not self.stopping
        await self._respond(conn, started, label, status, obj, close=not keep_alive, head_only=head_only, extra=extra)
        return keep_alive

    async def _route(self, request: _Request, body: bytes) -> tuple[int, object]:
        service, path = self.service, request.path
        allowed = ROUTE_METHODS.get(path)
        if allowed is None:
            raise RequestError(404, f"no route {request.method[:20]} {path[:200]}")
        if request.method != allowed:
            raise RequestError(405, f"{path} takes {allowed} only", {"Allow": allowed})
        if path == "/healthz":
            return 200, {"status": "ok"}
        if path == "/readyz":
            return 200, {"status": "ready", "model_version": service.scorer.version}
        if path == "/metrics":
            return 200, service.metrics.render(service.scorer)
        if path == "/v1/rank":
            scorer = service.scorer  # this request's scorer, even if a reload swaps it
            try:
                scorer.check_rankable()
            except BatchOnlyError as err:  # a table bundle: nothing wrong with the request itself
                raise RequestError(501, str(err)) from None
            rank = parse_rank_request(body, self.limits)
            try:
                item_ids, feeds = scorer.request_feeds(rank)
            except ValueError as err:  # a context value the features cannot take
                raise RequestError(400, str(err)) from None
            outputs = await self.batcher.run(scorer, feeds, len(item_ids))
            return 200, rank_response(scorer.version, item_ids, scorer.result_names, outputs)
        self._check_admin(request)  # /admin/reload
        return 200, {"model_version": await asyncio.get_running_loop().run_in_executor(None, service.reload)}

    def _check_admin(self, request: _Request) -> None:
        """RequestError unless the request carries the admin token and is not one a browser
        sends on another site's behalf (a foreign Origin, a form's or text/plain body)."""
        token = self.service.admin_token
        if token is None:
            raise RequestError(
                403,
                f"reload over HTTP is off: start the server with {ADMIN_TOKEN_ENV} or "
                "--admin-token-file set; SIGHUP reloads",
            )
        origin, host = request.headers.get("origin"), request.headers.get("host", "")
        if origin is not None and origin != f"http://{host}":
            raise RequestError(403, f"cross-origin request refused (Origin {origin[:100]!r}, not http://{host[:100]})")
        content_type = request.headers.get("content-type")
        if content_type is not None and content_type.partition(";")[0].strip().lower() != "application/json":
            raise RequestError(415, f"reload takes no body or a JSON one, not {content_type[:100]!r}")
        sent = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(sent, b"Bearer " + token.encode()):
            raise RequestError(
                401, "reload needs the admin token: Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
            )

    async def _respond(
        self,
        conn: _Connection,
        started: float,
        label: str,
        status: int,
        obj: object,
        close: bool,
        head_only: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        """Write the response; wait (up to body_timeout_s) only if the client is not taking it."""
        conn.writer.write(_response_bytes(status, obj, close, head_only, extra))
        self.service.metrics.observe(label, status, time.perf_counter() - started)
        if conn.writer.transport.get_write_buffer_size():  # not all in the socket
            conn.enter("write", self.limits.body_timeout_s)
            await conn.writer.drain()
            conn.enter("busy", math.inf)

    @staticmethod
    async def _linger(reader: asyncio.StreamReader) -> None:
        """Read and drop what the client still sends, for a moment, before closing: the client
        gets the error response instead of a connection reset."""
        try:
            async with asyncio.timeout(LINGER_S):
                while await reader.read(1 << 16):
                    pass
        except TimeoutError:
            pass


def _response_bytes(
    status: int, obj: object, close: bool, head_only: bool = False, extra: dict[str, str] | None = None
) -> bytes:
    """An HTTP/1.1 response: ``obj`` as JSON (bytes: JSON already, from rank_response; str:
    the metrics text); ``head_only``: the headers alone (a HEAD request)."""
    if isinstance(obj, bytes):
        body, content_type = obj, "application/json"
    elif isinstance(obj, str):
        body, content_type = obj.encode(), "text/plain; version=0.0.4"
    else:
        body, content_type = json.dumps(obj).encode(), "application/json"
    more = "".join(f"{name}: {value}\r\n" for name, value in (extra or {}).items())
    connection = "Connection: close\r\n" if close else ""
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nServer: funnelrank\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{more}{connection}\r\n"
    ).encode("latin-1")
    return head if head_only else head + body


def serve(
    bundle_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    threads: int = 1,
    scoring: dict | None = None,
    admin_token_file: str | Path | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM (then drain), 0; SIGHUP reloads the bundle folder.
    ``scoring``: ScoringLimits fields over the bundle's own. ServerStartError when it cannot start."""
    token = admin_token(admin_token_file)
    listeners = listen(host, port)
    try:
        service = RankingService(Path(bundle_path), threads, scoring, token)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    asyncio.run(_serve(service, listeners, host))
    return 0


async def _serve(service: RankingService, listeners: list[socket.socket], host: str) -> None:
    loop = asyncio.get_running_loop()
    server = HttpServer(service)
    bound = await server.start(listeners)
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
    if server.cap_note:
        print(server.cap_note, flush=True)
    where = f"[{host}]" if ":" in host else host
    print(
        f"funnelrank serving bundle {service.scorer.version} on http://{where}:{bound}; admin reload over HTTP "
        f"{'on' if service.admin_token else 'off (SIGHUP reloads)'}",
        flush=True,
    )
    await stop.wait()
    print(
        f"stopping: answering {service.metrics.requests_in_flight} requests in flight "
        f"(at most {service.limits.drain_timeout_s} s)",
        flush=True,
    )
    await server.stop()
