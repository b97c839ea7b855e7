"""Routing, slot caps, the balancer queue, health transitions and metrics, over loopback."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from balancer.admission import Admission, QueueFull, QueueTimeout
from balancer.policy import LeastOutstanding, LeastWork, RoundRobin, make_policy
from balancer.upstream import Registry, Replica, ReplicaState
from tests.conftest import admin_headers, metric_value, read_sse, wait_until
from tests.upstreams import Script

GEN = {"inputs": "hello", "parameters": {"max_new_tokens": 5}}


def _replicas(*inflight: int, cap: int = 8) -> list[Replica]:
    return [
        Replica(
            f"r{i}",
            f"http://x{i}",
            slot_cap=cap,
            state=ReplicaState.READY,
            healthy=True,
            inflight=n,
        )
        for i, n in enumerate(inflight)
    ]


# ---------------------------------------------------------------- pure policy / admission
def test_least_outstanding_prefers_idle_and_rotates_ties():
    policy = LeastOutstanding()
    a, b, c = _replicas(3, 1, 1)
    picks = Counter(policy.pick([a, b, c], 0).name for _ in range(10))
    assert picks == {"r1": 5, "r2": 5}


def test_least_outstanding_breaks_ties_on_remaining_work():
    policy = LeastOutstanding()
    a, b, c = _replicas(2, 2, 3)
    a.outstanding_work, b.outstanding_work, c.outstanding_work = 16_400, 700, 0
    assert policy.pick([a, b, c], 0) is b  # same request count, b is only decoding


def test_least_work_counts_tokens_not_requests():
    policy = LeastWork()
    a, b = _replicas(1, 3)
    a.outstanding_work, b.outstanding_work = 16_000, 300
    assert policy.pick([a, b], 100) is b


def test_round_robin_cycles_whatever_the_load():
    policy = RoundRobin()
    reps = _replicas(5, 0, 0)
    assert [policy.pick(reps, 0).name for _ in range(6)] == ["r0", "r1", "r2"] * 2


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="least-outstanding"):
        make_policy("fastest")


async def test_admission_caps_queues_and_hands_over_in_fifo_order():
    registry = Registry(_replicas(0, cap=1))
    adm = Admission(registry, LeastOutstanding(), max_queue=2, queue_timeout_s=5)
    first = await adm.acquire(1)
    waiters = [asyncio.ensure_future(adm.acquire(1)) for _ in range(2)]
    await asyncio.sleep(0)
    assert adm.queue_depth == 2
    with pytest.raises(QueueFull):
        await adm.acquire(1)
    adm.release(first, 1)
    done, _pending = await asyncio.wait(waiters, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert done == {waiters[0]}  # FIFO: the oldest waiter gets the slot
    adm.release(await waiters[0], 1)
    assert (await waiters[1]).inflight == 1


async def _grant_order(order: str, ageing: float, gap_s: float) -> list[str]:
    """A long request queues, then (``gap_s`` later) a short one; one slot frees at a time."""
    registry = Registry(_replicas(0, cap=1))
    adm = Admission(
        registry, LeastOutstanding(), max_queue=8, queue_timeout_s=5, order=order, ageing=ageing
    )
    held = await adm.acquire(1)
    long = asyncio.ensure_future(adm.acquire(16_000 + 1_000, prompt_tokens=16_000))
    await asyncio.sleep(gap_s)
    short = asyncio.ensure_future(adm.acquire(1_000 + 10, prompt_tokens=1_000))
    await asyncio.sleep(0)
    granted = []
    adm.release(held, 1)
    for _ in range(2):
        done, _ = await asyncio.wait(
            [t for t in (long, short) if t not in granted],
            timeout=5,
            return_when=asyncio.FIRST_COMPLETED,
        )
        (task,) = done
        granted.append(task)
        adm.release(await task, 1)
    return ["long" if t is long else "short" for t in granted]


async def test_deadline_queue_lets_short_requests_pass_long_ones_within_the_ageing():
    # Long: 1.6 s prefill + 1000 x 39 ms; short: 0.1 s + 10 x 39 ms. Deadlines at 0.3 x that.
    assert await _grant_order("fifo", 0.3, 0.0) == ["long", "short"]
    assert await _grant_order("deadline", 0.3, 0.0) == ["short", "long"]
    # Ageing bounds the overtaking: 0.001 x 40.6 s = 41 ms, and the short one came 150 ms later.
    assert await _grant_order("deadline", 0.001, 0.15) == ["long", "short"]


def test_unknown_queue_order_names_the_choices():
    with pytest.raises(ValueError, match="fifo, deadline"):
        Admission(Registry(_replicas(0)), LeastOutstanding(), 1, 1.0, order="lifo")


async def test_admission_timeout_and_cancel_leave_no_trace():
    registry = Registry(_replicas(0, cap=1))
    adm = Admission(registry, LeastOutstanding(), max_queue=8, queue_timeout_s=0.05)
    held = await adm.acquire(1)
    with pytest.raises(QueueTimeout):
        await adm.acquire(1)
    task = asyncio.ensure_future(adm.acquire(1))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0)
    assert adm.queue_depth == 0
    adm.release(held, 1)
    assert held.inflight == 0


async def test_admission_wakes_waiters_when_a_replica_becomes_ready():
    registry = Registry(_replicas(0))
    (rep,) = registry.replicas
    registry.set_state(rep, ReplicaState.STARTING)
    adm = Admission(registry, LeastOutstanding(), max_queue=8, queue_timeout_s=5)
    task = asyncio.ensure_future(adm.acquire(1))
    await asyncio.sleep(0.01)
    assert not task.done()
    registry.set_state(rep, ReplicaState.READY)
    assert await asyncio.wait_for(task, 5) is rep


# ---------------------------------------------------------------- over loopback
async def _hold_streams(session, url, n):
    """Open n slow streams and read their first event; return the open responses."""
    resps = []
    for _ in range(n):
        resp = await session.post(f"{url}/generate_stream", json=GEN)
        await resp.content.readuntil(b"\n\n")
        resps.append(resp)
    return resps


async def test_least_outstanding_sends_to_the_idle_replica(scripted, balancer):
    slow = Script(tokens=200, token_delay_s=0.05)
    a, url_a = await scripted(slow)
    b, url_b = await scripted(slow)
    server = await balancer([url_a, url_b])
    async with aiohttp.ClientSession() as session:
        held = await _hold_streams(session, server.url, 4)
        # Two each, never four on one: the second request always went to the idle one.
        assert (a.seen.active_streams, b.seen.active_streams) == (2, 2)
        for resp in held:
            resp.close()


async def test_cap_and_queue_hold_then_drain(scripted, balancer):
    rep, url = await scripted(Script(tokens=200, token_delay_s=0.05))
    server = await balancer([url], max_inflight_per_replica=2, max_queue=1, queue_timeout_s=30)
    async with aiohttp.ClientSession() as session:
        held = await _hold_streams(session, server.url, 2)
        queued = asyncio.ensure_future(session.post(f"{server.url}/generate_stream", json=GEN))
        await wait_until(lambda: server.balancer.admission.queue_depth == 1, what="queued")
        assert rep.seen.active_streams == 2  # the cap held: the replica never saw the third
        async with session.post(f"{server.url}/generate_stream", json=GEN) as full:
            assert full.status == 429
            assert full.headers["Retry-After"]
            body = await full.json()
            assert body["error_type"] == "overloaded"
        held[0].close()
        resp = await asyncio.wait_for(queued, 10)
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        assert server.balancer.admission.queue_depth == 0
        for r in (*held, resp):
            r.close()
        async with session.get(f"{server.url}/metrics") as m:
            text = await m.text()
        assert metric_value(text, "neuron_fleet_rejected_requests_total", reason="queue_full") == 1
        assert metric_value(text, "neuron_fleet_queue_wait_seconds_count") >= 3


async def test_queue_timeout_answers_503_with_retry_after(scripted, balancer, http):
    _, url = await scripted(Script(tokens=200, token_delay_s=0.05))
    server = await balancer([url], max_inflight_per_replica=1, queue_timeout_s=0.2)
    held = await _hold_streams(http, server.url, 1)
    async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        assert "busy" in (await resp.json())["error"]
    held[0].close()


async def test_no_cap_sends_everything_through(scripted, balancer, http):
    rep, url = await scripted(Script(tokens=200, token_delay_s=0.05))
    server = await balancer([url], max_inflight_per_replica=0)
    held = await _hold_streams(http, server.url, 12)
    assert rep.seen.active_streams == 12
    for r in held:
        r.close()


async def test_health_transitions_with_rise_and_fall(scripted, balancer, http):
    a, url_a = await scripted(Script(tokens=1))
    b, url_b = await scripted(Script(tokens=1))
    server = await balancer([url_a, url_b])
    a.script.healthy = False
    await wait_until(lambda: server.registry.ready_count() == 1, what="r0 down")
    for _ in range(4):
        async with http.post(f"{server.url}/generate", json=GEN) as resp:
            assert resp.status == 200
    assert len(a.seen.requests) == 0 and len(b.seen.requests) == 4
    b.script.healthy = False
    await wait_until(lambda: server.registry.ready_count() == 0, what="all down")
    async with http.get(f"{server.url}/health") as resp:
        assert resp.status == 503
        assert (await resp.json())["error_type"] == "healthcheck"
    a.script.healthy = True
    await wait_until(lambda: server.registry.ready_count() == 1, what="r0 back")
    async with http.get(f"{server.url}/health") as resp:
        assert resp.status == 200
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "neuron_fleet_replica_up", replica="r0") == 1
    assert metric_value(text, "neuron_fleet_replica_up", replica="r1") == 0
    assert metric_value(text, "neuron_fleet_replica_state", replica="r1", state="unhealthy") == 1


async def test_passive_ejection_after_consecutive_failures(scripted, balancer, http):
    bad, bad_url = await scripted(Script(status=500))
    _good, good_url = await scripted(Script(tokens=1))
    server = await balancer([bad_url, good_url], eject_after_failures=2, health_interval_s=60)
    for _ in range(6):
        async with http.post(f"{server.url}/generate", json=GEN) as resp:
            assert resp.status == 200
    assert len(bad.seen.requests) == 2  # ejected after two failures in a row
    assert not server.registry.get("r0").healthy


async def test_metrics_count_tokens_ttft_and_requests(scripted, balancer, http):
    _, url = await scripted(Script(tokens=6))
    server = await balancer([url])
    for _ in range(3):
        async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
            assert len(await read_sse(resp)) == 6
    chat = {"messages": [{"role": "user", "content": "x"}], "stream": True}
    async with http.post(f"{server.url}/v1/chat/completions", json=chat) as resp:
        assert len(await read_sse(resp)) == 7  # 6 tokens + [DONE]
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "neuron_fleet_output_tokens_total", replica="r0") == 24
    assert metric_value(text, "neuron_fleet_time_to_first_token_seconds_count", replica="r0") == 4
    assert metric_value(text, "neuron_fleet_inter_token_latency_seconds_count", replica="r0") == 20
    assert (
        metric_value(text, "neuron_fleet_requests_total", route="/generate_stream", code="200") == 3
    )
    assert metric_value(text, "neuron_fleet_replica_inflight", replica="r0") == 0
    assert metric_value(text, "neuron_fleet_queue_depth") == 0
    # The replica's own metrics are re-exported with a replica label.
    assert "tgi_queue_size{" in text and 'replica="r0"' in text


async def test_drain_and_undrain_without_supervisor(scripted, balancer, http):
    a, url_a = await scripted(Script(tokens=1))
    _b, url_b = await scripted(Script(tokens=1))
    server = await balancer([url_a, url_b])
    admin = admin_headers(server)
    async with http.post(f"{server.url}/fleet/replicas/r0/drain", headers=admin) as resp:
        assert resp.status == 200
        assert (await resp.json())["state"] == "draining"
    for _ in range(3):
        async with http.post(f"{server.url}/generate", json=GEN) as resp:
            assert resp.status == 200
    assert len(a.seen.requests) == 0
    async with http.get(f"{server.url}/fleet/status", headers=admin) as resp:
        status = await resp.json()
    assert [r["state"] for r in status["replicas"]] == ["draining", "ready"]
    async with http.post(f"{server.url}/fleet/replicas/r0/undrain", headers=admin) as resp:
        assert resp.status == 200
    async with http.post(f"{server.url}/fleet/replicas/r0/restart", headers=admin) as resp:
        assert resp.status == 501
    async with http.post(f"{server.url}/fleet/replicas/nope/drain", headers=admin) as resp:
        assert resp.status == 404


async def test_outstanding_work_shrinks_as_the_replica_works(scripted, balancer):
    _, url = await scripted(Script(tokens=50, token_delay_s=0.05))
    server = await balancer([url])
    replica = server.registry.get("r0")
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 50}}  # ~2 prompt tokens
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/generate_stream", json=body) as resp:
            await resp.content.readuntil(b"\n\n")
            # Admitted with 52 (prefill + 50 tokens); after the first token 49 remain.
            await wait_until(lambda: replica.outstanding_work == 49, what="prefill done")
            await resp.read()
    await wait_until(lambda: replica.inflight == 0, what="released")
    assert replica.outstanding_work == 0


async def test_work_estimate_never_exceeds_max_total_tokens(scripted, balancer):
    """max_tokens = 10**12 is accepted and passed on, but a replica never runs more than
    MAX_TOTAL_TOKENS: the least-work estimate is clamped to it."""
    _, url = await scripted(Script(tokens=50, token_delay_s=0.05))
    server = await balancer([url], max_total_tokens=4096)
    replica = server.registry.get("r0")
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 10**12}}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/generate_stream", json=body) as resp:
            await resp.content.readuntil(b"\n\n")
            # Admitted with 4096; after the prefill (~2 tokens) and a token, 4093 remain.
            await wait_until(lambda: replica.outstanding_work == 4093, what="prefill done")
            await resp.read()
    await wait_until(lambda: replica.inflight == 0, what="released")
