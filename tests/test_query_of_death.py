"""A request that kills the processes it reaches (a query of death) harms each replica once.

A retry may go back to a replica that restarted since the request failed there
(``Replica.incarnation``), but only when the request cannot have caused that failure: it
never reached the process (connection refused) or the replica said it was busy (429). A
process that died under the request, hung on it or answered it with a failure keeps its
replica excluded for the rest of the request, whatever restarts: otherwise one request
walks the restarted replicas through its retries (found in review: with ``retries: 2`` a
prompt that crashes every process it reaches killed a third process on a two-replica fleet,
and each death counts towards the supervisor's crash loop, 5 exits in 600 s by default,
after which the replica stays down).
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
    # Every process of this replica dies under the first generation request it gets. The
    # second replica's process waits for the test's "go" before it dies, so that the
    # supervisor has seen the first death and is restarting that replica by then.

    class Handler(Replica):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            (folder / f"died-{name}-{os.getpid()}").touch()
            if name == "b":
                while not (folder / "go").exists():
                    time.sleep(0.01)
            os._exit(1)  # dies under the request: no answer, connection closed

    """
)


async def test_a_query_of_death_kills_each_replica_once_not_its_restarts(
    tmp_path: Path,
) -> None:
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
        replicas = setup.replicas
        async with aiohttp.ClientSession() as http:
            call = asyncio.ensure_future(
                http.post(f"{setup.url}/generate", json={"inputs": "poison"})
            )
            await wait_until(lambda: len(deaths()) == 2, what="both replicas got the request")
            # The first replica's death has been seen: it is restarting (a fast start,
            # well within the request's queue time), or already back.
            await wait_until(
                lambda: any(
                    r.restarts or r.state is not ReplicaState.READY for r in setup.replicas
                ),
                what="the supervisor saw the first death",
            )
            (tmp_path / "go").touch()  # the second replica dies too
            async with asyncio.timeout(30):
                resp = await call
            async with resp:
                assert resp.status == 502, await resp.text()
            # Both replicas are back (a third death would show up by now).
            await wait_until(
                lambda: all(r.routable for r in replicas), what="both replicas restarted"
            )
            await asyncio.sleep(0.3)
        assert deaths() == ["died-a", "died-b"]
        metrics = await _metrics(setup.server)
        assert metric_sum(metrics, "neuron_fleet_retries_total") == 1


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
