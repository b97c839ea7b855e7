"""The defects an adversarial review of the balancer found (issue 11), each reproduced."""

from __future__ import annotations

import asyncio

from balancer.admission import Admission, Ticket
from balancer.policy import LeastOutstanding
from balancer.upstream import Registry, Replica, ReplicaState


def _replicas(n: int, cap: int = 1) -> list[Replica]:
    return [
        Replica(f"r{i}", f"http://x{i}", slot_cap=cap, state=ReplicaState.READY, healthy=True)
        for i in range(n)
    ]


# ---------------------------------------------------------------- 1. admission
async def test_a_queued_retry_does_not_keep_new_requests_off_an_idle_replica():
    registry = Registry(_replicas(2))
    a, b = registry.replicas
    adm = Admission(registry, LeastOutstanding(), max_queue=8, queue_timeout_s=5)
    first = await adm.acquire(1)
    busy_b = await adm.acquire(1)
    assert {first, busy_b} == {a, b}
    # A's request failed: its retry excludes A and waits for B, which is busy.
    retry = asyncio.ensure_future(adm.acquire(1, exclude=frozenset({a})))
    await asyncio.sleep(0)
    adm.release(a, 1)
    await asyncio.sleep(0)
    assert not retry.done()
    # A is idle: a new request takes it at once although the queue is not empty.
    assert await asyncio.wait_for(adm.acquire(1), 0.5) is a
    adm.release(b, 1)
    assert await asyncio.wait_for(retry, 0.5) is b


async def test_a_retry_keeps_its_place_and_its_deadline():
    registry = Registry(_replicas(1))
    adm = Admission(registry, LeastOutstanding(), max_queue=8, queue_timeout_s=0.3)
    held = await adm.acquire(1)
    ticket = Ticket()
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.2)
    later = asyncio.ensure_future(adm.acquire(1))  # arrives after the ticket's request
    await asyncio.sleep(0)
    retry = asyncio.ensure_future(adm.acquire(1, ticket=ticket))
    await asyncio.sleep(0)
    adm.release(held, 1)
    # The retry keeps its place (it arrived first), so it is served before ``later``.
    got = await asyncio.wait_for(retry, 1)
    assert got is held and not later.done()
    adm.release(got, 1)
    adm.release(await asyncio.wait_for(later, 1), 1)
    # ...and its deadline: 0.3 s from its first arrival, not from the retry.
    adm2 = Admission(registry, LeastOutstanding(), max_queue=8, queue_timeout_s=0.3)
    hold = await adm2.acquire(1)
    ticket = Ticket()
    await asyncio.sleep(0.2)
    started = loop.time()
    try:
        await adm2.acquire(1, ticket=ticket)
    except Exception as exc:  # QueueTimeout
        waited = loop.time() - started
        assert type(exc).__name__ == "QueueTimeout"
        assert waited < 0.25
    else:
        raise AssertionError("expected a queue timeout")
    adm2.release(hold, 1)
