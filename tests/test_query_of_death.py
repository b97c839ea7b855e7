"""A request that kills the process it reaches (a query of death) harms one replica per send.

A retry may go back to a replica that restarted since the request failed there
(``Replica.incarnation``), but only when the request cannot have caused that failure: it
never reached the process (connection refused) or the replica said it was busy (429). A
process that died under the request, hung on it or answered it with a failure keeps its
replica excluded for the rest of the request, whatever restarts; and a process that died
under the request alone is followed by no retry at all (balancer/retry.py): each death
counts towards the supervisor's crash loop (5 exits in 600 s by default, after which the
replica stays down).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from balancer.admission import Admission
from balancer.policy import LeastOutstanding
from balancer.server import BalancerServer
from balancer.upstream import EVERY_INCARNATION, Registry, Replica, ReplicaState
from tests.conftest import wait_until
from tests.script_fleet import replica_script, script_fleet
from tests.test_hardening_input import metric_sum

pytestmark = pytest.mark.timeout(60)

POISONED = replica_script(
    """
    # Every process of this replica dies under the first generation request it gets.

    class Handler(Replica):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            (folder / f"died-{name}-{os.getpid()}").touch()
            os._exit(1)  # dies under the request: no answer, connection closed

    """
)


async def test_a_query_of_death_kills_one_replica_per_send_whatever_the_retries(
    tmp_path: Path,
) -> None:
    """The process died under the request alone: evidence specific to it, so it is not
    handed to another replica, retries or not (balancer/retry.py). Each resend costs one
    more process (the quarantine, off here, stops that: tests/test_quarantine.py)."""

    def deaths() -> list[str]:
        return sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.glob("died-*"))

    async with script_fleet(
        tmp_path,
        POISONED,
        ("a", "b"),
        slot_cap=2,
        retries=4,
        quarantine_after=0,  # this is about retries alone: tests/test_quarantine.py
    ) as setup:
        async with aiohttp.ClientSession() as http:
            for sent in (1, 2):
                await wait_until(
                    lambda: all(r.routable for r in setup.replicas), what="both replicas up"
                )
                async with asyncio.timeout(30):
                    async with http.post(f"{setup.url}/generate", json={"inputs": "p"}) as r:
                        assert r.status == 502, await r.text()
                assert len(deaths()) == sent
        metrics = await _metrics(setup.server)
        assert metric_sum(metrics, "neuron_fleet_retries_total") == 0


async def _metrics(server: BalancerServer) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as r:
        return await r.text()


async def test_a_retry_that_may_have_killed_a_replica_waits_for_another_not_its_restart() -> None:
    """In the queue: the waiter excludes A through A's restart (``EVERY_INCARNATION``) and
    takes B when B frees a slot."""
    a, b = (
        Replica(n, f"http://{n}", slot_cap=1, state=ReplicaState.READY, healthy=True)
        for n in ("a", "b")
    )
    registry = Registry([a, b])
    adm = Admission(registry, LeastOutstanding(), max_queue=8, queue_timeout_s=5)
    assert await adm.acquire(1) is a
    assert await adm.acquire(1) is b
    retry = asyncio.ensure_future(adm.acquire(1, exclude={a: EVERY_INCARNATION}))
    await asyncio.sleep(0)
    adm.release(a, 1)
    a.healthy = False
    registry.set_state(a, ReplicaState.STARTING)
    a.healthy = True
    registry.set_state(a, ReplicaState.READY)  # a new incarnation, idle
    await asyncio.sleep(0.05)
    assert not retry.done()
    adm.release(b, 1)
    assert await asyncio.wait_for(retry, 1) is b
    adm.release(b, 1)
