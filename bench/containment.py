"""Containment: what one poison request, one hanging request, or one host-level event costs.

Each scenario starts a fresh ``neuron-fleet serve`` (three replicas of
bench/containment_replica.py under the ``command`` launcher, on free loopback ports, by PID),
does one nasty thing, and prints what happened to the *processes* (the replica program's own
marks, not the balancer's view):

    poison 424-then-exit     3 sends: replica deaths in total and per send, final answer
    poison event-then-exit   the same with a 200 stream whose first event is the error
    exit mid-event           the same with a death in the middle of an event, after a token
    hang (+ /health)         1 hanging request and 9 unrelated ones sent meanwhile:
                             replicas wedged, unrelated ones served and their slowest time
    hang, every slot busy    the same with 12 unrelated 5 s streams, some of which land on
                             the wedged replica
    poison, exit after window  424, exit 1.5 s later (after confirm_window_s = 1 s)
    poison, 3 sends at once  3 identical sends together, then 2 more: deaths
    poison after a survival  each replica first lives through an unrelated 424
    resends in flight        2 resends while the first (slow 424) process is dying
    fleet-wide SIGKILL       9 identical popular streams in flight, every replica SIGKILLed
                             together; once back: requests quarantined (false quarantines)
                             and identical requests refused out of 5

Run by hand (not in CI): ``.venv/bin/python bench/containment.py`` (about a minute).
Loopback only; every process started here is stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from harness import consecutive_free_ports

ROOT = Path(__file__).resolve().parents[1]
REPLICA = Path(__file__).with_name("containment_replica.py")
ADMIN_TOKEN = secrets.token_urlsafe(32)
FIRST_BYTE_TIMEOUT_S = 3.0

FLEET = """\
[model]
id = "neuron-fleet/simulated"
batch_size = 4

[fleet]
launcher = "command"
devices = 2
replicas = 3
cores_per_replica = 1
base_port = {base_port}
min_ready = 3
startup_timeout_s = 30
stop_grace_s = 2

[launcher.command]
template = "{python} {replica} {{port}} {{name}} {folder}"

[balancer]
listen = "127.0.0.1:{port}"
health_interval_s = 0.5
health_timeout_s = 1.0
first_byte_timeout_s = {first_byte}
"""


class Service:
    """One ``neuron-fleet serve`` in a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.marks = folder / "marks"
        self.marks.mkdir()
        port, *replica_ports = consecutive_free_ports(4)
        self.url = f"http://127.0.0.1:{port}"
        config = folder / "fleet.toml"
        config.write_text(
            FLEET.format(
                base_port=replica_ports[0],
                port=port,
                python=sys.executable,
                replica=REPLICA,
                folder=self.marks,
                first_byte=FIRST_BYTE_TIMEOUT_S,
            )
        )
        env = {**os.environ, "NEURON_FLEET_ADMIN_TOKEN": ADMIN_TOKEN}
        self.log = open(folder / "serve.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "serve", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def count(self, kind: str) -> int:
        return sum(1 for _ in self.marks.glob(f"{kind}-*"))

    async def status(self, http: aiohttp.ClientSession) -> dict:
        async with http.get(f"{self.url}/fleet/status", headers=self.admin) as r:
            return await r.json()

    async def all_ready(self, http: aiohttp.ClientSession, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = await self.status(http)
                if all(r["state"] == "ready" for r in status["replicas"]):
                    return
            except (aiohttp.ClientError, KeyError, json.JSONDecodeError):
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError("replicas not ready")

    async def post(
        self, http: aiohttp.ClientSession, path: str, doc: dict
    ) -> tuple[int, str, float]:
        began = time.monotonic()
        async with http.post(f"{self.url}{path}", json=doc) as r:
            return r.status, await r.text(), time.monotonic() - began

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


async def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the replicas never got there")
        await asyncio.sleep(0.05)


async def poison(service: Service, http: aiohttp.ClientSession, path: str, word: str) -> str:
    statuses, deaths = [], []
    for _ in range(3):
        await service.all_ready(http)
        before = service.count("died")
        status, _, _ = await service.post(http, path, {"inputs": word})
        await asyncio.sleep(2.5)  # every exit seen (1.5 s late ones too)
        statuses.append(status)
        deaths.append(service.count("died") - before)
    return f"replica deaths {sum(deaths)} over 3 sends (per send {deaths}), answers {statuses}"


async def poison_at_once(service: Service, http: aiohttp.ClientSession) -> str:
    """3 identical poison sends at once (before anything failed), then a 4th and 5th."""
    await service.all_ready(http)
    first = await asyncio.gather(
        *(service.post(http, "/generate", {"inputs": "answer-then-exit"}) for _ in range(3))
    )
    await asyncio.sleep(1.5)
    at_once = service.count("died")
    later = []
    for _ in range(2):
        await service.all_ready(http)
        status, _, _ = await service.post(http, "/generate", {"inputs": "answer-then-exit"})
        later.append(status)
        await asyncio.sleep(1.5)
    return (
        f"replica deaths {at_once} from 3 sends at once (answers {[s for s, _, _ in first]}), "
        f"{service.count('died') - at_once} more from 2 later sends (answers {later})"
    )


async def poison_after_survival(service: Service, http: aiohttp.ClientSession) -> str:
    """Every replica first lives through an unrelated failure (a 424, found alive), then
    the poison is sent 3 times."""
    await service.post(http, "/generate", {"inputs": "harmless-424"})
    await asyncio.sleep(2.0)
    return await poison(service, http, "/generate", "answer-then-exit")


async def resends_in_flight(service: Service, http: aiohttp.ClientSession) -> str:
    """A client resends a poison whose 424 is slow (1.5 s) twice while the first send's
    process has answered but not exited."""
    await service.all_ready(http)
    doc = {"inputs": "slow-424-exit"}
    first = asyncio.ensure_future(service.post(http, "/generate", doc))
    await until(lambda: service.count("seen") > 0)
    await asyncio.sleep(1.6)  # the first 424 is out, its process about to exit
    resends = await asyncio.gather(*(service.post(http, "/generate", doc) for _ in range(2)))
    status, _, _ = await first
    await asyncio.sleep(2.0)
    return (
        f"replica deaths {service.count('died')} over 3 sends "
        f"(answers {[status, *(s for s, _, _ in resends)]})"
    )


async def hang(service: Service, http: aiohttp.ClientSession) -> str:
    await service.all_ready(http)
    hanging = asyncio.ensure_future(
        service.post(http, "/generate", {"inputs": "hang", "stream": True})
    )
    await until(lambda: service.count("hung") > 0)
    others = await asyncio.gather(
        *(service.post(http, "/generate", {"inputs": f"hello {i}"}) for i in range(9))
    )
    status, _, took = await hanging
    await asyncio.sleep(2.0)
    served = sum(1 for s, _, _ in others if s == 200)
    slowest = max(t for _, _, t in others)
    return (
        f"wedged replicas {service.count('hung')}, hanging request {status} after "
        f"{took:.1f} s, unrelated served {served}/9 (slowest {slowest:.2f} s; first-byte "
        f"timeout {FIRST_BYTE_TIMEOUT_S:g} s)"
    )


async def hang_under_load(service: Service, http: aiohttp.ClientSession) -> str:
    """The same with every slot busy: 12 long streams (5 s) sent meanwhile, some of which
    land on the wedged replica (slot cap 4 per replica)."""
    await service.all_ready(http)
    hanging = asyncio.ensure_future(
        service.post(http, "/generate", {"inputs": "hang", "stream": True})
    )
    await until(lambda: service.count("hung") > 0)
    popular = {"inputs": "popular", "parameters": {"max_new_tokens": 100}}
    streams = [
        asyncio.ensure_future(service.post(http, "/generate_stream", {**popular, "n": i}))
        for i in range(12)
    ]
    others = await asyncio.gather(*streams)
    status, _, _ = await hanging
    await asyncio.sleep(2.0)
    whole = sum(1 for s, text, _ in others if s == 200 and "error" not in text)
    slowest = max(t for _, _, t in others)
    retried = await _metric(service, http, "neuron_fleet_retries_total")
    hung = next(service.marks.glob("hung-*")).name.split("-")[1:3]
    on_wedged = service.count("seen-" + "-".join(hung)) - 1
    return (
        f"wedged replicas {service.count('hung')}, hanging request {status}, unrelated "
        f"5 s streams served whole {whole}/12 (slowest {slowest:.1f} s), sent to the "
        f"wedged replica {on_wedged}, retries {retried:g}"
    )


async def _metric(service: Service, http: aiohttp.ClientSession, name: str) -> float:
    async with http.get(f"{service.url}/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def fleet_kill(service: Service, http: aiohttp.ClientSession) -> str:
    await service.all_ready(http)
    popular = {"inputs": "popular", "parameters": {"max_new_tokens": 100}}
    calls = [
        asyncio.ensure_future(service.post(http, "/generate_stream", popular)) for _ in range(9)
    ]
    await until(lambda: service.count("seen") >= 9)
    await asyncio.sleep(0.3)
    pids = [r["pid"] for r in (await service.status(http))["replicas"]]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    await asyncio.gather(*calls)
    await service.all_ready(http)
    await asyncio.sleep(2.0)
    async with http.get(f"{service.url}/fleet/quarantine", headers=service.admin) as r:
        quarantined = (await r.json())["count"] if r.status == 200 else "n/a"
    if quarantined == "n/a":
        quarantined = (await service.status(http))["quarantine"]["count"]
    refused = 0
    for _ in range(5):
        status, _, _ = await service.post(http, "/generate_stream", popular)
        refused += status == 422
    return (
        f"{len(pids)} replicas SIGKILLed under 9 identical streams: false quarantines "
        f"{quarantined}, identical requests refused {refused}/5"
    )


SCENARIOS: dict[str, Callable[[Service, aiohttp.ClientSession], Awaitable[str]]] = {
    "poison 424-then-exit": lambda s, h: poison(s, h, "/generate", "answer-then-exit"),
    "poison event-then-exit": lambda s, h: poison(s, h, "/generate_stream", "event-then-exit"),
    "exit mid-event": lambda s, h: poison(s, h, "/generate_stream", "mid-event"),
    "poison, exit after window": lambda s, h: poison(s, h, "/generate", "late-exit"),
    "poison, 3 sends at once": poison_at_once,
    "poison after a survival": poison_after_survival,
    "resends in flight": resends_in_flight,
    "hang (+ /health)": hang,
    "hang, every slot busy": hang_under_load,
    "fleet-wide SIGKILL": fleet_kill,
}


async def main(only: str | None) -> None:
    timeout = aiohttp.ClientTimeout(total=120)
    for name, scenario in SCENARIOS.items():
        if only and only not in name:
            continue
        with tempfile.TemporaryDirectory(prefix="containment-") as tmp:
            service = Service(Path(tmp))
            try:
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    await service.all_ready(http)
                    row = await scenario(service, http)
            except Exception as exc:  # a row, not a traceback: the others still run
                tail = (Path(tmp) / "serve.log").read_text().splitlines()[-5:]
                row = f"error: {exc!r}; serve log: " + " | ".join(tail)
            finally:
                service.stop()
        print(f"{name:24} {row}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
