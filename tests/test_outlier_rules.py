"""Outlier detection and retries under the cases a second review found: a poison prompt
with one routable replica, a replica that fails every stream after its head, a retry
that never runs, a retry's queue time, and replicas that restart or are given up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from balancer.metrics import BalancerMetrics
from balancer.outlier import OutlierDetector
from balancer.upstream import Registry, Replica, ReplicaState
from tests.conftest import wait_until
from tests.test_fleet import make_fleet, started
from tests.upstreams import Script

POISON = {"inputs": "POISON", "parameters": {"max_new_tokens": 3}}
GOOD = {"inputs": "hello", "parameters": {"max_new_tokens": 3}}
LONG = {"inputs": "x", "parameters": {"max_new_tokens": 400}}


async def _poison_three_times_then_serve(server, http) -> float:
    for _ in range(3):
        async with http.post(server.url + "/generate", json=POISON) as resp:
            assert resp.status == 424  # TGI's answer reaches the client
    async with http.get(server.url + "/health") as resp:
        assert resp.status == 200  # a front load balancer keeps the host
    started_at = time.monotonic()
    async with http.post(server.url + "/generate", json=GOOD) as resp:
        assert resp.status == 200
    return time.monotonic() - started_at


async def test_a_poison_prompt_never_ejects_the_only_replica(scripted, balancer, http):
    _, url = await scripted(Script(tokens=3, poison="POISON"))
    server = await balancer([url], health_interval_s=5.0, eject_after_failures=1)
    waited = await _poison_three_times_then_serve(server, http)
    assert server.registry.get("r0").routable
    assert waited < 2.0  # served at once, not after health checks re-admitted it


async def test_a_poison_prompt_never_ejects_the_last_routable_replica(scripted, balancer, http):
    urls = [(await scripted(Script(tokens=3, poison="POISON")))[1] for _ in range(2)]
    server = await balancer(urls, health_interval_s=5.0, eject_after_failures=1)
    server.registry.set_state(server.registry.get("r1"), ReplicaState.DRAINING)  # rolling restart
    await _poison_three_times_then_serve(server, http)
    assert server.registry.get("r0").routable


def _registry(n: int, fraction: float = 0.34) -> tuple[Registry, OutlierDetector]:
    registry = Registry(
        [
            Replica(f"r{i}", f"http://127.0.0.1:{9000 + i}", state=ReplicaState.READY, healthy=True)
            for i in range(n)
        ]
    )
    detector = OutlierDetector(registry, BalancerMetrics(registry, lambda: 0), 3, fraction)
    return registry, detector


def test_transport_failures_never_eject_the_last_routable_replica() -> None:
    registry, detector = _registry(2, fraction=1.0)  # a budget that would allow both
    r0, r1 = registry.get("r0"), registry.get("r1")
    for _ in range(3):
        detector.failed(r0, "connect_error")
    assert r0.ejected and not r0.routable
    for _ in range(5):
        detector.failed(r1, "connect_error")
    assert r1.routable  # the last one: a suspect replica beats none


def test_a_replica_the_supervisor_gave_up_does_not_hold_the_budget() -> None:
    registry, detector = _registry(3)
    r0, r1 = registry.get("r0"), registry.get("r1")
    for _ in range(3):
        detector.failed(r0, "payload_error")
    assert r0.ejected
    registry.set_state(r0, ReplicaState.FAILED)  # crash loop: out for its own reasons
    for _ in range(3):
        detector.failed(r1, "payload_error")
    assert r1.ejected and not r1.routable


async def test_a_replica_that_cuts_every_stream_after_its_head_is_ejected(scripted, balancer, http):
    _, bad = await scripted(Script(tokens=5, drop_after_tokens=1))
    _, good = await scripted(Script(tokens=5))
    server = await balancer([bad, good], eject_after_failures=2, health_interval_s=60)
    cut = 0
    for _ in range(12):
        async with http.post(f"{server.url}/generate_stream", json=GOOD) as resp:
            cut += b"Incomplete generation stream" in await resp.read()
    assert 2 <= cut < 12
    assert server.registry.get("r0").ejected  # failures between good commits add up


async def test_a_replica_whose_streams_stall_is_ejected(scripted, balancer, http):
    _, bad = await scripted(Script(tokens=5, hang_after_tokens=1))
    _, good = await scripted(Script(tokens=5))
    server = await balancer(
        [bad, good], eject_after_failures=2, idle_timeout_s=0.5, health_interval_s=60
    )
    for _ in range(6):
        async with http.post(f"{server.url}/generate_stream", json=GOOD) as resp:
            await resp.read()
    assert server.registry.get("r0").ejected


async def _poison_with_the_retry_blocked(server, http, client_timeout: float | None) -> None:
    """r1's only slot is held by a long stream, so the poison prompt's retry waits."""
    r0, r1 = server.registry.get("r0"), server.registry.get("r1")
    r0.inflight += 1  # steer the long stream to r1
    filler = asyncio.ensure_future(http.post(f"{server.url}/generate_stream", json=LONG))
    await wait_until(lambda: r1.inflight == 1, what="the long stream on r1")
    r0.inflight -= 1
    timeout = aiohttp.ClientTimeout(total=client_timeout)
    try:
        async with http.post(f"{server.url}/generate_stream", json=POISON, timeout=timeout) as resp:
            await resp.read()
    except TimeoutError:
        pass  # the client left while its retry waited
    (await filler).close()
    await wait_until(lambda: server.balancer.idle, what="both slots free again")


async def test_a_poison_prompt_whose_retry_times_out_in_the_queue_blames_nobody(
    scripted, balancer, http
):
    urls = [
        (await scripted(Script(tokens=400, token_delay_s=0.01, poison="POISON")))[1]
        for _ in range(2)
    ]
    server = await balancer(
        urls,
        eject_after_failures=2,
        health_interval_s=60,
        max_inflight_per_replica=1,
        queue_timeout_s=0.5,
        retries=1,
    )
    for _ in range(2):
        await _poison_with_the_retry_blocked(server, http, None)
    assert not server.registry.get("r0").ejected


async def test_a_poison_prompt_whose_client_leaves_during_the_retry_blames_nobody(
    scripted, balancer, http
):
    urls = [
        (await scripted(Script(tokens=400, token_delay_s=0.01, poison="POISON")))[1]
        for _ in range(2)
    ]
    server = await balancer(
        urls, eject_after_failures=2, health_interval_s=60, max_inflight_per_replica=1, retries=1
    )
    for _ in range(2):
        await _poison_with_the_retry_blocked(server, http, 0.5)
    assert not server.registry.get("r0").ejected


async def test_a_retry_gets_its_queue_time_after_a_first_byte_timeout(scripted, balancer, http):
    """The time spent on the replica that timed out is not queue time: the retry still
    waits up to queue_timeout_s for a slot."""
    _, hang = await scripted(Script(first_delay_s=30))  # r0: never answers in time
    _, ok = await scripted(Script(tokens=50, token_delay_s=0.05))  # r1: >= 2.5 s per stream
    server = await balancer(
        [hang, ok],
        max_inflight_per_replica=1,
        first_byte_timeout_s=2.0,
        queue_timeout_s=1.5,
        retries=1,
        health_interval_s=60,
    )
    r0, r1 = server.registry.get("r0"), server.registry.get("r1")
    r0.inflight += 1  # steer the filler to r1
    filler = asyncio.ensure_future(
        http.post(server.url + "/generate_stream", json={**LONG, "parameters": {}})
    )
    await wait_until(lambda: r1.inflight == 1, what="the filler on r1")
    r0.inflight -= 1
    async with http.post(server.url + "/generate_stream", json=GOOD) as resp:
        body = await resp.text()
    (await filler).close()
    # r0 timed out at 2 s; r1 freed its slot at >= 2.5 s (later on a loaded machine): within
    # the retry's own 1.5 s wait, whereas a deadline that counted the 2 s on r0 was over
    assert resp.status == 200, body


async def test_a_restarted_replica_starts_with_a_clean_record(tmp_path: Path) -> None:
    fleet = await started(make_fleet(tmp_path, 2))
    try:
        r = fleet.registry.get("replica-0")
        assert r is not None
        r.ejected, r.consecutive_failures = True, 7  # the old process's record
        async with asyncio.timeout(15):
            await fleet.restart("replica-0", force=True)
        assert r.state is ReplicaState.READY
        assert not r.ejected and r.consecutive_failures == 0
    finally:
        await fleet.stop()
