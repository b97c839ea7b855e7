"""The fleet: drain / undrain / restart / rolling restart / stop over real child processes.

Most tests use the fast stdlib stand-in from test_replica_lifecycle; the no-lost-request
test runs real simulated TGI replicas behind the real balancer.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest

from balancer.config import BalancerConfig
from balancer.upstream import Registry, Replica, ReplicaState
from supervisor.fleet import Fleet, FleetBusyError, FleetSettings
from supervisor.launchers import LaunchSpec
from supervisor.procutil import pid_alive
from supervisor.replica import LifecycleSettings, ReplicaStartError
from tests.test_replica_lifecycle import FAST, free_port, stub_spec, until

pytestmark = pytest.mark.timeout(60)


def make_fleet(
    tmp_path: Path,
    n: int = 3,
    *,
    drain_timeout_s: float = 5.0,
    lifecycle: LifecycleSettings = FAST,
    min_ready: int = 1,
    **stub: object,
) -> Fleet:
    replicas, specs = [], {}
    for i in range(n):
        port = free_port()
        name = f"replica-{i}"
        replicas.append(Replica(name=name, url=f"http://127.0.0.1:{port}", port=port))
        specs[name] = stub_spec(port, tmp_path / name, **stub)  # type: ignore[arg-type]
    settings = FleetSettings(
        min_ready=min_ready, drain_timeout_s=drain_timeout_s, launcher="stub", lifecycle=lifecycle
    )
    return Fleet(Registry(replicas), specs, settings)


async def started(fleet: Fleet) -> Fleet:
    await fleet.start()
    async with asyncio.timeout(15):
        assert await fleet.wait_ready(len(fleet.registry))
    return fleet


async def test_rolling_restart_goes_one_at_a_time_in_order(tmp_path: Path) -> None:
    fleet = await started(make_fleet(tmp_path))
    registry = fleet.registry
    before = {r.name: r.pid for r in registry}
    out_of_rotation: list[int] = []
    order: list[str] = []

    def watch() -> None:
        out = [r.name for r in registry if not r.routable]
        out_of_rotation.append(len(out))
        for name in out:
            if name not in order:
                order.append(name)

    registry.subscribe(watch)
    try:
        async with asyncio.timeout(30):
            await fleet.rolling_restart()
        assert max(out_of_rotation) == 1  # never two replicas out at once
        assert order == ["replica-0", "replica-1", "replica-2"]
        for r in registry:
            assert r.state is ReplicaState.READY and r.routable
            assert r.pid != before[r.name] and r.restarts == 1
        assert fleet.status()["operation"] is None
    finally:
        await fleet.stop()


async def test_restart_waits_for_inflight_requests(tmp_path: Path) -> None:
    fleet = await started(make_fleet(tmp_path, 2))
    try:
        r = fleet.registry.get("replica-0")
        assert r is not None
        pid = r.pid
        r.inflight = 1  # the balancer's count of a stream still running there
        task = asyncio.create_task(fleet.restart("replica-0"))
        await until(lambda: r.state is ReplicaState.DRAINING)
        await asyncio.sleep(0.3)
        assert r.pid == pid and not task.done()  # not stopped while a request runs
        with pytest.raises(FleetBusyError):
            await fleet.restart("replica-0")
        with pytest.raises(FleetBusyError):
            await fleet.undrain("replica-0")
        r.inflight = 0
        async with asyncio.timeout(10):
            await task
        assert r.pid != pid and r.state is ReplicaState.READY and r.routable
    finally:
        await fleet.stop()


async def test_operations_serialize_and_keep_min_ready(tmp_path: Path) -> None:
    """Back-to-back restarts: the first runs, the others get FleetBusyError (409) naming
    it, so only one replica is ever out; drains wait too, and none goes below min_ready."""
    fleet = await started(make_fleet(tmp_path, 3, min_ready=2))
    try:
        r0 = fleet.registry.get("replica-0")
        assert r0 is not None
        r0.inflight = 1  # keep the first restart in its drain
        first = asyncio.create_task(fleet.restart("replica-0"))
        await until(lambda: r0.state is ReplicaState.DRAINING)
        for call in (
            fleet.restart("replica-1"),
            fleet.restart("replica-2"),
            fleet.rolling_restart(),
            fleet.drain("replica-1"),
        ):
            with pytest.raises(FleetBusyError, match="restart replica-0 is in progress"):
                await call
        assert fleet.status()["operation"] == "restart replica-0"
        assert [r.state for r in fleet.registry].count(ReplicaState.READY) == 2
        r0.inflight = 0
        async with asyncio.timeout(10):
            await first
        assert fleet.status()["operation"] is None
        # min_ready = 2 of 3: one drain is fine, a second would leave one.
        await fleet.drain("replica-1")
        with pytest.raises(FleetBusyError, match="below min_ready = 2"):
            await fleet.drain("replica-2")
        with pytest.raises(FleetBusyError, match="below min_ready = 2"):
            await fleet.restart("replica-2")
        await fleet.drain("replica-2", force=True)  # the operator insists
        assert fleet.registry.ready_count() == 1
    finally:
        await fleet.stop()


async def test_drain_timeout_stops_anyway(tmp_path: Path) -> None:
    fleet = await started(make_fleet(tmp_path, 1, drain_timeout_s=0.3))
    try:
        r = fleet.registry.get("replica-0")
        assert r is not None
        pid = r.pid
        r.inflight = 3  # stuck: never finishes
        async with asyncio.timeout(10):
            await fleet.restart("replica-0", force=True)  # the only replica: below min_ready
        assert r.pid != pid and r.state is ReplicaState.READY
    finally:
        await fleet.stop()


async def test_drain_and_undrain(tmp_path: Path) -> None:
    fleet = await started(make_fleet(tmp_path, 2))
    try:
        r = fleet.registry.get("replica-1")
        assert r is not None
        pid = r.pid
        await fleet.drain("replica-1")
        assert r.state is ReplicaState.DRAINING and not r.routable
        assert r.pid == pid  # drain does not stop the process
        assert fleet.status()["drained"] == ["replica-1"]

        # A drained replica that crashes comes back drained: the operator's intent stands.
        spawns = fleet.process("replica-1").spawns
        fleet.process("replica-1")._proc.kill()  # type: ignore[union-attr]
        async with asyncio.timeout(10):
            assert await fleet.process("replica-1").wait_ready(after_spawn=spawns)
        assert r.state is ReplicaState.DRAINING

        await fleet.undrain("replica-1")
        assert r.state is ReplicaState.READY and r.routable
        with pytest.raises(KeyError):
            await fleet.drain("replica-9")
        with pytest.raises(KeyError):
            await fleet.restart("replica-9")
    finally:
        await fleet.stop()


async def test_rolling_restart_stops_at_a_replica_that_does_not_come_back(
    tmp_path: Path,
) -> None:
    lifecycle = LifecycleSettings(**{**FAST.__dict__, "crash_loop_max_exits": 2})
    fleet = await started(make_fleet(tmp_path, 3, lifecycle=lifecycle))
    try:
        pid_2 = fleet.registry.get("replica-2").pid  # type: ignore[union-attr]
        # A bad change: replica-1's new process cannot start.
        fleet.process("replica-1").spec = LaunchSpec(argv=(sys.executable, "-c", "exit(4)"))
        with pytest.raises(ReplicaStartError):
            async with asyncio.timeout(20):
                await fleet.rolling_restart()
        r1 = fleet.registry.get("replica-1")
        r2 = fleet.registry.get("replica-2")
        assert r1 is not None and r2 is not None
        assert r1.state is ReplicaState.FAILED and "exit 4" in (r1.failed_reason or "")
        assert r2.pid == pid_2 and r2.routable  # untouched
        assert fleet.status()["failed"] == {"replica-1": r1.failed_reason}
        assert fleet.status()["operation"] is None
    finally:
        await fleet.stop()


async def test_stop_leaves_no_child(tmp_path: Path) -> None:
    fleet = await started(make_fleet(tmp_path, 3, mode="grandchild"))
    pids = [r.pid for r in fleet.registry]
    assert all(pid is not None and pid_alive(pid) for pid in pids)
    await fleet.stop()
    assert all(r.state is ReplicaState.STOPPED for r in fleet.registry)
    assert not any(pid_alive(pid) for pid in pids if pid is not None)


async def test_wait_ready_gives_up_when_min_ready_is_out_of_reach(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, 2, min_ready=2)
    for proc in fleet.processes:
        proc.spec = LaunchSpec(argv=(str(tmp_path / "missing-binary"),))
    await fleet.start()
    try:
        async with asyncio.timeout(10):
            assert not await fleet.wait_ready()
        status = fleet.status()
        assert fleet.registry.ready_count() == 0
        assert set(status["failed"]) == {"replica-0", "replica-1"}
        assert status["launcher"] == "stub" and status["min_ready"] == 2
    finally:
        await fleet.stop()


async def test_rolling_restart_under_load_loses_no_request(tmp_path: Path) -> None:
    """Real simulated replicas behind the real balancer, streams running all along."""
    from balancer.server import BalancerServer

    replicas, specs = [], {}
    for i in range(3):
        port = free_port()
        name = f"replica-{i}"
        replicas.append(Replica(name=name, url=f"http://127.0.0.1:{port}", port=port, slot_cap=4))
        argv = (sys.executable, "-m", "supervisor.simulator", "--port", str(port))
        argv += ("--speed", "100", "--batch-size", "4", "--seed", str(i), "--log-level", "WARNING")
        specs[name] = LaunchSpec(argv=argv)
    registry = Registry(replicas)
    fleet = Fleet(registry, specs, FleetSettings(min_ready=2, drain_timeout_s=10, lifecycle=FAST))
    config = BalancerConfig(
        host="127.0.0.1",
        port=0,
        health_interval_s=0.2,
        health_fall=2,
        queue_timeout_s=20,
        max_inflight_per_replica=4,
    )
    server = BalancerServer(config, registry, fleet)
    await server.start()
    await fleet.start()
    outcomes: list[str] = []
    done = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        body = {
            "model": "tgi",
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": True,
            "max_tokens": 12,
        }
        while not done.is_set():
            async with session.post(f"{server.url}/v1/chat/completions", json=body) as resp:
                text = await resp.text()
            ok = resp.status == 200 and text.rstrip().endswith("data:[DONE]")
            outcomes.append(
                "ok" if ok and '"error"' not in text else f"{resp.status} {text[-200:]}"
            )

    try:
        async with asyncio.timeout(15):
            assert await fleet.wait_ready()
        async with aiohttp.ClientSession() as session:
            clients = [asyncio.create_task(client(session)) for _ in range(6)]
            await until(lambda: len(outcomes) >= 10)
            pids = [r.pid for r in registry]
            async with asyncio.timeout(30):
                await fleet.rolling_restart()
            count = len(outcomes)
            await until(lambda: len(outcomes) >= count + 6)
            done.set()
            async with asyncio.timeout(10):
                await asyncio.gather(*clients)
        assert [r.pid for r in registry] != pids
        assert all(r.restarts == 1 for r in registry)
        failures = [o for o in outcomes if o != "ok"]
        assert not failures, failures[:3]
    finally:
        done.set()
        await server.begin_shutdown()
        await fleet.stop()
        await server.stop()


async def test_admin_api_answers_409_to_overlapping_operations(tmp_path: Path) -> None:
    """Three back-to-back POST /fleet/replicas/*/restart: one 202, then 409s that say what
    is running; never two replicas out at once."""
    import aiohttp

    from balancer.config import BalancerConfig
    from balancer.server import BalancerServer
    from tests.conftest import admin_headers

    fleet = await started(make_fleet(tmp_path, 3, min_ready=1))
    config = BalancerConfig(host="127.0.0.1", port=0, health_interval_s=0.1)
    server = BalancerServer(config, registry=fleet.registry, fleet=fleet)
    await server.start()
    r0 = fleet.registry.get("replica-0")
    assert r0 is not None
    r0.inflight = 1  # hold the first restart in its drain
    try:
        async with aiohttp.ClientSession(headers=admin_headers(server)) as http:
            answers = []
            for name in ("replica-0", "replica-1", "replica-2"):
                async with http.post(f"{server.url}/fleet/replicas/{name}/restart") as resp:
                    answers.append((resp.status, await resp.json()))
            assert [status for status, _ in answers] == [202, 409, 409]
            for _, body in answers[1:]:
                assert body["error_type"] == "conflict"
                assert "restart replica-0 is in progress" in body["error"]
            async with http.post(f"{server.url}/fleet/rolling-restart") as resp:
                assert resp.status == 409
            async with http.get(f"{server.url}/fleet/status") as resp:
                status = await resp.json()
            assert status["operation"] == "restart replica-0"
            assert [r["state"] for r in status["replicas"]].count("ready") == 2
            r0.inflight = 0
            await until(lambda: fleet.status()["operation"] is None)
    finally:
        await server.stop()
        await fleet.stop()
