"""A small HTTP/1.1 client for the relay: the replica's response body is pushed, not pulled.

aiohttp's client hands every body chunk to a coroutine through a ``StreamReader``: a future,
a task wake-up and several coroutine frames per token event, which was about half of the
balancer's CPU per relayed event (bench/profile_balancer.py). Here httptools (llhttp, the
parser uvicorn uses) calls ``on_body`` from ``data_received``; before the relay commits a
response the body is buffered for it to inspect, after that every piece goes straight to the
relay's *sink*, which writes it to the client's transport. No coroutine runs per event: the
relay's coroutine only wakes for "done", "failed" or "paused" (the client reads slowly).

Connections are kept alive per replica and reused most-recent-first. One the replica closed
while idle is dropped when it notices (``connection_lost``); a request that meets such a
connection closing under it before any response byte is sent again once on a new one. Idle
connections are also closed proactively once past ``IDLE_KEEPALIVE_S`` (the pool's reaper),
not only when a request happens to reach them.

A response moves through ``ResponseState``: HEAD (reading the status line and headers) ->
BODY -> COMPLETE, or FAILED from anywhere (``error`` says why). The head is bounded as
aiohttp's client bounds it (``MAX_HEAD_BYTES``, ``MAX_FIELD_BYTES``, ``MAX_HEADERS``), and
chunked trailers are dropped: they come after the body, so they are never response headers.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import select
import ssl
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from balancer.sse import FirstEventScanner

log = logging.getLogger("neuron_fleet.upstream")

Sink = Callable[[bytes], None]
"""Receives each body piece once the relay has committed the response."""

IDLE_KEEPALIVE_S = 4.0
"""Idle connections older than this are closed rather than reused: under uvicorn's (vLLM's)
5 s keep-alive, so a replica rarely closes a connection just as a request goes out on it."""
MAX_IDLE_PER_REPLICA = 256
MAX_HEAD_BYTES = 64 * 1024
"""Most bytes of a response's status line and headers (Envoy's default header limit is
60 KiB; nginx's proxy buffers 4-8 KiB). A replica's head is a few hundred bytes."""
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 128
"""As aiohttp's client (aiohttp 3.14.5, client.py ClientSession: max_line_size=8190,
max_field_size=8190, max_headers=128)."""


def _readable(transport: asyncio.BaseTransport) -> bool:
    """An idle connection with something to read: bytes, or the replica's FIN (it closed the
    connection, or its process died), which the kernel holds before our loop reads it. On
    loopback a killed process's FIN is queued as it dies, so a request that finds none was
    sent before the death. ``poll`` (not ``select``): descriptors above 1023."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class ResponseState(enum.Enum):
    HEAD = "head"
    """Waiting for (more of) the status line and headers."""
    BODY = "body"
    COMPLETE = "complete"
    FAILED = "failed"


class UpstreamError(Exception):
    """The connection to a replica failed; ``kind`` says how (a metrics label).

    ``str()`` is the kind alone: it reaches clients in 502 bodies and error events, which
    must not name internal addresses or errno values; ``detail`` (with those) is logged at
    DEBUG for the operator."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(kind)
        self.kind = kind
        self.detail = detail
        log.debug("upstream %s: %s", kind, detail)


class _HeadTooLarge(Exception):
    """Raised from ``on_header`` to stop the parser (it wraps it in a callback error)."""


class ReplicaConnection(asyncio.Protocol):
    """One keep-alive connection to a replica and the response currently on it."""

    def __init__(self, pool: UpstreamPool, key: str) -> None:
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self.reused = False
        self.idle_since = 0.0
        self.reaper: asyncio.TimerHandle | None = None
        """Closes the connection if it stays idle in the pool past IDLE_KEEPALIVE_S."""
        self._new_response()

    def _new_response(self) -> None:
        self.state = ResponseState.HEAD
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self._head_bytes = 0
        self.paused = False
        """Flow control, orthogonal to ``state``: reading stopped until the client drains."""
        self.got_bytes = False
        self.error: UpstreamError | None = None
        self._buffered: list[bytes] = []
        self._sink: Sink | None = None
        self._until_eof = False
        self._keep_alive = False

    @property
    def head_done(self) -> bool:
        """The status line and headers arrived (the response may have failed since)."""
        return self.status != 0

    @property
    def complete(self) -> bool:
        return self.state is ResponseState.COMPLETE

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.complete:  # bytes after a whole response answer nothing: unusable connection
            self.got_bytes = True
            self.abort()
            return
        self.got_bytes = True
        if self.state is ResponseState.HEAD:
            if self._head_bytes > MAX_HEAD_BYTES:
                # Still no end of the head after the limit: httptools would buffer all of a
                # 64 MB header value. (Counted per read: one read may carry body bytes too.)
                self._fail("bad_response", f"response head over {MAX_HEAD_BYTES} bytes")
                self.abort()
                return
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._fail("bad_response", f"response head over the limits: {exc.__context__}")
                self.abort()
                return
            # Our own callback (the relay's sink) raised: a balancer bug, not the replica's.
            log.error("relaying a replica response failed", exc_info=exc.__context__ or exc)
            self._fail("relay_error", f"balancer error while relaying: {exc.__context__!r}")
            self.abort()
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # Not "payload_error" (the replica cut the response): a replica that answers
            # garbage (a misconfigured URL) is not a process dying under the request (whether
            # a request broke its process is the process's fate, balancer/fate.py).
            self._fail("bad_response", f"malformed or upgraded response: {exc!r}")
            self.abort()

    def eof_received(self) -> bool | None:
        return False  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.forget(self)
        self.transport = None
        if self.complete or self.error is not None:
            return
        if self.head_done and self._until_eof and exc is None:
            self._on_complete()  # a body delimited by the connection's end is now complete
            return
        if self.head_done:
            self._fail("payload_error", "the replica closed the connection mid-response")
        else:
            self._fail("disconnected", "the replica closed the connection before answering")

    # ------------------------------------------------------------------ httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state is not ResponseState.HEAD:
            return  # a chunked trailer: not a response header (and not relayed)
        if len(name) + len(value) > MAX_FIELD_BYTES or len(self.headers) >= MAX_HEADERS:
            raise _HeadTooLarge(f"header {name[:40]!r} or header count over the limit")
        # As aiohttp decodes them, so that non-ASCII bytes reach the client unchanged.
        self.headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 1xx interim answer: the real one follows
            self.headers = CIMultiDict()
            return
        self.status = status
        self._keep_alive = self._parser.should_keep_alive()
        te = self.headers.get("Transfer-Encoding", "")
        self._until_eof = (
            "Content-Length" not in self.headers
            and "chunked" not in te.lower()
            and status not in (204, 304)
        )
        self.state = ResponseState.BODY
        self._wake()

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink(body)
        else:
            self._buffered.append(body)
            self._wake()

    def on_message_complete(self) -> None:
        if self.head_done:
            self._on_complete()

    # ------------------------------------------------------------------ the relay's side
    def send(self, request: bytes) -> None:
        if self.transport is not None:  # else it closed already: read_head raises why
            self.transport.write(request)

    async def read_head(self) -> None:
        """Wait for the status line and headers (``status``, ``headers``)."""
        while not self.head_done:
            await self._wait()

    async def read_first(self, until_event: bool, limit: int) -> bytes:
        """Body bytes buffered so far: for SSE until the first complete event that is not a
        keep-alive comment (or ``limit`` bytes, or the end), else whatever the first piece
        is. Empty means the body is empty."""
        scanner = FirstEventScanner() if until_event else None
        buf: bytes | bytearray = b""
        while True:
            pending = self._buffered
            if pending:
                if not buf and len(pending) == 1:
                    buf = pending[0]  # the common case: the first read holds the event
                else:  # grows in place: a large first event in small reads stays linear
                    if not isinstance(buf, bytearray):
                        buf = bytearray(buf)
                    for piece in pending:
                        buf += piece
                pending.clear()
            whole = scanner is None or scanner.end(buf) >= 0
            if self.complete or self.error is not None or (buf and whole) or len(buf) >= limit:
                if self.error is not None and not (buf and whole):
                    raise self.error  # nothing usable arrived: the relay may still retry
                return bytes(buf) if isinstance(buf, bytearray) else buf
            await self._wait()

    def pipe(self, sink: Sink) -> None:
        """From now on every body piece goes to ``sink`` as it arrives."""
        pending, self._buffered = self._buffered, []
        for piece in pending:
            sink(piece)
        self._sink = sink

    async def wait(self) -> None:
        """Return once the response is complete or paused; raise if it failed."""
        while not (self.complete or self.paused):
            await self._wait()

    def pause(self) -> None:
        """Stop reading (the client is slow); wakes the relay to wait for it to drain."""
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
            self._wake()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def release(self) -> None:
        """Done with this response: back to the pool if it can carry another, else close."""
        transport = self.transport
        if (
            self.complete
            and self._keep_alive
            and transport is not None
            and not transport.is_closing()
            and not self.paused
        ):
            self._new_response()
            self._pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the connection now (a replica still generating sees the client leave)."""
        transport = self.transport
        if transport is None:
            return
        if self.state is ResponseState.COMPLETE:
            transport.close()  # nothing in flight: an orderly close
            return
        self._fail("connection_error", "closed by the balancer")
        transport.abort()

    # ------------------------------------------------------------------ internals
    def _on_complete(self) -> None:
        self.state = ResponseState.COMPLETE
        self._wake()

    def _fail(self, kind: str, detail: str) -> None:
        if self.error is None and self.state is not ResponseState.COMPLETE:
            self.error = UpstreamError(kind, detail)
            self.state = ResponseState.FAILED
        self._wake()

    async def _wait(self) -> None:
        if self.error is not None:
            raise self.error
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None
        if self.error is not None:
            raise self.error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class UpstreamPool:
    """Keep-alive connections per replica base URL."""

    def __init__(self, connect_timeout_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[str, list[ReplicaConnection]] = {}
        self._targets: dict[str, tuple[str, int, ssl.SSLContext | None, str, str]] = {}
        self._closed = False

    async def request(
        self,
        base_url: str,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes,
        sent: Callable[[ReplicaConnection], None] | None = None,
    ) -> ReplicaConnection:
        """Send a request; return its connection once the status line and headers are in.

        A reused connection the replica closed before answering a byte is replaced by a new
        one and the request sent once more. Unlike aiohttp (idempotent methods only) this
        re-sends POSTs: generation has no side effects, and the usual cause is the replica's
        keep-alive timer closing the socket as the request went out, which the replica then
        never processes. The caller must ``release`` (or ``abort``) the connection; if this
        raises or is cancelled, the connection is already dropped. ``sent`` is told the
        connection once the request is on it, before the head arrives (so that the caller
        can abort a request whose replica is found hung meanwhile).
        """
        host, port, context, netloc, prefix = self._target(base_url)
        raw = _serialize(method, prefix + path_qs, netloc, headers, body)
        conn = self._take_idle(base_url)
        if conn is None:
            conn = await self._connect(base_url, host, port, context)
        try:
            conn.send(raw)
            if sent is not None:
                sent(conn)
            try:
                await conn.read_head()
            except UpstreamError as closed:
                if not (conn.reused and not conn.got_bytes) or closed.kind == "connection_error":
                    raise  # (connection_error: we aborted it ourselves, see ``sent``)
                try:
                    conn = await self._connect(base_url, host, port, context)
                except UpstreamError:
                    # Nothing listens any more: the process closed the connection as it
                    # died, perhaps of this very request. Say so, not "never reached": the
                    # request may not go back to its restart (balancer/retry.py), and
                    # counts towards its quarantine (balancer/quarantine.py).
                    raise closed from None
                conn.send(raw)
                if sent is not None:
                    sent(conn)
                await conn.read_head()
        except BaseException:
            conn.abort()
            raise
        return conn

    def put(self, conn: ReplicaConnection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= MAX_IDLE_PER_REPLICA:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        conn.reused = True
        idle.append(conn)
        conn.reaper = asyncio.get_running_loop().call_later(IDLE_KEEPALIVE_S, self._expire, conn)

    def _expire(self, conn: ReplicaConnection) -> None:
        """An idle connection reached its keep-alive limit: close it now, not when reached."""
        conn.reaper = None
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if conn.transport is not None:
                conn.transport.close()

    def forget(self, conn: ReplicaConnection) -> None:
        if conn.reaper is not None:
            conn.reaper.cancel()
            conn.reaper = None
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in list(idle):
                if conn.reaper is not None:
                    conn.reaper.cancel()
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()

    def _take_idle(self, key: str) -> ReplicaConnection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.reaper is not None:
                conn.reaper.cancel()
                conn.reaper = None
            transport = conn.transport
            if transport is None or transport.is_closing():
                continue
            if conn.got_bytes or now - conn.idle_since > IDLE_KEEPALIVE_S or _readable(transport):
                # Bytes while idle are not an answer to anything: the connection is unusable.
                # So is one whose end the kernel already holds and our loop has not read yet
                # (a replica killed a moment ago): the request must not go out on it, or it
                # would fail as if the death were its doing.
                transport.close()
                continue
            return conn
        return None

    async def _connect(
        self, key: str, host: str, port: int, context: ssl.SSLContext | None
    ) -> ReplicaConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: ReplicaConnection(self, key),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except TimeoutError:
            raise UpstreamError(
                "connect_error", f"no connection to {key} within {self.connect_timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise UpstreamError("connect_error", f"cannot connect to {key}: {exc}") from None
        return conn

    def _target(self, base_url: str) -> tuple[str, int, ssl.SSLContext | None, str, str]:
        target = self._targets.get(base_url)
        if target is None:
            parts = urlsplit(base_url)
            https = parts.scheme == "https"
            host = parts.hostname or "127.0.0.1"
            port = parts.port or (443 if https else 80)
            context = ssl.create_default_context() if https else None
            netloc = f"[{host}]" if ":" in host else host
            if parts.port is not None:
                netloc += f":{parts.port}"
            target = (host, port, context, netloc, parts.path.rstrip("/"))
            self._targets[base_url] = target
        return target


def _serialize(
    method: str, target: str, netloc: str, headers: CIMultiDict[str], body: bytes
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {netloc}"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value:  # never let a value split the head
            continue
        lines.append(f"{name}: {value}")
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"Content-Length: {len(body)}")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("utf-8", "surrogateescape") + body
