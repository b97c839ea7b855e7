"""One replica's lifecycle against real child processes on loopback.

The child is a stdlib-only stand-in (fast to start) that serves /health, can crash, ignore
SIGTERM, report unhealthy, fork a grandchild, or stop through a stop command. Only PIDs
these tests started are signalled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from balancer.upstream import Registry, Replica, ReplicaState
from supervisor.launchers import LaunchSpec
from supervisor.procutil import child_env, describe_returncode, pid_alive
from supervisor.replica import (
    LifecycleSettings,
    ReplicaProcess,
    ReplicaStartError,
    backoff_delay,
)
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(60)

STUB = textwrap.dedent(
    """
    import http.server, os, signal, subprocess, sys, threading, time
    port, delay, crash_after, mode, flags = (
        int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5])
    print(f"stub pid {os.getpid()} port {port}", flush=True)
    print("stub says hi on stderr", file=sys.stderr, flush=True)
    if os.environ.get("FLEET_TEST_SECRET") == "s3cr3t":
        print("secret received", flush=True)
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    if mode == "grandchild":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(f"grandchild {child.pid}", flush=True)
    def watch_stop_file():
        while not os.path.exists(os.path.join(flags, "stop")):
            time.sleep(0.05)
        os._exit(0)
    threading.Thread(target=watch_stop_file, daemon=True).start()
    time.sleep(delay)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            bad = os.path.exists(os.path.join(flags, "unhealthy"))
            self.send_response(503 if bad else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
    if crash_after > 0:
        threading.Timer(crash_after, lambda: os._exit(3)).start()
    server.serve_forever()
    """
)

FAST = LifecycleSettings(
    startup_timeout_s=10,
    stop_grace_s=2,
    health_poll_interval_s=0.05,
    health_timeout_s=1,
    restart_backoff_initial_s=0.05,
    restart_backoff_max_s=0.2,
    crash_loop_max_exits=5,
    crash_loop_window_s=60,
    unhealthy_restart_after_s=None,
)


def stub_spec(
    port: int,
    flags: Path,
    *,
    delay: float = 0.0,
    crash_after: float = 0.0,
    mode: str = "normal",
    **kwargs: object,
) -> LaunchSpec:
    argv = (sys.executable, "-c", STUB, str(port), str(delay), str(crash_after), mode, str(flags))
    return LaunchSpec(argv=argv, display=f"stub :{port} {mode}", **kwargs)  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``predicate`` (bounded in time) instead of sleeping a guessed amount."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def make(
    tmp_path: Path, settings: LifecycleSettings = FAST, **spec_kwargs: object
) -> ReplicaProcess:
    port = free_port()
    replica = Replica(name="r0", url=f"http://127.0.0.1:{port}", port=port)
    return ReplicaProcess(
        replica,
        stub_spec(port, tmp_path, **spec_kwargs),  # type: ignore[arg-type]
        Registry([replica]),
        settings,
        rng=random.Random(1),
    )


async def test_ready_then_clean_stop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    proc = make(tmp_path, delay=0.4)
    r = proc.replica
    await proc.start()
    await until(lambda: r.pid is not None)
    assert r.state is ReplicaState.STARTING and not r.routable  # no traffic while loading
    async with asyncio.timeout(10):
        assert await proc.wait_ready()
    assert r.state is ReplicaState.READY and r.healthy and r.routable
    assert r.start_duration_s is not None and r.start_duration_s >= 0.3
    assert r.started_at is not None and r.uptime_s() is not None
    pid = r.pid
    assert pid is not None and pid_alive(pid)
    assert os.getpgid(pid) == pid  # its own process group
    await until(lambda: "[r0] stub says hi on stderr" in caplog.text)
    assert f"[r0] stub pid {pid} port {r.port}" in caplog.text

    await proc.stop()
    assert r.state is ReplicaState.STOPPED and not r.healthy
    assert r.pid is None and r.started_at is None
    assert r.last_exit == "exit 0"
    assert not pid_alive(pid)
    assert r.restarts == 0


async def test_env_reaches_child_but_not_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    assert "NOTIFY_SOCKET" not in child_env({})  # a replica must not speak for us to systemd
    proc = make(tmp_path, env={"FLEET_TEST_SECRET": "s3cr3t"})
    await proc.start()
    async with asyncio.timeout(10):
        assert await proc.wait_ready()
    await until(lambda: "secret received" in caplog.text)
    await proc.stop()
    assert "s3cr3t" not in caplog.text
    assert "stub :" in caplog.text  # the display line is what gets logged


async def test_crash_restarts_with_backoff(tmp_path: Path) -> None:
    proc = make(tmp_path, crash_after=0.3)
    r = proc.replica
    await proc.start()
    async with asyncio.timeout(10):
        assert await proc.wait_ready()
    first_pid = r.pid
    await until(lambda: r.restarts >= 2)
    assert r.last_exit == "exit 3"
    async with asyncio.timeout(10):
        assert await proc.wait_ready(after_spawn=proc.spawns - 1)
    assert r.pid != first_pid
    assert r.state is ReplicaState.READY
    await proc.stop()


async def test_killed_child_comes_back(tmp_path: Path) -> None:
    proc = make(tmp_path)
    r = proc.replica
    await proc.start()
    async with asyncio.timeout(10):
        assert await proc.wait_ready()
    pid = r.pid
    assert pid is not None
    spawns = proc.spawns
    os.kill(pid, signal.SIGKILL)  # our own child
    await until(lambda: r.state is ReplicaState.STARTING)
    assert not r.routable
    async with asyncio.timeout(10):
        assert await proc.wait_ready(after_spawn=spawns)
    assert r.last_exit == "signal 9 (SIGKILL)"
    assert r.restarts == 1 and r.pid != pid
    await proc.stop()


async def test_crash_loop_marks_failed_and_restart_revives(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    replica = Replica(name="r0", url=f"http://127.0.0.1:{port}", port=port)
    crashing = LaunchSpec(
        argv=(
            sys.executable,
            "-c",
            "import sys; print('model not found', file=sys.stderr); exit(2)",
        )
    )
    settings = LifecycleSettings(**{**FAST.__dict__, "crash_loop_max_exits": 3})
    proc = ReplicaProcess(replica, crashing, Registry([replica]), settings)
    await proc.start()
    async with asyncio.timeout(10):
        assert not await proc.wait_ready()  # supervision ends: FAILED
    assert replica.state is ReplicaState.FAILED
    assert replica.failed_reason is not None and "exit 2" in replica.failed_reason
    assert replica.restarts == 2 and proc.spawns == 3
    failed_logs = [rec for rec in caplog.records if "FAILED" in rec.getMessage()]
    assert len(failed_logs) == 1  # said once, with the last output
    assert "model not found" in failed_logs[0].getMessage()
    await asyncio.sleep(0.3)
    assert proc.spawns == 3  # no more restarts

    with pytest.raises(ReplicaStartError):
        async with asyncio.timeout(10):
            await proc.restart()
    proc.spec = stub_spec(port, tmp_path)  # "fix the cause"
    async with asyncio.timeout(10):
        await proc.restart()
    assert replica.state is ReplicaState.READY and replica.failed_reason is None
    await proc.stop()
    assert replica.state is ReplicaState.STOPPED


async def test_missing_binary_fails_at_once(tmp_path: Path) -> None:
    replica = Replica(name="r0", url="http://127.0.0.1:9")
    spec = LaunchSpec(argv=(str(tmp_path / "no-such-launcher"),))
    proc = ReplicaProcess(replica, spec, Registry([replica]), FAST)
    await proc.start()
    async with asyncio.timeout(5):
        assert not await proc.wait_ready()
    assert replica.state is ReplicaState.FAILED
    assert "cannot start" in (replica.failed_reason or "")
    await proc.stop()
    assert replica.state is ReplicaState.FAILED  # stop keeps the verdict visible


async def test_startup_timeout_counts_as_failure(tmp_path: Path) -> None:
    settings = LifecycleSettings(
        **{**FAST.__dict__, "startup_timeout_s": 0.3, "crash_loop_max_exits": 2}
    )
    proc = make(tmp_path, settings, delay=30)
    await proc.start()
    async with asyncio.timeout(10):
        assert not await proc.wait_ready()
    assert proc.replica.state is ReplicaState.FAILED
    assert proc.spawns == 2
    assert proc.replica.last_exit == "exit 0"  # stopped by SIGTERM, handled by the stub
    await proc.stop()


async def test_unhealthy_replica_is_restarted(tmp_path: Path) -> None:
    # 1 s: the check 0.1 s in stays well inside it on a loaded machine
    settings = LifecycleSettings(**{**FAST.__dict__, "unhealthy_restart_after_s": 1.0})
    proc = make(tmp_path, settings)
    r = proc.replica
    await proc.start()
    async with asyncio.timeout(10):
        assert await proc.wait_ready()
    pid, spawns = r.pid, proc.spawns
    r.healthy = False  # what the balancer's health checker does after `fall` failures
    await asyncio.sleep(0.1)
    assert r.pid == pid  # not before unhealthy_restart_after_s
    async with asyncio.timeout(10):
        assert await proc.wait_ready(after_spawn=spawns)
    assert r.pid != pid and r.restarts == 1 and r.healthy
    assert r.state is ReplicaState.READY
    await proc.stop()


async def test_draining_replica_is_not_restarted_for_health(tmp_path: Path) -> None:
    settings = LifecycleSettings(**{**FAST.__dict__, "unhealthy_restart_after_s": 0.1})
    proc = make(tmp_path, settings)
    r = proc.replica
    await proc.start()
    async with asyncio.timeout(10):
        assert await proc.wait_ready()
    proc.registry.set_state(r, ReplicaState.DRAINING)
    r.healthy = False
    await asyncio.sleep(0.4)
    assert r.restarts == 0
    await proc.stop()


async def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    settings = LifecycleSettings(**{**FAST.__dict__, "stop_grace_s": 0.3})
    proc = make(tmp_path, settings, mode="ignore-term")
    await proc.start()
    async with asyncio.timeout(10):
        assert await proc.wait_ready()
    pid = proc.replica.pid
    assert pid is not None
    await proc.stop()
    assert proc.replica.last_exit == "signal 9 (SIGKILL)"
    assert not pid_alive(pid)


async def test_stop_command_is_used(tmp_path: Path) -> None:
    stop_file = tmp_path / "stop"
    stop_argv = (sys.executable, "-c", f"open({str(stop_file)!r}, 'w').close()")
    proc = make(tmp_path, mode="ignore-term", stop_argv=stop_argv)
    await proc.start()
    async with asyncio.timeout(10):
        assert await proc.wait_ready()
    await proc.stop()
    assert stop_file.exists()
    assert proc.replica.last_exit == "exit 0"  # not SIGKILL: the stop command did it


async def test_group_kill_reaches_grandchildren(tmp_path: Path) -> None:
    proc = make(tmp_path, mode="grandchild")
    await proc.start()
    async with asyncio.timeout(10):
        assert await proc.wait_ready()
    await until(lambda: any(line.startswith("grandchild ") for line in proc.last_output()))
    line = next(line for line in proc.last_output() if line.startswith("grandchild "))
    grandchild = int(line.split()[1])
    assert pid_alive(grandchild)
    await proc.stop()
    await until(lambda: not pid_alive(grandchild), seconds=15)


async def test_restart_command_while_starting(tmp_path: Path) -> None:
    proc = make(tmp_path, delay=0.5)
    await proc.start()
    await until(lambda: proc.replica.pid is not None)
    first = proc.replica.pid
    async with asyncio.timeout(10):
        await proc.restart()
    assert proc.replica.pid != first and proc.replica.restarts == 1
    assert proc.replica.state is ReplicaState.READY
    await proc.stop()


def test_children_die_with_the_supervisor(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: SIGKILL the supervising process, its replica goes too."""
    port = free_port()
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from balancer.upstream import Registry, Replica
        from supervisor.launchers import LaunchSpec
        from supervisor.replica import ReplicaProcess
        async def main():
            replica = Replica(name="r0", url="http://127.0.0.1:{port}")
            spec = LaunchSpec(argv=(sys.executable, "-c", "import time; time.sleep(60)"))
            proc = ReplicaProcess(replica, spec, Registry([replica]))
            await proc.start()
            while replica.pid is None:
                await asyncio.sleep(0.01)
            print(replica.pid, flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert pid_alive(child)
    finally:
        parent.kill()
        parent.wait(5)
        if parent.stdout is not None:
            parent.stdout.close()
    deadline = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    for failures, base in ((1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (30, 60.0)):
        for _ in range(20):
            delay = backoff_delay(failures, 1.0, 60.0, rng)
            assert base / 2 <= delay <= base


def test_describe_returncode() -> None:
    assert describe_returncode(0) == "exit 0"
    assert describe_returncode(1) == "exit 1"
    assert describe_returncode(-9) == "signal 9 (SIGKILL)"


def test_settings_from_fleet_section() -> None:
    class Section:
        startup_timeout_s = 12.0
        stop_grace_s = 3.0
        crash_loop_max_exits = 2
        unrelated = "x"

    s = LifecycleSettings.from_fleet(Section())
    assert (s.startup_timeout_s, s.stop_grace_s, s.crash_loop_max_exits) == (12.0, 3.0, 2)
    assert s.restart_backoff_initial_s == LifecycleSettings.restart_backoff_initial_s
