"""Bad clients: a thousand that leave at random points, readers that stop reading, and
slowloris clients that trickle their headers or body in.

Whatever clients do, the balancer must end up with nothing in flight, nothing queued, and
the replicas with no running sequence; a stuck client must cost bounded memory and be cut
off by ``client_timeout_s``; and none of them may slow down the clients that behave.
"""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from balancer.relay import STAGE
from tests.conftest import metric_value, start_app, wait_until
from tests.test_hardening_input import build_request, metric_sum, parse_response

pytestmark = pytest.mark.timeout(90)

CHAT = {"model": "tgi", "messages": [{"role": "user", "content": "Hello"}], "stream": True}


async def _metrics(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def _replicas_idle(http: aiohttp.ClientSession, urls: list[str]) -> bool:
    for url in urls:
        text = await _metrics(http, url)
        if metric_value(text, "tgi_batch_current_size") or metric_value(text, "tgi_queue_size"):
            return False
    return True


# --------------------------------------------------------------------------- 6. disconnects


async def test_a_thousand_clients_leaving_at_random_points_leave_nothing_behind(
    simulator, balancer, http
):
    rng = random.Random(20240611)
    # batch 2 behind a slot cap of 4: half of each replica's requests wait inside it, with
    # no byte sent yet, so "before the first token" is a real stage, not a microsecond.
    urls = [await simulator(speed=20.0, batch_size=2, seed=i) for i in range(3)]
    server = await balancer(urls, max_inflight_per_replica=4, max_queue=1000, queue_timeout_s=60.0)
    ejections: list[str] = []
    server.registry.subscribe(
        lambda: ejections.extend(r.name for r in server.registry if not r.healthy)
    )
    plans: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    gate = asyncio.Semaphore(100)
    connector = aiohttp.TCPConnector(limit=0)

    def stage_of(request_id: str) -> str | None:
        for stream in list(server.balancer.relay._streams):
            if stream.request.headers.get("x-request-id") == request_id:
                return stream.request.get(STAGE)
        return None

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body = {**CHAT, "max_tokens": rng.randint(4, 32)}
        plan = rng.choices(("early", "first-byte", "headers", "mid", "full"), (25, 10, 15, 35, 15))[
            0
        ]
        plans[plan] += 1
        rid = f"client-{i}"
        post = functools.partial(
            session.post,
            f"{server.url}/v1/chat/completions",
            json=body,
            headers={"x-request-id": rid},
        )
        async with gate:
            if plan in ("early", "first-byte"):
                task = asyncio.ensure_future(post())
                if plan == "early":  # queued, or not even sent yet
                    await asyncio.sleep(rng.uniform(0, 0.03))
                else:  # leave once the balancer waits for the replica's first byte
                    for _ in range(2000):
                        if task.done() or stage_of(rid) in ("waiting_first_byte", "streaming"):
                            break
                        await asyncio.sleep(0.001)
                if task.done():
                    task.result().close()
                    outcomes[f"{plan}-answered"] += 1
                else:
                    task.cancel()
                    outcomes[f"{plan}-cancelled"] += 1
                return
            resp = await post()
            try:
                assert resp.status == 200, await resp.text()
                if plan == "headers":
                    return
                if plan == "mid":
                    for _ in range(rng.randint(1, 3)):
                        await resp.content.readuntil(b"\n\n")
                    return
                text = (await resp.read()).decode()
                ok = text.rstrip().endswith("data:[DONE]") and '"error"' not in text
                outcomes["full-ok" if ok else "full-broken"] += 1
            finally:
                resp.close()  # the client leaves (a no-op once the body was read)

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as session:
        async with asyncio.timeout(60):
            await asyncio.gather(*(one(session, i) for i in range(1000)))
    elapsed = time.monotonic() - started

    b = server.balancer
    await wait_until(
        lambda: b.inflight == 0 and b.admission.queue_depth == 0 and b.relay.active == 0,
        what="balancer idle",
    )
    deadline = time.monotonic() + 10
    while not await _replicas_idle(http, urls):
        assert time.monotonic() < deadline, "a replica still runs a sequence nobody reads"
        await asyncio.sleep(0.05)
    text = await _metrics(http, server.url)
    assert metric_sum(text, "neuron_fleet_replica_inflight") == 0
    assert metric_value(text, "neuron_fleet_queue_depth") == 0
    stages = {
        s: metric_value(text, "neuron_fleet_client_disconnects_total", stage=s)
        for s in ("queued", "waiting_first_byte", "streaming")
    }
    print(f"\n1000 clients in {elapsed:.1f} s: plans {dict(plans)}, outcomes {dict(outcomes)}")
    print(f"balancer saw disconnects by stage: {stages}")
    assert all(v >= 1 for v in stages.values()), stages  # every stage was exercised
    # A client leaving is not the replica's fault (found by this suite: a write to a client
    # that had left raised aiohttp's ClientConnectionResetError, which the relay took for
    # an upstream failure: error events "sent", replicas ejected, the queue stalled).
    assert metric_sum(text, "neuron_fleet_upstream_errors_total") == 0
    assert metric_sum(text, "neuron_fleet_stream_errors_total") == 0
    assert ejections == []
    assert outcomes["full-broken"] == 0 and outcomes["full-ok"] == plans["full"]
    assert metric_sum(text, "neuron_fleet_requests_total", code="500") == 0
    async with http.post(f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 3}) as r:
        assert r.status == 200 and (await r.text()).rstrip().endswith("data:[DONE]")


# --------------------------------------------------------------------------- 7. slow readers

EVENT = b"data:" + b"x" * (16 * 1024 - 7) + b"\n\n"
"""One 16 KiB SSE event: the fat upstream sends these as fast as it may."""


class FatUpstream:
    """An upstream that streams ``max_new_tokens`` 16 KiB events as fast as TCP lets it."""

    def __init__(self) -> None:
        self.written: dict[int, int] = {}
        self.cancelled = 0
        self.completed = 0
        self._next = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/generate_stream", self.generate)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        events = int((await request.json())["parameters"]["max_new_tokens"])
        sid, self._next = self._next, self._next + 1
        self.written[sid] = 0
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for _ in range(events):
                await resp.write(EVENT)
                self.written[sid] += len(EVENT)
            await resp.write_eof()
            self.completed += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise
        return resp


def _stalled_reader(port: int, events: int) -> socket.socket:
    """A client that sends a streaming request and never reads a byte of the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotune
    sock.connect(("127.0.0.1", port))
    body = b'{"inputs":"x","parameters":{"max_new_tokens":%d}}' % events
    sock.sendall(
        build_request(
            "POST", b"/generate_stream", [b"Content-Type: application/json"], body
        ).replace(b"Connection: close\r\n", b"")
    )
    return sock


async def test_readers_that_stop_reading_cost_bounded_memory_then_get_cut(balancer, http):
    fat = FatUpstream()
    runner, url = await start_app(fat.app())
    stalled: list[socket.socket] = []
    try:
        server = await balancer([url], client_timeout_s=2.0, max_inflight_per_replica=0)
        big = 16_000  # 250 MiB per stream if nothing pushed back
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            stalled = [_stalled_reader(server.bound_port, big) for _ in range(4)]
            await wait_until(lambda: server.balancer.relay.active >= 4, what="slow streams open")

            # Meanwhile a well-behaved client streams 320 KiB answers through the same
            # balancer and the same upstream, unaffected.
            small = {"inputs": "x", "parameters": {"max_new_tokens": 20}}
            good, pushed, peak = 0, [0], 0
            while server.balancer.relay.active >= 4 and good < 200:
                async with http.post(f"{server.url}/generate_stream", json=small) as resp:
                    assert resp.status == 200
                    assert len(await resp.read()) == 20 * len(EVENT)
                good += 1
                if good == 10:  # the slow streams are blocked by now: measure them
                    pushed = [fat.written[i] for i in range(4)]
                    peak = tracemalloc.get_traced_memory()[1] - baseline
            current, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await wait_until(lambda: server.balancer.relay.active == 0, timeout=10, what="slow cut")
        await wait_until(lambda: fat.cancelled == 4, what="upstream told to stop")
        await wait_until(lambda: server.balancer.inflight == 0, what="slots released")
        for sock in stalled:  # the balancer closed them: reading hits EOF or a reset
            sock.settimeout(5)
            try:
                while sock.recv(1 << 20):
                    pass
            except ConnectionResetError:
                pass
        text = await _metrics(http, server.url)
        print(
            f"\nslow readers: upstream pushed {[p // 1024 for p in pushed]} KiB each of "
            f"{big * len(EVENT) // 2**20} MiB before backpressure stopped it; traced memory "
            f"peak +{peak / 2**20:.1f} MiB (whole test process, {good} good streams served "
            f"meanwhile, +{(current - baseline) / 2**20:.1f} MiB by the end)"
        )
        assert good >= 10
        # Backpressure reached the upstream: what it pushed is what the kernel's socket
        # buffers hold (loopback autotuning: up to tcp_rmem max + tcp_wmem max per stream,
        # kernel memory), never the whole answer.
        assert all(p < big * len(EVENT) // 4 for p in pushed), pushed
        # The balancer's own memory: a few 64 KiB buffers per stream, not 4 x 250 MiB.
        assert peak < 24 * 2**20, peak
        assert fat.completed == good
        assert metric_sum(text, "neuron_fleet_requests_total", code="499") == 4
        assert metric_sum(text, "neuron_fleet_requests_total", code="500") == 0
    finally:
        for sock in stalled:
            sock.close()
        await runner.cleanup()


# --------------------------------------------------------------------------- 9. slowloris


async def _trickle(
    port: int, head: bytes, drip: bytes, every: float, limit_s: float
) -> tuple[float, bytes]:
    """Send ``head``, then ``drip`` one byte every ``every`` s. Returns as soon as the server
    answers or closes the connection: (seconds since connecting, the answer), or after
    ``limit_s`` with ``(limit_s, b"")``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(head)
        for i in range(len(drip) + 1):
            try:
                async with asyncio.timeout(every):
                    chunk = await reader.read(65536)
                # An answer (the 408) or EOF (cut without one): either way, we are done.
                return time.monotonic() - started, chunk
            except TimeoutError:
                pass
            except ConnectionResetError:
                return time.monotonic() - started, b""
            if time.monotonic() - started > limit_s or i == len(drip):
                return limit_s, b""
            try:
                writer.write(drip[i : i + 1])
                await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                return time.monotonic() - started, b""
        return limit_s, b""
    finally:
        writer.close()


@pytest.fixture
async def guarded(scripted, balancer) -> AsyncIterator[tuple[object, object]]:
    from tests.upstreams import Script

    replica, url = await scripted(Script(tokens=3, token_delay_s=0.01))
    server = await balancer(
        [url], client_timeout_s=1.0, body_timeout_s=1.0, max_inflight_per_replica=4
    )
    yield replica, server


HEAD = b"POST /generate HTTP/1.1\r\nHost: balancer\r\nContent-Type: application/json\r\n"
TRICKLE_S = 10.0
"""How long a trickling client would go on if nobody stopped it (10 bytes/s)."""


async def test_trickled_headers_are_cut_off(guarded):
    """aiohttp has no header-read timeout of its own; its keep-alive timer (armed when the
    connection opens, set to client_timeout_s) is what cuts a client that never finishes."""
    replica, server = guarded
    took, answer = await _trickle(server.bound_port, HEAD, b"X-Slow: " + b"a" * 200, 0.1, TRICKLE_S)
    print(f"\nheaders trickled at 10 B/s: cut after {took:.1f} s (client_timeout_s 1)")
    assert took < TRICKLE_S, "the balancer let a client trickle its headers for 10 s"
    assert answer == b""  # closed without an answer: there was no request to answer yet
    assert replica.seen.requests == []


async def test_a_silent_connection_is_closed(guarded):
    _, server = guarded
    reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
    started = time.monotonic()
    try:
        async with asyncio.timeout(TRICKLE_S):
            assert await reader.read(100) == b""  # EOF: the balancer hung up
    finally:
        writer.close()
    assert time.monotonic() - started < TRICKLE_S


async def test_trickled_body_is_refused_with_408(guarded):
    """A body that never completes: 408 after body_timeout_s (the connection then lingers
    up to aiohttp's lingering_time, 10 s, so the client can read the 408 before the close)."""
    replica, server = guarded
    head = HEAD + b"Content-Length: 400\r\n\r\n"
    took, answer = await _trickle(
        server.bound_port, head, b'{"inputs":"' + b"a" * 388, 0.1, TRICKLE_S
    )
    resp = parse_response(answer)
    print(f"\nbody trickled at 10 B/s: {resp.status} after {took:.1f} s")
    assert took < TRICKLE_S
    assert resp.status == 408, answer[:300]
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["connection"].lower() == "close"
    assert b'"error_type": "timeout"' in resp.body
    assert replica.seen.requests == []


async def test_slowloris_crowd_holds_no_replica_slot_and_slows_no_one(guarded, http):
    replica, server = guarded
    b = server.balancer
    body_head = HEAD + b"Content-Length: 400\r\n\r\n"
    crowd = [
        asyncio.create_task(
            _trickle(server.bound_port, HEAD, b"X-S: " + b"a" * 100, 0.1, TRICKLE_S)
        )
        for _ in range(40)
    ] + [
        asyncio.create_task(
            _trickle(server.bound_port, body_head, b"{" + b" " * 399, 0.1, TRICKLE_S)
        )
        for _ in range(20)
    ]
    await asyncio.sleep(0.2)
    served, peak_slots = 0, 0
    gen = {"inputs": "x", "parameters": {"max_new_tokens": 3}}
    while not all(t.done() for t in crowd) and served < 500:
        async with http.post(f"{server.url}/generate_stream", json=gen) as resp:
            assert resp.status == 200
            assert (await resp.read()).count(b"\n\n") == 3
        served += 1
        peak_slots = max(peak_slots, b.inflight)
    results = await asyncio.gather(*crowd)
    assert all(took < TRICKLE_S for took, _ in results), sorted(t for t, _ in results)[-3:]
    assert sum(parse_response(a).status == 408 for _, a in results) == 20
    assert served >= 10 and peak_slots <= 1  # only the good client ever held a slot
    assert len(replica.seen.requests) == served
    text = await _metrics(http, server.url)
    assert metric_sum(text, "neuron_fleet_rejected_requests_total", reason="invalid_408") == 20
    print(f"\n60 slowloris clients cut; {served} requests served meanwhile")


# --------------------------------------------------------------------------- watchdog


class _ClientTransport:
    """A client transport that takes pieces; ``abort()`` fails the write waiting on it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.pieces: list[bytes] = []

    def abort(self) -> None:
        self.event.set()

    def is_closing(self) -> bool:
        return self.event.is_set()

    def write(self, data: bytes) -> None:
        self.pieces.append(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16384, 65536)


class _FullSocketResponse:
    """A started response whose chosen write blocks until the transport is aborted."""

    def __init__(self, transport: _ClientTransport, block: str) -> None:
        self.transport, self.block = transport, block
        self.headers = {"Transfer-Encoding": "chunked"}
        self.written: list[bytes] = []
        self.blocked = False

    async def _wait_abort(self) -> None:
        self.blocked = True
        await self.transport.event.wait()
        raise ConnectionResetError("aborted by the watchdog")

    async def write(self, data: bytes) -> None:
        if self.block == "error-event" and b'"error"' in data:
            await self._wait_abort()
        self.written.append(data)

    async def write_eof(self) -> None:
        if self.block == "eof":
            await self._wait_abort()


SECOND = b'data:{"token":{"id":2}}\n\n'


class _EndingUpstream:
    """A replica connection whose response ends (cleanly or not) right after the first event."""

    def __init__(self, fails: bool) -> None:
        self.fails, self.complete, self.paused = fails, False, False

    def pipe(self, sink) -> None:
        self.sink = sink

    async def wait(self) -> None:
        from balancer.upstream_http import UpstreamError

        self.sink(SECOND)  # a piece after the first goes straight to the client's socket
        if self.fails:
            raise UpstreamError("payload_error", "the replica died")
        self.complete = True

    def abort(self) -> None:
        pass


@pytest.mark.parametrize("block", ["error-event", "eof"])
async def test_every_client_write_is_under_the_slow_client_watchdog(block):
    """The last writes of a stream (the error event after a replica failed, the end of the
    stream) can block on a full socket too: they must count as WRITING for the watchdog
    (they were IDLE, so a client that stopped reading right then held its slot forever)."""
    from unittest import mock

    from balancer.config import BalancerConfig
    from balancer.metrics import BalancerMetrics
    from balancer.relay import Phase, Relay, RelayRequest, _Stream
    from balancer.ticket import Ticket
    from balancer.upstream import Registry, Replica, ReplicaState

    replica = Replica("r0", "http://127.0.0.1:9", state=ReplicaState.READY, healthy=True)
    registry = Registry([replica])
    config = BalancerConfig(client_timeout_s=5.0)
    relay = Relay(config, registry, mock.Mock(), BalancerMetrics(registry, lambda: 0))
    transport = _ClientTransport()
    request = mock.Mock(transport=transport)
    att = relay.policy.begin(request, "/generate_stream", b"{}", "rid", Ticket())
    relay.policy.started(att, replica)
    stream = _Stream(request, att)
    upstream = _EndingUpstream(fails=block == "error-event")
    stream.upstream = upstream  # type: ignore[assignment]
    relay._streams.add(stream)
    response = _FullSocketResponse(transport, block)
    rr = RelayRequest("/generate_stream", b"{}", "rid", openai=False)
    first = b'data:{"token":{"id":1}}\n\n'
    task = asyncio.create_task(
        relay._pipe_events(att, rr, replica, upstream, response, stream, first, time.monotonic())
    )
    loop = asyncio.get_running_loop()
    await wait_until(lambda: transport.pieces, what="second event relayed")
    assert response.written == [first]  # with the head, through aiohttp's writer
    assert transport.pieces == [b"%x\r\n%b\r\n" % (len(SECOND), SECOND)]  # chunk-framed
    await wait_until(lambda: response.blocked, what="the final write blocked")
    assert not task.done() and stream.phase == Phase.WRITING
    relay.check_timeouts(loop.time() + config.client_timeout_s + 1)
    assert stream.expired == "slow_client" and transport.event.is_set()
    with pytest.raises(ConnectionResetError):
        await task
