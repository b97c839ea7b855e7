"""Retry-After on the balancer's own 429 and 503: what the balancer knows, not a constant.

Every slot busy: once the forecast has learned from finished streams, ``Retry-After`` (and
``retry-after-ms``, which the OpenAI SDK prefers) is the predicted time until a slot frees;
before that, today's fixed values. No replica ready: when a starting replica should be
ready, from its last start's duration.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from balancer.forecast import RETRY_AFTER_MAX_S, retry_after
from balancer.upstream import ReplicaState
from tests.conftest import wait_until
from tests.upstreams import Script

pytestmark = pytest.mark.timeout(60)

TOKENS = 60
DELAY_S = 0.05
"""Each stream takes about TOKENS x DELAY_S = 3 s: the forecast learns 0.05 s per step."""
GEN = {"inputs": "hello", "parameters": {"max_new_tokens": TOKENS}}


def test_retry_after_of_a_forecast_that_is_not_a_number_is_the_least_not_an_error() -> None:
    """A forecast gone NaN (or negative) must not turn a refusal into a 500."""
    for seconds in (float("nan"), float("-inf"), -3.0):
        assert retry_after(seconds) == {"Retry-After": "1", "retry-after-ms": "1"}
    top = str(int(RETRY_AFTER_MAX_S))
    assert retry_after(float("inf"))["Retry-After"] == top
    assert retry_after(2.5) == {"Retry-After": "3", "retry-after-ms": "2500"}


async def _stream(http: aiohttp.ClientSession, base: str) -> aiohttp.ClientResponse:
    resp = await http.post(f"{base}/generate_stream", json=GEN)
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")  # its first token: the slot is held
    return resp


async def _hold_and_refuse(http: aiohttp.ClientSession, server) -> aiohttp.ClientResponse:
    """Fill both slots and the one queue place, then send one more request."""
    held = [await _stream(http, server.url) for _ in range(2)]
    queued = asyncio.ensure_future(http.post(f"{server.url}/generate_stream", json=GEN))
    await wait_until(lambda: server.balancer.admission.queue_depth == 1, what="queued")
    refused = await http.post(f"{server.url}/generate_stream", json=GEN)
    await refused.read()
    for resp in held:
        resp.close()
    (await queued).close()
    await wait_until(lambda: server.balancer.inflight == 0, what="slots free")
    return refused


async def test_every_slot_busy_retry_after_is_when_the_forecast_says_a_slot_frees(
    scripted, balancer, http
) -> None:
    _, url = await scripted(Script(tokens=TOKENS, token_delay_s=DELAY_S))
    server = await balancer([url], max_inflight_per_replica=2, max_queue=1, queue_timeout_s=30)

    # Nothing learned yet: the fixed value.
    full = await _hold_and_refuse(http, server)
    assert full.status == 429
    assert full.headers["Retry-After"] == "1" and "retry-after-ms" not in full.headers

    # Two streams finish: the forecast knows a stream of 60 tokens takes ~3 s.
    lessons = await asyncio.gather(*(_stream(http, server.url) for _ in range(2)))
    for resp in lessons:
        await resp.read()
    assert server.balancer.forecast.ready

    full = await _hold_and_refuse(http, server)
    assert full.status == 429
    seconds, ms = int(full.headers["Retry-After"]), int(full.headers["retry-after-ms"])
    # The slots were taken just now by 3 s streams: a slot frees in ~3 s, not in 1.
    assert 2 <= seconds <= 10, full.headers
    assert 1000 < ms <= seconds * 1000
    assert f"retry in {seconds} s" in (await full.json())["error"]


async def test_queue_timeout_retry_after_is_the_predicted_wait_for_a_slot(
    scripted, balancer, http
) -> None:
    _, url = await scripted(Script(tokens=TOKENS, token_delay_s=DELAY_S))
    server = await balancer([url], max_inflight_per_replica=1, queue_timeout_s=0.3)
    async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
        await resp.read()  # one lesson: 60 tokens take ~3 s
    held = await _stream(http, server.url)
    async with http.post(f"{server.url}/generate_stream", json=GEN) as timed_out:
        assert timed_out.status == 503
        assert "every replica slot stayed busy" in (await timed_out.json())["error"]
        seconds = int(timed_out.headers["Retry-After"])
        ms = int(timed_out.headers["retry-after-ms"])
    held.close()
    assert 2 <= seconds <= 10, timed_out.headers  # the holder has ~2.7 s left, not 5
    assert 1000 < ms <= seconds * 1000


async def test_no_replica_ready_retry_after_follows_a_starting_replicas_last_start(
    scripted, balancer, http
) -> None:
    _, url = await scripted(Script())
    server = await balancer([url], queue_timeout_s=0.2)
    replica = server.registry.replicas[0]
    replica.healthy = False
    server.registry.set_state(replica, ReplicaState.STARTING)  # as the supervisor does

    async def refusals() -> list[aiohttp.ClientResponse]:
        out = []
        for method, path in (("GET", "/info"), ("POST", "/generate")):
            async with http.request(method, f"{server.url}{path}", json={"inputs": "x"}) as r:
                assert r.status == 503 and (await r.json())["error_type"] == "unavailable"
                out.append(r)
        return out

    # Its first start: nothing known about how long starts take.
    for r in await refusals():
        assert r.headers["Retry-After"] == "5" and "retry-after-ms" not in r.headers
    # A restart of a replica whose last start took 30 s, 2 s ago.
    replica.start_duration_s = 30.0
    replica.started_at = time.monotonic() - 2.0
    for r in await refusals():
        assert 27 <= int(r.headers["Retry-After"]) <= 28, r.headers
        assert 26_000 <= int(r.headers["retry-after-ms"]) <= 28_000
    # Overdue: never under a second.
    replica.started_at = time.monotonic() - 60.0
    for r in await refusals():
        assert r.headers["Retry-After"] == "1"


async def test_queue_full_while_no_replica_is_ready_retry_after_follows_the_restart(
    scripted, balancer, http
) -> None:
    """Every replica down and the queue full of requests waiting for them: the 429 says
    when a starting replica should be back, not "1 s" (found in review: the forecast has
    no replica to predict from, so the 429 fell back to 1 s and told clients to hammer
    a fleet that was restarting for half a minute)."""
    _, url = await scripted(Script())
    server = await balancer([url], max_queue=1, queue_timeout_s=30)
    replica = server.registry.replicas[0]
    replica.healthy = False
    server.registry.set_state(replica, ReplicaState.STARTING)  # as the supervisor does
    replica.start_duration_s = 30.0
    replica.started_at = time.monotonic() - 2.0
    waiting = asyncio.ensure_future(http.post(f"{server.url}/generate", json={"inputs": "x"}))
    try:
        await wait_until(lambda: server.balancer.admission.queue_depth == 1, what="queued")
        async with http.post(f"{server.url}/generate", json={"inputs": "x"}) as full:
            assert full.status == 429
            assert 27 <= int(full.headers["Retry-After"]) <= 28, full.headers
            assert 26_000 <= int(full.headers["retry-after-ms"]) <= 28_000
            assert f"retry in {full.headers['Retry-After']} s" in (await full.json())["error"]
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
    await wait_until(lambda: server.balancer.admission.queue_depth == 0, what="left")
