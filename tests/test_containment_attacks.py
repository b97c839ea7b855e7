"""Attacks on containment (issue 18) in forms its first tests did not take: a poison whose
error answer is slow (so the one more attempt is still on its way when the first exit is
seen), exits after more or less than the confirmation window, sends at once, the OpenAI SDK's
own retries, a frozen replica (SIGSTOP) under unrelated traffic, a replica that fails every
request fast but stays healthy.

Each replica program fails by a word in the request body, like tests/test_containment.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import wait_until
from tests.script_fleet import ScriptFleet, replica_script, script_fleet
from tests.test_containment import _all_up

pytestmark = pytest.mark.timeout(60)

REPLICA = replica_script(
    """
    # "slow-424": 424 after 0.8 s, exit 50-200 ms later; "late-exit-N": 424, exit N ms later;
    # "chat-500": an OpenAI-shaped 500, then exit (vLLM's engine death);
    # "fail-fast" on replica "a" only: 500 at once, and a lives on (misconfigured).
    import random, re

    ERROR = {"error": "Request failed during generation: Server error: shard died",
             "error_type": "generation"}

    def die_in(seconds):
        time.sleep(seconds)
        (folder / f"died-{name}-{os.getpid()}").touch()
        os._exit(1)

    class Handler(Replica):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            (folder / f"seen-{name}-{uuid.uuid4().hex}").touch()
            if b"slow-424" in body:
                time.sleep(0.8)
                self.send_json(424, json.dumps(ERROR).encode())
                self.wfile.flush()
                die_in(random.uniform(0.05, 0.2))
            if b"first-exits-last" in body:  # the first process to get it dies last
                try:
                    (folder / "first-taken").touch(exist_ok=False)
                    wait = 0.4
                except FileExistsError:
                    wait = 0.05
                self.send_json(424, json.dumps(ERROR).encode())
                self.wfile.flush()
                die_in(wait)
            if m := re.search(rb"late-exit-(\\d+)", body):
                self.send_json(424, json.dumps(ERROR).encode())
                self.wfile.flush()
                die_in(int(m.group(1)) / 1000 * random.uniform(0.9, 1.1))
            if b"chat-500" in body:
                error = {"error": {"message": "EngineCore encountered an issue",
                                   "type": "InternalServerError", "code": 500}}
                self.send_json(500, json.dumps(error).encode())
                self.wfile.flush()
                die_in(random.uniform(0.05, 0.2))
            if m := re.search(rb"slow-first-(\\d+)", body):  # healthy, slow to start
                time.sleep(int(m.group(1)) / 1000)
                event = b'data:{"token":{"id":1,"text":"a","logprob":0,"special":true},'
                event += b'"generated_text":"a","details":null}\\n\\n'
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(event)))
                self.end_headers()
                self.wfile.write(event)
                return
            if b"harmless-424" in body:  # a failure the process lives through
                self.send_json(424, json.dumps(ERROR).encode())
                return
            if name == "a" and b"fail-fast" in body:
                self.send_json(500, b'{"error":"misconfigured","error_type":"generation"}')
                return
            self.send_json(200, b'{"generated_text":"ok"}')

    """
)

SETTINGS: dict[str, object] = {
    "retries": 2,
    "eject_after_failures": 100,
    "first_byte_timeout_s": 1.5,
    "health_timeout_s": 0.5,
    "confirm_window_s": 0.5,
}


@pytest.fixture
async def fleet3(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[ScriptFleet]:
    settings = {**SETTINGS, **getattr(request, "param", {})}
    async with script_fleet(tmp_path, REPLICA, ("a", "b", "c"), slot_cap=4, **settings) as f:
        yield f


async def test_resends_while_the_one_more_attempt_is_still_on_its_way_kill_no_third(
    fleet3: ScriptFleet,
) -> None:
    """The first send's process exits while the one more attempt (a resend) is still
    waiting for its slow 424: the other resend must not go out then (it did: 3 deaths)."""
    doc = {"inputs": "slow-424"}
    fates = fleet3.server.balancer.relay.policy.fates
    async with aiohttp.ClientSession() as http:

        async def send() -> int:
            async with http.post(f"{fleet3.url}/generate", json=doc) as r:
                await r.read()
                return r.status

        first = asyncio.ensure_future(send())
        await wait_until(lambda: fates.watching, timeout=5, what="the first 424 under watch")
        resends = await asyncio.gather(send(), send())
        assert await first == 424
    await asyncio.sleep(0.5)
    assert fleet3.count("died") == 2, (resends, fleet3.count("seen"))
    assert sorted(resends) in ([422, 424], [422, 422]), resends


async def test_when_the_one_more_dies_before_the_first_both_count(
    fleet3: ScriptFleet,
) -> None:
    """The resend's process exits before the first send's: the first send's break was in
    flight before the counted one failed, and did not count (1 break: a third send killed
    a third replica). Each process failed it in words, alone: both count."""
    doc = {"inputs": "first-exits-last"}
    fates = fleet3.server.balancer.relay.policy.fates
    first = asyncio.ensure_future(fleet3.post("/generate", doc))
    await wait_until(lambda: fates.watching, timeout=5, what="the first 424 under watch")
    resend = await fleet3.post("/generate", doc)
    await first
    await wait_until(lambda: fleet3.count("died") == 2, what="both exits")
    await asyncio.sleep(0.3)
    await _all_up(fleet3)
    status, _ = await fleet3.post("/generate", doc)
    assert status == 422, (resend[0], status)
    assert fleet3.count("died") == 2


@pytest.mark.parametrize("exit_ms", [300, 800])
async def test_an_exit_later_than_tgis_within_the_window_still_counts(
    tmp_path: Path, exit_ms: int
) -> None:
    """Exits 300 and 800 ms after the 424, with the default 1 s confirmation window."""
    settings = {**SETTINGS, "confirm_window_s": 1.0}
    async with script_fleet(tmp_path, REPLICA, ("a", "b", "c"), slot_cap=4, **settings) as f:
        statuses = []
        for _ in range(3):
            await _all_up(f)
            status, _ = await f.post("/generate", {"inputs": f"late-exit-{exit_ms}"})
            statuses.append(status)
        await asyncio.sleep(1.0)
        assert f.count("died") <= 2, statuses
        assert statuses[-1] == 422, statuses


async def test_three_sends_at_once_are_quarantined_by_what_each_replica_said(
    fleet3: ScriptFleet,
) -> None:
    """Three identical sends at once, before anything failed: nothing yet tells them from a
    popular request, so each reaches a replica (3 deaths: a known limit). Each replica
    answered that request alone with a failure, then exited: evidence specific to it, so it
    is quarantined now, although the three were in flight together (it was not: a fourth
    send killed a fourth replica)."""
    doc = {"inputs": "late-exit-100"}
    statuses = await asyncio.gather(*(fleet3.post("/generate", doc) for _ in range(3)))
    await wait_until(lambda: fleet3.count("died") == 3, what="the exits")
    await asyncio.sleep(0.3)
    await _all_up(fleet3)
    status, _ = await fleet3.post("/generate", doc)
    assert status == 422, (statuses, status, fleet3.count("died"))
    assert fleet3.count("died") == 3


async def test_the_openai_sdks_own_retries_kill_at_most_two(fleet3: ScriptFleet) -> None:
    """vLLM-shaped: 500 then exit. The SDK resends 5xx twice by itself (max_retries=2); the
    balancer's 422 stops it."""
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=f"{fleet3.url}/v1", api_key="x", max_retries=2)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "chat-500"}]
        )
    await asyncio.sleep(0.5)
    assert fleet3.count("died") <= 2, caught.value.status_code
    assert caught.value.status_code == 422
    await client.close()


async def test_a_frozen_replica_costs_unrelated_requests_no_error(fleet3: ScriptFleet) -> None:
    """SIGSTOP one replica (a host stall, a debugger) under unrelated traffic: requests on
    it time out, none is to blame; each is retried and served, and the frozen replica is
    taken out of rotation."""
    frozen = fleet3.replicas[0]
    assert frozen.pid is not None
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        async with aiohttp.ClientSession() as http:

            async def send(i: int) -> tuple[int, float]:
                began = time.monotonic()
                doc = {"inputs": f"hello {i}"}
                async with http.post(f"{fleet3.url}/generate", json=doc) as r:
                    await r.read()
                    return r.status, time.monotonic() - began

            first = await asyncio.gather(*(send(i) for i in range(9)))
            later = await asyncio.gather(*(send(i) for i in range(9, 18)))
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert [s for s, _ in first + later] == [200] * 18, (first, later)
    assert len(fleet3.quarantine) == 0
    limit = SETTINGS["first_byte_timeout_s"] + 2 * SETTINGS["confirm_window_s"] + 1.0  # type: ignore[operator]
    assert max(t for _, t in first) < limit, first
    assert max(t for _, t in later) < 1.0, later  # the frozen one is out of rotation


@pytest.mark.parametrize("fleet3", [{"eject_after_failures": 3}], indirect=True)
async def test_a_replica_failing_fast_but_healthy_is_avoided(fleet3: ScriptFleet) -> None:
    """Replica a answers 500 to everything at once and stays healthy. A request on it waits
    one confirmation window (it might be the request's fault), then is served elsewhere;
    after eject_after_failures of them a is ejected; nobody is quarantined."""
    async with aiohttp.ClientSession() as http:

        async def send(i: int) -> tuple[int, float]:
            began = time.monotonic()
            async with http.post(f"{fleet3.url}/generate", json={"inputs": f"fail-fast {i}"}) as r:
                await r.read()
                return r.status, time.monotonic() - began

        results = []
        for _ in range(5):  # bursts of 3: least-outstanding puts one on each replica
            results += await asyncio.gather(*(send(i) for i in range(3)))
    assert [s for s, _ in results] == [200] * 15, results
    assert len(fleet3.quarantine) == 0
    window = SETTINGS["confirm_window_s"]
    slow = [round(t, 2) for _, t in results if t > window]  # type: ignore[operator]
    # eject_after_failures, plus one that landed while the third was being retried (an
    # answered failure counts once the request succeeded elsewhere).
    assert len(slow) <= 4, slow


async def test_an_exit_after_the_confirmation_window_still_counts(fleet3: ScriptFleet) -> None:
    """The process answers 424 and exits 1.5 s later, after the 0.5 s window: it looked
    alive, so the first send goes on to every replica (a known limit: a window shorter
    than the engine's exit delay); the late exits must still count, or every send kills
    every replica for ever (it did: 9 deaths over 3 sends, no quarantine)."""
    doc = {"inputs": "late-exit-1500"}
    statuses = []
    for _ in range(3):
        await _all_up(fleet3)
        status, _ = await fleet3.post("/generate", doc)
        statuses.append(status)
        await wait_until(lambda: fleet3.count("died") >= 3, what="the late exits")
        await asyncio.sleep(0.3)
    assert fleet3.count("died") == 3, statuses
    assert statuses == [424, 422, 422], statuses


@pytest.mark.parametrize("different", [True, False], ids=["9-different", "3-identical"])
async def test_every_replica_killed_under_streams_quarantines_nothing(
    tmp_path: Path, different: bool
) -> None:
    """A host-level event (every replica SIGKILLed together) under many different streams,
    or one identical stream per replica (each alone on its process: no crowd to hide in).
    Nobody's fault: 0 quarantined, and the same requests are served once the fleet is back."""
    from tests.test_containment import REPLICA as STREAMER
    from tests.test_containment import SETTINGS as STREAMER_SETTINGS

    n = 9 if different else 3
    docs = [
        {"inputs": f"popular {i if different else 0}", "parameters": {"max_new_tokens": 100}}
        for i in range(n)
    ]
    async with (
        script_fleet(tmp_path, STREAMER, ("a", "b", "c"), slot_cap=4, **STREAMER_SETTINGS) as f,
        aiohttp.ClientSession() as http,
    ):

        async def stream(doc: dict[str, object]) -> str:
            async with http.post(f"{f.url}/generate_stream", json=doc) as r:
                return await r.text()

        calls = [asyncio.ensure_future(stream(d)) for d in docs]
        await wait_until(lambda: f.count("seen") == n, what="all in flight")
        assert all(r.inflight for r in f.replicas)  # every replica has one
        await asyncio.sleep(0.2)
        for r in f.replicas:
            assert r.pid is not None
            os.kill(r.pid, signal.SIGKILL)
        bodies = await asyncio.gather(*calls)
        assert all("incomplete_generation_stream" in b for b in bodies)
        await _all_up(f)
        await asyncio.sleep(1.0)
        assert len(f.quarantine) == 0
        served = await asyncio.gather(*(f.post("/generate", doc) for doc in docs[:3]))
        assert [status for status, _ in served] == [200] * 3, served


async def test_a_slow_but_healthy_replica_is_waited_for_or_timed_out_blamelessly(
    fleet3: ScriptFleet,
) -> None:
    """First byte just under the 1.5 s first-byte timeout: served. Just over, on every
    replica: 504 after trying each (each found alive), nobody quarantined or taken out."""
    status, text = await fleet3.post("/generate_stream", {"inputs": "slow-first-1200"})
    assert status == 200 and "generated_text" in text, text
    began = time.monotonic()
    status, text = await fleet3.post("/generate_stream", {"inputs": "slow-first-1800"})
    took = time.monotonic() - began
    assert status == 504, text
    assert len(fleet3.quarantine) == 0
    assert all(r.routable for r in fleet3.replicas)
    assert fleet3.count("seen") == 4, took
    print(f"slow-first-1800: 504 after {took:.1f} s")


async def test_a_process_that_survived_another_failure_does_not_pass_a_poison_on(
    fleet3: ScriptFleet,
) -> None:
    """Each replica first lives through an unrelated failure (424, no exit: found alive).
    Then a poison (424, exit 50-200 ms later): its failure joined the old "survived"
    verdict and was retried at once, before the exit (3 deaths on the first send)."""
    status, _ = await fleet3.post("/generate", {"inputs": "harmless-424"})
    assert status == 424
    assert fleet3.count("seen") == 3  # it went round: every process was found alive
    await asyncio.sleep(1.0)  # every verdict in
    statuses = []
    for _ in range(3):
        await _all_up(fleet3)
        status, _ = await fleet3.post("/generate", {"inputs": "late-exit-100"})
        statuses.append(status)
    await asyncio.sleep(0.5)
    assert fleet3.count("died") <= 2, statuses
    assert statuses[-1] == 422, statuses
    assert len(fleet3.quarantine) == 1  # the poison; not the request that harmed nobody


async def test_a_hanging_request_sent_three_times_wedges_at_most_two(tmp_path: Path) -> None:
    """The request that hangs its replica (``/health`` too), sent 3 times one after the
    other: each send wedges one replica at most, the third is refused."""
    from tests.test_containment import REPLICA as HANGER
    from tests.test_containment import SETTINGS as HANGER_SETTINGS

    async with script_fleet(tmp_path, HANGER, ("a", "b", "c"), slot_cap=4, **HANGER_SETTINGS) as f:
        statuses = []
        for _ in range(3):
            status, _ = await f.post("/generate", {"inputs": "hang", "stream": True})
            statuses.append(status)
        assert f.count("hung") <= 2, statuses
        assert statuses[-1] == 422, statuses
        status, _ = await f.post("/generate", {"inputs": "unrelated"})
        assert status == 200
