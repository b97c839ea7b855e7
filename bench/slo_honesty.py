"""False refusals of the TTFT SLO gate at light load, in the three forms of issue 18.

Real processes: one simulated TGI Neuron replica (``python -m supervisor.simulator``, inf2
timing at ``--speed``) behind ``neuron-fleet balance --ttft-slo``. Every probe the gate
refuses (429) gets a **twin**: the same request sent straight to the replica at that
moment; a refusal is *false* when the twin's first token came within the SLO (the gate
refused what it could serve), *right* when it did not. Printed per case: probes, admitted
and within the SLO, refused right, refused falsely. The cases:

- ``non-streaming``: two non-streaming answers (~6 s) hold both slots; a stream arrives
  0.5 s in (it really would wait ~5.5 s: must be refused) and 5.5 s in (~0.5 s: must be
  served). Before: the answers were forecast as if in prefill forever.
- ``long prefill``: three streams start; right after their first token a 16k-token prompt
  is admitted (its prefill pauses them ~1.6 s); after it, a stream arrives with every slot
  busy. Before: the step time came from the young streams' mean (their one step = the
  prefill).
- ``stall``: the replica is stopped (SIGSTOP) for 6 s under a stream waiting for its first
  token (the forecast is 6 s late once); then probes arrive at light load while two
  background clients keep both slots busy, for 24 s. Before: the 6 s lateness stayed the
  gate's margin until 100 more samples.

Run: ``.venv/bin/python bench/slo_honesty.py [--speed 1] [--rounds 2]`` (about 2 minutes).
Traffic on loopback only; every loop bounded; processes stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from harness import Proc, free_port, stop_all, wait_http
from targets import PY, start_replicas

SLO_S = 2.0
PROMPT = "x" * 400  # ~100 tokens
Case = Callable[[aiohttp.ClientSession, str, str, Proc, Counter], Awaitable[None]]


def stream_body(max_tokens: int, prompt: str = PROMPT) -> dict:
    return {"model": "tgi", "prompt": prompt, "max_tokens": max_tokens, "stream": True}


LAST_REFUSAL: list[str] = [""]


async def first_token(http: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, float]:
    """Status and seconds to the first event (or to the refusal); reads the rest."""
    sent = time.monotonic()
    async with http.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            LAST_REFUSAL[0] = (await resp.read()).decode(errors="replace")
            return resp.status, time.monotonic() - sent
        await resp.content.readuntil(b"\n\n")
        ttft = time.monotonic() - sent
        await resp.read()
        return 200, ttft


async def probe(
    http: aiohttp.ClientSession, base: str, replica: str, body: dict, tally: Counter
) -> None:
    """One request through the gate; a refused one's twin goes straight to the replica."""
    status, seconds = await first_token(http, base, body)
    if status == 200:
        tally["served within SLO" if seconds <= SLO_S else "served late"] += 1
        return
    if status != 429:
        tally[f"other {status}"] += 1
        return
    twin_status, twin_ttft = await first_token(http, replica, body)
    met = twin_status == 200 and twin_ttft <= SLO_S
    tally["refused falsely" if met else "refused rightly"] += 1
    if met:
        print(f"  false refusal: twin TTFT {twin_ttft:.2f} s; {LAST_REFUSAL[0][:160]}", flush=True)


async def teach(http: aiohttp.ClientSession, base: str) -> None:
    for _ in range(4):
        status, _ = await first_token(http, base, stream_body(40))
        assert status == 200, status


async def non_streaming(
    http: aiohttp.ClientSession, base: str, replica: str, proc: Proc, tally: Counter
) -> None:
    whole = {"inputs": PROMPT, "parameters": {"max_new_tokens": 200}}  # ~6 s at speed 1
    for at in (0.5, 5.5):
        started = time.monotonic()
        answers = [asyncio.create_task(http.post(f"{base}/generate", json=whole)) for _ in "ab"]
        await asyncio.sleep(at * SCALE)
        await probe(http, base, replica, stream_body(10), tally)
        for task in answers:
            (await task).release()
        await asyncio.sleep(max(0.0, started + 0.2 - time.monotonic()))


async def long_prefill(
    http: aiohttp.ClientSession, base: str, replica: str, proc: Proc, tally: Counter
) -> None:
    async def stream_after(signal_: asyncio.Event | None) -> None:
        async with http.post(f"{base}/v1/completions", json=stream_body(250)) as resp:
            await resp.content.readuntil(b"\n\n")
            if signal_ is not None:
                signal_.set()
            await resp.read()

    first = asyncio.Event()
    streams = [asyncio.create_task(stream_after(first if i == 0 else None)) for i in range(3)]
    await first.wait()
    long_body = stream_body(50, "x" * 60_000)  # ~15k tokens: a ~1.5 s prefill
    long_task = asyncio.create_task(first_token(http, base, long_body))
    await asyncio.sleep(1.9 * SCALE)  # its prefill is over; every slot is busy
    await probe(http, base, replica, stream_body(10), tally)
    await long_task
    await asyncio.gather(*streams)


async def stall(
    http: aiohttp.ClientSession, base: str, replica: str, proc: Proc, tally: Counter
) -> None:
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        waiting = asyncio.create_task(first_token(http, base, stream_body(10)))
        await asyncio.sleep(6.0 * SCALE)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    _, late = await waiting
    tally["stalled first token (s)"] = round(late / SCALE, 1)
    stop = time.monotonic() + 24.0 * SCALE

    async def background() -> None:  # keeps both slots busy, back to back
        while time.monotonic() < stop:
            status, _ = await first_token(http, base, stream_body(60))
            if status != 200:
                tally["background refused"] += 1
                await asyncio.sleep(0.1 * SCALE)

    busy = [asyncio.create_task(background()) for _ in range(2)]
    await asyncio.sleep(1.0 * SCALE)
    while time.monotonic() < stop:
        await probe(http, base, replica, stream_body(10), tally)
        await asyncio.sleep(1.0 * SCALE)
    await asyncio.gather(*busy)


CASES: dict[str, Case] = {
    "non-streaming": non_streaming,
    "long prefill": long_prefill,
    "stall": stall,
}
SCALE = 1.0
"""Seconds of the cases' schedule per inf2 second (1 / --speed)."""


async def run_case(name: str, case: Case, speed: float, rounds: int, work: Path) -> Counter:
    batch = 4 if name == "long prefill" else 2
    procs, urls = start_replicas(1, work / name.replace(" ", "-"), speed=speed, batch=batch)
    listen = free_port()
    argv = [PY, "-m", "supervisor", "balance", "--listen", f"127.0.0.1:{listen}"]
    argv += ["--upstream", urls[0], "--max-inflight-per-replica", str(batch)]
    argv += ["--ttft-slo", str(SLO_S), "--health-interval", "0.5"]
    procs.append(Proc("balancer", argv, work / name.replace(" ", "-")))
    base = f"http://127.0.0.1:{listen}"
    tally: Counter = Counter()
    try:
        await wait_http(f"{urls[0]}/health", proc=procs[0])
        await wait_http(f"{base}/health", proc=procs[1])
        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            await teach(http, base)
            for _ in range(rounds):
                await case(http, base, urls[0], procs[0], tally)
    finally:
        stop_all(procs)
    return tally


async def main(args: argparse.Namespace) -> None:
    global SCALE, SLO_S
    SCALE = 1.0 / args.speed
    SLO_S = SLO_S * SCALE
    work = Path(tempfile.mkdtemp(prefix="nf-slo-honesty-"))
    print(f"TTFT SLO {SLO_S / SCALE:g} inf2 s; replica speed {args.speed:g}; {args.rounds} rounds")
    print("| case | probes | served within SLO | refused rightly | refused falsely | other |")
    print("|---|---|---|---|---|---|")
    for name, case in CASES.items():
        if args.only and name not in args.only:
            continue
        tally = await run_case(name, case, args.speed, args.rounds, work)
        other = {k: v for k, v in tally.items() if k not in KNOWN}
        probes = sum(v for k, v in tally.items() if k in KNOWN or k.startswith(("served", "other")))
        print(
            f"| {name} | {probes} | {tally['served within SLO']} | "
            f"{tally['refused rightly']} | {tally['refused falsely']} | {other or '-'} |",
            flush=True,
        )


KNOWN = ("served within SLO", "refused rightly", "refused falsely")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", action="append", default=[], choices=sorted(CASES))
    sys.exit(asyncio.run(main(parser.parse_args())))
