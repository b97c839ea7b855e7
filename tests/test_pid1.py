"""`neuron-fleet serve` as a container's PID 1, for real: in a new PID namespace.

``unshare --pid --fork --mount-proc`` (util-linux) makes the service PID 1 of its own PID
namespace with its own /proc, as a container runtime does, sharing our network namespace so
the test reaches it on loopback. Each replica's command leaves an orphan behind (a
background ``sleep`` from a subshell), which the kernel hands to PID 1: the service must
reap it, take SIGTERM (PID 1 gets no signal it has no handler for), drain, exit 0, and log
to stdout. Skips where PID namespaces cannot be created (an unprivileged container).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_ports
from tests.test_serve import CHAT, get, post_json, wait_for

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]

FLEET = """\
[model]
id = "neuron-fleet/simulated"
batch_size = 4

[fleet]
launcher = "command"
devices = 2
replicas = 2
cores_per_replica = 1
base_port = {base_port}
min_ready = 2
startup_timeout_s = 30
stop_grace_s = 5

[launcher.command]
# A subshell starts `sleep` in the background and exits: the sleep is orphaned at once.
template = "sh -c '(sleep 1.5 &); exec {python} -m supervisor.simulator --port {{port}}'"

[balancer]
listen = "127.0.0.1:{port}"
health_interval_s = 0.2
"""


def _unshare() -> str:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    return unshare


def _zombie_children(pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if _status(c) == psutil.STATUS_ZOMBIE]


def _status(process: psutil.Process) -> str:
    try:
        return process.status()
    except psutil.NoSuchProcess:
        return "gone"


def test_serve_as_pid_1_reaps_orphans_and_drains_on_sigterm(tmp_path: Path) -> None:
    unshare = _unshare()
    port, base_port, _ = free_ports(3)
    config = tmp_path / "fleet.toml"
    config.write_text(FLEET.format(base_port=base_port, port=port, python=sys.executable))
    argv = [unshare, "--pid", "--fork", "--mount-proc", "--kill-child"]
    argv += [sys.executable, "-m", "supervisor", "serve", "--config", str(config)]
    proc = subprocess.Popen(
        [*argv, "--log-stream", "stdout"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: bool(psutil.Process(proc.pid).children()), 10, "the namespace's init")
        (service,) = psutil.Process(proc.pid).children()
        status = Path(f"/proc/{service.pid}/status").read_text()
        (line,) = [x for x in status.splitlines() if x.startswith("NSpid:")]
        ns_pids = line.split()[1:]  # its PID in each namespace, outermost first
        assert ns_pids[-1] == "1", ns_pids  # PID 1 inside its namespace

        orphans: set[int] = set()

        def ready() -> bool:
            orphans.update(c.pid for c in service.children() if c.name() == "sleep")
            try:
                return get(f"{base}/health", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(ready, 20, "/health 200")
        code, text = post_json(f"{base}/v1/chat/completions", CHAT)
        assert code == 200 and text.rstrip().endswith("data:[DONE]")
        # Each replica left a `sleep` that the kernel re-parented to PID 1.
        deadline = time.monotonic() + 5
        while len(orphans) < 2 and time.monotonic() < deadline:
            orphans.update(c.pid for c in service.children() if c.name() == "sleep")
            time.sleep(0.05)
        assert len(orphans) >= 2, "no orphan reached PID 1"
        # They exit after 1.5 s; PID 1 must reap them (else they stay zombies for good).
        wait_for(
            lambda: (
                not any(psutil.pid_exists(pid) for pid in orphans)
                and not _zombie_children(service.pid)
            ),
            10,
            "orphans reaped by PID 1",
        )

        service.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:] + out[-3000:]
        assert "stopped in" in out and "Traceback" not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()  # --kill-child: the namespace's init dies with unshare
            proc.communicate(timeout=10)
