"""Replica faults under streaming load: the supervisor and the balancer together.

Real simulated TGI replicas (child processes started by ``supervisor.fleet.Fleet``, or by a
``neuron-fleet serve`` subprocess) behind the real balancer, with clients streaming all
along. Whatever a replica does (killed, hung, failing generations), every request either
succeeds or, if it had already received tokens from the replica that failed, ends with an
explicit error event; the replica comes back by itself; the metrics tell the story.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from balancer.config import BalancerConfig
from balancer.server import BalancerServer
from balancer.upstream import Registry, Replica
from supervisor.fleet import Fleet, FleetSettings
from supervisor.launchers import LaunchSpec
from supervisor.procutil import pid_alive
from supervisor.replica import LifecycleSettings
from tests.conftest import free_port, metric_value, start_app, wait_until
from tests.test_hardening_input import metric_sum
from tests.test_serve import admin_auth
from tests.upstreams import Script

pytestmark = pytest.mark.timeout(90)

LIFECYCLE = LifecycleSettings(
    startup_timeout_s=20,
    stop_grace_s=0.5,
    health_poll_interval_s=0.05,
    health_timeout_s=0.5,
    restart_backoff_initial_s=0.05,
    restart_backoff_max_s=0.2,
    crash_loop_max_exits=5,
    crash_loop_window_s=60,
    unhealthy_restart_after_s=0.5,
)


# --------------------------------------------------------------------------- load


@dataclass
class Load:
    """Clients streaming chat completions in a loop, each outcome classified:

    ok: complete, no error; error_event: HTTP 200 ended by an explicit error event (+[DONE]);
    refused: a clean 503 + Retry-After or a refused connection (only expected on shutdown);
    anything else is a failure, kept with its detail.
    """

    url: str
    max_tokens: int = 40
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    refuse_ok: bool = False
    """A 503 or a refused connection ends that client quietly (graceful shutdown)."""
    killed: bool = False
    """The service is being killed: a response cut mid-way is expected too."""

    @property
    def done(self) -> int:
        return sum(self.outcomes.values())

    async def client(self, session: aiohttp.ClientSession, limit: int) -> None:
        body = {
            "model": "tgi",
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": True,
            "max_tokens": self.max_tokens,
        }
        for _ in range(limit):
            if self.stop.is_set():
                return
            try:
                async with session.post(f"{self.url}/v1/chat/completions", json=body) as resp:
                    text = await resp.text()
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
            except aiohttp.ClientPayloadError as exc:
                if self.killed:
                    self.outcomes["cut"] += 1
                    return
                self.outcomes["failed"] += 1
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            except aiohttp.ClientConnectionError as exc:
                if self.refuse_ok or self.killed:
                    self.outcomes["refused"] += 1
                    return
                self.outcomes["failed"] += 1
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            self.outcomes[self.classify(status, retry_after, text)] += 1
            if self.refuse_ok and status == 503:
                return

    def classify(self, status: int, retry_after: str | None, text: str) -> str:
        if status == 503 and self.refuse_ok and retry_after:
            return "refused"
        events = [e for e in text.split("\n\n") if e.strip()]
        if status == 200 and events and events[-1] == "data:[DONE]":
            errors = [e for e in events if e.startswith('data:{"error"')]
            if not errors:
                return "ok"
            if len(errors) == 1 and events[-2] == errors[0]:
                return "error_event"  # explicit, last, then [DONE]: never a silent cut
        self.failures.append(f"{status} {text[-300:]!r}")
        return "failed"

    @contextlib.asynccontextmanager
    async def running(self, clients: int, limit: int = 400) -> AsyncIterator[Load]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = [asyncio.create_task(self.client(session, limit)) for _ in range(clients)]
            try:
                yield self
            finally:
                self.stop.set()
                async with asyncio.timeout(30):
                    await asyncio.gather(*tasks)

    async def wait_for(self, count: int, timeout: float = 20) -> None:
        await wait_until(lambda: self.done >= count, timeout=timeout, what=f"{count} outcomes")


# --------------------------------------------------------------------------- fleet


@dataclass
class RunningFleet:
    server: BalancerServer
    fleet: Fleet
    registry: Registry
    flips: list[tuple[str, bool, int]] = field(default_factory=list)
    """(replica, healthy, consecutive_failures) at each health change, in order."""

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as http, http.get(f"{self.server.url}/metrics") as r:
            return await r.text()


@contextlib.asynccontextmanager
async def running_fleet(
    n: int = 3,
    *,
    speed: float = 10.0,
    batch: int = 2,
    slot_cap: int = 4,
    sim_args: dict[int, tuple[str, ...]] | None = None,
    lifecycle: LifecycleSettings = LIFECYCLE,
    **balancer: object,
) -> AsyncIterator[RunningFleet]:
    """``n`` simulated replicas (child processes) supervised by a Fleet, behind a balancer.

    The simulator's batch is smaller than the balancer's slot cap on purpose: half of a
    replica's requests wait inside it with no byte sent yet, as behind a busy Neuron batch.
    """
    replicas, specs = [], {}
    for i in range(n):
        port = free_port()
        name = f"replica-{i}"
        replicas.append(
            Replica(name=name, url=f"http://127.0.0.1:{port}", port=port, slot_cap=slot_cap)
        )
        argv = (sys.executable, "-m", "supervisor.simulator", "--port", str(port))
        argv += ("--speed", str(speed), "--batch-size", str(batch), "--seed", str(i))
        argv += ("--log-level", "WARNING", *(sim_args or {}).get(i, ()))
        specs[name] = LaunchSpec(argv=argv)
    registry = Registry(replicas)
    fleet = Fleet(
        registry, specs, FleetSettings(min_ready=n, drain_timeout_s=10, lifecycle=lifecycle)
    )
    config = BalancerConfig(
        host="127.0.0.1",
        port=0,
        **{
            "health_interval_s": 0.1,
            "health_timeout_s": 0.5,
            "health_fall": 2,
            "queue_timeout_s": 30.0,
            "first_byte_timeout_s": 5.0,
            "idle_timeout_s": 5.0,
            **balancer,
        },  # type: ignore[arg-type]
    )
    server = BalancerServer(config, registry, fleet)
    running = RunningFleet(server, fleet, registry)
    last = {r.name: r.healthy for r in replicas}

    def watch() -> None:
        for r in registry:
            if r.healthy != last[r.name]:
                last[r.name] = r.healthy
                running.flips.append((r.name, r.healthy, r.consecutive_failures))

    registry.subscribe(watch)
    await server.start()
    await fleet.start()
    try:
        async with asyncio.timeout(20):
            assert await fleet.wait_ready()
        yield running
    finally:
        for r in registry:  # a replica a test stopped must be killable
            if r.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, signal.SIGCONT)
        await server.begin_shutdown()
        await fleet.stop(grace=1)
        await server.stop()


# --------------------------------------------------------------------------- 1. SIGKILL


async def test_replica_sigkilled_under_load() -> None:
    async with running_fleet() as f:
        victim = f.registry.get("replica-1")
        assert victim is not None
        load = Load(f.server.url, max_tokens=60)
        async with load.running(clients=12):
            await load.wait_for(15)
            await wait_until(lambda: victim.inflight >= 3, what="streams on the victim")
            pid = victim.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # a child this test's fleet started
            await wait_until(
                lambda: victim.restarts == 1 and victim.routable and victim.pid != pid,
                timeout=20,
                what="victim restarted and back in rotation",
            )
            killed_exit = victim.last_exit
            served_before = metric_value(
                await f.metrics(),
                "neuron_fleet_upstream_responses_total",
                replica="replica-1",
                code="200",
            )
            count = load.done
            await load.wait_for(count + 30)
        text = await f.metrics()
    served_after = metric_value(
        text, "neuron_fleet_upstream_responses_total", replica="replica-1", code="200"
    )
    cut = metric_sum(text, "neuron_fleet_stream_errors_total", replica="replica-1")
    retries = metric_sum(text, "neuron_fleet_retries_total")
    print(f"\nSIGKILL: {dict(load.outcomes)}, retries {retries:g}, streams cut {cut:g}")
    assert load.outcomes["failed"] == 0, load.failures[:3]
    assert load.outcomes["error_event"] >= 1  # streams that had tokens from the victim
    assert cut == load.outcomes["error_event"]  # every cut stream counted, none elsewhere
    assert metric_sum(text, "neuron_fleet_stream_errors_total") == cut
    assert retries >= 1  # requests waiting inside the victim went elsewhere
    assert metric_value(text, "neuron_fleet_replica_restarts_total", replica="replica-1") == 1
    assert served_after > served_before  # re-admitted: it serves again
    assert not pid_alive(pid) and killed_exit == "signal 9 (SIGKILL)"


# --------------------------------------------------------------------------- 2. hangs


async def test_replica_hung_under_load_is_timed_out_ejected_and_restarted() -> None:
    """SIGSTOP: the replica accepts connections (the kernel does) but sends nothing more,
    neither tokens nor /health answers. Streams on it end on the idle timeout with an error
    event, requests waiting for its first byte go elsewhere on the first-byte timeout, the
    health checks eject it, and the supervisor restarts it (unhealthy_restart_after_s),
    escalating to SIGKILL since a stopped process cannot act on SIGTERM."""
    async with running_fleet(first_byte_timeout_s=1.5, idle_timeout_s=0.5) as f:
        victim = f.registry.get("replica-2")
        assert victim is not None
        load = Load(f.server.url, max_tokens=60)
        async with load.running(clients=9):
            await load.wait_for(10)
            await wait_until(lambda: victim.inflight >= 3, what="streams on the victim")
            pid = victim.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                await wait_until(
                    lambda: victim.restarts == 1 and victim.routable and victim.pid != pid,
                    timeout=30,
                    what="hung replica restarted",
                )
                hung_exit = victim.last_exit
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            count = load.done
            await load.wait_for(count + 20)
        text = await f.metrics()
    cut = metric_sum(text, "neuron_fleet_stream_errors_total", replica="replica-2")
    idle = metric_value(
        text, "neuron_fleet_stream_errors_total", replica="replica-2", reason="idle_timeout"
    )
    fbt = metric_value(text, "neuron_fleet_retries_total", reason="first_byte_timeout")
    print(f"\nSIGSTOP: {dict(load.outcomes)}, first-byte retries {fbt:g}, idle cuts {idle:g}")
    assert load.outcomes["failed"] == 0, load.failures[:3]
    assert load.outcomes["error_event"] >= 1 and idle == cut == load.outcomes["error_event"]
    assert fbt >= 1
    assert ("replica-2", False) in [(name, ok) for name, ok, _ in f.flips]  # ejected
    assert hung_exit == "signal 9 (SIGKILL)"
    assert metric_value(text, "neuron_fleet_replica_restarts_total", replica="replica-2") == 1


async def test_first_byte_timeout_cancels_the_request_on_the_slow_replica(
    scripted, balancer, http
) -> None:
    """Headers sent, then silence: the request is retried elsewhere *and* the connection to
    the silent replica is closed at once, so it stops working on a request nobody will
    read (found by this suite: it stayed open until garbage collection)."""
    stuck, stuck_url = await scripted(Script(tokens=5, hang_after_tokens=0))
    _good, good_url = await scripted(Script(tokens=3))
    server = await balancer([stuck_url, good_url], first_byte_timeout_s=0.3)
    gen = {"inputs": "x", "parameters": {"max_new_tokens": 3}}
    while not stuck.seen.requests:
        async with http.post(f"{server.url}/generate_stream", json=gen) as resp:
            assert resp.status == 200
            assert (await resp.read()).count(b"\n\n") == 3
    await wait_until(lambda: stuck.seen.cancelled_streams == 1, what="stuck cancelled")
    assert stuck.seen.active_streams == 0


async def test_no_replica_left_to_retry_answers_at_once(scripted, balancer, http) -> None:
    """A retryable failure when every replica was tried answers with the last error now
    (found by this suite: it waited queue_timeout_s for a slot it had excluded itself)."""
    _, url = await scripted(Script(status=503))
    server = await balancer([url], queue_timeout_s=30.0, eject_after_failures=100)
    started = time.monotonic()
    async with http.post(f"{server.url}/generate", json={"inputs": "x"}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "scripted 503"  # the replica's own answer
    assert time.monotonic() - started < 10  # not queue_timeout_s (30 s)


async def test_non_streamed_body_cut_mid_way_resets_the_client(balancer, http) -> None:
    """A replica that dies or hangs in the middle of a non-SSE body: the client's connection
    is reset (a truncated JSON must not look complete), counted as a stream error (found
    by this suite: an "unexpected error" traceback, and the client waited forever)."""

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def generate(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Length": "1000"}
        )
        await resp.prepare(request)
        await resp.write(b'{"generated_text": "')
        if request.query.get("mode") == "hang":
            await asyncio.sleep(3600)
        assert request.transport is not None
        request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/generate", generate)
    runner, url = await start_app(app)
    try:
        server = await balancer([url], idle_timeout_s=0.5, eject_after_failures=100)
        for mode in ("drop", "hang"):
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(5):
                    async with http.post(
                        f"{server.url}/generate?mode={mode}", json={"inputs": "x"}
                    ) as resp:
                        await resp.read()
        async with http.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
        assert metric_sum(text, "neuron_fleet_stream_errors_total") == 2
        assert metric_sum(text, "neuron_fleet_requests_total", code="500") == 0
        await wait_until(lambda: server.balancer.inflight == 0, what="slot released")
    finally:
        await runner.cleanup()


def test_default_timeouts_fit_neuron_prefills_and_queueing() -> None:
    """The defaults, checked against the simulator's Neuron timing (calibrated on the blog's
    Llama-3.1-8B, tp 8, batch 8 on inf2): a 16k-token prefill takes ~1.6 s, so a batch of 8
    of them ~12.8 s, during which a replica sends nothing to the requests it admits and
    pauses every running stream."""
    from supervisor.replica import LifecycleSettings as Lifecycle
    from supervisor.simulator.engine import NeuronTiming, SimConfig

    cfg, sim, timing = BalancerConfig(), SimConfig(), NeuronTiming()
    one_prefill = timing.prefill(sim.max_input_tokens)
    full_batch_prefill = sim.batch_size * one_prefill
    assert 1.4 < one_prefill < 1.8 and 11 < full_batch_prefill < 15
    # First byte: the replica's slot is free when the balancer sends (slot cap = batch), but
    # its prefill may be one of 8 long ones admitted together: 300 s is ~23x that, and
    # still bounds a replica that accepted a request and went silent.
    assert cfg.first_byte_timeout_s >= 20 * full_batch_prefill
    # Idle: a stream pauses for every prefill of newcomers; TGI sends an SSE keep-alive
    # comment after 15 s of silence. 120 s is 8x the longer of the two.
    assert cfg.idle_timeout_s >= 8 * max(full_batch_prefill, sim.keepalive_interval)
    assert cfg.first_byte_timeout_s > cfg.idle_timeout_s > cfg.connect_timeout_s
    # Queue: a request may wait for a slot behind a few full batches.
    assert cfg.queue_timeout_s >= 8 * full_batch_prefill
    # A hung replica is ejected by health checks in fall x (interval + timeout) = 30 s,
    # well before the first-byte timeout, and restarted after 300 s unhealthy.
    assert cfg.health_fall * (cfg.health_interval_s + cfg.health_timeout_s) < 60
    assert Lifecycle().unhealthy_restart_after_s == 300


# --------------------------------------------------------------------------- 3. 424s


async def test_generation_errors_are_retried_counted_and_eject_the_replica(
    simulator, balancer
) -> None:
    """A replica whose every prefill fails (TGI answers 424, or a 200 stream whose first
    event is a generation error): each request is retried on another replica, counted, and
    the replica is ejected after eject_after_failures consecutive failures (health checks,
    which it passes, then re-admit it)."""
    from supervisor.simulator.engine import FaultConfig

    bad = await simulator(speed=50.0, faults=FaultConfig(fail_generation_every=1))
    good = [await simulator(speed=50.0, seed=i) for i in (1, 2)]
    server = await balancer(
        [bad, *good], eject_after_failures=3, health_interval_s=0.3, health_rise=2
    )
    r0 = server.registry.get("r0")
    assert r0 is not None
    flips: list[tuple[bool, int]] = []
    server.registry.subscribe(lambda: flips.append((r0.healthy, r0.consecutive_failures)))
    requests = [
        ("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}),
        ("/generate_stream", {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
        ),
    ]
    outcomes: Counter[str] = Counter()

    async def client(session: aiohttp.ClientSession, k: int) -> None:
        for i in range(30):
            path, body = requests[(i + k) % 3]
            async with session.post(f"{server.url}{path}", json=body) as resp:
                text = await resp.text()
            ok = resp.status == 200 and '"error"' not in text
            outcomes["ok" if ok else f"{resp.status} {text[:120]}"] += 1

    def seen(text: str, kind: str) -> float:
        return metric_value(text, "neuron_fleet_upstream_errors_total", replica="r0", kind=kind)

    rounds = 0
    async with aiohttp.ClientSession() as session:
        # Which route meets r0 before it is ejected is up to timing: more rounds (at most 5)
        # until both failure shapes (424 and the 200 stream's error event) were met.
        while rounds < 5:
            rounds += 1
            async with asyncio.timeout(60):
                await asyncio.gather(*(client(session, k) for k in range(6)))
            async with session.get(f"{server.url}/metrics") as resp:
                text = await resp.text()
            if seen(text, "status_424") and seen(text, "generation_event"):
                break
    print(f"\n424s: {dict(outcomes)} in {rounds} rounds, health flips of the bad replica {flips}")
    assert outcomes == Counter(ok=180 * rounds)
    assert metric_value(text, "neuron_fleet_upstream_responses_total", replica="r0", code="424")
    assert metric_value(text, "neuron_fleet_upstream_errors_total", replica="r0", kind="status_424")
    assert metric_value(
        text, "neuron_fleet_upstream_errors_total", replica="r0", kind="generation_event"
    )
    assert metric_value(text, "neuron_fleet_retries_total", reason="status_424") >= 1
    assert metric_value(text, "neuron_fleet_retries_total", reason="generation_event") >= 1
    # Ejected at the threshold, not before; the healthy replicas never were.
    assert (False, 3) in flips
    for name in ("r1", "r2"):
        assert metric_sum(text, "neuron_fleet_upstream_errors_total", replica=name) == 0


async def test_a_batch_failure_mid_stream_ends_running_streams_with_an_error_event(
    simulator, balancer, http
) -> None:
    """TGI fails every running request of a batch when a prefill fails: streams that already
    got tokens cannot be retried, so they end with the replica's explicit error event."""
    from supervisor.simulator.engine import FaultConfig

    url = await simulator(speed=20.0, batch_size=4, faults=FaultConfig(fail_generation_every=4))
    server = await balancer([url], eject_after_failures=100)
    gen = {"inputs": "Hello", "parameters": {"max_new_tokens": 200}}
    streams = []
    for _ in range(3):
        resp = await http.post(f"{server.url}/generate_stream", json=gen)
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")  # running, tokens flowing
        streams.append(resp)
    async with http.post(f"{server.url}/generate_stream", json=gen) as fourth:
        last = await fourth.read()  # its prefill fails the whole batch
    assert b'"error_type":"generation"' in last
    for resp in streams:
        events = [e for e in (await resp.read()).split(b"\n\n") if e]
        resp.release()
        assert json.loads(events[-1].removeprefix(b"data:"))["error_type"] == "generation"
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_sum(text, "neuron_fleet_upstream_errors_total", kind="error_event") >= 3


# --------------------------------------------------------------------------- 4, 5. serve


def _serve(tmp_path: Path) -> tuple[subprocess.Popen[str], str, list[int]]:
    from tests.conftest import free_ports
    from tests.test_serve import demo_config, start_serve

    listen, *replica_ports = free_ports(4)
    config = demo_config(tmp_path, replica_ports[0], drain_timeout_s=20)
    return start_serve(config, listen), f"http://127.0.0.1:{listen}", [listen, *replica_ports]


async def _status(http: aiohttp.ClientSession, base: str) -> dict | None:
    try:
        async with http.get(
            f"{base}/fleet/status",
            headers=admin_auth(base),
            timeout=aiohttp.ClientTimeout(total=2),
        ) as r:
            return await r.json() if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def _until_status(http, base, predicate, timeout: float = 30, what: str = "") -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await _status(http, base)
        if status is not None and predicate(status):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _all_ready(status: dict) -> bool:
    return status["ready_replicas"] == len(status["replicas"]) == 3


async def test_rolling_restart_then_sigterm_under_load_lose_nothing(tmp_path: Path) -> None:
    proc, base, _ = _serve(tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            before = await _until_status(http, base, _all_ready, what="3 replicas ready")
            old = [r["pid"] for r in before["replicas"]]
            load = Load(base, max_tokens=64)
            async with load.running(clients=8):
                await load.wait_for(20)
                proc.send_signal(signal.SIGHUP)  # rolling restart
                after = await _until_status(
                    http,
                    base,
                    lambda s: (
                        _all_ready(s)
                        and all(r["restarts"] == 1 for r in s["replicas"])
                        and s.get("operation") is None
                    ),
                    what="rolling restart done",
                )
                new = [r["pid"] for r in after["replicas"]]
                await load.wait_for(load.done + 20)
                rolled = dict(load.outcomes)
                load.refuse_ok = True  # from now on a 503 "shutting down" is a clean refusal
                proc.send_signal(signal.SIGTERM)
                _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        print(f"\nrolling restart: {rolled}; through SIGTERM: {dict(load.outcomes)}")
        assert proc.returncode == 0, err[-3000:]
        assert load.outcomes["failed"] == 0, load.failures[:3]
        assert load.outcomes["error_event"] == 0
        assert rolled.get("ok", 0) >= 40 and set(rolled) == {"ok"}
        assert set(old).isdisjoint(new)
        for pid in old + new:
            assert not pid_alive(pid), f"replica pid {pid} left behind"
        assert "Traceback" not in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def _listening(ports: list[int]) -> set[int]:
    """Which of ``ports`` some process still LISTENs on (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if fields[3] == "0A" and port in ports:  # 0A: TCP_LISTEN
                    found.add(port)
    return found


async def test_supervisor_sigkilled_under_load_leaves_no_replica_nor_port(
    tmp_path: Path,
) -> None:
    """Extends test_serve.py::test_replicas_die_when_serve_is_sigkilled (idle service) with
    streams in flight, and checks what an orphan would really cost: its ports stay taken."""
    proc, base, ports = _serve(tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            status = await _until_status(http, base, _all_ready, what="3 replicas ready")
            pids = [r["pid"] for r in status["replicas"]]
            assert _listening(ports) == set(ports)  # the check below can see listeners
            load = Load(base, max_tokens=400, killed=True)
            async with load.running(clients=6):
                await load.wait_for(3)
                await _until_status(http, base, lambda s: s["inflight"] >= 3, what="in flight")
                proc.kill()  # SIGKILL: no cleanup code runs in the service
                await asyncio.to_thread(proc.communicate, timeout=10)
        await wait_until(
            lambda: not any(pid_alive(pid) for pid in pids), timeout=5, what="replicas gone"
        )
        # An orphan would hold its port for good; a dead one's listener goes within moments.
        await wait_until(lambda: not _listening(ports), timeout=5, what="ports released")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
