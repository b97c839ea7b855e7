"""Review of pending breaks (balancer/quarantine.py): a listener's failure must not stop the
supervisor's reaping, an answer read after its process was seen to exit still counts, and a
stream whose first event is a client's error still clears the replica's failure count."""

from __future__ import annotations

import json

import pytest

from balancer.quarantine import PENDING_WINDOW_S, Quarantine, Verdict
from balancer.upstream import Replica, ReplicaState
from tests.conftest import wait_until
from tests.script_fleet import ScriptFleet
from tests.test_hardening_input import metric_sum
from tests.test_pending_breaks import Clock, _metrics, fleet3  # noqa: F401 (a fixture)
from tests.upstreams import Script

pytestmark = pytest.mark.timeout(60)


async def test_a_listener_failing_on_an_exit_does_not_stop_the_supervisor(
    fleet3: ScriptFleet,  # noqa: F811
) -> None:
    def broken(replica: Replica, pid: int) -> None:
        raise RuntimeError("a listener's bug")

    fleet3.server.balancer.registry.on_process_exit(broken)
    before = {r.name: r.pid for r in fleet3.replicas}
    status, text = await fleet3.post("/generate", {"inputs": "crash"})
    assert status == 424, text
    # The relay's listener (registered before the broken one) still ran for both exits...
    await wait_until(lambda: len(fleet3.quarantine) == 1, what="both exits seen")
    # ...and the supervisor restarted both crashed processes instead of giving up on them.
    await wait_until(
        lambda: (
            all(r.state is ReplicaState.READY and r.pid is not None for r in fleet3.replicas)
            and sum(r.pid != before[r.name] for r in fleet3.replicas) == 2
        ),
        timeout=20,
        what="both crashed replicas restarted",
    )


async def test_generation_errors_read_after_their_processes_were_seen_to_exit_count(
    fleet3: ScriptFleet,  # noqa: F811
) -> None:
    """Through the relay: the supervisor's reap told first, the answers read after."""
    registry = fleet3.server.balancer.registry
    for replica in fleet3.replicas:
        assert replica.pid is not None
        registry.process_exited(replica, replica.pid)  # not stopped on purpose
    status, text = await fleet3.post("/generate", {"inputs": "fail"})
    assert status == 424, text  # both attempts answered: the request in flight gets TGI's answer
    assert len(fleet3.quarantine) == 1
    status, text = await fleet3.post("/generate", {"inputs": "fail"})
    assert status == 422 and json.loads(text)["error_type"] == "quarantined", text
    metrics = await _metrics(fleet3)
    assert metric_sum(metrics, "neuron_fleet_quarantines_total") == 1


def test_an_answer_read_after_its_process_was_seen_to_exit_still_counts() -> None:
    """A slow client holds the error event back in the relay; the supervisor reaps first."""
    clock = Clock()
    q = Quarantine(after=2, ttl_s=60, clock=clock)
    assert q.process_exited("a", 10, on_purpose=False) == []
    verdict, _ = q.pending("d", "/generate", "a", 10, "a/pid 10") or (None, None)
    assert verdict is Verdict.SUSPECT and not q.has_pending
    q.process_exited("b", 20, on_purpose=False)
    verdict, entry = q.pending("d", "/generate", "b", 20, "b/pid 20") or (None, None)
    assert verdict is Verdict.QUARANTINED and entry is not None and entry.replicas == ["a", "b"]


def test_an_answer_read_after_an_exit_on_purpose_or_long_after_does_not_count() -> None:
    clock = Clock()
    q = Quarantine(after=1, ttl_s=60, clock=clock)
    q.process_exited("a", 10, on_purpose=True)
    assert q.pending("d", "/generate", "a", 10, "a/pid 10") is None
    assert not q.has_pending and len(q) == 0
    q.process_exited("b", 20, on_purpose=False)
    clock.now += PENDING_WINDOW_S
    assert q.pending("d", "/generate", "b", 20, "b/pid 20") is None
    assert len(q) == 0  # left pending: a pid is not seen to exit twice


VALIDATION = (
    '{"error":"Input validation error: `inputs` must have less than 8 tokens",'
    '"error_type":"validation"}'
)


@pytest.mark.parametrize(
    ("script", "path"),
    [
        (Script(first_event_error=VALIDATION), "/generate_stream"),
        (Script(status=422), "/generate"),  # the same answer, not streamed: passed before too
    ],
)
async def test_a_client_error_answered_clears_the_replica_failure_count(
    scripted, balancer, http, script: Script, path: str
) -> None:
    """TGI answers a streaming request's validation error as an HTTP-200 stream whose only
    event is the error: the replica works, as with the 422 it gives without streaming."""
    _, url = await scripted(script)
    server = await balancer([url], eject_after_failures=5)
    replica = server.registry.get("r0")
    replica.consecutive_failures = 3  # failures of other requests just before
    doc = {"inputs": "a b c d e f g h i j", "parameters": {"max_new_tokens": 3}}
    async with http.post(server.url + path, json=doc) as resp:
        body = await resp.text()
    assert "Input validation error" in body or resp.status == 422, body
    assert replica.consecutive_failures == 0
