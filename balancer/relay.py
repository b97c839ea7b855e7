"""The hot path: send one request to a replica and pipe its response back, byte for byte.

1. Take a slot (admission) and open the upstream request.
2. Before anything reaches the client, look at the status and, for SSE, the first event:
   connection refused/reset, 424/429/5xx, or TGI's HTTP-200 stream whose first event is an
   error (overloaded) are retried on another replica within the retry budget.
3. Commit: send the upstream's status and headers, then relay chunks as they arrive, with
   no parsing and no re-serialising. Event boundaries (``\\n\\n``) are *counted* to measure
   time to first token and inter-token latency.
4. If the upstream fails after the client got bytes, end the stream with an explicit error
   event in the route's format (never a silent truncation); no retry once a token was sent.
5. ``finally``: release the slot, which hands it to the oldest queued request; a client
   that left (cancellation) closes the upstream connection at once, so the replica frees
   its batch slot at the next token.

The replica side is ``balancer.upstream_http``: once committed, the replica's body is pushed
from the connection's ``data_received`` into a sink that writes straight to the client's
transport, so no coroutine runs per token event; the relay's coroutine wakes only when the
response ends, fails or the client's socket is full (then it waits for it to drain).
A single watchdog task enforces the idle and slow-client timeouts of every stream, so the
per-chunk cost is an attribute store rather than a timer per read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from balancer.admission import Admission, QueueFull, QueueTimeout
from balancer.config import BalancerConfig
from balancer.errors import json_error, stream_error_event
from balancer.forecast import Ticket
from balancer.metrics import BalancerMetrics
from balancer.upstream import Registry, Replica
from balancer.upstream_http import ReplicaConnection, UpstreamError, UpstreamPool

log = logging.getLogger("neuron_fleet.relay")

RETRYABLE_STATUS = frozenset({424, 429, 500, 502, 503, 504})
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
SPOOFABLE = frozenset({"x-forwarded-for", "x-real-ip", "forwarded", "x-neuron-fleet-replica"})
REQUEST_ONLY_DROP = frozenset({"content-encoding", "expect"})
"""Not forwarded either: aiohttp already decoded a compressed body, and already answered
``Expect: 100-continue`` (the whole body is read before the replica is called)."""
SSE = "text/event-stream"
STAGE = web.RequestKey("neuron_fleet_stage", str)
"""request[STAGE]: where a request is (queued / waiting_first_byte / streaming)."""
CLIENT_GONE = web.RequestKey("neuron_fleet_client_gone", bool)
"""request[CLIENT_GONE]: the client disconnected while we were writing to it."""
FIRST_EVENT_LIMIT = 1 << 20
"""Most bytes read while looking for the first event before we give up looking."""


@dataclass(frozen=True)
class RelayRequest:
    """What the app decided about a request before it reaches the relay."""

    route: str
    body: bytes
    request_id: str
    openai: bool
    """Error events in OpenAI's shape (+ ``data:[DONE]``) rather than TGI's."""
    admit: bool = True
    """Generation routes take a batch slot; /info, /tokenize and friends do not."""
    work: int = 0
    """Prompt tokens + tokens to generate, for the work-aware policies."""
    prompt_tokens: int = 0
    """The prefill part of ``work``: done once the first token arrives."""
    ticket: Ticket | None = None
    """What the forecast and the SLO gate know of it (balancer/forecast.py)."""


StreamEnd = Callable[[Ticket, float, float, int, bool], None]
"""Called when a stream with a ticket ends: (ticket, seconds from arrival to the first
token, seconds from the first to the last token, token events, ended normally)."""


class _Retry(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Stream:
    """Mutable per-request state the watchdog inspects."""

    __slots__ = ("client_gone", "expired", "phase", "request", "since", "upstream", "work_done")

    IDLE, READING, WRITING = 0, 1, 2

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.upstream: ReplicaConnection | None = None
        self.phase = _Stream.IDLE
        self.since = 0.0
        self.expired: str | None = None
        self.client_gone = False
        """The client's transport was found closing while relaying to it."""
        self.work_done = 0
        """Part of the request's work the replica has done (prefill, then one per token)."""


class Relay:
    def __init__(
        self,
        config: BalancerConfig,
        registry: Registry,
        admission: Admission,
        metrics: BalancerMetrics,
        pool: UpstreamPool | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.admission = admission
        self.metrics = metrics
        self.pool = pool if pool is not None else UpstreamPool(config.connect_timeout_s)
        self._streams: set[_Stream] = set()
        self._any_turn = 0
        self.on_stream_end: StreamEnd | None = None
        # The client's API key is the balancer's to check, not the replicas' to see.
        self._consumed = frozenset({"authorization"}) if config.api_keys else frozenset()

    # ---------------------------------------------------------------- entry point
    async def forward(self, request: web.Request, rr: RelayRequest) -> web.StreamResponse:
        started = time.monotonic()
        headers = upstream_headers(request, rr.request_id, drop=self._consumed)
        tried: set[Replica] = set()
        stream = _Stream(request)
        self._streams.add(stream)
        try:
            for attempt in range(self.config.retries + 1):
                request[STAGE] = "queued"
                replica = await self._acquire(rr, frozenset(tried))
                if replica is None:
                    return self._reject_no_replica(rr)
                # No replica left to retry on: answer with this one's error now, rather than
                # wait queue_timeout_s for a slot on a replica this request excludes.
                last_attempt = attempt == self.config.retries or not any(
                    r.routable and r is not replica and r not in tried
                    for r in self.registry.replicas
                )
                stream.work_done = 0
                try:
                    request[STAGE] = "waiting_first_byte"
                    return await self._attempt(
                        request, rr, replica, headers, stream, started, last_attempt
                    )
                except _Retry as retry:
                    tried.add(replica)
                    if stream.upstream is not None:
                        # Release the failed attempt's connection now: a replica still
                        # working on it (first-byte timeout) must see the request cancelled.
                        stream.upstream.abort()
                        stream.upstream = None
                    self.metrics.retries.labels(reason=retry.reason).inc()
                    log.info(
                        "retrying %s %s on another replica: %s from %s",
                        rr.request_id,
                        rr.route,
                        retry.reason,
                        replica.name,
                    )
                finally:
                    if rr.admit:
                        self.admission.release(replica, rr.work - stream.work_done, rr.ticket)
            raise AssertionError("unreachable: the last attempt never retries")
        except QueueFull:
            self.metrics.rejected.labels(reason="queue_full").inc()
            return json_error(
                429,
                f"Model is overloaded: {self.admission.queue_depth} requests are queued "
                "at the balancer (max_queue reached); retry later",
                "overloaded",
                headers={"Retry-After": "1", "x-request-id": rr.request_id},
            )
        except QueueTimeout as exc:
            reason = exc.reason
            self.metrics.rejected.labels(reason=reason).inc()
            what = "no replica is ready" if exc.no_replica else "every replica slot stayed busy"
            if reason == "ttft_slo_expired" and rr.ticket is not None:
                what = "it can no longer get its first token within its TTFT budget"
                klass = "long" if rr.ticket.long else "short"
                self.metrics.slo_requests.labels(outcome="expired", prompt_class=klass).inc()
            return json_error(
                503,
                f"Waited {exc.waited_s:.1f} s for a replica slot but {what}; retry later",
                "unavailable" if exc.no_replica else "overloaded",
                headers={"Retry-After": "5", "x-request-id": rr.request_id},
            )
        finally:
            self._streams.discard(stream)
            if stream.upstream is not None:
                stream.upstream.release()  # kept for the next request if it ended cleanly

    async def _acquire(self, rr: RelayRequest, exclude: frozenset[Replica]) -> Replica | None:
        if rr.admit:
            return await self.admission.acquire(rr.work, exclude, rr.prompt_tokens, rr.ticket)
        candidates = [r for r in self.registry.replicas if r.routable and r not in exclude]
        if not candidates:
            return None
        self._any_turn += 1
        return candidates[self._any_turn % len(candidates)]

    def _reject_no_replica(self, rr: RelayRequest) -> web.Response:
        self.metrics.rejected.labels(reason="no_replica").inc()
        return json_error(
            503,
            "No replica is ready to answer; check `neuron-fleet status`",
            "unavailable",
            headers={"Retry-After": "5", "x-request-id": rr.request_id},
        )

    # ---------------------------------------------------------------- one attempt
    async def _attempt(
        self,
        request: web.Request,
        rr: RelayRequest,
        replica: Replica,
        headers: CIMultiDict[str],
        stream: _Stream,
        started: float,
        last_attempt: bool,
    ) -> web.StreamResponse:
        cfg = self.config
        stream.upstream = None
        try:
            async with asyncio.timeout(cfg.first_byte_timeout_s):
                upstream = stream.upstream = await self.pool.request(
                    replica.url, request.method, request.path_qs, headers, rr.body
                )
                self.metrics.upstream_responses.labels(
                    replica=replica.name, code=str(upstream.status)
                ).inc()
                if upstream.status in RETRYABLE_STATUS:
                    if upstream.status != 429:  # busy is not broken
                        self._failed(replica, f"status_{upstream.status}")
                    if not last_attempt:
                        raise _Retry(f"status_{upstream.status}")
                else:
                    self._passed(replica)
                is_sse = _content_type(upstream.headers) == SSE
                first = await upstream.read_first(is_sse, FIRST_EVENT_LIMIT)
        except TimeoutError:
            self._failed(replica, "first_byte_timeout")
            if not last_attempt:
                raise _Retry("first_byte_timeout") from None
            return json_error(
                504,
                f"Replica {replica.name} sent nothing within {cfg.first_byte_timeout_s:g} s "
                "(first_byte_timeout)",
                "timeout",
                headers={"x-request-id": rr.request_id},
            )
        except UpstreamError as exc:
            self._failed(replica, exc.kind)
            if not last_attempt:
                raise _Retry(exc.kind) from None
            return json_error(
                502,
                f"Replica {replica.name} failed before answering ({exc})",
                "unavailable",
                headers={"x-request-id": rr.request_id},
            )

        if is_sse and first.startswith(b"data:") and b'{"error"' in first[:64]:
            retryable = _retryable_error_event(first)
            if retryable and not last_attempt:
                # Counted here because it never reaches _pipe_events, which counts the rest.
                self.metrics.upstream_errors.labels(replica=replica.name, kind="error_event").inc()
                if b"generation" in first:
                    self._failed(replica, "generation_event")
                raise _Retry(f"{retryable}_event")

        response = web.StreamResponse(
            status=upstream.status, headers=response_headers(upstream.headers)
        )
        response.headers["x-request-id"] = rr.request_id
        if is_sse:
            response.headers["Cache-Control"] = "no-cache"
            response.headers["X-Accel-Buffering"] = "no"
        request[STAGE] = "streaming"
        try:
            await response.prepare(request)
            if is_sse:
                await self._pipe_events(rr, replica, upstream, response, stream, first, started)
            else:
                await self._pipe_bytes(upstream, response, stream, first)
        except ConnectionResetError:
            # The client left (or was cut off as a slow reader): close upstream, free the slot.
            request[CLIENT_GONE] = True
            upstream.abort()
        except UpstreamError as exc:
            # A non-SSE body cut after it started (replica died or went idle): there is no
            # error event for it, and ending it cleanly would pass a truncated body off as
            # complete, so reset the client's connection.
            reason = stream.expired or exc.kind
            self._failed(replica, reason)
            self.metrics.stream_errors.labels(replica=replica.name, reason=reason).inc()
            log.warning("response %s from %s cut (%s)", rr.request_id, replica.name, reason)
            if request.transport is not None:
                request.transport.abort()
        return response

    # ---------------------------------------------------------------- piping
    async def _open_client(
        self, request: web.Request, response: web.StreamResponse, stream: _Stream, first: bytes
    ) -> Callable[[bytes], None]:
        """Send the response head with the first piece (one packet, through aiohttp's writer),
        then return a function that writes each further piece straight to the client's
        socket, chunk-framed if the response is, pausing the replica's connection when the
        client's buffer is full."""
        stream.phase, stream.since = _Stream.WRITING, asyncio.get_running_loop().time()
        if first:
            await response.write(first)
        else:
            request.writer.send_headers()
        stream.phase = _Stream.READING
        transport = request.transport
        upstream = stream.upstream
        if transport is None or transport.is_closing() or upstream is None:
            raise ConnectionResetError("client gone")
        high = transport.get_write_buffer_limits()[1]
        chunked = response.headers.get("Transfer-Encoding") == "chunked"
        write, closing = transport.write, transport.is_closing
        buffered = transport.get_write_buffer_size

        def to_client(piece: bytes) -> None:
            if closing():
                stream.client_gone = True
                upstream.abort()
                return
            write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
            if buffered() > high:
                upstream.pause()

        return to_client

    async def _drain_loop(
        self, request: web.Request, upstream: ReplicaConnection, stream: _Stream
    ) -> None:
        """Wait for the response to end; while the client's socket is full, wait for it."""
        loop_time = asyncio.get_running_loop().time
        stream.phase, stream.since = _Stream.READING, loop_time()
        while True:
            await upstream.wait()
            if upstream.complete:
                break
            stream.phase, stream.since = _Stream.WRITING, loop_time()
            await request.writer.drain()
            stream.phase, stream.since = _Stream.READING, loop_time()
            upstream.resume()
        stream.phase = _Stream.IDLE

    async def _pipe_bytes(
        self,
        upstream: ReplicaConnection,
        response: web.StreamResponse,
        stream: _Stream,
        first: bytes,
    ) -> None:
        request = stream.request
        loop_time = asyncio.get_running_loop().time
        to_client = await self._open_client(request, response, stream, first)

        def piece(chunk: bytes) -> None:
            stream.since = loop_time()
            to_client(chunk)

        upstream.pipe(piece)
        try:
            await self._drain_loop(request, upstream, stream)
        except UpstreamError:
            if stream.client_gone or stream.expired == "slow_client":
                raise ConnectionResetError("client gone") from None
            raise
        stream.phase, stream.since = _Stream.WRITING, loop_time()  # may block: a client write
        await response.write_eof()

    async def _pipe_events(
        self,
        rr: RelayRequest,
        replica: Replica,
        upstream: ReplicaConnection,
        response: web.StreamResponse,
        stream: _Stream,
        first: bytes,
        started: float,
    ) -> None:
        rm = self.metrics.for_replica(replica)
        request = stream.request
        loop_time = asyncio.get_running_loop().time
        sep = b"\r\n\r\n" if b"\r\n\r\n" in first and b"\n\n" not in first else b"\n\n"
        data_prefix = b"data: " if first.startswith(b"data: ") else b"data:"
        # Wall-clock origin of this request, on the loop's clock.
        origin = loop_time() - (time.monotonic() - started)
        last_token = first_token = 0.0
        tokens = 0
        saw_error = False

        def count(chunk: bytes) -> None:
            """Count the token events of one piece of the replica's stream."""
            nonlocal last_token, first_token, tokens, saw_error
            now = loop_time()
            events = chunk.count(sep)
            if events:
                # Not tokens: [DONE], the usage-only chunk, keep-alive comments.
                events -= chunk.count(b"[DONE]") + chunk.count(b'"choices":[]')
                if chunk[0] == 58:  # b":"
                    events -= 1
                events -= chunk.count(sep + b":")
                if not saw_error and b'{"error"' in chunk:
                    saw_error = True
                    self.metrics.upstream_errors.labels(
                        replica=replica.name, kind="error_event"
                    ).inc()
                if events > 0:
                    # Remaining work on the replica: the prefill is done at the first
                    # token, then one token per event (never below what we added).
                    done = events + (rr.prompt_tokens if tokens == 0 else 0)
                    done = min(done, rr.work - stream.work_done)
                    stream.work_done += done
                    replica.outstanding_work -= done
                    if tokens == 0:
                        rm.ttft.observe(now - origin)
                        first_token = now
                    else:
                        rm.itl.observe(now - last_token)
                    if events > 1:  # arrived together: no time between them
                        rm.itl.observe(0.0, events - 1)
                    tokens += events
                    last_token = now
            stream.since = now

        try:
            if first:
                count(first)
            to_client = await self._open_client(request, response, stream, first)

            def event(chunk: bytes) -> None:
                count(chunk)
                to_client(chunk)

            upstream.pipe(event)
            await self._drain_loop(request, upstream, stream)
            if stream.expired and not upstream.complete:
                raise UpstreamError(stream.expired, "stream cut by the watchdog")
        except (UpstreamError, TimeoutError) as exc:
            writing = stream.phase == _Stream.WRITING
            stream.phase = _Stream.IDLE
            if writing or stream.client_gone or stream.expired == "slow_client":
                # The client's side failed: it left or was cut as a slow reader. Not the
                # replica's fault, and nobody to send an error event to.
                raise ConnectionResetError("client gone") from exc
            reason = stream.expired or (exc.kind if isinstance(exc, UpstreamError) else "timeout")
            self._failed(replica, reason)
            self.metrics.stream_errors.labels(replica=replica.name, reason=reason).inc()
            log.warning(
                "stream %s from %s failed after %d tokens (%s): sent an error event",
                rr.request_id,
                replica.name,
                tokens,
                reason,
            )
            event_bytes = stream_error_event(
                rr.openai,
                f"Replica {replica.name} failed mid-stream ({reason}) after {tokens} tokens",
                "incomplete_generation",
                502,
                data_prefix,
            )
            stream.phase, stream.since = _Stream.WRITING, loop_time()
            await response.write(event_bytes)
        finally:
            if tokens:
                rm.output_tokens.inc(tokens)
                if self.on_stream_end is not None and rr.ticket is not None:
                    clean = upstream.complete and not saw_error and not stream.client_gone
                    ttft = first_token - origin
                    self.on_stream_end(rr.ticket, ttft, last_token - first_token, tokens, clean)
        # Every write to the client may block on a full socket: keep it under the watchdog.
        stream.phase, stream.since = _Stream.WRITING, loop_time()
        await response.write_eof()

    # ---------------------------------------------------------------- health signals
    def _passed(self, replica: Replica) -> None:
        replica.consecutive_failures = 0

    def _failed(self, replica: Replica, kind: str) -> None:
        """Count a failure; enough in a row ejects the replica until health checks pass."""
        self.metrics.upstream_errors.labels(replica=replica.name, kind=kind).inc()
        replica.consecutive_failures += 1
        if replica.healthy and replica.consecutive_failures >= self.config.eject_after_failures:
            replica.healthy = False
            replica.health_successes = 0
            log.warning(
                "ejected %s after %d consecutive failures (last: %s); health checks re-admit it",
                replica.name,
                replica.consecutive_failures,
                kind,
            )
            self.registry.notify()

    # ---------------------------------------------------------------- watchdog
    def check_timeouts(self, now: float) -> None:
        """Called by the watchdog: cut streams idle upstream or stuck on a slow client."""
        idle = self.config.idle_timeout_s
        client = self.config.client_timeout_s
        for s in list(self._streams):
            if s.phase == _Stream.READING and now - s.since > idle and s.upstream is not None:
                s.expired = "idle_timeout"
                s.phase = _Stream.IDLE
                s.upstream.abort()
            elif s.phase == _Stream.WRITING and now - s.since > client:
                s.expired = "slow_client"
                s.phase = _Stream.IDLE
                transport = s.request.transport
                if transport is not None:
                    transport.abort()
                if s.upstream is not None:
                    s.upstream.abort()

    @property
    def active(self) -> int:
        return len(self._streams)


def upstream_headers(
    request: web.Request, request_id: str, drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop and spoofable ones (and ``drop``, lower case), plus
    forwarding and request id."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lower = name.lower()
        if (
            lower in HOP_BY_HOP
            or lower in SPOOFABLE
            or lower in REQUEST_ONLY_DROP
            or lower in drop
            or lower == "x-request-id"
        ):
            continue
        out.add(name, value)
    for token in _connection_tokens(request.headers.getall("Connection", ())):
        out.popall(token, None)
    peer = request.remote or ""
    prior = ", ".join(request.headers.getall("X-Forwarded-For", ()))
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["x-request-id"] = request_id
    return out


def response_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    drop = set(_connection_tokens(headers.getall("Connection", ())))
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in drop or lower == "x-request-id":
            continue
        out.add(name, value)
    cl = headers.get("Content-Length")
    if cl is not None and "Transfer-Encoding" not in headers:
        out["Content-Length"] = cl
    return out


def _connection_tokens(values: Iterable[str]) -> list[str]:
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def _content_type(headers: CIMultiDict[str]) -> str:
    return headers.get("Content-Type", "").partition(";")[0].strip().lower()


def _retryable_error_event(first: bytes) -> str | None:
    """TGI streams answer HTTP 200 with an error event when overloaded or on a batch failure."""
    head = first[:512]
    if b"overloaded" in head or b'"http_status_code":429' in head:
        return "overloaded"
    if b'"error_type":"generation"' in head or b'"http_status_code":424' in head:
        return "generation"
    return None
