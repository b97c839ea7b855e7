"""The security review's abuse cases, re-run against a fresh ``neuron-fleet serve``.

Each scenario starts the service with three simulated replicas (bench/faults.py's
``service``: free loopback ports, by PID, stopped with SIGTERM), does what the review did,
and prints one row with the figure the review measured before the fixes (issue 12) and the
figure now:

    huge prompt       one 7 MB prompt with a tokenizer configured: time to the answer,
                      service RSS growth (peak, kept); then four at once: /health worst
    idle connections  3,000 idle connections opened at once: accepted vs refused
    one client floods 1,100 concurrent streams from one address, then 20 from another:
                      what each got
    queued bodies     slots full, then 60 requests with 8 MB bodies: queued vs refused,
                      RSS growth
    tokenize flood    60 concurrent 600 KB /tokenize while /generate runs
    admin             cross-site drain, DNS-rebinding status, no token: answers
    announced bodies  (issue 18) one address holds 100 connections whose headers announce a
                      body just under max_body_bytes and send none (halving the length when
                      refused); then 5 clients on other addresses: how many are served, the
                      budget the attacker holds, what it gets in the end
    slow bodies       (issue 18) one address sends 40% of 100 announced 1.9 MB bodies, then
                      stalls: its 413s, the budget it holds, the other clients served

Run by hand: ``.venv/bin/python bench/security.py`` (about 2 minutes on 2 cores);
``--only NAME`` for one scenario. Traffic on loopback only; every loop bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from faults import ADMIN_TOKEN, ROOT, Service, service

sys.path.insert(0, str(ROOT))
from tests.helpers_tokenizer import build_tiny_tokenizer

MIB = 2**20
Scenario = Callable[[], Awaitable[list[str]]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return register


def rss(svc: Service) -> int:
    return svc.status_field("VmRSS")


def hwm(svc: Service) -> int:
    return svc.status_field("VmHWM")


async def _post(
    http: aiohttp.ClientSession, url: str, body: bytes, timeout: float = 120
) -> tuple[int, float]:
    started = time.monotonic()
    headers = {"Content-Type": "application/json"}
    async with http.post(
        url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as resp:
        await resp.read()
        return resp.status, time.monotonic() - started


async def _health_worst(base: str, stop: asyncio.Event) -> float:
    worst = 0.0
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            started = time.monotonic()
            async with http.get(f"{base}/health") as resp:
                await resp.read()
            worst = max(worst, time.monotonic() - started)
            await asyncio.sleep(0.05)
    return worst


async def _tokenizer_loaded(http: aiohttp.ClientSession, base: str) -> None:
    """The tokenizer loads in the background: until it has, prompts are estimated and
    forwarded. A 200,000-character probe is refused by the balancer's character bound
    (16,000 x the tiny vocabulary's longest token) only once it is loaded."""
    probe = {"inputs": "a" * 200_000, "parameters": {"max_new_tokens": 1}}
    for _ in range(600):
        async with http.post(f"{base}/generate", json=probe) as resp:
            if resp.status == 422 and "characters" in (await resp.json()).get("error", ""):
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("the tokenizer did not load within 60 s")


@scenario("huge prompt")
async def huge_prompt() -> list[str]:
    folder = build_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="nf-sec-tok-")))
    async with service(balancer={"tokenizer_path": str(folder)}) as svc:
        async with aiohttp.ClientSession() as http:
            body = b'{"inputs":"' + b"a" * (7 * 10**6) + b'","parameters":{"max_new_tokens":1}}'
            await _tokenizer_loaded(http, svc.base)
            before = rss(svc)
            status, took = await _post(http, f"{svc.base}/generate", body)
            peak, kept = hwm(svc) - before, rss(svc) - before
            stop = asyncio.Event()
            watcher = asyncio.create_task(_health_worst(svc.base, stop))
            started = time.monotonic()
            four = await asyncio.gather(
                *(_post(http, f"{svc.base}/generate", body) for _ in range(4))
            )
            wall = time.monotonic() - started
            stop.set()
            worst = await watcher
    return [
        f"| huge prompt (7 MB, tiny tokenizer) | 422 after ~8 s CPU; RSS +870 MB peak, "
        f"+463 MB kept | {status} after {took:.2f} s; RSS +{peak / MIB:.0f} MiB peak, "
        f"+{kept / MIB:.0f} MiB kept |",
        f"| four at once | 35 s saturated CPU, RSS 2.2 GB, /health up to 702 ms | "
        f"{sorted({s for s, _ in four})} in {wall:.2f} s, /health worst {worst * 1000:.0f} ms |",
    ]


@scenario("idle connections")
async def idle_connections() -> list[str]:
    async with service() as svc:
        port = int(svc.base.rsplit(":", 1)[1])
        socks: list[socket.socket] = []
        before = rss(svc)
        try:
            for _ in range(3000):
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            await asyncio.sleep(0.5)
            for sock in socks:
                sock.setblocking(False)
                try:
                    sock.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                except OSError:
                    pass  # closed by the balancer already
            await asyncio.sleep(2.0)
            answers: Counter[str] = Counter()
            for sock in socks:
                try:
                    head = sock.recv(64)
                except BlockingIOError:
                    head = b"(no answer yet)"
                except OSError:
                    head = b"(reset)"
                answers[head[:12].decode("latin-1") or "(closed)"] += 1
            accepted = answers["HTTP/1.1 200"]
            refused = 3000 - accepted
            grown = rss(svc) - before
        finally:
            for sock in socks:
                sock.close()
    return [
        f"| 3,000 idle connections at once | all accepted | {accepted} served, {refused} "
        f"refused ({answers['HTTP/1.1 503']} with a 503, the rest closed); "
        f"RSS +{grown / MIB:.0f} MiB |"
    ]


async def _stream(http: aiohttp.ClientSession, base: str, tokens: int) -> int:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": tokens}}
    async with http.post(
        f"{base}/generate_stream", json=body, timeout=aiohttp.ClientTimeout(total=300)
    ) as resp:
        await resp.read()
        return resp.status


@scenario("one client floods")
async def one_client_floods() -> list[str]:
    async with service(balancer={"queue_timeout_s": 300}) as svc:
        greedy = aiohttp.TCPConnector(limit=0, local_addr=("127.0.0.2", 0))
        polite = aiohttp.TCPConnector(limit=0, local_addr=("127.0.0.3", 0))
        async with (
            aiohttp.ClientSession(connector=greedy) as a,
            aiohttp.ClientSession(connector=polite) as b,
        ):
            flood = [asyncio.create_task(_stream(a, svc.base, 40)) for _ in range(1100)]
            await asyncio.sleep(3)
            other = await asyncio.gather(*(_stream(b, svc.base, 8) for _ in range(20)))
            got = Counter(await asyncio.gather(*flood))
    return [
        "| one client: 1,100 streams, then 20 from another | the first fills the queue "
        f"(1,024), the other gets 429 | first: {got[200]} served, {got[429]} got 429, "
        f"{got[503]} got 503 (max_connections_per_client 512); "
        f"other: {other.count(200)}/20 served |"
    ]


@scenario("queued bodies")
async def queued_bodies() -> list[str]:
    # 8 MB bodies: above the 2000000-byte default (TGI's --payload-limit), as an operator
    # who raised both would allow.
    balancer = {"queue_timeout_s": 300, "max_body_bytes": 8 * MIB}
    async with service(balancer=balancer) as svc:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            hold = [asyncio.create_task(_stream(http, svc.base, 400)) for _ in range(24)]
            await asyncio.sleep(1)
            before = rss(svc)
            body = b'{"inputs":"' + b"b" * (8 * MIB - 64) + b'","parameters":{"max_new_tokens":1}}'
            results = await asyncio.gather(
                *(_post(http, f"{svc.base}/generate", body, 300) for _ in range(60))
            )
            peak = hwm(svc) - before
            await asyncio.gather(*hold)
    got = Counter(s for s, _ in results)
    return [
        "| 60 queued requests with 8 MB bodies | all queued, +15 MB RSS each (1,024 ≈ 15 GB) | "
        f"{sum(n for s, n in got.items() if s != 503)} admitted, {got[503]} refused (503, "
        f"body budget 256 MiB); RSS +{peak / MIB:.0f} MiB peak |"
    ]


@scenario("tokenize flood")
async def tokenize_flood() -> list[str]:
    async with service() as svc:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            body = b'{"inputs":"' + b"hello " * 100_000 + b'"}'
            gens = [asyncio.create_task(_stream(http, svc.base, 16)) for _ in range(20)]
            toks = await asyncio.gather(
                *(_post(http, f"{svc.base}/tokenize", body) for _ in range(60))
            )
            gen = await asyncio.gather(*gens)
    got = Counter(s for s, _ in toks)
    return [
        "| 60 concurrent 600 KB /tokenize + /generate | all 60 served (no admission) | "
        f"{got[200]} served, {got[429]} got 429 (limit 16); /generate {gen.count(200)}/20 |"
    ]


@scenario("admin")
async def admin() -> list[str]:
    async with service() as svc:
        port = int(svc.base.rsplit(":", 1)[1])
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        drain = f"{svc.base}/fleet/replicas/replica-0/drain"
        async with aiohttp.ClientSession() as http:
            form = {**auth, "Origin": "http://evil.example"}
            async with http.post(drain, data={"a": "1"}, headers=form) as r1:
                cross = r1.status
            async with http.post(drain, data={"a": "1"}) as r2:
                no_token = r2.status
            rebound = {**auth, "Host": f"attacker.example:{port}"}
            async with http.get(f"{svc.base}/fleet/status", headers=rebound) as r3:
                rebinding = r3.status
    return [
        f"| admin: form POST from a web page / no token / rebinding Host | 200 (drained) / 200 "
        f"/ 200 | {cross} / {no_token} / {rebinding} |"
    ]


async def _announce(port: int, length: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=ATTACKER)
    writer.write(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {length}\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


async def _refused_soon(reader: asyncio.StreamReader, within: float) -> bytes | None:
    """The status line when an answer came within ``within`` seconds (a refusal)."""
    try:
        return await asyncio.wait_for(reader.readline(), within)
    except TimeoutError:
        return None


async def _others(base: str, n: int) -> list[int]:
    async def one(i: int) -> int:
        connector = aiohttp.TCPConnector(local_addr=(f"127.0.0.{3 + i}", 0))
        async with aiohttp.ClientSession(connector=connector) as http:
            body = {"inputs": "hello", "parameters": {"max_new_tokens": 4}}
            async with http.post(f"{base}/generate", json=body) as resp:
                await resp.read()
                return resp.status

    return list(await asyncio.gather(*(one(i) for i in range(n))))


ATTACKER = ("127.0.0.2", 0)


@scenario("announced bodies")
async def announced_bodies() -> list[str]:
    async with service(balancer={"body_timeout_s": 10.0}) as svc:
        port = int(svc.base.rsplit(":", 1)[1])
        held, refusals, length = [], Counter(), 2_000_000 - 1
        for _ in range(400):  # bounded: 100 held, each refusal halves the length
            if len(held) == 100:
                break
            reader, writer = await _announce(port, length)
            answer = await _refused_soon(reader, 0.05)
            if answer is None:
                held.append((reader, writer))
                continue
            refusals[answer.split()[1].decode() if answer else "closed"] += 1
            writer.close()
            length //= 2
        started = time.monotonic()
        statuses = await _others(svc.base, 5)
        took = time.monotonic() - started
        ends = Counter()
        for reader, writer in held:
            line = await _refused_soon(reader, 15)
            ends[line.split()[1].decode() if line else "none"] += 1
            writer.close()
    return [
        "| announced bodies: one address, 100 connections announcing ~2 MB, no body; then 5 "
        "other clients | 73 connections held 134 MB of budget, 0/5 others served (503) | "
        f"{len(held)} held, refused on the way: {dict(refusals) or 'none'}; others "
        f"{statuses.count(200)}/5 served in {took:.2f} s; the attacker's end: {dict(ends)} "
        "(408 after body_timeout_s 10 s) |"
    ]


@scenario("slow bodies")
async def slow_bodies() -> list[str]:
    async with service() as svc:
        port = int(svc.base.rsplit(":", 1)[1])
        streams, part = [], b'{"inputs":"' + b"a" * 760_000
        for _ in range(100):
            reader, writer = await _announce(port, 1_900_000)
            writer.write(part)
            streams.append((reader, writer))
        await asyncio.sleep(1.0)
        statuses = await _others(svc.base, 5)
        refused = Counter()
        for reader, _ in streams:
            line = await _refused_soon(reader, 0.01)
            refused[line.split()[1].decode() if line else "still sending"] += 1
        for _, writer in streams:
            writer.close()
    return [
        "| slow bodies: one address sends 760 kB of 100 announced 1.9 MB bodies, stalls; then "
        "5 other clients | (not measured) | attacker: "
        f"{dict(refused)} (share 64 MiB = 44 such parts); others {statuses.count(200)}/5 "
        "served |"
    ]


async def main(only: list[str]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20000)), hard))
    print("| scenario | before (issue 12) | now |\n|---|---|---|")
    for name, fn in SCENARIOS.items():
        if only and name not in only:
            continue
        for line in await fn():
            print(line, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", default=[], choices=sorted(SCENARIOS))
    asyncio.run(main(parser.parse_args().only))
