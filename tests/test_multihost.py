"""Multi-host rehearsal on loopback: two `neuron-fleet serve` hosts behind HAProxy.

Two "hosts" (each a `neuron-fleet serve` with two simulated replicas) listen on 127.0.0.2
and 127.0.0.3; HAProxy stands in for the ALB: ``balance leastconn``, HTTP health checks on
``/health`` every 500 ms (down after 2 failures, up after 2 successes). Under bounded
streaming load, one test drives the whole story and checks it:

1. SIGTERM host A: not one request fails, and HAProxy never had to retry or redispatch a
   request to A nor got a 5xx from it (it stopped sending before A stopped accepting);
2. start A again: HAProxy sends it nothing while its /health is 503, then traffic;
3. SIGKILL all of host B: only requests in flight on B fail, each with an error the client
   sees at once (a cut body; for one still waiting for its head, HAProxy's 502, or a closed
   connection with no response when it was not the first request on its connection), none
   hangs; new requests go to A.

HAProxy retries a request only when the *connection* to a server failed (``retry-on
conn-failure``, nothing was sent): an ALB does not retry at all; docs/scale-out.md says what
that changes. The figures printed here are the ones reported in docs/scale-out.md.
Needs Debian's haproxy (scripts/run-tests.sh installs it); skips without it, fails in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_ports
from tests.test_deploy import require_tool

pytestmark = pytest.mark.timeout(110)

ROOT = Path(__file__).resolve().parents[1]
HOSTS = {"host-a": "127.0.0.2", "host-b": "127.0.0.3"}
ADMIN_TOKEN = "multihost-admin-token"
"""Given to both services, so the test can read their /fleet/status."""
CHECK_INTER_MS = 500
SHUTDOWN_DELAY_S = 2.0
"""> HAProxy's detection time: 2 failed checks x 500 ms, plus one interval of phase."""
WORKERS = 12
REQUEST = {"inputs": "Tell me about Inferentia", "parameters": {"max_new_tokens": 48}}
LOAD_LIMIT = 4000
"""Most requests the load may send in the whole test (it is also bounded in time)."""

FLEET_TOML = """\
[model]
id = "neuron-fleet/simulated"
batch_size = 4
max_input_tokens = 1000
max_total_tokens = 2000

[fleet]
launcher = "simulated"
devices = 2
replicas = 2
cores_per_replica = 1
host = "{host}"
base_port = {base_port}
min_ready = 2
startup_timeout_s = 30
drain_timeout_s = 20
stop_grace_s = 5
restart_backoff_initial_s = 0.05

[launcher.simulated]
speed = 4.0
startup_delay_s = {startup_delay}
seed = 7

[balancer]
listen = "{host}:{port}"
shutdown_delay_s = {delay}
health_interval_s = 0.2
"""

HAPROXY_CFG = """\
global
    maxconn 2000
    stats socket {stats} mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    # Retry only a request whose connection failed (nothing sent), on another server.
    retries 1
    retry-on conn-failure
    option redispatch 1
frontend fe
    bind 127.0.0.1:{port}
    default_backend hosts
backend hosts
    balance leastconn
    option httpchk
    http-check send meth GET uri /health ver HTTP/1.1 hdr Host neuron-fleet
    http-check expect status 200
    http-response set-header X-Served-By %s
    default-server inter {inter}ms fall 2 rise 2
{servers}
"""


@dataclass
class Result:
    started: float
    ended: float = 0.0
    status: int = 0
    served_by: str = ""
    ok: bool = False
    error: str = ""


@dataclass
class Load:
    """WORKERS clients sending streaming requests back to back, until stopped."""

    url: str
    results: list[Result] = field(default_factory=list)
    stopping: bool = False

    async def run(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._worker(session) for _ in range(WORKERS)))

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        while not self.stopping and len(self.results) < LOAD_LIMIT:
            result = Result(started=time.monotonic())
            self.results.append(result)
            try:
                async with asyncio.timeout(20):
                    async with session.post(f"{self.url}/generate_stream", json=REQUEST) as resp:
                        result.status = resp.status
                        result.served_by = resp.headers.get("X-Served-By", "")
                        body = await resp.read()
                last = [e for e in body.split(b"\n\n") if e.strip()][-1:] or [b""]
                result.ok = resp.status == 200 and b'"generated_text":"' in last[0]
                if not result.ok:
                    result.error = f"HTTP {resp.status}: {body[-200:]!r}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"
            result.ended = time.monotonic()

    def between(self, start: float, end: float) -> list[Result]:
        """Requests that started in [start, end)."""
        return [r for r in self.results if start <= r.started < end]


def summary(results: list[Result]) -> dict[str, int]:
    return {
        "sent": len(results),
        "ok": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
    }


class Host:
    """One `neuron-fleet serve` on its own loopback address."""

    def __init__(self, name: str, folder: Path, port: int, base_port: int) -> None:
        self.name = name
        self.address = HOSTS[name]
        self.folder = folder
        self.port = port
        self.base_port = base_port
        self.proc: subprocess.Popen[str] | None = None
        self.log = folder / f"{name}.log"

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def start(self, startup_delay: float = 0.0) -> None:
        config = self.folder / f"{self.name}.toml"
        config.write_text(
            FLEET_TOML.format(
                host=self.address,
                port=self.port,
                base_port=self.base_port,
                delay=SHUTDOWN_DELAY_S,
                startup_delay=startup_delay,
            )
        )
        argv = [sys.executable, "-m", "supervisor", "serve", "--config", str(config)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env["NEURON_FLEET_ADMIN_TOKEN"] = ADMIN_TOKEN
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
            )

    def health(self) -> int:
        return _http_status(f"{self.url}/health")

    def replicas(self) -> list[tuple[int, int]]:
        """(pid, port) of each replica, from the host's /fleet/status."""
        with socket.create_connection((self.address, self.port), timeout=2) as sock:
            sock.sendall(
                f"GET /fleet/status HTTP/1.0\r\nHost: {self.address}:{self.port}\r\n"
                f"Authorization: Bearer {ADMIN_TOKEN}\r\n\r\n".encode()
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        doc = json.loads(data.split(b"\r\n\r\n", 1)[1])
        return [(r["pid"], r["port"]) for r in doc["replicas"] if r["pid"]]

    def kill_all(self) -> list[int]:
        """SIGKILL the whole host at once: the service and every replica it started.
        Returns the ports it listened on (gone once the processes are)."""
        assert self.proc is not None
        replicas = self.replicas()
        os.kill(self.proc.pid, signal.SIGKILL)
        for pid, _ in replicas:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return [self.port] + [port for _, port in replicas]

    def refuses(self, port: int) -> bool:
        try:
            socket.create_connection((self.address, port), timeout=1).close()
        except OSError:
            return True
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _http_status(url: str) -> int:
    host, _, port = url.removeprefix("http://").partition("/")[0].partition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1) as sock:
            sock.settimeout(2)
            sock.sendall(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
            head = sock.recv(64)
        return int(head.split()[1])
    except (OSError, IndexError, ValueError):
        return 0


class HAProxy:
    def __init__(self, folder: Path, port: int, hosts: list[Host]) -> None:
        self.stats_path = str(folder / "haproxy.sock")
        servers = "\n".join(f"    server {h.name} {h.address}:{h.port} check" for h in hosts)
        self.config = folder / "haproxy.cfg"
        self.config.write_text(
            HAPROXY_CFG.format(
                stats=self.stats_path, port=port, inter=CHECK_INTER_MS, servers=servers
            )
        )
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[str] | None = None
        self.log = folder / "haproxy.log"

    def start(self, binary: str) -> None:
        check = subprocess.run(
            [binary, "-c", "-f", str(self.config)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [binary, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` per server name (stot, econ, eresp, wretr, wredis, hrsp_5xx, status)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(self.stats_path)
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().lstrip("# ").splitlines()
        return {
            row["svname"]: row
            for row in csv.DictReader(lines)
            if row.get("pxname") == "hosts" and row["svname"] not in ("BACKEND",)
        }

    def up(self, server: str) -> bool:
        try:
            return self.stats()[server]["status"] == "UP"
        except OSError:  # the stats socket is not there yet
            return False

    def stat(self, server: str, key: str) -> int:
        return int(self.stats()[server][key] or 0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


async def wait_for(predicate, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.05)


def _two_address_port() -> int:
    """A port free on both 127.0.0.2 and 127.0.0.3 (each host listens on its own address)."""
    for _ in range(50):
        (port,) = free_ports(1)
        try:
            for address in HOSTS.values():
                with socket.socket() as probe:
                    probe.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on both addresses")


async def test_two_hosts_behind_haproxy(tmp_path: Path) -> None:
    binary = require_tool("haproxy")
    port = _two_address_port()
    base_port = free_ports(2)[0]
    a, b = (Host(name, tmp_path, port, base_port) for name in HOSTS)
    front = HAProxy(tmp_path, free_ports(1)[0], [a, b])
    load = Load(front.url)
    figures: dict[str, object] = {}
    try:
        a.start()
        b.start()
        front.start(binary)
        await wait_for(
            lambda: all(front.up(h.name) for h in (a, b)),
            30,
            "both hosts UP in HAProxy",
        )
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            loader = asyncio.create_task(load.run(session))
            try:
                marks = await _rehearse(a, b, front, load, figures)
            finally:
                load.stopping = True
                await asyncio.wait_for(loader, 30)  # every request sent has ended now
        _check_results(load, marks, figures)
    finally:
        for host in (a, b):
            host.stop()
        front.stop()
        print(json.dumps(figures, indent=2))
        for path in (front.log, a.log, b.log):
            if path.exists():
                print(f"--- {path.name} (tail)\n{path.read_text()[-1500:]}")


async def _rehearse(a: Host, b: Host, front: HAProxy, load: Load, figures: dict) -> dict:  # type: ignore[type-arg]
    """Drive the three events; check HAProxy's view as they happen. Returns their times."""
    marks: dict[str, float] = {}
    # -- 1. SIGTERM host A under load: A is never sent a request it refuses or cannot take.
    await asyncio.sleep(1.5)
    assert load.results, "no load"
    assert front.stat("host-a", "stot") > 0 and front.stat("host-b", "stot") > 0
    assert a.proc is not None
    marks["sigterm"] = t0 = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    await wait_for(lambda: a.proc.poll() is not None, 40, "host A to stop")
    assert a.proc.returncode == 0, a.log.read_text()[-3000:]
    a_stats = front.stats()["host-a"]
    figures["sigterm"] = {
        "stop_took_s": round(time.monotonic() - t0, 2),
        "haproxy_a": {k: a_stats[k] for k in ("econ", "eresp", "wretr", "wredis", "hrsp_5xx")},
    }
    for key in ("econ", "eresp", "wretr", "wredis", "hrsp_5xx"):
        assert int(a_stats[key] or 0) == 0, f"HAProxy {key} for host A: {a_stats[key]}"
    assert a_stats["status"].startswith("DOWN")
    await asyncio.sleep(0.5)

    # -- 2. Start A again (models "load" 2 s): no traffic to it until its /health says 200.
    before = front.stat("host-a", "stot")
    marks["restart"] = t1 = time.monotonic()
    a.start(startup_delay=2.0)
    sent_while_not_ready = 0
    while a.health() != 200:
        assert time.monotonic() - t1 < 30, "host A never became ready"
        sent_while_not_ready = max(sent_while_not_ready, front.stat("host-a", "stot") - before)
        await asyncio.sleep(0.05)
    ready_after = time.monotonic() - t1
    assert sent_while_not_ready == 0, f"HAProxy sent {sent_while_not_ready} to A before ready"
    await wait_for(lambda: front.up("host-a"), 10, "host A UP again")
    await wait_for(lambda: front.stat("host-a", "stot") > before, 10, "traffic to host A")
    figures["restart"] = {
        "ready_after_s": round(ready_after, 2),
        "up_in_haproxy_after_s": round(time.monotonic() - t1, 2),
        "sent_to_a_before_ready": sent_while_not_ready,
    }
    await asyncio.sleep(1.0)

    # -- 3. SIGKILL all of host B: only its in-flight streams may fail.
    a_before = {k: front.stat("host-a", k) for k in ("eresp", "hrsp_5xx", "econ")}
    marks["sigkill"] = time.monotonic()
    in_flight = [r for r in load.results if r.ended == 0]
    ports = b.kill_all()
    # A process is not gone the instant it is signalled: requests sent until its sockets
    # close were sent to a live host that then died, like those sent just before the kill.
    await wait_for(lambda: all(b.refuses(port) for port in ports), 5, "host B gone")
    marks["dead"] = time.monotonic()
    in_flight += [r for r in load.results if r.ended == 0 and r.started >= marks["sigkill"]]
    figures["sigkill"] = {
        "streams_in_flight_on_b": sum(r.served_by == "host-b" for r in in_flight),
        "requests_without_headers_yet": sum(r.served_by == "" for r in in_flight),
    }
    await asyncio.sleep(3.0)
    marks["end"] = time.monotonic()
    # Host A answered everything it was sent: any error response came from B's death.
    for key, value in a_before.items():
        assert front.stat("host-a", key) == value, f"host A {key} grew during the kill"
    return marks


def _check_results(load: Load, marks: dict[str, float], figures: dict) -> None:  # type: ignore[type-arg]
    """Every request has ended: judge each phase by when its requests started."""
    t0, t1, t2 = marks["sigterm"], marks["restart"], marks["sigkill"]
    stop_phase = load.between(t0 - 1.0, t1)
    figures["sigterm"].update(summary(stop_phase))
    failed = [r for r in stop_phase if not r.ok]
    assert not failed, f"{len(failed)} failed around the SIGTERM: {[r.error for r in failed][:5]}"

    restart_phase = load.between(t1, t2 - 1.0)
    figures["restart"].update(summary(restart_phase))
    assert all(r.ok for r in restart_phase), [r.error for r in restart_phase if not r.ok][:5]
    assert any(r.served_by == "host-a" for r in restart_phase)

    # Requests alive at the kill or sent after it.
    kill_phase = [r for r in load.between(t2 - 30, marks["end"]) if r.ended >= t2]
    failed = [r for r in kill_phase if not r.ok]
    figures["sigkill"].update(
        summary(kill_phase),
        errors=sorted({r.error.split(":")[0] for r in failed}),
        slowest_failure_s=round(max((r.ended - t2 for r in failed), default=0.0), 2),
    )
    dead = marks["dead"]
    figures["sigkill"]["host_gone_after_s"] = round(dead - t2, 3)
    for r in failed:
        assert r.started < dead, f"a request sent after host B was gone failed: {r}"
        assert r.ended - t2 < 2.0, f"a cut stream took {r.ended - t2:.1f} s to end"
        if r.served_by:  # a stream from B, cut: the client's read fails at once
            assert r.served_by == "host-b", r
            assert r.error.startswith(("ClientPayloadError", "ServerDisconnectedError")), r
        else:  # sent to B, no answer yet: HAProxy's own 502 (A's error counters did not move),
            # or, on a client connection that already carried a request, a close with no
            # response at all, so that the client retries: HAProxy 2.6 src/http_ana.c,
            # http_wait_for_response(), "if (txn->flags & TX_NOT_FIRST) goto abort_keep_alive".
            assert r.status == 502 or (
                r.status == 0 and r.error.startswith("ServerDisconnectedError")
            ), r
    in_flight = figures["sigkill"]
    assert (
        len(failed)
        <= in_flight["streams_in_flight_on_b"] + in_flight["requests_without_headers_yet"]
    )
    after = [r for r in kill_phase if r.started > dead]
    assert after and all(r.ok and r.served_by == "host-a" for r in after)
