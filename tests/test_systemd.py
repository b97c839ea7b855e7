"""sd_notify over a real unix datagram socket bound by the test (path and abstract names)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.systemd import SystemdNotifier

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # A short directory: unix socket paths are limited to ~108 bytes.
    folder = tempfile.mkdtemp(prefix="nf-sd-")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_reach_a_path_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.status("0/3 replicas ready")
    assert receive(sock) == "STATUS=0/3 replicas ready"
    assert notifier.ready("1/3 replicas ready")
    assert receive(sock) == "READY=1\nSTATUS=1/3 replicas ready"
    assert notifier.watchdog()
    assert receive(sock) == "WATCHDOG=1"
    assert notifier.stopping()
    assert receive(sock) == "STOPPING=1"
    notifier.close()


def test_abstract_socket_name() -> None:
    name = f"neuron-fleet-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.ready()
        assert receive(sock) == "READY=1"
        notifier.close()
    finally:
        sock.close()


def test_same_status_is_sent_once(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.status("2/3 replicas ready")
    assert not notifier.status("2/3 replicas ready")
    assert notifier.status("3/3 replicas ready")
    assert receive(sock) == "STATUS=2/3 replicas ready"
    assert receive(sock) == "STATUS=3/3 replicas ready"
    notifier.close()


def test_noop_without_notify_socket() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog() and not notifier.stopping()
    assert notifier.watchdog_interval_s is None


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    base = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    assert SystemdNotifier({**base, "WATCHDOG_USEC": "30000000"}).watchdog_interval_s == 15.0
    ours = {**base, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier(ours).watchdog_interval_s == 1.0
    theirs = {**base, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}
    assert SystemdNotifier(theirs).watchdog_interval_s is None  # meant for another process
    assert SystemdNotifier({**base, "WATCHDOG_USEC": "bogus"}).watchdog_interval_s is None


async def test_watchdog_pings_repeatedly(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_interval_s == 0.05
    task = asyncio.create_task(notifier.run_watchdog())
    try:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        got = []
        async with asyncio.timeout(5):
            while len(got) < 3:
                got.append((await loop.sock_recv(sock, 4096)).decode())
        assert got == ["WATCHDOG=1"] * 3
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.close()


async def test_run_watchdog_returns_when_not_asked() -> None:
    async with asyncio.timeout(5):
        await SystemdNotifier({"NOTIFY_SOCKET": "/nonexistent/notify"}).run_watchdog()


def test_send_failure_is_logged_once_and_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not notifier.ready()
    assert not notifier.status("x")
    assert len([r for r in caplog.records if "NOTIFY_SOCKET" in r.getMessage()]) == 1
    notifier.close()
