"""``neuron-fleet serve`` / ``demo`` / ``status`` end to end, as real subprocesses.

Each test runs the service with the demo fleet (simulated replicas) on free loopback ports,
talks to it over HTTP, listens to its systemd notifications on a socket bound here, signals
it by its PID, and checks that no replica process is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor import cli
from supervisor.demo import DEMO_TOML
from supervisor.procutil import pid_alive
from supervisor.status_cli import format_table, format_uptime
from tests.conftest import free_ports

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
DEMO_FILE = ROOT / "deploy" / "fleet-demo.toml"
CHAT = {
    "model": "tgi",
    "messages": [{"role": "user", "content": "Hello"}],
    "stream": True,
    "max_tokens": 16,
}


def demo_config(tmp_path: Path, base_port: int, **fleet: Any) -> Path:
    """deploy/fleet-demo.toml on our own ports, fast, with ``fleet`` keys changed."""
    text = DEMO_FILE.read_text()
    text = text.replace("base_port = 8081", f"base_port = {base_port}", 1)
    text = text.replace("speed = 1.0", "speed = 100.0", 1)
    settings = {"restart_backoff_initial_s": 0.05, "stop_grace_s": 5, **fleet}
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
    text = text.replace("[fleet]\n", f"[fleet]\n{lines}", 1)
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    folder = tempfile.mkdtemp(prefix="nf-serve-")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


class Notifications:
    """Every datagram the service sent, split into KEY=VALUE lines, read as they come.

    Read continuously: a unix datagram queue holds only ~10 messages, and systemd too reads
    at once, so a slow reader would make the service drop notifications.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines: list[str] = []
        sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by the fixture
            self.lines += data.split("\n")

    def wait_for(self, predicate: Callable[[str], bool], seconds: float = 20) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"notification not received; got {self.lines}")


def start_serve(
    config: Path, listen_port: int, notify_path: str | None = None, *args: str
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    if notify_path is not None:
        env.update(NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="200000")
    argv = [sys.executable, "-m", "supervisor", "serve", "--config", str(config)]
    argv += ["--listen", f"127.0.0.1:{listen_port}", *args]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )


def get(url: str, timeout: float = 5, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=timeout
        ) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post_json(url: str, body: dict[str, Any], timeout: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return resp.status, resp.read().decode()


def admin_auth(base: str) -> dict[str, str]:
    """The headers `neuron-fleet status` would send to the local balancer at ``base`` (its
    token from the 0600 runtime file the balancer wrote, since the tests configure none)."""
    from balancer.access import ADMIN_HEADER
    from supervisor.status_cli import find_token

    return {"Authorization": f"Bearer {find_token(base)}", ADMIN_HEADER: "1"}


def fleet_status(base: str) -> dict[str, Any]:
    status, body = get(f"{base}/fleet/status", headers=admin_auth(base))
    assert status == 200, body
    return json.loads(body)


def wait_for(predicate: Callable[[], bool], seconds: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    """Signal our service by PID; its exit code and stderr (killed if it hangs)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise AssertionError(f"service did not stop on signal {sig}:\n{err[-3000:]}") from None
    return proc.returncode, err


def test_serve_end_to_end(
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sock, path = notify_socket
    listen, *replica_ports = free_ports(4)
    config = demo_config(tmp_path, replica_ports[0])
    config.write_text(config.read_text().replace("startup_delay_s = 0", "startup_delay_s = 1"))
    proc = start_serve(config, listen, path)
    base = f"http://127.0.0.1:{listen}"
    notes = Notifications(sock)
    try:
        # The balancer listens before any replica is ready, and says so.
        wait_for(lambda: _answers(base), what="balancer listening")
        status, body = get(f"{base}/health")
        assert status == 503, body
        assert "READY=1" not in notes.lines
        notes.wait_for(lambda line: line == "READY=1")
        notes.wait_for(lambda line: line.startswith("STATUS=") and "replicas ready" in line)
        notes.wait_for(lambda line: line == "WATCHDOG=1")

        code, text = post_json(f"{base}/v1/chat/completions", CHAT)
        assert code == 200 and text.rstrip().endswith("data:[DONE]"), text[-300:]

        wait_for(lambda: fleet_status(base)["ready_replicas"] == 3, what="3 replicas ready")
        notes.wait_for(lambda line: line == "STATUS=3/3 replicas ready")
        before = fleet_status(base)
        pids = [r["pid"] for r in before["replicas"]]
        assert all(pid_alive(pid) for pid in pids)
        assert before["launcher"] == "simulated" and before["min_ready"] == 1

        assert cli.main(["status", "--url", base]) == 0
        table = capsys.readouterr().out
        assert "3/3 replicas ready" in table and "replica-2" in table and "16-23" in table

        proc.send_signal(signal.SIGHUP)  # rolling restart
        wait_for(
            lambda: all(
                r["restarts"] == 1 and r["state"] == "ready" for r in fleet_status(base)["replicas"]
            ),
            what="rolling restart done",
        )
        after = [r["pid"] for r in fleet_status(base)["replicas"]]
        assert set(after).isdisjoint(pids)
        code, text = post_json(f"{base}/v1/chat/completions", CHAT)
        assert code == 200 and text.rstrip().endswith("data:[DONE]")

        returncode, err = stop(proc)
        assert returncode == 0, err[-3000:]
        notes.wait_for(lambda line: line == "STOPPING=1", seconds=2)
        for pid in pids + after:
            assert not pid_alive(pid), f"replica pid {pid} left behind"
        assert "[replica-0]" in err  # replica output forwarded with its name
        assert "ERROR" not in err and "Traceback" not in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def _answers(base: str) -> bool:
    try:
        get(f"{base}/health", timeout=1)
    except OSError:
        return False
    return True


def test_replicas_die_when_serve_is_sigkilled(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    listen, *replica_ports = free_ports(4)
    proc = start_serve(demo_config(tmp_path, replica_ports[0]), listen, path)
    base = f"http://127.0.0.1:{listen}"
    try:
        Notifications(sock).wait_for(lambda line: line == "READY=1")
        wait_for(lambda: all(r["pid"] for r in fleet_status(base)["replicas"]), what="pids")
        pids = [r["pid"] for r in fleet_status(base)["replicas"]]
        assert len(pids) == 3 and all(pid_alive(pid) for pid in pids)
    finally:
        proc.kill()  # SIGKILL: no cleanup code runs in the service
        proc.communicate(timeout=5)
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), seconds=15, what="replicas gone")


def test_sigint_during_startup_stops_cleanly(tmp_path: Path) -> None:
    listen, *replica_ports = free_ports(4)
    config = demo_config(tmp_path, replica_ports[0])
    config.write_text(config.read_text().replace("startup_delay_s = 0", "startup_delay_s = 30"))
    proc = start_serve(config, listen)
    base = f"http://127.0.0.1:{listen}"
    try:
        wait_for(
            lambda: _answers(base) and all(r["pid"] for r in fleet_status(base)["replicas"]),
            what="replicas spawned",
        )
        pids = [r["pid"] for r in fleet_status(base)["replicas"]]
        returncode, err = stop(proc, signal.SIGINT)
        assert returncode == 0, err[-3000:]
        assert not any(pid_alive(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def test_exits_1_when_min_ready_cannot_be_reached(tmp_path: Path) -> None:
    listen, *replica_ports = free_ports(4)
    config = demo_config(tmp_path, replica_ports[0], crash_loop_max_exits=2)
    text = config.read_text().replace(
        "[launcher.simulated]\n", '[launcher.simulated]\nextra_args = ["--no-such-flag"]\n', 1
    )
    config.write_text(text)
    proc = start_serve(config, listen)
    returncode, err = _wait_exit(proc)
    assert returncode == 1, err[-3000:]
    assert "FAILED" in err and "cannot reach min_ready" in err
    assert "--no-such-flag" in err  # the replica's own error, forwarded


def _wait_exit(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise AssertionError(f"service did not exit:\n{err[-3000:]}") from None
    return proc.returncode, err


def test_config_errors_are_all_reported_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[fleet]\nlauncher = "simulated"\nreplicas = "three"\nbogus_key = 1\n')
    assert cli.main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "replicas" in err and "bogus_key" in err
    assert cli.main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_demo_prints_how_to_use_it_and_stops_on_ctrl_c() -> None:
    listen, *_ = free_ports(3)  # the demo puts replicas on listen + 1, + 2
    argv = [sys.executable, "-m", "supervisor", "demo", "--listen", f"127.0.0.1:{listen}"]
    argv += ["--replicas", "2", "--speed", "100"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    base = f"http://127.0.0.1:{listen}"
    try:
        assert proc.stdout is not None
        seen = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("Ctrl-C"):
                break
        out = "".join(seen)
        assert f"curl -N {base}/v1/chat/completions" in out, out
        assert f"{base}/metrics" in out and f"{base}/fleet/status" in out
        status = fleet_status(base)
        assert [r["port"] for r in status["replicas"]] == [listen + 1, listen + 2]
        pids = [r["pid"] for r in status["replicas"]]
        returncode, err = stop(proc, signal.SIGINT)
        assert returncode == 0, err[-3000:]
        assert not any(pid_alive(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def test_embedded_demo_config_matches_deploy_file() -> None:
    assert tomllib.loads(DEMO_TOML) == tomllib.loads(DEMO_FILE.read_text())


def test_status_table_formatting() -> None:
    status = {
        "replicas": [
            {
                "name": "replica-0",
                "state": "ready",
                "cores": "0-7",
                "pid": 123,
                "port": 8081,
                "inflight": 2,
                "slot_cap": 8,
                "restarts": 1,
                "uptime_s": 3725.0,
                "last_exit": "exit 1",
            },
            {"name": "replica-1", "state": "failed", "cores": "8-15", "uptime_s": None},
        ],
        "ready_replicas": 1,
        "queue_depth": 4,
        "max_queue": 1024,
        "failed": {"replica-1": "crash loop: 5 failed runs within 600 s, last exit 1"},
    }
    table = format_table(status, "http://127.0.0.1:8080")
    assert "1/2 replicas ready, queue 4/1024" in table
    assert "2/8" in table and "1h02m" in table and "exit 1" in table
    assert "replica-1 failed: crash loop" in table
    assert format_uptime(59) == "59s" and format_uptime(61) == "1m01s"
    assert "STOPPING" not in table
    stopping = format_table({**status, "phase": "stopping"}, None)
    assert "STOPPING (health 503, still serving)" in stopping
    draining = format_table({**status, "phase": "draining", "draining": True}, None)
    assert "SHUTTING DOWN" in draining and "STOPPING" not in draining


def test_status_cli_reports_an_unreachable_service(capsys: pytest.CaptureFixture[str]) -> None:
    (port,) = free_ports(1)
    assert cli.main(["status", "--url", f"http://127.0.0.1:{port}", "--timeout", "2"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_unreadable_neuron_ls_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (listen,) = free_ports(1)
    bad = tmp_path / "neuron-ls.json"
    bad.write_text("not json")
    argv = ["serve", "--config", str(DEMO_FILE), "--neuron-ls", str(bad)]
    assert cli.main([*argv, "--listen", f"127.0.0.1:{listen}"]) == 2
    assert "--neuron-ls" in capsys.readouterr().err


def test_demo_names_a_status_command_that_runs(tmp_path: Path, monkeypatch) -> None:
    """demo.sh starts .venv/bin/neuron-fleet, which is not on the user's PATH: the banner
    must name that path, and the bare name only where PATH finds the same program."""
    from supervisor.demo import own_command

    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    program = venv_bin / "neuron-fleet"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    assert own_command(".venv/bin/neuron-fleet") == str(program)
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")
    assert own_command(".venv/bin/neuron-fleet") == "neuron-fleet"
    assert own_command("/x/supervisor/__main__.py") == "neuron-fleet"
