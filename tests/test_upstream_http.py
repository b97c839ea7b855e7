"""The relay's own HTTP/1.1 client (balancer/upstream_http.py) against hand-written replicas.

Each replica here is a raw asyncio server writing exact bytes, so the framings and the
connection behaviours a library server would smooth over (keep-alive closed under a request,
bodies ended by the connection's close, garbage) are what the balancer really meets.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import uvloop

from tests.conftest import LOOPBACK, metric_value
from tests.test_hardening_input import metric_sum

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]
"""Answers the n-th request (0-based) on a connection; False closes the connection."""

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENTS = [b'data:{"token":{"id":%d,"text":" t%d"}}\n\n' % (i, i) for i in range(3)]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class RawReplica:
    """Counts connections; answers /health itself and every other request with ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        return f"http://{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                if head.startswith(b"GET /health"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                self.requests.append(head + body)
                keep = await self.handler(reader, writer, n)
                n += 1
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def raw_replica() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[RawReplica, str]]]]:
    started: list[RawReplica] = []

    async def make(handler: Handler) -> tuple[RawReplica, str]:
        replica = RawReplica(handler)
        started.append(replica)
        return replica, await replica.start()

    yield make
    for replica in started:
        await replica.stop()


async def sse_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
    writer.write(SSE_HEAD + b"".join(chunk(e) for e in EVENTS) + b"0\r\n\r\n")
    return True


async def test_tests_run_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_connections_to_a_replica_are_kept_alive_and_reused(
    raw_replica, balancer, http
) -> None:
    replica, url = await raw_replica(sse_answer)
    server = await balancer([url])
    health_connections = replica.connections  # the health checker's own session
    for _ in range(5):
        async with http.post(f"{server.url}/generate_stream", json={"inputs": "x"}) as resp:
            assert resp.status == 200
            assert await resp.read() == b"".join(EVENTS)
    assert len(replica.requests) == 5
    assert replica.connections - health_connections == 1


async def test_a_keepalive_connection_closed_under_a_request_is_sent_again(
    raw_replica, balancer, http
) -> None:
    """The replica closes a kept-alive connection, without answering, as a request is sent on
    it (uvicorn's keep-alive timer is 5 s): the request is sent again once on a new
    connection, not failed, and the replica is not blamed for it."""

    async def once_per_connection(reader, writer, n: int) -> bool:
        if n == 0:
            return await sse_answer(reader, writer, n)
        return False  # read the request, then close without a byte of answer

    replica, url = await raw_replica(once_per_connection)
    server = await balancer([url])
    for _ in range(4):
        async with http.post(f"{server.url}/generate_stream", json={"inputs": "x"}) as resp:
            assert resp.status == 200
            assert await resp.read() == b"".join(EVENTS)
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_sum(text, "neuron_fleet_upstream_errors_total") == 0
    assert metric_sum(text, "neuron_fleet_retries_total") == 0
    generations = [r for r in replica.requests if r.startswith(b"POST /generate_stream")]
    assert len(generations) == 7  # 4 answered + 3 sent on a connection being closed


@pytest.mark.parametrize(
    "framing",
    ["content-length", "chunked", "until-close"],
)
async def test_every_body_framing_is_relayed_whole(raw_replica, balancer, http, framing) -> None:
    body = b'{"generated_text":"' + b"abc " * 5000 + b'"}'

    async def answer(reader, writer, n: int) -> bool:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if framing == "content-length":
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            return True
        if framing == "chunked":
            pieces = [body[i : i + 3000] for i in range(0, len(body), 3000)]
            writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
            for piece in pieces:
                writer.write(chunk(piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            return True
        writer.write(head + b"Connection: close\r\n\r\n" + body)  # ended by the close
        return False

    _, url = await raw_replica(answer)
    server = await balancer([url])
    for _ in range(2):  # the second one on a reused (or, until-close, a new) connection
        async with http.post(f"{server.url}/generate", json={"inputs": "x"}) as resp:
            assert resp.status == 200
            assert await resp.read() == body


async def test_a_malformed_replica_answer_is_a_502_in_tgi_shape(
    raw_replica, balancer, http
) -> None:
    async def garbage(reader, writer, n: int) -> bool:
        writer.write(b"HTTP/1.1 2OO NOT A STATUS\r\n\r\n")
        return False

    _, url = await raw_replica(garbage)
    server = await balancer([url], retries=0)
    async with http.post(f"{server.url}/generate", json={"inputs": "x"}) as resp:
        assert resp.status == 502
        doc = await resp.json()
    assert doc["error_type"] == "unavailable" and "bad_response" in doc["error"]
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "neuron_fleet_upstream_errors_total", kind="bad_response") == 1


async def test_a_client_that_stops_reading_pauses_the_replica_connection(
    raw_replica, balancer
) -> None:
    """Backpressure: the balancer stops reading a replica whose client does not read, so
    neither process buffers the whole stream."""
    sent = 0
    blocked = asyncio.Event()

    async def firehose(reader, writer, n: int) -> bool:
        nonlocal sent
        writer.write(SSE_HEAD)
        event = chunk(b"data:" + b"x" * 4000 + b"\n\n")
        for _ in range(20_000):  # 80 MB if nothing pushed back
            writer.write(event)
            sent += len(event)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                blocked.set()
                return False
        return False

    _, url = await raw_replica(firehose)
    server = await balancer([url], client_timeout_s=30.0)
    _, writer = await asyncio.open_connection(LOOPBACK, server.bound_port)
    writer.write(
        b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 14\r\n\r\n" + b'{"inputs":"x"}'
    )
    await writer.drain()
    await asyncio.wait_for(blocked.wait(), 20)  # the replica's writes stopped draining
    assert sent < 20 * 1024 * 1024, f"{sent} bytes left the replica for a client reading none"
    writer.close()


@pytest.mark.parametrize(
    "interim",
    [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"],
)
async def test_an_interim_1xx_answer_is_skipped(raw_replica, balancer, http, interim) -> None:
    async def answer(reader, writer, n: int) -> bool:
        writer.write(interim)
        return await sse_answer(reader, writer, n)

    _, url = await raw_replica(answer)
    server = await balancer([url])
    async with http.post(f"{server.url}/generate_stream", json={"inputs": "x"}) as resp:
        assert resp.status == 200 and "Link" not in resp.headers
        assert await resp.read() == b"".join(EVENTS)


@pytest.mark.parametrize("keep_alive", [False, True])
async def test_an_http10_replica(raw_replica, balancer, http, keep_alive) -> None:
    body = b'{"generated_text":"ok"}'

    async def answer(reader, writer, n: int) -> bool:
        head = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
        if keep_alive:
            head += b"Connection: keep-alive\r\nContent-Length: %d\r\n" % len(body)
        writer.write(head + b"\r\n" + body)
        return keep_alive

    replica, url = await raw_replica(answer)
    server = await balancer([url])
    before = replica.connections
    for _ in range(3):
        async with http.post(f"{server.url}/generate", json={"inputs": "x"}) as resp:
            assert resp.status == 200
            assert await resp.read() == body
    assert replica.connections - before == (1 if keep_alive else 3)


async def test_a_partial_first_event_then_a_drop_is_retried_elsewhere(
    raw_replica, balancer, http
) -> None:
    """Nothing reached the client yet, so the request moves to another replica rather than
    committing a 200 that starts with half an event."""

    async def half(reader, writer, n: int) -> bool:
        writer.write(SSE_HEAD + chunk(b'data:{"token":{"id":0,'))  # then close at once
        return False

    broken, url1 = await raw_replica(half)
    _, url2 = await raw_replica(sse_answer)
    server = await balancer([url1, url2], policy="round-robin")
    for _ in range(2):  # one of the two starts on the broken replica
        async with http.post(f"{server.url}/generate_stream", json={"inputs": "x"}) as resp:
            assert resp.status == 200
            assert await resp.read() == b"".join(EVENTS)
    assert broken.requests  # it was tried
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_sum(text, "neuron_fleet_retries_total") >= 1


async def test_a_replica_that_accepts_then_closes_gets_a_502_not_a_500(
    raw_replica, balancer, http
) -> None:
    async def hang_up(reader, writer, n: int) -> bool:
        return False

    _, url = await raw_replica(hang_up)
    server = await balancer([url], retries=0)
    async with http.post(f"{server.url}/generate", json={"inputs": "x"}) as resp:
        assert resp.status == 502
        assert (await resp.json())["error_type"] == "unavailable"


async def test_a_reset_inside_a_close_delimited_body_is_not_a_complete_answer(
    raw_replica, balancer, http
) -> None:
    async def reset(reader, writer, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + b"x" * 5000)
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with linger 0: an RST, a crash, not the end of the body
        return False

    _, url = await raw_replica(reset)
    server = await balancer([url], retries=0)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(f"{server.url}/generate", json={"inputs": "x"}) as resp:
            await resp.read()


async def test_a_first_event_cut_before_it_was_read_is_an_error_not_a_start() -> None:
    """Deterministic form of the above: the head, half an event and the close all arrive
    before the relay reads the first event; it must get the error (and retry), not the half."""
    from unittest import mock

    from balancer.upstream_http import ReplicaConnection, UpstreamError

    conn = ReplicaConnection(mock.Mock(), "http://replica")
    conn.connection_made(mock.Mock())
    conn.data_received(SSE_HEAD + chunk(b'data:{"token":{"id":0,'))
    conn.connection_lost(None)
    await conn.read_head()
    with pytest.raises(UpstreamError) as cut:
        await conn.read_first(True, 1 << 20)
    assert cut.value.kind == "payload_error"
    whole = ReplicaConnection(mock.Mock(), "http://replica")
    whole.connection_made(mock.Mock())
    whole.data_received(SSE_HEAD + chunk(EVENTS[0]))
    whole.connection_lost(None)
    await whole.read_head()
    assert await whole.read_first(True, 1 << 20) == EVENTS[0]  # a whole event is relayed


async def test_a_keepalive_connection_closed_by_a_dying_replica_is_not_unreached(
    raw_replica,
) -> None:
    """The replica closes a kept-alive connection under a request and nothing listens any
    more (it died, perhaps of that request): ``disconnected``, not ``connect_error``, which
    would pass for "never reached" and let the request go back to the restart uncounted
    (balancer/relay.py ``_Retry.harmless``, balancer/quarantine.py)."""
    from multidict import CIMultiDict

    from balancer.upstream_http import UpstreamError, UpstreamPool

    async def dies_on_the_second(reader, writer, n: int) -> bool:
        if n == 0:
            return await sse_answer(reader, writer, n)
        await replica.stop()  # the process is gone: no new connection either
        return False

    replica, url = await raw_replica(dies_on_the_second)
    pool = UpstreamPool(connect_timeout_s=2)
    headers: CIMultiDict[str] = CIMultiDict()
    conn = await pool.request(url, "POST", "/generate_stream", headers, b"{}")
    await conn.read_first(True, 1 << 20)
    await conn.wait()
    conn.release()  # kept alive for the next request
    with pytest.raises(UpstreamError) as failed:
        await pool.request(url, "POST", "/generate_stream", headers, b"{}")
    assert failed.value.kind == "disconnected"
    pool.close()


async def test_replicas_answering_garbage_do_not_quarantine_the_request(
    raw_replica, balancer, http
) -> None:
    """A malformed answer (a misconfigured URL: a TLS or HTTP/2-only port, another service)
    is the replica's failure, not a process dying or cutting the response under the
    request: a request tried on two such replicas gets a 502, not a 422 "quarantined" that
    tells its client never to resend it (balancer/quarantine.py)."""

    async def garbage(reader, writer, n: int) -> bool:
        writer.write(b"HTTP/1.1 2OO NOT A STATUS\r\n\r\n")
        return False

    urls = [(await raw_replica(garbage))[1] for _ in range(2)]
    server = await balancer(urls, retries=1, quarantine_after=2, eject_after_failures=100)
    for _ in range(2):
        async with http.post(f"{server.url}/generate", json={"inputs": "x"}) as resp:
            assert resp.status == 502, await resp.text()
    assert len(server.balancer.quarantine) == 0


async def test_a_connection_a_killed_replica_closed_before_the_request_is_not_used() -> None:
    """A replica killed while idle (SIGKILL, the OOM killer): the kernel holds the FIN of its
    kept-alive connection before the balancer's loop reads it. A request must not go out on
    that connection: it would fail "disconnected", as if it had killed the process, and the
    retry rule would blame it (a 502, not retried; a break towards its quarantine). It gets
    ``connect_error`` (never reached: retried at once elsewhere). The server runs in a thread
    so that the death happens without the test's loop seeing it."""
    import threading

    from multidict import CIMultiDict

    from balancer.upstream_http import UpstreamError, UpstreamPool

    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    die, dead = threading.Event(), threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        data = b""
        while not data.endswith(b"{}"):
            data += conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        die.wait(5)
        conn.close()  # the process dies: its connections and its port close together
        listener.close()
        dead.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    pool = UpstreamPool(connect_timeout_s=2)
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    try:
        conn = await pool.request(url, "POST", "/v1/completions", headers, b"{}")
        await conn.wait()
        conn.release()  # kept alive for the next request
        die.set()
        assert dead.wait(5)  # not awaited: the loop has not read the FIN
        time.sleep(0.05)  # noqa: ASYNC251 - on purpose: the FIN reaches the kernel, not the loop
        with pytest.raises(UpstreamError) as failed:
            await pool.request(url, "POST", "/v1/completions", headers, b"{}")
        assert failed.value.kind == "connect_error", failed.value
    finally:
        pool.close()
        thread.join(5)
