"""The hot path: send one request to a replica and pipe its response back, byte for byte.

A request's life, top to bottom (``Relay.forward``), one method per concern:

1. **Choose a replica and retry** (``forward``, ``_choose``): take a slot (admission); the
   request's ``Ticket`` keeps its place in line and its queue deadline across retries.
   *Whether* a failed attempt is retried, and whom the failure is blamed on (outliers,
   quarantine), is decided in one place apart from this file: ``balancer.retry``. The
   relay reports each attempt's outcome to it and does as told.
2. **Open** (``_open``): send the request and wait for the replica's answer: the status
   line and headers, and for event streams the first event. Connection refused or reset,
   a 424/429/5xx answer, or TGI's HTTP-200 stream whose first event is an error
   (``balancer.sse``) raise ``_Retry`` when the retry policy says so.
3. **Commit** (``_commit``): send the status and headers to the client. From here on the
   request is never retried.
4. **Pipe** (``_pipe_events`` / ``_pipe_bytes``): relay the body as it arrives, unparsed.
   Event streams go through an ``EventFramer`` that forwards whole events only and counts
   token events (time to first token, inter-token latency, remaining work). If the replica
   fails mid-stream the client gets an explicit error event after the last whole event
   (never half an event, never a silent truncation); a cut non-streaming body resets the
   client's connection, so it cannot pass for a complete one.
5. **Account**: the retry policy (balancer/retry.py) hears every outcome: failures
   before the commit (``RetryPolicy.retry``), the answer committed (``answered``), a
   response that failed after it (``failed_after_commit``) or ended well (``ended_well``).
   ``finally`` releases the slot, which hands it to the next waiter; a client that left
   closes the upstream connection at once, so the replica frees its batch slot at the next
   token.

Timeouts (balancer/config.py): ``connect_timeout_s`` (TCP connect, in the pool);
``first_byte_timeout_s`` (a stream's head and first event); ``response_timeout_s`` (a
non-streaming response, whole); ``idle_timeout_s`` (silence between two pieces of a started
response); ``client_timeout_s`` (a client that does not take what we write). Until the
commit they are ``asyncio.timeout`` scopes; after it one watchdog task checks every
stream's ``Phase`` and the time it entered it, so a relayed piece costs an attribute store
rather than a timer.

The replica side is ``balancer.upstream_http``: once committed, the replica's body is pushed
from the connection's ``data_received`` into a sink that writes straight to the client's
transport, so no coroutine runs per token event.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from balancer.admission import Admission, QueueFull, QueueTimeout, Ticket
from balancer.config import BalancerConfig
from balancer.errors import json_error, stream_error_event
from balancer.fate import Prober
from balancer.forecast import retry_after
from balancer.health import probe_health
from balancer.metrics import BalancerMetrics
from balancer.quarantine import Entry, Quarantine
from balancer.retry import WEDGED_REPLICA, Attempts, Quarantined, RetryPolicy
from balancer.slo import SloScore
from balancer.sse import CLIENT, GENERATION, EventFramer, parse_error_event, separator_of
from balancer.upstream import Registry, Replica, ReplicaState, Tried, excluded
from balancer.upstream_http import ReplicaConnection, UpstreamError, UpstreamPool

log = logging.getLogger("neuron_fleet.relay")

BUSY_STATUS = 429
FAILED_STATUS = frozenset({424, 500, 502, 503, 504})
"""Answers that say the replica could not serve this request. 424: TGI's answer to a
request whose generation failed (``InferError::GenerationError``: v3.3.7
``router/src/server.rs`` ``impl From<InferError>``), also what every request of a batch gets
when a shard dies under it, just before the server exits."""
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
REQUEST_ONLY_DROP = frozenset({"content-encoding", "expect", "accept-encoding"})
"""Not forwarded either: aiohttp already decoded a compressed body, and already answered
``Expect: 100-continue`` (the whole body is read before the replica is called). And the
replica must answer uncompressed: a compressed event stream hides its event boundaries."""
SSE = "text/event-stream"
STAGE = web.RequestKey("neuron_fleet_stage", str)
"""request[STAGE]: where a request is (queued / waiting_first_byte / streaming)."""
CLIENT_GONE = web.RequestKey("neuron_fleet_client_gone", bool)
"""request[CLIENT_GONE]: the client disconnected while we were writing to it."""
RETRY_AFTER_S = 5
"""Seconds a refused client should wait when the balancer cannot tell better (every 429 and
503 carries ``Retry-After``: balancer/app.py adds it to those it did not write)."""
FIRST_EVENT_LIMIT = 1 << 20
"""Most bytes read while looking for the first event before we give up looking."""
DRAIN_TIMEOUT = "drain_timeout"
"""Why a response still relaying when the drain timeout ran out was ended (``end_streams``)."""
QUARANTINED_STATUS = 422
"""A 4xx, so that client SDKs do not resend a request that kills replicas: openai 3.57.0
(``openai/_base_client.py`` ``_should_retry``) retries 408, 409, 429 and >= 500 only (twice
by default, ``_constants.py`` ``DEFAULT_MAX_RETRIES``), and obeys ``x-should-retry: false``,
which we send too. 422 is what TGI answers for a request it will not serve (validation)."""


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
    stream: bool = False
    """The client asked for an event stream: the first event is due within
    ``first_byte_timeout_s``; otherwise the whole answer within ``response_timeout_s``."""
    ticket: Ticket | None = None
    """Made by the app with what the forecast and the SLO gate need (balancer/ticket.py)."""


class _Retry(Exception):
    """This attempt failed before the commit and the retry policy says: another attempt."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Answer:
    """A replica's answer before the commit: head, first piece, and what they say."""

    upstream: ReplicaConnection
    is_sse: bool
    first: bytes
    failure: str | None = None
    """Set when the answer is a failure relayed as is (no replica left to retry on)."""
    error_event: bool = False
    """The first event is an error event (already counted)."""


class Phase(enum.IntEnum):
    """What a committed stream waits for, as the watchdog sees it."""

    IDLE = 0
    READING = 1
    """For the replica: bounded by ``idle_timeout_s``."""
    WRITING = 2
    """For the client to take our bytes: bounded by ``client_timeout_s``."""


class _Stream:
    """Per-request state the watchdog inspects."""

    __slots__ = (
        "att",
        "client_gone",
        "deadline",
        "expired",
        "phase",
        "request",
        "since",
        "upstream",
        "work_done",
    )

    def __init__(self, request: web.Request, att: Attempts) -> None:
        self.request = request
        self.att = att
        """The retry policy's view of the request: the replica process of this attempt."""
        self.upstream: ReplicaConnection | None = None
        self.phase = Phase.IDLE
        self.since = 0.0
        """Loop time the current phase began (or the last piece arrived)."""
        self.deadline: float | None = None
        """Loop time a non-streaming response must be complete by (response_timeout_s)."""
        self.expired: str | None = None
        self.client_gone = False
        """The client's transport was found closing while relaying to it."""
        self.work_done = 0
        """Part of the request's work the replica has done (prefill, then one per token)."""

    def sent(self, upstream: ReplicaConnection) -> None:
        """The request is on ``upstream``, its head not in yet (``Relay._cut_waiting``)."""
        self.upstream = upstream

    def enter(self, phase: Phase, now: float) -> None:
        self.phase, self.since = phase, now


class Relay:
    def __init__(
        self,
        config: BalancerConfig,
        registry: Registry,
        admission: Admission,
        metrics: BalancerMetrics,
        pool: UpstreamPool | None = None,
        quarantine: Quarantine | None = None,
        probe: Prober | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.admission = admission
        self.metrics = metrics
        self.pool = pool if pool is not None else UpstreamPool(config.connect_timeout_s)
        self.quarantine = (
            quarantine
            if quarantine is not None
            else Quarantine(config.quarantine_after, config.quarantine_ttl_s)
        )
        self.policy = RetryPolicy(
            config,
            registry,
            metrics,
            self.quarantine,
            probe if probe is not None else functools.partial(probe_health, None, config),
        )
        """When a request is retried, and whom failures are blamed on (balancer/retry.py)."""
        self.policy.on_wedged = self._cut_waiting
        self._streams: set[_Stream] = set()
        self._any_turn = 0
        self.score: SloScore | None = None
        """Told when a generation request's response ends (balancer/slo.py)."""
        # The client's API key is the balancer's to check, not the replicas' to see; with a
        # replica key, the replicas see that one instead of anything the client sent.
        replica_key = config.replica_api_key
        self._consumed = (
            frozenset({"authorization"}) if config.api_keys or replica_key else frozenset()
        )
        self._replica_auth = f"Bearer {replica_key}" if replica_key else None

    # ---------------------------------------------------------------- 1. choose and retry
    async def forward(self, request: web.Request, rr: RelayRequest) -> web.StreamResponse:
        started = time.monotonic()
        headers = upstream_headers(request, rr.request_id, drop=self._consumed)
        if self._replica_auth is not None:
            headers["Authorization"] = self._replica_auth
        ticket = rr.ticket if rr.ticket is not None else Ticket()
        policy = self.policy
        att = policy.begin(request, rr.route, rr.body, rr.request_id, ticket)
        held = policy.refused_on_arrival(att)
        if held is not None:
            return self._refuse_quarantined(rr, held)
        stream = _Stream(request, att)
        self._streams.add(stream)
        try:
            while True:  # ends: an answer, a refusal, or no retry (balancer/retry.py)
                request[STAGE] = "queued"
                await policy.before_attempt(att)
                replica = await self._choose(rr, ticket, att.tried)
                if replica is None:
                    return self._reject_no_replica(rr)
                policy.started(att, replica)
                stream.work_done = 0
                try:
                    request[STAGE] = "waiting_first_byte"
                    answer = await self._open(request, rr, replica, headers, stream, att)
                    if answer is None:  # timed out or unreachable, and not retried
                        return self._unanswered(rr, replica, stream)
                    policy.answered(att, answer.failure)
                    response = self._commit(request, rr, answer)
                    clean = await self._pipe(
                        request, rr, replica, answer, response, stream, started, att
                    )
                    if clean and answer.failure is None:
                        # Only a response that ended well clears the replica's failure
                        # count: one that fails every stream after its head must add up.
                        policy.ended_well(att)
                    return response
                except _Retry as retry:
                    self._abort_attempt(stream)
                    self.metrics.retries.labels(reason=retry.reason).inc()
                    log.info(
                        "retrying %s %s on another replica: %s from %s",
                        rr.request_id,
                        rr.route,
                        retry.reason,
                        replica.name,
                    )
                finally:
                    policy.attempt_ended(att)
                    if rr.admit:
                        self.admission.release(replica, rr.work - stream.work_done, ticket)
        except Quarantined as exc:
            if exc.unsent:
                return self._refuse_quarantined(rr, exc.entry)
            return self._quarantined_now(rr, exc.entry)
        except QueueFull:
            self.metrics.rejected.labels(reason="queue_full").inc()
            # The queue has room again once its first request takes a slot: on a free slot
            # if a replica is ready, else once one is back from its start.
            come_back = (
                self._slot_retry_after(ticket, behind_queue=False, fallback=1)
                if self.registry.routable()
                else self._start_retry_after()
            )
            return json_error(
                429,
                f"Model is overloaded: {self.admission.queue_depth} requests are queued "
                f"at the balancer (max_queue reached); retry in {come_back['Retry-After']} s",
                "overloaded",
                headers={**come_back, "x-request-id": rr.request_id},
            )
        except QueueTimeout as exc:
            reason = exc.reason
            self.metrics.rejected.labels(reason=reason).inc()
            what = "no replica is ready" if exc.no_replica else "every replica slot stayed busy"
            if reason == "ttft_slo_expired":
                what = "it can no longer get its first token within its TTFT budget"
                self.metrics.slo_requests.labels(
                    outcome="expired", prompt_class=ticket.prompt_class
                ).inc()
            come_back = (
                self._start_retry_after()
                if exc.no_replica
                else self._slot_retry_after(ticket, behind_queue=True, fallback=RETRY_AFTER_S)
            )
            return json_error(
                503,
                f"Waited {exc.waited_s:.1f} s for a replica slot but {what}; "
                f"retry in {come_back['Retry-After']} s",
                "unavailable" if exc.no_replica else "overloaded",
                headers={**come_back, "x-request-id": rr.request_id},
            )
        finally:
            policy.finished(att)  # no commit (refused, cancelled): settle now
            self._streams.discard(stream)
            if stream.upstream is not None:
                stream.upstream.release()  # kept for the next request if it ended cleanly

    async def _choose(self, rr: RelayRequest, ticket: Ticket, tried: Tried) -> Replica | None:
        if rr.admit:
            return await self.admission.acquire(rr.work, tried, rr.prompt_tokens, ticket)
        candidates = [r for r in self.registry.replicas if r.routable and not excluded(r, tried)]
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
            headers={**self._start_retry_after(), "x-request-id": rr.request_id},
        )

    def _slot_retry_after(
        self, ticket: Ticket, behind_queue: bool, fallback: int
    ) -> dict[str, str]:
        """``Retry-After`` for a request refused while every slot is busy: when the forecast
        predicts a slot frees for it, behind the requests queued now (``behind_queue``) or
        the first one to free (the queue is full: then it has room again); never under
        1 s. ``fallback`` seconds until the forecast has learned from a first stream."""
        forecast = self.admission.forecast
        if forecast is not None:
            now = time.monotonic()
            ahead = self.admission.ahead_of(ticket, now) if behind_queue else []
            prediction = forecast.predict(ticket, self.registry.routable(), ahead, now)
            if prediction is not None:
                return retry_after(max(1.0, prediction.wait_s))
        return {"Retry-After": str(fallback)}

    def _start_retry_after(self) -> dict[str, str]:
        """``Retry-After`` when no replica is ready: when the first starting one should be
        (its last start's duration, from its process start), else ``RETRY_AFTER_S``."""
        now = time.monotonic()
        due = [
            left
            for r in self.registry.replicas
            if r.state is ReplicaState.STARTING and (left := r.start_left_s(now)) is not None
        ]
        if due:
            return retry_after(max(1.0, min(due)))
        return {"Retry-After": str(RETRY_AFTER_S)}

    def _unanswered(self, rr: RelayRequest, replica: Replica, stream: _Stream) -> web.Response:
        """The last replica tried never answered: 504 if it was silent, else 502."""
        reason = stream.expired or "unreachable"
        headers = {"x-request-id": rr.request_id}
        if reason in ("first_byte_timeout", "response_timeout"):
            limit = (
                self.config.first_byte_timeout_s
                if reason == "first_byte_timeout"
                else self.config.response_timeout_s
            )
            return json_error(
                504,
                f"Replica {replica.name} did not answer within {limit:g} s ({reason})",
                "timeout",
                headers=headers,
            )
        return json_error(
            502,
            f"Replica {replica.name} failed before answering ({reason})",
            "unavailable",
            headers=headers,
        )

    # ---------------------------------------------------------------- 2. open one attempt
    async def _open(
        self,
        request: web.Request,
        rr: RelayRequest,
        replica: Replica,
        headers: CIMultiDict[str],
        stream: _Stream,
        att: Attempts,
    ) -> _Answer | None:
        """The replica's head (and first event): an ``_Answer`` to commit, ``_Retry`` when
        the retry policy says so (balancer/retry.py: after a failure that may be the
        request's own, only once the process's fate is known), or None when the replica did
        not answer and the request is not retried (``stream.expired`` says why)."""
        cfg = self.config
        stream.upstream = None
        stream.expired = None
        limit_s, timeout_kind = (
            (cfg.first_byte_timeout_s, "first_byte_timeout")
            if rr.stream
            else (cfg.response_timeout_s, "response_timeout")
        )
        loop = asyncio.get_running_loop()
        stream.deadline = None if rr.stream else loop.time() + limit_s
        failed: str | None = None
        try:
            async with asyncio.timeout(limit_s):
                upstream = stream.upstream = await self.pool.request(
                    replica.url, request.method, request.path_qs, headers, rr.body, stream.sent
                )
                status = upstream.status
                self.metrics.upstream_responses.labels(replica=replica.name, code=str(status)).inc()
                is_sse = _content_type(upstream.headers) == SSE
                if status == BUSY_STATUS or status in FAILED_STATUS:
                    failed = f"status_{status}"
                else:
                    first = await upstream.read_first(is_sse, FIRST_EVENT_LIMIT)
        except TimeoutError:
            stream.expired = timeout_kind
            self._abort_attempt(stream)
            if await self.policy.retry(att, timeout_kind, answered=False, harmless=False):
                raise _Retry(timeout_kind) from None
            return None
        except UpstreamError as exc:
            kind = WEDGED_REPLICA if stream.expired == WEDGED_REPLICA else exc.kind
            stream.expired = kind
            # Never got there, or a victim of another request that wedged the process.
            unreached = kind in ("connect_error", WEDGED_REPLICA)
            self._abort_attempt(stream)
            if await self.policy.retry(att, kind, answered=False, harmless=unreached):
                raise _Retry(kind) from None
            return None

        if failed is not None:
            # Busy (429) is not broken; a failure answer may be the request's own doing.
            busy = status == BUSY_STATUS
            if await self.policy.retry(att, failed, answered=not busy, harmless=busy):
                raise _Retry(failed)
            try:  # not retried: the client gets the replica's answer, as it came
                async with asyncio.timeout(limit_s):
                    first = await upstream.read_first(is_sse, FIRST_EVENT_LIMIT)
            except (TimeoutError, UpstreamError):
                stream.expired = "unreachable"
                return None

        answer = _Answer(upstream, is_sse, first)
        if status in FAILED_STATUS:
            answer.failure = failed
        elif is_sse and b'"error"' in first:
            event = parse_error_event(first)
            if event is not None:
                # Counted here, once: _pipe_events does not count a first error event again.
                answer.error_event = True
                self.metrics.upstream_errors.labels(replica=replica.name, kind="error_event").inc()
                kind = f"{event.verdict}_event"
                generation = event.verdict == GENERATION
                if event.verdict != CLIENT and await self.policy.retry(
                    att, kind, answered=generation, harmless=not generation
                ):
                    # Overloaded: busy, not broken. Generation: the replica failed this
                    # request, or the request fails everywhere (balancer/retry.py decides).
                    raise _Retry(kind)
                if generation:
                    answer.failure = kind
        return answer

    @staticmethod
    def _abort_attempt(stream: _Stream) -> None:
        """Drop a failed attempt's connection before waiting on anything: a replica still
        working on it must see the request cancelled."""
        if stream.upstream is not None:
            stream.upstream.abort()
            stream.upstream = None

    # ---------------------------------------------------------------- 3. commit
    def _commit(
        self, request: web.Request, rr: RelayRequest, answer: _Answer
    ) -> web.StreamResponse:
        """The response the client gets: the replica's status and headers. From here on
        there is no retry; the head leaves with the first piece (one packet, _open_client)."""
        upstream = answer.upstream
        response = web.StreamResponse(
            status=upstream.status, headers=response_headers(upstream.headers)
        )
        response.headers["x-request-id"] = rr.request_id
        if answer.is_sse:
            response.headers["Cache-Control"] = "no-cache"
            response.headers["X-Accel-Buffering"] = "no"
        request[STAGE] = "streaming"
        return response

    # ---------------------------------------------------------------- 4. pipe
    async def _pipe(
        self,
        request: web.Request,
        rr: RelayRequest,
        replica: Replica,
        answer: _Answer,
        response: web.StreamResponse,
        stream: _Stream,
        started: float,
        att: Attempts,
    ) -> bool:
        """Relay the body; True if it ended well (not cut, not left by the client)."""
        upstream = answer.upstream
        try:
            await response.prepare(request)
            if answer.is_sse:
                return await self._pipe_events(
                    att,
                    rr,
                    replica,
                    upstream,
                    response,
                    stream,
                    answer.first,
                    started,
                    answer.error_event,
                )
            head_at = asyncio.get_running_loop().time()  # the head leaves with the first piece
            await self._pipe_bytes(upstream, response, stream, answer.first)
            if self.score is not None and rr.ticket is not None and 200 <= upstream.status < 300:
                self.score.response_ended(rr.ticket, head_at)
            return True
        except ConnectionResetError:
            # The client left (or was cut off as a slow reader): close upstream, free the slot.
            request[CLIENT_GONE] = True
            upstream.abort()
            return False
        except UpstreamError as exc:
            # A non-SSE body cut after it started (replica died or went idle): there is no
            # error event for it, and ending it cleanly would pass a truncated body off as
            # complete, so reset the client's connection.
            reason = stream.expired or exc.kind
            self._stream_failed(att, replica, reason)
            log.warning("response %s from %s cut (%s)", rr.request_id, replica.name, reason)
            if request.transport is not None:
                request.transport.abort()
            return False

    async def _open_client(
        self, request: web.Request, response: web.StreamResponse, stream: _Stream, first: bytes
    ) -> Callable[[bytes], None]:
        """Send the response head with the first piece (one packet, through aiohttp's writer),
        then return a function that writes each further piece straight to the client's
        socket, chunk-framed if the response is, pausing the replica's connection when the
        client's buffer is full."""
        stream.enter(Phase.WRITING, asyncio.get_running_loop().time())
        if first:
            await response.write(first)
        else:
            request.writer.send_headers()
        stream.phase = Phase.READING
        transport = request.transport
        upstream = stream.upstream
        if transport is None or transport.is_closing() or upstream is None:
            raise ConnectionResetError("client gone")
        high = transport.get_write_buffer_limits()[1]
        chunked = response.headers.get("Transfer-Encoding") == "chunked"
        write, closing = transport.write, transport.is_closing
        buffered = transport.get_write_buffer_size

        def to_client(piece: bytes) -> None:
            if not piece:
                return  # an empty chunk would end a chunked body
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
        stream.enter(Phase.READING, loop_time())
        while True:
            await upstream.wait()
            if upstream.complete:
                break
            stream.enter(Phase.WRITING, loop_time())
            await request.writer.drain()
            stream.enter(Phase.READING, loop_time())
            upstream.resume()
        stream.phase = Phase.IDLE

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
        stream.enter(Phase.WRITING, loop_time())  # may block: a client write
        await response.write_eof()

    async def _pipe_events(
        self,
        att: Attempts,
        rr: RelayRequest,
        replica: Replica,
        upstream: ReplicaConnection,
        response: web.StreamResponse,
        stream: _Stream,
        first: bytes,
        started: float,
        saw_error: bool = False,
    ) -> bool:
        """Relay SSE events, whole ones only; True if the stream ended well."""
        rm = self.metrics.for_replica(replica)
        request = stream.request
        loop_time = asyncio.get_running_loop().time
        sep = separator_of(first)
        framer = EventFramer(sep)
        data_prefix = b"data: " if b"\ndata: " in b"\n" + first else b"data:"
        # Wall-clock origin of this request, on the loop's clock.
        origin = loop_time() - (time.monotonic() - started)
        last_token = 0.0
        tokens = 0
        clean = True
        # An error event after the first is no good end. The first event's error was judged
        # in _open (answer.failure): a client's (validation) error is a replica that works.
        error_mid_stream = False
        # The stream's progress, read by the forecast (balancer/forecast.py). The loop's
        # clock has time.monotonic()'s epoch: uvloop 0.23.0 loop.pyx Loop.time() is libuv's
        # uv_now() (CLOCK_MONOTONIC) in whole milliseconds, after uv_update_time().
        ticket = rr.ticket if rr.ticket is not None else Ticket()

        def count(events_bytes: bytes) -> None:
            """Count the token events among whole events (never a partial one)."""
            nonlocal last_token, tokens, saw_error, error_mid_stream
            now = loop_time()
            events = events_bytes.count(sep)
            # Not tokens: [DONE], the usage-only chunk, error events, keep-alive comments.
            # (A token's own text cannot match: JSON escapes its quotes.)
            events -= events_bytes.count(b"[DONE]") + events_bytes.count(b'"choices":[]')
            errors = events_bytes.count(b'{"error"')
            events -= errors
            if events_bytes[0] == 58:  # b":"
                events -= 1
            events -= events_bytes.count(sep + b":")
            if errors and not saw_error:
                saw_error = error_mid_stream = True
                self.metrics.upstream_errors.labels(replica=replica.name, kind="error_event").inc()
                # A failure path: worth parsing (the first error event of the stream only).
                at = events_bytes.rfind(sep, 0, events_bytes.find(b'{"error"'))
                event = parse_error_event(events_bytes[at + len(sep) if at >= 0 else 0 :])
                if event is not None and event.verdict == GENERATION:
                    self.policy.failed_after_commit(att, "generation_event")
            if events > 0:
                # Remaining work on the replica: the prefill is done at the first
                # token, then one token per event (never below what we added).
                done = events + (rr.prompt_tokens if tokens == 0 else 0)
                done = min(done, rr.work - stream.work_done)
                stream.work_done += done
                replica.outstanding_work -= done
                if tokens == 0:
                    rm.ttft.observe(now - origin)
                    ticket.first_token_at = now
                else:
                    rm.itl.observe(now - last_token)
                if events > 1:  # arrived together: no time between them
                    rm.itl.observe(0.0, events - 1)
                tokens += events
                last_token = ticket.last_token_at = now
                ticket.generated = tokens

        try:
            whole = framer.feed(first)
            if whole:
                count(whole)
            to_client = await self._open_client(request, response, stream, whole)

            def event(piece: bytes) -> None:
                stream.since = loop_time()
                whole = framer.feed(piece)
                if whole:
                    count(whole)
                    to_client(whole)

            upstream.pipe(event)
            await self._drain_loop(request, upstream, stream)
            if stream.expired and not upstream.complete:
                raise UpstreamError(stream.expired, "stream cut by the watchdog")
            to_client(framer.flush())  # a last event without its blank line, as it came
        except (UpstreamError, TimeoutError) as exc:
            writing = stream.phase == Phase.WRITING
            stream.phase = Phase.IDLE
            if writing or stream.client_gone or stream.expired == "slow_client":
                # The client's side failed: it left or was cut as a slow reader. Not the
                # replica's fault, and nobody to send an error event to.
                raise ConnectionResetError("client gone") from exc
            reason = stream.expired or (exc.kind if isinstance(exc, UpstreamError) else "timeout")
            self._stream_failed(att, replica, reason)
            partial = len(framer.flush())
            log.warning(
                "stream %s from %s failed after %d tokens (%s; %d bytes of an unfinished "
                "event dropped): sent an error event",
                rr.request_id,
                replica.name,
                tokens,
                reason,
                partial,
            )
            if reason == DRAIN_TIMEOUT:
                message = (
                    f"Incomplete generation stream: the balancer is shutting down and its "
                    f"drain timeout ran out after {tokens} tokens; resend the request"
                )
                status = 503
            else:
                message = (
                    f"Incomplete generation stream: replica {replica.name} failed mid-stream "
                    f"({reason}) after {tokens} tokens"
                )
                status = 502
            event_bytes = stream_error_event(
                rr.openai, message, "incomplete_generation_stream", status, data_prefix
            )
            if framer.mid_event:  # framing gave up: the client holds part of an event
                event_bytes = sep + event_bytes
            stream.enter(Phase.WRITING, loop_time())
            await response.write(event_bytes)
            clean = False
        finally:
            if tokens:
                rm.output_tokens.inc(tokens)
                if self.score is not None and rr.ticket is not None:
                    ended_well = upstream.complete and not saw_error and not stream.client_gone
                    self.score.stream_ended(rr.ticket, ended_well)
        # Every write to the client may block on a full socket: keep it under the watchdog.
        stream.enter(Phase.WRITING, loop_time())
        await response.write_eof()
        return clean and not error_mid_stream

    # ---------------------------------------------------------------- 5. account
    def _stream_failed(self, att: Attempts, replica: Replica, reason: str) -> None:
        """A committed response failed: counted, and told to the retry policy (a cut or a
        stall may be the request's doing: balancer/retry.py)."""
        self.metrics.stream_errors.labels(replica=replica.name, reason=reason).inc()
        self.policy.failed_after_commit(att, reason)

    def _refuse_quarantined(self, rr: RelayRequest, entry: Entry) -> web.Response:
        """An identical request broke replicas: refused before any replica sees it."""
        self.metrics.rejected.labels(reason="quarantined").inc()
        left = max(1, math.ceil(entry.until - self.quarantine.clock()))
        return _quarantine_error(
            rr,
            f"Request refused without being sent to a replica: an identical request "
            f"(digest {entry.short}) made {len(entry.broke)} replica processes fail while "
            f"serving it ({', '.join(entry.replicas)}), so it is quarantined for {left} more "
            f"s. Do not resend it unchanged: change the prompt or parameters; the operator "
            f"sees digest {entry.short} in the balancer's log and `neuron-fleet status`",
        )

    def _quarantined_now(self, rr: RelayRequest, entry: Entry) -> web.Response:
        """This request broke its replica and is (now) quarantined: no further attempt."""
        log.warning(
            "request %s %s (digest %s) not retried: quarantined after breaking %s",
            rr.request_id,
            rr.route,
            entry.short,
            ", ".join(entry.replicas),
        )
        return _quarantine_error(
            rr,
            f"This request made replica processes fail while serving it: {len(entry.broke)} "
            f"with identical requests ({', '.join(entry.replicas)}); it was not retried "
            f"further, and identical requests are refused for {self.quarantine.ttl_s:g} s "
            f"(digest {entry.short}). Do not resend it unchanged: change the prompt or "
            f"parameters, or report it to the operator",
        )

    # ---------------------------------------------------------------- watchdog
    def check_timeouts(self, now: float) -> None:
        """Called by the watchdog: cut streams idle upstream, past their total time, or
        stuck on a slow client."""
        idle = self.config.idle_timeout_s
        client = self.config.client_timeout_s
        for s in list(self._streams):
            if s.phase == Phase.READING and s.upstream is not None:
                if now - s.since > idle:
                    s.expired = "idle_timeout"
                elif s.deadline is not None and now > s.deadline:
                    s.expired = "response_timeout"
                else:
                    continue
                s.phase = Phase.IDLE
                s.upstream.abort()
            elif s.phase == Phase.WRITING and now - s.since > client:
                s.expired = "slow_client"
                s.phase = Phase.IDLE
                transport = s.request.transport
                if transport is not None:
                    transport.abort()
                if s.upstream is not None:
                    s.upstream.abort()

    @property
    def active(self) -> int:
        return len(self._streams)

    def _cut_waiting(self, replica: Replica, pid: int | None, culprit_sent: float) -> None:
        """A process of ``replica`` is wedged: cut the attempts still waiting for its first
        byte (they are retried at once, balancer/retry.py ``WEDGED_REPLICA``), except the
        earliest one sent before ``culprit_sent``: that one may be what hung it, and is
        left to its own timeout."""
        waiting = [
            s
            for s in self._streams
            if s.att.replica is replica
            and s.att.pid == pid
            and s.upstream is not None
            and s.phase == Phase.IDLE
            and s.request.get(STAGE) == "waiting_first_byte"
        ]
        earlier = [s for s in waiting if s.att.started < culprit_sent]
        spared = min(earlier, key=lambda s: s.att.started) if earlier else None
        for s in waiting:
            if s is not spared and s.upstream is not None:
                s.expired = WEDGED_REPLICA
                s.upstream.abort()

    async def end_streams(self, wait_s: float = 2.0) -> int:
        """The drain timeout ran out: end every response still relaying. An event stream
        gets an explicit error event in its route's format, then its end (a client sees
        why it stopped, not a chunked-encoding error); a plain body is reset (it cannot
        say it is incomplete). Waits up to ``wait_s`` for them to be written; returns how
        many were ended."""
        ended = 0
        for s in list(self._streams):
            if s.phase == Phase.READING and s.upstream is not None:
                s.expired = DRAIN_TIMEOUT
                s.phase = Phase.IDLE
                s.upstream.abort()
                ended += 1
        deadline = time.monotonic() + wait_s
        while ended and any(s.expired == DRAIN_TIMEOUT for s in self._streams):
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        return ended


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
    out["Accept-Encoding"] = "identity"
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


def _quarantine_error(rr: RelayRequest, message: str) -> web.Response:
    """TGI's error shape, with the status and header that keep SDKs from resending it."""
    return json_error(
        QUARANTINED_STATUS,
        message,
        "quarantined",
        headers={"x-should-retry": "false", "x-request-id": rr.request_id},
    )
