"""Issue 18, point 3: bodies announced and never sent, bodies sent too slowly, many connections
from one address, and clients lying in ``X-Forwarded-For`` keep nobody else from being served.

Every attacker is a real socket on its own loopback address (127.0.0.2), the other clients
on others (127.0.0.3 ...), so the balancer tells them apart by the socket peer as it would
on a network. The body budget counts bytes received (balancer/quotas.py), so headers alone
hold nothing; a client's share bounds what its slow bodies hold (413 to it alone); the body
deadline (408) ends what never completes; the connection share bounds its sockets (503).
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest

from balancer.client_address import parse_networks, too_wide
from tests.conftest import metric_value, wait_until
from tests.upstreams import Script

pytestmark = pytest.mark.timeout(60)

ATTACKER = "127.0.0.2"
GEN = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
MAX_BODY = 2_000_000


def _head(length: int, path: str = "/generate", extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: balancer\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n".encode()
        + extra
        + b"\r\n"
    )


async def _connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _answer(reader: asyncio.StreamReader, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Status, headers (lower-case names) and body of one response (by its Content-Length:
    after refusing a body aiohttp lingers up to 10 s before the close)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().strip().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def _answered_within(
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], seconds: float
) -> list[tuple[int, dict, bytes]]:
    """The answers that came within ``seconds`` (the others are still being read)."""
    tasks = [asyncio.create_task(_answer(reader, seconds)) for reader, _ in streams]
    await asyncio.wait(tasks)
    return [t.result() for t in tasks if t.exception() is None]


async def _others_served(url: str, n: int) -> list[int]:
    """``n`` requests, each from its own loopback address (127.0.0.3, .4, ...)."""

    async def one(i: int) -> int:
        connector = aiohttp.TCPConnector(local_addr=(f"127.0.0.{3 + i}", 0))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.post(f"{url}/generate", json=GEN) as resp:
                await resp.read()
                return resp.status

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_headers_announcing_bodies_that_never_come_hold_no_budget(
    scripted, balancer, http
) -> None:
    """The issue's attack: one address, 100 connections, each with headers announcing a body
    just under max_body_bytes, and no body. Before: the length was reserved on arrival, 64 of
    them held the whole 256 MiB budget and the other clients got 503 "body budget"."""
    _, url = await scripted(Script(tokens=2))
    server = await balancer([url], body_timeout_s=3.0, max_body_bytes=MAX_BODY)
    b = server.balancer
    port = server.bound_port
    attackers = [await _connect(port, ATTACKER) for _ in range(100)]
    try:
        for _, writer in attackers:
            writer.write(_head(MAX_BODY - 1))
        await wait_until(lambda: b.handling >= 100, what="100 bodies awaited")  # type: ignore[union-attr]
        assert b.quotas.body_bytes == 0  # type: ignore[union-attr]
        assert await _others_served(server.url, 5) == [200] * 5
        # the deadline then ends every announced body: 408 in the engine's shape, closed
        answers = await asyncio.gather(*(_answer(r) for r, _ in attackers))
        for status, headers, body in answers:
            assert status == 408 and headers["connection"] == "close"
            assert json.loads(body)["error_type"] == "timeout"
    finally:
        for _, writer in attackers:
            writer.close()
    async with http.get(f"{server.url}/metrics") as resp:
        metrics = await resp.text()
    refused = metric_value(metrics, "neuron_fleet_rejected_requests_total", reason="invalid_408")
    assert refused == 100


async def test_slow_bodies_are_bounded_by_the_clients_share(scripted, balancer) -> None:
    """The attacker sends 600 kB of each announced 1.9 MB body and stalls, on 20
    connections: past its share it gets 413 (Retry-After, engine's shape), on the
    connection whose bytes crossed it; other clients are served meanwhile, and the
    attacker's bytes never exceed its share."""
    _, url = await scripted(Script(tokens=2))
    share = 8 * 2**20
    server = await balancer(
        [url],
        body_timeout_s=20.0,
        max_body_bytes=MAX_BODY,
        max_buffered_body_bytes=4 * share,
        max_buffered_body_bytes_per_client=share,
    )
    quotas = server.balancer.quotas  # type: ignore[union-attr]
    attackers = [await _connect(server.bound_port, ATTACKER) for _ in range(20)]
    try:
        for _, writer in attackers:
            writer.write(_head(1_900_000) + b'{"inputs":"' + b"a" * 600_000)
        # 20 x 600 kB x 2 = 24 MB wanted, 8 MB allowed: the rest are refused
        refused = await _answered_within(attackers, 2.0)
        held = quotas.body_by_client.get(f"addr:{ATTACKER}", 0)
        assert 0 < held <= share
        assert len(refused) >= 10
        for status, headers, body in refused:
            assert status == 413, body
            assert headers["retry-after"] == "1" and headers["connection"] == "close"
            doc = json.loads(body)
            assert doc["error_type"] == "overloaded"  # come back later, unlike a too-large body
            assert "max_buffered_body_bytes_per_client" in doc["error"]
        assert await _others_served(server.url, 5) == [200] * 5
    finally:
        for _, writer in attackers:
            writer.close()
    await wait_until(lambda: quotas.body_bytes == 0, what="budget released")
    assert quotas.body_by_client == {}


async def test_a_lying_forwarded_for_does_not_buy_a_fresh_share(scripted, balancer) -> None:
    """An attacker not in trusted_proxies naming a new client in X-Forwarded-For on each
    connection is still one client: its share stays its share."""
    _, url = await scripted(Script(tokens=2))
    share = 4 * 2**20
    server = await balancer(
        [url],
        body_timeout_s=20.0,
        max_buffered_body_bytes=8 * share,
        max_buffered_body_bytes_per_client=share,
        trusted_proxies=("127.0.0.9",),
    )
    quotas = server.balancer.quotas  # type: ignore[union-attr]
    attackers = [await _connect(server.bound_port, ATTACKER) for _ in range(10)]
    try:
        for i, (_, writer) in enumerate(attackers):
            lie = f"X-Forwarded-For: 198.51.100.{i}\r\n".encode()
            writer.write(_head(1_500_000, extra=lie) + b'{"inputs":"' + b"a" * 1_000_000)
        statuses = [status for status, _, _ in await _answered_within(attackers, 2.0)]
        assert statuses and set(statuses) == {413}
        assert set(quotas.body_by_client) == {f"addr:{ATTACKER}"}
        assert quotas.body_by_client[f"addr:{ATTACKER}"] <= share
    finally:
        for _, writer in attackers:
            writer.close()


async def test_bodies_are_charged_as_bytes_arrive_not_as_announced(scripted, balancer) -> None:
    """Half a body received holds half of it (x BODY_COST), not the announced length."""
    _, url = await scripted(Script(tokens=2))
    server = await balancer([url], body_timeout_s=20.0)
    quotas = server.balancer.quotas  # type: ignore[union-attr]
    reader, writer = await _connect(server.bound_port, ATTACKER)
    try:
        part = b'{"inputs":"' + b"a" * 99_989
        writer.write(_head(1_000_000) + part)
        await wait_until(lambda: quotas.body_bytes == 2 * len(part), what="100 kB counted")
        rest = b"a" * (1_000_000 - len(part) - 2) + b'"}'
        writer.write(rest)
        status, _, body = await _answer(reader)
        assert status == 200, body
    finally:
        writer.close()
    assert quotas.body_bytes == 0


async def test_one_address_cannot_hold_every_connection(scripted, balancer, http) -> None:
    """Past max_connections_per_client an address gets 503 and a close; another address
    still connects and is served; a trusted proxy is not capped per address."""
    _, url = await scripted(Script(tokens=1))
    server = await balancer(
        [url], max_connections=64, max_connections_per_client=8, trusted_proxies=("127.0.0.5",)
    )
    port = server.bound_port
    held = [await _connect(port, ATTACKER) for _ in range(8)]
    proxy = [await _connect(port, "127.0.0.5") for _ in range(12)]
    try:
        aiohttp_server = server._runner.server  # type: ignore[union-attr]
        await wait_until(lambda: len(aiohttp_server.connections) == 20, what="20 registered")
        reader, writer = await _connect(port, ATTACKER)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await _answer(reader, 5)
        writer.close()
        assert status == 503 and headers["retry-after"] == "1"
        doc = json.loads(body)
        assert doc["error_type"] == "overloaded" and "max_connections_per_client" in doc["error"]
        assert await _others_served(server.url, 3) == [200] * 3
        # the proxy's 12 connections (over the per-client 8) are all served
        for reader, writer in proxy:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            line = await asyncio.wait_for(reader.readline(), 5)
            assert line.startswith(b"HTTP/1.1 200"), line
    finally:
        for _, writer in held + proxy:
            writer.close()
    # closed connections free the address's share
    await wait_until(lambda: len(server._runner.server.connections) == 0, what="all closed")  # type: ignore[union-attr]
    reader, writer = await _connect(port, ATTACKER)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await _answer(reader, 5))[0] == 200
    writer.close()
    async with http.get(f"{server.url}/metrics") as resp:
        metrics = await resp.text()
    reason = "too_many_connections_per_client"
    assert metric_value(metrics, "neuron_fleet_rejected_requests_total", reason=reason) == 1


def test_too_wide_names_ranges_wider_than_a_load_balancer_needs() -> None:
    nets = parse_networks(["10.0.0.0/16", "10.0.0.0/22", "10.0.4.0/24", "0.0.0.0/0", "fd00::/8"])
    assert [str(n) for n in too_wide(nets)] == ["10.0.0.0/16", "0.0.0.0/0", "fd00::/8"]
    assert too_wide(parse_networks(["2600:1f18::/64", "192.0.2.7"])) == []


async def test_the_balancer_warns_at_start_about_a_wide_trusted_range(
    scripted, balancer, caplog: pytest.LogCaptureFixture
) -> None:
    _, url = await scripted(Script(tokens=1))
    with caplog.at_level(logging.WARNING, logger="neuron_fleet.server"):
        await balancer([url], trusted_proxies=("10.0.0.0/24", "10.0.1.0/24"))
        assert "trusted_proxies" not in caplog.text
        await balancer([url], trusted_proxies=("10.0.0.0/24", "10.0.0.0/16"))
    warned = [r.getMessage() for r in caplog.records if "trusted_proxies" in r.getMessage()]
    assert len(warned) == 1 and "10.0.0.0/16" in warned[0] and "10.0.0.0/24" not in warned[0]
