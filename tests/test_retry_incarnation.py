"""A retry avoids a replica only for the incarnation the request failed in.

A replica that failed a request without the request being the cause (it was busy, or
never reached) and was restarted by the supervisor since (same ``Replica``, STARTING ->
READY) is a fresh process: the retry may go back to it. Found as a defect: with overlapping
failures (A fails, the retry goes to B, B dies, A is back) every replica was excluded for
the whole request and the client got 502 although A was ready. A replica whose process died
under the request stays excluded through restarts (tests/test_query_of_death.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from unittest import mock

import aiohttp
import pytest

from balancer.admission import Admission
from balancer.config import BalancerConfig
from balancer.health import HealthChecker
from balancer.metrics import BalancerMetrics
from balancer.policy import LeastOutstanding
from balancer.relay import Relay
from balancer.retry import Attempts
from balancer.server import BalancerServer
from balancer.ticket import Ticket
from balancer.upstream import EVERY_INCARNATION, Registry, Replica, ReplicaState, excluded
from tests.conftest import wait_until
from tests.script_fleet import replica_script, script_fleet
from tests.test_hardening_input import metric_sum
from tests.upstreams import Script

pytestmark = pytest.mark.timeout(60)


def _ready(name: str) -> Replica:
    return Replica(name, f"http://{name}", slot_cap=1, state=ReplicaState.READY, healthy=True)


# --------------------------------------------------------------------------- the counter


def test_incarnation_changes_only_when_a_replica_comes_back_into_rotation() -> None:
    """Bumped when the supervisor makes a replica ready again or health checks re-admit it;
    not by other replicas' changes, nor while it is still down."""
    a, b = _ready("a"), _ready("b")
    registry = Registry([a, b])
    checks = HealthChecker(BalancerConfig(health_fall=1, health_rise=1), registry, None)  # type: ignore[arg-type]
    first = a.incarnation
    failed_here = {a: first}
    registry.set_state(b, ReplicaState.DRAINING)  # something else changed
    registry.set_state(b, ReplicaState.READY)
    assert a.incarnation == first and excluded(a, failed_here)

    # The supervisor saw it exit and restarts it: down while starting, back when ready.
    a.healthy = False
    registry.set_state(a, ReplicaState.STARTING)
    assert a.incarnation == first
    a.healthy = True
    registry.set_state(a, ReplicaState.READY)
    assert a.incarnation == first + 1 and not excluded(a, failed_here)

    # Balance-only mode: health checks take it out and bring it back.
    failed_here = {a: a.incarnation}
    checks.record(a, False, "HTTP 503")
    checks.record(a, True)
    assert a.incarnation == first + 2 and not excluded(a, failed_here)


async def test_a_queued_retry_takes_a_replica_only_once_it_restarted() -> None:
    registry = Registry([_ready("a"), _ready("b")])
    a, b = registry.replicas
    adm = Admission(registry, LeastOutstanding(), max_queue=8, queue_timeout_s=5)
    assert await adm.acquire(1) is a
    assert await adm.acquire(1) is b
    # The request failed on A; its retry waits for "any replica but this A".
    retry = asyncio.ensure_future(adm.acquire(1, exclude={a: a.incarnation}))
    await asyncio.sleep(0)
    adm.release(a, 1)
    registry.notify()  # any state change: A is free and the same process
    await asyncio.sleep(0.05)
    assert not retry.done()
    # A restarts: down, then ready again as a new incarnation.
    a.healthy = False
    registry.set_state(a, ReplicaState.STARTING)
    await asyncio.sleep(0.05)
    assert not retry.done()
    a.healthy = True
    registry.set_state(a, ReplicaState.READY)
    assert await asyncio.wait_for(retry, 1) is a
    adm.release(a, 1)
    adm.release(b, 1)


# --------------------------------------------------------------------------- end to end

REPLICA = replica_script(
    """
    # A replica for this test. The first process to get a generation request answers it
    # 429 (busy) and then dies (not of the request: it answered); so does the second, later.
    # Once restarted (the supervisor starts the same command again) a replica answers.

    restarted = (folder / f"died-{name}").exists()

    class Handler(Replica):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if not restarted:
                first_to_die = not any(folder.glob("died-*"))
                (folder / f"died-{name}").touch()
                if first_to_die:
                    busy = b'{"error":"busy","error_type":"overloaded"}'
                    self.send_json(429, busy)
                    self.wfile.flush()
                    time.sleep(0.05)
                    os._exit(1)  # dies after answering: the request did not kill it
                # The second waits until the test says the first replica's death has been
                # seen by the supervisor, then is busy too and dies. (A process that died
                # under the request, unanswered, would not be followed by a retry at all:
                # tests/test_containment.py.)
                while not (folder / "go").exists():
                    time.sleep(0.01)
                self.send_json(429, b'{"error":"busy","error_type":"overloaded"}')
                self.wfile.flush()
                time.sleep(0.05)
                os._exit(1)
            body = json.dumps({"generated_text": "ok", "replica": name, "pid": os.getpid()})
            self.send_json(200, body.encode())

    """
)


async def test_overlapping_failures_the_retry_returns_to_the_restarted_busy_replica(
    tmp_path: Path,
) -> None:
    async with script_fleet(tmp_path, REPLICA, ("a", "b"), slot_cap=2, retries=2) as setup:
        replicas = setup.replicas
        first_pids = {r.name: r.pid for r in replicas}
        incarnations = {r.name: r.incarnation for r in replicas}
        async with aiohttp.ClientSession() as http:
            call = asyncio.ensure_future(
                http.post(f"{setup.url}/generate", json={"inputs": "hello"})
            )
            # The first replica was busy (and then died); the retry went to the other one.
            await wait_until(
                lambda: len(list(tmp_path.glob("died-*"))) == 2, what="both got the request"
            )
            # The second one is still alive (it waits for "go"): only the first can be down.
            await wait_until(
                lambda: any(r.restarts or r.state is not ReplicaState.READY for r in replicas),
                what="the supervisor saw the first death",
            )
            (tmp_path / "go").touch()  # now the second replica dies too
            async with asyncio.timeout(30):
                resp = await call
            async with resp:
                text = await resp.text()
                assert resp.status == 200, text
                served = json.loads(text)
        # Served by a restarted process (a new incarnation of the replica that was busy).
        by_name = {r.name: r for r in replicas}
        winner = by_name[served["replica"]]
        assert served["pid"] != first_pids[winner.name]
        assert winner.incarnation > incarnations[winner.name]
        # Two retries: after each 429; no third attempt, no error.
        assert metric_sum(await _metrics(setup.server), "neuron_fleet_retries_total") == 2


async def _metrics(server: BalancerServer) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as r:
        return await r.text()


async def test_a_replica_that_failed_and_is_still_the_same_process_stays_excluded(
    scripted, balancer, http
) -> None:
    """Retries left, but every replica failed the request in its current incarnation: the
    last failure is the answer now, and no replica gets the request twice."""
    a, a_url = await scripted(Script(status=503))
    b, b_url = await scripted(Script(status=503))
    server = await balancer([a_url, b_url], retries=5, eject_after_failures=100)
    async with http.post(f"{server.url}/generate", json={"inputs": "x"}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "scripted 503"
    assert len(a.seen.requests) == 1 and len(b.seen.requests) == 1


def test_a_restart_counts_as_a_retry_target_only_if_expected_back_in_the_queue_time() -> None:
    """A starting replica is worth waiting for only if its last start took less than the
    request's queue time left: a Neuron replica loading for minutes means the attempt's own
    error now, not a 503 after ``queue_timeout_s``."""
    a = _ready("a")
    registry = Registry([a])
    config = BalancerConfig(queue_timeout_s=30.0, retries=2)
    relay = Relay(config, registry, mock.Mock(), BalancerMetrics(registry, lambda: 0))
    failed_here = {a: a.incarnation}
    ticket = Ticket()

    def can_retry(
        attempt: int, incarnation: int, tried: dict[Replica, int], harmless: bool
    ) -> bool:
        """The retry policy's "is there room for another attempt" (balancer/retry.py)."""
        att = Attempts(None, "/generate", b"", "r1", ticket)  # type: ignore[arg-type]
        att.attempt, att.replica, att.incarnation, att.tried = attempt, a, incarnation, tried
        return relay.policy.room(att, harmless)

    # Failures the request cannot have caused (busy, never reached) from here on.
    # Same process, still READY (its death not seen yet): excluded, nothing else left.
    assert not can_retry(0, a.incarnation, failed_here, True)

    # The supervisor restarts it: the last start took 5 s, it began 1 s ago.
    a.healthy = False
    registry.set_state(a, ReplicaState.STARTING)
    a.start_duration_s, a.started_at = 5.0, time.monotonic() - 1.0
    assert can_retry(0, 0, failed_here, True)
    # ... but not with 2 s of queue time left, nor with the retries used up.
    ticket.queued_s = 28.0
    assert not can_retry(0, 0, failed_here, True)
    ticket.queued_s = 0.0
    assert not can_retry(2, 0, failed_here, True)
    # A model that loads for 10 minutes is not worth a 30 s wait.
    a.start_duration_s = 600.0
    assert not can_retry(0, 0, failed_here, True)
    # Nor a 40 s start whose process is not even running yet (restart backoff): all ahead.
    a.start_duration_s, a.started_at = 40.0, None
    assert not can_retry(0, 0, failed_here, True)
    a.started_at = time.monotonic() - 20.0  # running, 20 s of 40 s left: fits in 30 s
    assert can_retry(0, 0, failed_here, True)
    # First start (duration unknown): counted, as a starting replica always was.
    a.start_duration_s = None
    assert can_retry(0, 0, failed_here, True)
    # The process died under the request (or answered it with a failure): not again.
    assert not can_retry(0, 0, failed_here, False)
    assert not can_retry(0, 0, {a: EVERY_INCARNATION}, True)
