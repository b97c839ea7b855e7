"""A request that kills the replica processes serving it is quarantined (balancer/quarantine.py).

End to end with real supervised replica processes (a small script, as in
tests/test_query_of_death.py): a prompt that kills the process it reaches is tried on at most
``quarantine_after`` processes, then answered 422 ``quarantined`` at once; an identical resend
is refused before any replica sees it; other prompts are still served; it is admitted again
once the quarantine expires. A death mid-stream counts; a replica that is merely slow (a
timeout) does not. Unit tests cover the bookkeeping: distinct processes, expiry, bounded size.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from balancer.quarantine import Quarantine, Verdict, request_digest
from supervisor.status_cli import format_table
from tests.conftest import wait_until
from tests.script_fleet import ScriptFleet, replica_script, script_fleet
from tests.test_hardening_input import metric_sum

pytestmark = pytest.mark.timeout(60)

ADMIN_TOKEN = "quarantine-test-admin"

REPLICA = replica_script(
    """
    # A TGI-like replica: "poison" in the body kills the process before it answers,
    # "poison-stream" after the first token event, "slow" is never answered in time;
    # anything else gets an answer. Every POST leaves a file behind, every death another.

    class Handler(Replica):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            (folder / f"seen-{name}-{uuid.uuid4().hex}").touch()
            if b"poison-stream" in body:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                event = b'data:{"token":{"id":1,"text":"a","logprob":0,"special":false}}\\n\\n'
                self.wfile.write(b"%x\\r\\n%b\\r\\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(0.05)
                (folder / f"died-{name}-{os.getpid()}").touch()
                os._exit(1)
            if b"flaky" in body:
                try:  # dies once per "kill" file the test leaves: an unrelated crash
                    (folder / "kill").unlink()
                    (folder / f"died-{name}-{os.getpid()}").touch()
                    os._exit(1)
                except FileNotFoundError:
                    pass
            if b"cut" in body:  # closes the connection unanswered, and lives on
                self.close_connection = True
                return
            if b"poison-late" in body:  # dies too, later on b and c than on a
                time.sleep(0.3 if name == "a" else 1.0)
            if b"poison" in body:
                (folder / f"died-{name}-{os.getpid()}").touch()
                os._exit(1)  # dies under the request: no answer, connection closed
            if b"slow" in body:
                time.sleep(30)
            answer = b'{"generated_text":"ok"}'
            self.send_json(200, answer)

    """
)


@pytest.fixture
async def fleet3(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[ScriptFleet]:
    """Three supervised replicas of REPLICA behind a balancer; ``request.param``: config."""
    settings: dict[str, object] = {
        "retries": 2,
        "eject_after_failures": 100,  # this is about the quarantine, not passive ejection
        "admin_token": ADMIN_TOKEN,
        **getattr(request, "param", {}),
    }
    async with script_fleet(tmp_path, REPLICA, ("a", "b", "c"), slot_cap=4, **settings) as f:
        yield f


async def _post(url: str, path: str, doc: dict[str, object]) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.post(f"{url}{path}", json=doc) as r:
        return r.status, await r.text(), dict(r.headers)


async def test_a_query_of_death_kills_quarantine_after_processes_then_is_refused(
    fleet3: ScriptFleet,
) -> None:
    poison = {"inputs": "poison", "parameters": {"max_new_tokens": 5}}

    # The process died under it alone: not handed to another replica (retries = 2).
    status, text, _ = await _post(fleet3.url, "/generate", poison)
    assert status == 502, text
    assert fleet3.count("died") == 1 and fleet3.count("seen") == 1
    # The resend kills a second process (sent after the first failed: one after the
    # other), which quarantines it (quarantine_after = 2): 422, not retried.
    status, text, headers = await _post(fleet3.url, "/generate", poison)
    assert fleet3.count("died") == 2
    assert status == 422, text
    doc = json.loads(text)
    assert doc["error_type"] == "quarantined"
    assert "not retried" in doc["error"] and "poison" not in doc["error"]
    assert headers["x-should-retry"] == "false"
    seen = fleet3.count("seen")
    assert seen == 2

    # The resend (a user's retry, an SDK's retry) never reaches a replica.
    status, text, _ = await _post(fleet3.url, "/generate", poison)
    assert status == 422, text
    assert json.loads(text)["error_type"] == "quarantined"
    assert "without being sent to a replica" in json.loads(text)["error"]
    assert fleet3.count("seen") == seen and fleet3.count("died") == 2

    # Other prompts are served (by the replica that survived, or a restarted one).
    status, text, _ = await _post(fleet3.url, "/generate", {"inputs": "hello"})
    assert status == 200, text
    seen += 1

    metrics = await fleet3.metrics()
    assert metric_sum(metrics, "neuron_fleet_quarantines_total") == 1
    assert metric_sum(metrics, "neuron_fleet_quarantined_requests") == 1
    assert metric_sum(metrics, "neuron_fleet_rejected_requests_total", reason="quarantined") == 1
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{fleet3.url}/fleet/status", headers=admin) as r,
    ):
        fleet_status = await r.json()
    assert fleet_status["quarantine"]["count"] == 1
    [entry] = fleet_status["quarantine"]["requests"]
    assert entry["route"] == "/generate" and entry["refused"] == 1
    assert len(entry["broke"]) == 2 and 0 < entry["expires_in_s"] <= 600
    assert "poison" not in json.dumps(fleet_status)
    assert f"quarantined request {entry['digest']}" in format_table(fleet_status)

    # Once the quarantine expires the request is admitted again (and kills again).
    quarantine = fleet3.server.balancer.quarantine
    quarantine.clock = lambda: time.monotonic() + 601
    await wait_until(
        lambda: (
            sum(r.restarts for r in fleet3.replicas) == 2
            and all(r.routable for r in fleet3.replicas)
        ),
        what="the two replicas that died are back",
    )
    status, text, _ = await _post(fleet3.url, "/generate", poison)
    assert fleet3.count("seen") == seen + 1 and fleet3.count("died") == 3
    assert status == 502 and len(quarantine) == 0


@pytest.mark.parametrize("fleet3", [{"quarantine_after": 0}], indirect=True)
async def test_quarantine_after_zero_turns_it_off(fleet3: ScriptFleet) -> None:
    for sent in (1, 2):
        status, _, _ = await _post(fleet3.url, "/generate", {"inputs": "poison"})
        assert status == 502 and fleet3.count("died") == sent  # one process per send
    assert len(fleet3.server.balancer.quarantine) == 0


async def test_a_death_mid_stream_counts(fleet3: ScriptFleet) -> None:
    poison = {"inputs": "poison-stream", "parameters": {"max_new_tokens": 5}}
    for deaths in (1, 2):
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{fleet3.url}/generate_stream", json=poison) as r,
        ):
            assert r.status == 200  # committed with the first token: no retry
            body = await r.text()
        assert '"error_type":"incomplete_generation_stream"' in body
        assert fleet3.count("died") == deaths
    seen = fleet3.count("seen")
    assert seen == 2
    # Counted once the second process is seen to exit (balancer/fate.py).
    await wait_until(lambda: len(fleet3.server.balancer.quarantine) == 1, what="quarantine")

    status, text, _ = await _post(fleet3.url, "/generate_stream", poison)
    assert status == 422 and json.loads(text)["error_type"] == "quarantined"
    assert fleet3.count("seen") == seen


@pytest.mark.parametrize("fleet3", [{"response_timeout_s": 0.3}], indirect=True)
async def test_a_slow_replica_timing_out_does_not_count(fleet3: ScriptFleet) -> None:
    slow = {"inputs": "slow"}
    for sent in (3, 6):
        status, text, _ = await _post(fleet3.url, "/generate", slow)
        assert status == 504, text
        assert fleet3.count("seen") == sent  # the resend reached the replicas again
    assert len(fleet3.server.balancer.quarantine) == 0
    assert fleet3.count("died") == 0


async def test_a_client_leaving_mid_stream_does_not_count(fleet3: ScriptFleet) -> None:
    """The balancer closes the replica's connection when the client leaves: not a break."""
    slow = {"inputs": "slow", "stream": True}
    for _ in range(2):
        async with aiohttp.ClientSession() as http:
            call = asyncio.ensure_future(http.post(f"{fleet3.url}/generate", json=slow))
            before = fleet3.count("seen")
            await wait_until(lambda b=before: fleet3.count("seen") > b, what="request arrived")
            call.cancel()
        await wait_until(lambda: fleet3.server.balancer.relay.active == 0, what="relay idle")
    assert len(fleet3.server.balancer.quarantine) == 0
    assert fleet3.server.balancer.quarantine._suspects == {}


@pytest.mark.parametrize("fleet3", [{"retries": 0}], indirect=True)
async def test_unrelated_crashes_do_not_add_up_against_a_request_served_between_them(
    fleet3: ScriptFleet,
) -> None:
    """A popular request (a benchmark's, a canary's) is in flight whenever a replica
    crashes; served in full between two crashes, it is no query of death."""
    flaky = {"inputs": "flaky"}
    for crash in (1, 2):
        await wait_until(
            lambda c=crash: (
                sum(r.restarts for r in fleet3.replicas) == c - 1
                and all(r.routable for r in fleet3.replicas)
            ),
            what="every replica up",
        )
        (fleet3.folder / "kill").touch()
        status, text, _ = await _post(fleet3.url, "/generate", flaky)
        assert status == 502, text  # broke under it: retries = 0
        assert fleet3.count("died") == crash
        status, text, _ = await _post(fleet3.url, "/generate", flaky)
        assert status == 200, text  # served: the suspicion is cleared
    assert len(fleet3.server.balancer.quarantine) == 0


async def test_identical_requests_in_flight_together_are_not_quarantined_by_their_breaks(
    fleet3: ScriptFleet,
) -> None:
    """Two identical queries of death in flight together (a client's resend while the
    first still runs), one on a, one on b: each kills its process alone, so neither is
    retried; but the second was sent before the first failed, so their breaks were
    together (as under a host-level event) and count once. The next send, sent after
    them, kills a third process and quarantines it."""
    await fleet3.server.fleet.drain("c", force=True)  # type: ignore[union-attr]
    for r in fleet3.replicas:
        r.slot_cap = 1
    poison = {"inputs": "poison-late"}
    async with aiohttp.ClientSession() as http:

        async def call() -> tuple[int, str]:
            async with http.post(f"{fleet3.url}/generate", json=poison) as r:
                return r.status, await r.text()

        results = await asyncio.gather(call(), call())  # one on a, one on b
    assert [status for status, _ in results] == [502, 502], results
    assert fleet3.count("died") == 2 and fleet3.count("seen") == 2
    await wait_until(lambda: fleet3.quarantine._suspects != {}, what="the breaks recorded")
    [entry] = fleet3.quarantine._suspects.values()
    assert len(entry.broke) == 1 and entry.together == 1
    await fleet3.server.fleet.undrain("c")  # type: ignore[union-attr]
    await wait_until(lambda: fleet3.replicas[2].routable, what="c back")
    status, text, _ = await _post(fleet3.url, "/generate", poison)
    assert status == 422, text
    assert fleet3.count("died") == 3


@pytest.mark.parametrize("fleet3", [{"retries": 0}], indirect=True)
async def test_one_process_back_in_rotation_is_still_one_process(fleet3: ScriptFleet) -> None:
    """A live process that cut a request twice, with a drain and undrain (or a health flap:
    a new incarnation) between, is one process, not two: not a quarantine."""
    fleet = fleet3.server.fleet
    for name in ("b", "c"):
        await fleet.drain(name, force=True)  # type: ignore[union-attr]
    a = fleet3.replicas[0]
    for cut in (1, 2):
        status, text, _ = await _post(fleet3.url, "/generate", {"inputs": "cut"})
        assert status == 502, text
        await fleet.drain("a", force=True)  # type: ignore[union-attr]
        await fleet.undrain("a")  # type: ignore[union-attr]
        assert a.routable and a.incarnation == cut + 1
    assert fleet3.count("died") == 0 and len(fleet3.server.balancer.quarantine) == 0


async def test_replicas_the_supervisor_stops_on_purpose_do_not_count(fleet3: ScriptFleet) -> None:
    """A stop past the drain timeout (or a second Ctrl-C, an unhealthy-restart) ends the
    processes under a popular request in flight on each: not the request's doing, so it
    is not quarantined and its clients are not told never to resend it."""
    popular = {"inputs": "slow"}
    async with aiohttp.ClientSession() as http:

        async def call() -> int:
            async with http.post(f"{fleet3.url}/generate", json=popular) as r:
                await r.read()
                return r.status

        calls = [asyncio.ensure_future(call()) for _ in range(3)]
        await wait_until(lambda: fleet3.count("seen") == 3, what="one on each replica")
        assert all(r.inflight == 1 for r in fleet3.replicas)
        await fleet3.server.fleet.stop(grace=1)  # type: ignore[union-attr]
        statuses = await asyncio.gather(*calls)
    assert 422 not in statuses, statuses
    quarantine = fleet3.server.balancer.quarantine
    assert len(quarantine) == 0 and quarantine._suspects == {}


# --------------------------------------------------------------------------- bookkeeping


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_distinct_processes_count_not_repeated_breaks_of_one() -> None:
    q = Quarantine(after=2, ttl_s=60)
    assert q.record("d", "/generate", "a", "a/10/1")[0] is Verdict.SUSPECT
    assert q.record("d", "/generate", "a", "a/10/1")[0] is Verdict.SUSPECT  # same process
    assert not q.holding
    verdict, entry = q.record("d", "/generate", "a", "a/11/2")  # a's restart: another one
    assert verdict is Verdict.QUARANTINED and entry.replicas == ["a"]
    assert q.holding and q.held("d") is entry and entry.refused == 1
    assert q.record("d", "/generate", "b", "b/12/1")[0] is Verdict.ALREADY
    assert q.quarantined_total == 1 and q.held("other") is None


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    q = Quarantine(after=2, ttl_s=60, clock=clock)
    q.record("old", "/generate", "a", "a/1/1")
    clock.now += 61  # a break long ago is forgotten: this one is a first again
    assert q.record("old", "/generate", "b", "b/2/1")[0] is Verdict.SUSPECT
    assert q.record("old", "/generate", "c", "c/3/1")[0] is Verdict.QUARANTINED
    clock.now += 59
    assert q.held("old") is not None and len(q) == 1
    clock.now += 1
    assert q.held("old") is None and len(q) == 0 and not q.holding


def test_memory_is_bounded_oldest_first() -> None:
    q = Quarantine(after=1, ttl_s=60, max_entries=3)
    for i in range(5):
        q.record(f"d{i}", "/generate", "a", f"a/{i}/1")
    assert [e.digest for e in q.entries()] == ["d2", "d3", "d4"]
    q2 = Quarantine(after=2, ttl_s=60, max_entries=3)
    for i in range(5):
        q2.record(f"d{i}", "/generate", "a", "a/1/1")
    assert list(q2._suspects) == ["d2", "d3", "d4"]


def test_a_request_served_in_full_clears_its_suspicion_and_quarantine() -> None:
    q = Quarantine(after=2, ttl_s=60)
    q.record("d", "/generate", "a", "a/1/1")
    assert q.suspecting and not q.holding
    q.passed("d")
    assert not q.suspecting
    assert q.record("d", "/generate", "b", "b/2/1")[0] is Verdict.SUSPECT  # a first again
    assert q.record("d", "/generate", "c", "c/3/1")[0] is Verdict.QUARANTINED
    q.passed("d")  # one sent before the quarantine began, served in full
    assert q.held("d") is None and not q.suspecting


def test_off_when_after_is_zero() -> None:
    q = Quarantine(after=0, ttl_s=60)
    for process in ("a/1/1", "b/2/1", "c/3/1"):
        assert q.record("d", "/generate", "a", process)[0] is Verdict.SUSPECT
    assert not q.holding and len(q) == 0


def test_the_digest_covers_route_and_body_bytes() -> None:
    base = request_digest("POST", "/generate", b'{"inputs":"x"}')
    assert base == request_digest("POST", "/generate", b'{"inputs":"x"}')
    assert base != request_digest("POST", "/generate_stream", b'{"inputs":"x"}')
    assert base != request_digest("POST", "/generate", b'{"inputs":"y"}')
    assert "x" not in base


def test_a_suspicion_is_forgotten_after_the_ttl_so_served_requests_stop_paying_a_digest() -> None:
    """``suspecting`` gates a digest of every response served in full (relay.forward): one
    break must not make every request pay for a digest of its body for ever."""
    clock = Clock()
    q = Quarantine(after=2, ttl_s=60, clock=clock)
    q.record("d", "/generate", "a", "a/1/1")
    assert q.suspecting
    clock.now += 61
    assert not q.suspecting and q._suspects == {}
