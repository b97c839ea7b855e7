"""Faults, bad clients and overload at scale: what neuron-fleet loses (nothing, we hope).

Each scenario starts a fresh ``neuron-fleet serve`` (three simulated replicas, batch 8, on
free loopback ports, by PID), runs streaming load while doing something nasty, stops the
service with SIGTERM and prints one row:

    sent       requests the well-behaved clients sent (plus, where it says so, the bad ones)
    ok         complete answers (stream ended with [DONE] / final event, no error)
    failed     anything else a client could not tell from success or a clean refusal:
               5xx, truncated stream without an error event, connection error, non-TGI
               error body. The number that must stay 0.
    retried    attempts the balancer retried on another replica before the first byte
               (neuron_fleet_retries_total)
    cut        streams ended with an explicit error event after tokens were sent (a replica
               died or hung mid-stream: those tokens cannot be retried)
    refused    clean refusals: 429/503 + Retry-After (overload, shutdown) or, for bad
               clients, the 4xx/408/cut-off they deserved
    peak RSS   VmHWM of the service process (balancer + supervisor; replicas excluded)

Run by hand (not in CI): ``.venv/bin/python bench/faults.py`` (about 6 minutes on 2 cores);
``--scale 0.3`` for a quick pass, ``--only NAME`` for one scenario. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from harness import consecutive_free_ports

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = secrets.token_urlsafe(32)
"""Given to every service started here, so the bench can read /fleet/status."""
DEMO = ROOT / "deploy" / "fleet-demo.toml"
REPLICAS, BATCH = 3, 8
SLOTS = REPLICAS * BATCH


# --------------------------------------------------------------------------- service


def write_config(
    folder: Path,
    base_port: int,
    speed: float,
    fleet: dict[str, object],
    balancer: dict[str, object],
    extra_args: list[str],
) -> Path:
    """deploy/fleet-demo.toml on our ports and speed, with keys added or replaced."""
    lines = []
    section = ""
    for line in DEMO.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        key = stripped.split("=", 1)[0].strip() if "=" in stripped else ""
        if section == "[balancer]" and key in balancer:
            continue
        if section == "[fleet]" and key in fleet:
            continue
        if key == "base_port":
            line = f"base_port = {base_port}"
        elif key == "speed":
            line = f"speed = {speed}"
        lines.append(line)
        if stripped == "[fleet]":
            lines += [f"{k} = {json.dumps(v)}" for k, v in fleet.items()]
        elif stripped == "[balancer]":
            lines += [f"{k} = {json.dumps(v)}" for k, v in balancer.items()]
        elif stripped == "[launcher.simulated]" and extra_args:
            lines.append(f"extra_args = {json.dumps(extra_args)}")
    path = folder / "fleet.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    replica_pids: list[int] = field(default_factory=list)

    def status_field(self, name: str) -> int:
        """A VmXXX value of the service process, in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
        return 0


@contextlib.asynccontextmanager
async def service(
    speed: float = 20.0,
    fleet: dict[str, object] | None = None,
    balancer: dict[str, object] | None = None,
    extra_args: list[str] | None = None,
):
    folder = Path(tempfile.mkdtemp(prefix="nf-faults-"))
    listen, *replica_ports = consecutive_free_ports(REPLICAS + 1)
    fleet = {"restart_backoff_initial_s": 0.1, "stop_grace_s": 5, **(fleet or {})}
    config = write_config(folder, replica_ports[0], speed, fleet, balancer or {}, extra_args or [])
    log = folder / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env["NEURON_FLEET_ADMIN_TOKEN"] = ADMIN_TOKEN
    argv = [sys.executable, "-m", "supervisor", "serve", "--config", str(config)]
    argv += ["--listen", f"127.0.0.1:{listen}", "--log-level", "WARNING"]
    proc = _spawn(argv, log, env)
    svc = Service(proc, f"http://127.0.0.1:{listen}", log)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                status = await fleet_status(http, svc.base)
                if status and status["ready_replicas"] == REPLICAS:
                    svc.replica_pids = [r["pid"] for r in status["replicas"]]
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited: {log.read_text()[-2000:]}")
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("fleet not ready in 30 s")
        yield svc
    finally:
        for pid in svc.replica_pids:  # a replica a scenario stopped must be able to die
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # a file, not a pipe nobody drains
        return subprocess.Popen(argv, stdout=out, stderr=out, cwd=ROOT, env=env)


async def fleet_status(http: aiohttp.ClientSession, base: str) -> dict | None:
    try:
        async with http.get(
            f"{base}/fleet/status",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=aiohttp.ClientTimeout(total=3),
        ) as r:
            return await r.json() if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def metric_sum(base: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


# --------------------------------------------------------------------------- load


@dataclass
class Row:
    name: str
    sent: int = 0
    ok: int = 0
    failed: int = 0
    retried: int = 0
    cut: int = 0
    refused: int = 0
    peak_rss: int = 0
    start_rss: int = 0
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def fail(self, detail: str) -> None:
        self.failed += 1
        if len(self.failures) < 5:
            self.failures.append(detail[:300])


def chat(max_tokens: int) -> dict:
    return {
        "model": "tgi",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
        "max_tokens": max_tokens,
    }


async def stream_once(
    session: aiohttp.ClientSession, base: str, row: Row, max_tokens: int, refuse_ok: bool
) -> bool:
    """One streaming chat request, classified into ``row``; False: stop this client."""
    row.sent += 1
    try:
        async with session.post(f"{base}/v1/chat/completions", json=chat(max_tokens)) as resp:
            text = await resp.text()
            status, retry_after = resp.status, resp.headers.get("Retry-After")
    except aiohttp.ClientConnectionError as exc:
        if refuse_ok:
            row.refused += 1
            return False
        row.fail(f"{type(exc).__name__}: {exc}")
        return True
    except aiohttp.ClientPayloadError as exc:
        row.fail(f"truncated: {exc}")
        return True
    if status in (429, 503) and retry_after:
        row.refused += 1
        return not (refuse_ok and status == 503)
    events = [e for e in text.split("\n\n") if e.strip()]
    if status == 200 and events and events[-1] == "data:[DONE]":
        errors = [e for e in events if e.startswith('data:{"error"')]
        if not errors:
            row.ok += 1
            return True
        if len(errors) == 1 and events[-2] == errors[0]:
            row.cut += 1
            return True
    row.fail(f"{status} {text[-200:]!r}")
    return True


async def run_load(
    base: str,
    row: Row,
    total: int,
    concurrency: int,
    max_tokens: int = 64,
    during: Callable[[], Awaitable[None]] | None = None,
    refuse_ok: Callable[[], bool] = lambda: False,
) -> None:
    """``total`` requests from ``concurrency`` clients; ``during()`` runs alongside."""
    left = [total]

    async def client(session: aiohttp.ClientSession) -> None:
        while left[0] > 0:
            left[0] -= 1
            if not await stream_once(session, base, row, max_tokens, refuse_ok()):
                return

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(concurrency)]
        if during is not None:
            await during()
        await asyncio.gather(*tasks)


async def wait_done(row: Row, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while row.ok + row.cut + row.failed + row.refused < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{row.name}: load stalled at {row.sent}")
        await asyncio.sleep(0.02)


async def wait_status(base: str, predicate, timeout: float = 60) -> dict:
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await fleet_status(http, base)
            if status and predicate(status):
                return status
            await asyncio.sleep(0.1)
    raise RuntimeError("fleet status condition not reached")


def ready(name: str, restarts: int) -> Callable[[dict], bool]:
    def check(status: dict) -> bool:
        r = next(x for x in status["replicas"] if x["name"] == name)
        return r["restarts"] >= restarts and r["state"] == "ready"

    return check


# --------------------------------------------------------------------------- scenarios

Scenario = Callable[[float], Awaitable[Row]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str):
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return register


async def finish(svc: Service, row: Row) -> Row:
    row.retried = int(await metric_sum(svc.base, "neuron_fleet_retries_total"))
    row.peak_rss = svc.status_field("VmHWM")
    return row


@scenario("baseline")
async def baseline(scale: float) -> Row:
    row = Row("baseline (no fault)")
    async with service() as svc:
        row.start_rss = svc.status_field("VmRSS")
        await run_load(svc.base, row, int(3000 * scale), 48)
        return await finish(svc, row)


@scenario("sigkill")
async def sigkill(scale: float) -> Row:
    row = Row("replica SIGKILLed x2")
    async with service() as svc:
        row.start_rss = svc.status_field("VmRSS")

        async def fault() -> None:
            for n, name in enumerate(("replica-1", "replica-2"), 1):
                await wait_done(row, int(700 * scale) * n)
                status = await wait_status(svc.base, lambda s: True)
                pid = next(r["pid"] for r in status["replicas"] if r["name"] == name)
                os.kill(pid, signal.SIGKILL)  # a replica of the service this bench started
                await wait_status(svc.base, ready(name, 1))
            row.notes.append("both restarted and back in rotation")

        await run_load(svc.base, row, int(3000 * scale), 48, during=fault)
        return await finish(svc, row)


@scenario("hang")
async def hang(scale: float) -> Row:
    row = Row("replica hung (SIGSTOP)")
    balancer = {
        "first_byte_timeout_s": 2.0,
        "idle_timeout_s": 1.0,
        "health_interval_s": 0.2,
        "health_timeout_s": 0.5,
        "health_fall": 2,
    }
    fleet = {"unhealthy_restart_after_s": 1.0, "stop_grace_s": 1}
    async with service(fleet=fleet, balancer=balancer) as svc:
        row.start_rss = svc.status_field("VmRSS")

        async def fault() -> None:
            await wait_done(row, int(700 * scale))
            status = await wait_status(svc.base, lambda s: True)
            pid = next(r["pid"] for r in status["replicas"] if r["name"] == "replica-1")
            os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()
            await wait_status(svc.base, ready("replica-1", 1))
            row.notes.append(
                f"restarted by the supervisor {time.monotonic() - started:.1f} s later"
            )

        await run_load(svc.base, row, int(3000 * scale), 48, during=fault)
        return await finish(svc, row)


@scenario("424")
async def generation_errors(scale: float) -> Row:
    row = Row("424s (2% of prefills fail)")
    args = ["--fail-generation-probability", "0.02"]
    async with service(extra_args=args) as svc:
        row.start_rss = svc.status_field("VmRSS")
        await run_load(svc.base, row, int(3000 * scale), 48)
        row.notes.append("a failed prefill fails its whole batch, running streams included")
        return await finish(svc, row)


@scenario("poison")
async def poison(scale: float) -> Row:
    """A prompt that fails on every replica (its prefill fails the batch, as a Neuron
    backend exception does), sent 5 at a time over and over alongside normal load."""
    row = Row("poison prompt (fails everywhere)")
    args = ["--poison-prompt", "POISON"]
    async with service(extra_args=args) as svc:
        row.start_rss = svc.status_field("VmRSS")
        answered = [0, 0]  # with TGI's generation error, otherwise

        async def poison_client(session: aiohttp.ClientSession) -> None:
            body = {**chat(16), "messages": [{"role": "user", "content": "POISON"}]}
            for _ in range(max(1, int(40 * scale))):
                async with session.post(f"{svc.base}/v1/chat/completions", json=body) as resp:
                    text = await resp.text()
                ok = resp.status == 200 and "Request failed during generation" in text
                answered[0 if ok else 1] += 1

        async def during() -> None:
            async with aiohttp.ClientSession() as session:
                await asyncio.gather(*(poison_client(session) for _ in range(5)))

        await run_load(svc.base, row, int(3000 * scale), 48, during=during)
        ejected = await metric_sum(svc.base, "neuron_fleet_ejections_total", outcome="ejected")
        kept = await metric_sum(svc.base, "neuron_fleet_ejections_total", outcome="over_budget")
        row.notes.append(
            f"{answered[0]} poison requests answered with TGI's generation error "
            f"({answered[1]} otherwise); ejections {ejected:.0f} (one replica at a time at "
            f"most), {kept:.0f} more refused by the budget. A failed prefill fails its whole "
            "batch: running streams there end with an error event (cut), queued ones are "
            "retried, and those count against the replica"
        )
        if answered[1]:
            row.fail(f"{answered[1]} poison requests not answered with the generation error")
        return await finish(svc, row)


@scenario("mid-event")
async def mid_event(scale: float) -> Row:
    """Replica processes die half-way through writing an event (1 in 3000 events, seeded
    per replica, so they die at different times) and are restarted by the supervisor."""
    row = Row("replica dies mid-event")
    args = ["--crash-mid-event-probability", "0.00033"]
    async with service(extra_args=args) as svc:
        row.start_rss = svc.status_field("VmRSS")
        await run_load(svc.base, row, int(1500 * scale), 48, max_tokens=32)
        status = await wait_status(svc.base, lambda s: True)
        restarts = sum(r["restarts"] for r in status["replicas"])
        row.notes.append(
            f"{restarts} replica deaths mid-event (restarted); every cut stream ended with a "
            "whole error event after whole events (a torn event would count as failed)"
        )
        return await finish(svc, row)


@scenario("rolling")
async def rolling(scale: float) -> Row:
    row = Row("rolling restart (SIGHUP)")
    async with service() as svc:
        row.start_rss = svc.status_field("VmRSS")

        async def fault() -> None:
            await wait_done(row, int(500 * scale))
            svc.proc.send_signal(signal.SIGHUP)
            started = time.monotonic()
            await wait_status(
                svc.base,
                lambda s: (
                    all(r["restarts"] >= 1 and r["state"] == "ready" for r in s["replicas"])
                    and s.get("operation") is None
                ),
            )
            row.notes.append(f"3 replicas restarted in {time.monotonic() - started:.1f} s")

        await run_load(svc.base, row, int(3000 * scale), 48, during=fault)
        return await finish(svc, row)


@scenario("sigterm")
async def sigterm(scale: float) -> Row:
    row = Row("graceful stop (SIGTERM)")
    stopping = [False]
    async with service() as svc:
        row.start_rss = svc.status_field("VmRSS")

        async def fault() -> None:
            await wait_done(row, int(500 * scale))
            row.retried = int(await metric_sum(svc.base, "neuron_fleet_retries_total"))
            row.peak_rss = svc.status_field("VmHWM")
            stopping[0] = True
            svc.proc.send_signal(signal.SIGTERM)

        await run_load(
            svc.base,
            row,
            int(100_000 * scale),
            48,
            max_tokens=256,
            during=fault,
            refuse_ok=lambda: stopping[0],
        )
        code = await asyncio.to_thread(svc.proc.wait, 60)
        alive = [pid for pid in svc.replica_pids if _alive(pid)]
        row.notes.append(f"exit {code}, {len(alive)} replica processes left")
        return row


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return False


@scenario("disconnects")
async def disconnects(scale: float) -> Row:
    row = Row("clients leaving at random")
    rng = random.Random(7)
    n = int(5000 * scale)
    async with service() as svc:
        row.start_rss = svc.status_field("VmRSS")
        gate = asyncio.Semaphore(200)
        left = Row("")

        async def one(session: aiohttp.ClientSession) -> None:
            plan = rng.choice(("early", "mid", "mid", "full"))
            async with gate:
                row.sent += 1
                if plan == "early":
                    task = asyncio.ensure_future(
                        session.post(f"{svc.base}/v1/chat/completions", json=chat(64))
                    )
                    await asyncio.sleep(rng.uniform(0, 0.1))
                    if task.done():
                        task.result().close()
                    else:
                        task.cancel()
                    left.sent += 1
                    return
                if plan == "full":
                    await stream_once(session, svc.base, row, 64, False)
                    row.sent -= 1  # counted by stream_once
                    return
                resp = await session.post(f"{svc.base}/v1/chat/completions", json=chat(64))
                try:
                    if resp.status != 200:
                        row.fail(f"{resp.status}")
                        return
                    for _ in range(rng.randint(1, 20)):
                        await resp.content.readuntil(b"\n\n")
                    left.sent += 1
                finally:
                    resp.close()  # leave now (`async with` would wait for the whole body)

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(*(one(session) for _ in range(n)))
        status = await wait_status(
            svc.base, lambda s: s["inflight"] == 0 and s["queue_depth"] == 0, timeout=20
        )
        busy = []
        async with aiohttp.ClientSession() as http:
            for r in status["replicas"]:
                async with http.get(f"{r['url']}/metrics") as resp:
                    text = await resp.text()
                busy += [
                    line
                    for line in text.splitlines()
                    if line.startswith(("tgi_batch_current_size ", "tgi_queue_size "))
                    and float(line.split()[-1]) != 0
                ]
        row.refused = left.sent
        row.notes.append(
            f"{left.sent} left early; afterwards balancer inflight 0, queue 0, "
            f"replica batches {'busy: ' + str(busy) if busy else 'empty'}"
        )
        return await finish(svc, row)


def _stalled_reader(port: int, max_tokens: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    body = json.dumps(chat(max_tokens)).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


@scenario("slow-readers")
async def slow_readers(scale: float) -> Row:
    row = Row("slow readers (never read)")
    async with service(balancer={"client_timeout_s": 2.0}) as svc:
        row.start_rss = svc.status_field("VmRSS")
        port = int(svc.base.rsplit(":", 1)[1])
        stalled = [_stalled_reader(port, 1000) for _ in range(int(100 * scale))]
        try:
            await run_load(svc.base, row, int(2000 * scale), 24)
            await wait_status(svc.base, lambda s: s["inflight"] == 0, timeout=30)
        finally:
            for sock in stalled:
                sock.close()
        row.refused = len(stalled)
        row.notes.append(
            f"{len(stalled)} non-readers of 1000-token answers: each answer fits in the "
            "socket buffers, so the replica finished it and the slot was freed"
        )
        return await finish(svc, row)


JUNK = [
    (b"POST", b"/generate", b"application/json", b"{not json"),
    (b"POST", b"/generate", b"application/json", b'{"inputs":"\xff\xfe"}'),
    (b"POST", b"/generate", b"text/plain", b'{"inputs":"x"}'),
    (b"POST", b"/generate", b"application/json", b'["list"]'),
    (b"POST", b"/generate", b"application/json", b"[" * 50_000 + b"]" * 50_000),
    (b"POST", b"/v1/completions", b"application/json", b'{"prompt":"x","max_tokens":-1}'),
    (b"POST", b"/v1/completions", b"application/json", b'{"prompt":"x","max_tokens":NaN}'),
    (b"POST", b"/generate", b"application/json", b'{"inputs":"' + b"x" * 9_000_000 + b'"}'),
    (b"GET", b"/nope", b"", b""),
    (b"DELETE", b"/generate", b"", b""),
    (b"POST", b"/generate", b"application/json\r\nX-Big: " + b"a" * 20_000, b"{}"),
    (b"POST", b"/generate", b"application/json\r\nExpect: \x80", b"{}"),
    (b"GARBAGE", b"/", b"", b""),
]


async def junk_request(port: int, method: bytes, path: bytes, ctype: bytes, body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    if ctype:
        head += b"Content-Type: " + ctype + b"\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    try:
        writer.write(head + body)
        await writer.drain()
    except (ConnectionResetError, BrokenPipeError):
        pass
    try:
        async with asyncio.timeout(15):
            line = await reader.readline()
        return int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    except (TimeoutError, ConnectionResetError, ValueError, IndexError):
        return 0
    finally:
        writer.close()


@scenario("malformed")
async def malformed(scale: float) -> Row:
    row = Row("malformed requests (+ load)")
    async with service() as svc:
        row.start_rss = svc.status_field("VmRSS")
        port = int(svc.base.rsplit(":", 1)[1])
        gate = asyncio.Semaphore(50)
        statuses: dict[int, int] = {}

        async def one(i: int) -> None:
            async with gate:
                status = await junk_request(port, *JUNK[i % len(JUNK)])
                statuses[status] = statuses.get(status, 0) + 1

        async def junk() -> None:
            await asyncio.gather(*(one(i) for i in range(int(3000 * scale))))

        await run_load(svc.base, row, int(2000 * scale), 24, during=junk)
        bad = sum(n for s, n in statuses.items() if s == 0 or s >= 500)
        row.sent += sum(statuses.values())
        row.refused = sum(statuses.values()) - bad
        row.failed += bad
        row.notes.append(f"junk answered {dict(sorted(statuses.items()))}")
        return await finish(svc, row)


@scenario("slowloris")
async def slowloris(scale: float) -> Row:
    row = Row("slowloris (+ load)")
    async with service(balancer={"client_timeout_s": 2.0}) as svc:
        row.start_rss = svc.status_field("VmRSS")
        port = int(svc.base.rsplit(":", 1)[1])
        cut: list[float] = []

        async def trickle(body: bool) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            writer.write(head + (b"Content-Length: 1000\r\n\r\n" if body else b""))
            try:
                for _ in range(300):  # 30 s of trickling if nobody stops it
                    try:
                        async with asyncio.timeout(0.1):
                            if await reader.read(100) is not None:
                                break  # an answer (408) or EOF
                    except TimeoutError:
                        writer.write(b"a")
                        await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                pass
            cut.append(time.monotonic() - started)
            writer.close()

        async def crowd() -> None:
            n = int(300 * scale)
            await asyncio.gather(*(trickle(i % 2 == 0) for i in range(n)))

        await run_load(svc.base, row, int(2000 * scale), 24, during=crowd)
        row.sent += len(cut)
        row.refused = len(cut)
        row.notes.append(f"{len(cut)} trickling clients cut after at most {max(cut):.1f} s")
        return await finish(svc, row)


@scenario("overload")
async def overload(scale: float) -> Row:
    row = Row("bursts of 10x, 20x capacity")
    async with service(balancer={"max_queue": SLOTS}) as svc:
        row.start_rss = svc.status_field("VmRSS")
        peaks = []
        for factor in (10, 20):
            burst = Row("")
            n = int(factor * SLOTS * max(scale, 1.0))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                await asyncio.gather(
                    *(stream_once(s, svc.base, burst, 96, False) for _ in range(n))
                )
            for name in ("sent", "ok", "failed", "cut", "refused"):
                setattr(row, name, getattr(row, name) + getattr(burst, name))
            row.failures += burst.failures
            peaks.append(f"{factor}x: {burst.ok} served, {burst.refused} shed")
        row.notes.append("; ".join(peaks) + f" (capacity {SLOTS} slots + {SLOTS} queued)")
        return await finish(svc, row)


# --------------------------------------------------------------------------- main


def table(rows: list[Row]) -> str:
    head = f"{'scenario':<30} {'sent':>7} {'ok':>7} {'failed':>6} {'retried':>7} {'cut':>5} "
    head += f"{'refused':>7} {'peak RSS':>9}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r.name:<30} {r.sent:>7} {r.ok:>7} {r.failed:>6} {r.retried:>7} {r.cut:>5} "
            f"{r.refused:>7} {r.peak_rss / 2**20:>5.0f} MiB"
        )
    out.append("")
    for r in rows:
        start = f"RSS {r.start_rss / 2**20:.0f} MiB at start" if r.start_rss else ""
        notes = "; ".join([*r.notes, start] if start else r.notes)
        out.append(f"- {r.name}: {notes}")
        out += [f"    failure: {f}" for f in r.failures]
    return "\n".join(out)


async def main(args: argparse.Namespace) -> int:
    rows = []
    for name, run in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        started = time.monotonic()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        row = await run(args.scale)
        print(f"  {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        rows.append(row)
    print(table(rows))
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    parser.add_argument("--only", action="append", choices=list(SCENARIOS) or None)
    sys.exit(asyncio.run(main(parser.parse_args())))
