"""Review of answered breaks (balancer/fate.py): a listener's failure must not stop the
supervisor's reaping, an answer read after its process was seen to exit still counts, and a
stream whose first event is a client's error still clears the replica's failure count."""

from __future__ import annotations

import pytest

from balancer.upstream import Replica, ReplicaState
from tests.conftest import wait_until
from tests.script_fleet import ScriptFleet
from tests.test_hardening_input import metric_sum
from tests.test_pending_breaks import fleet3  # noqa: F401 (a fixture)
from tests.upstreams import Script

pytestmark = pytest.mark.timeout(60)


async def test_a_listener_failing_on_an_exit_does_not_stop_the_supervisor(
    fleet3: ScriptFleet,  # noqa: F811
) -> None:
    def broken(replica: Replica, pid: int) -> None:
        raise RuntimeError("a listener's bug")

    fleet3.server.balancer.registry.on_process_exit(broken)
    before = {r.name: r.pid for r in fleet3.replicas}
    for _ in range(2):  # one process per send (balancer/retry.py)
        status, text = await fleet3.post("/generate", {"inputs": "crash"})
        assert status in (424, 422), text
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
    """Through the relay: the supervisor's reap told first, the answer read after."""
    registry = fleet3.server.balancer.registry
    for replica in fleet3.replicas:
        assert replica.pid is not None
        registry.process_exited(replica, replica.pid)  # not stopped on purpose
    status, text = await fleet3.post("/generate", {"inputs": "fail"})
    # Its process had exited already: the fate was known at once, and the request (alone
    # on it) not retried.
    assert status == 424, text
    assert fleet3.count("seen") == 1
    [entry] = fleet3.quarantine._suspects.values()
    assert len(entry.broke) == 1
    metrics = await fleet3.metrics()
    assert metric_sum(metrics, "neuron_fleet_process_fates_total", fate="exited") == 1


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
