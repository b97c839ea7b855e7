"""What the balancer adds: TTFT overhead and relay cost, measured against direct in one run.

Starts (by PID, on loopback) one replica and a ``neuron-fleet balance`` process in front of
it, then alternates rounds of the *same* load (``--streams`` concurrent streams) sent
directly and through the balancer. Two phases:

- latency: a *pacer* replica that times every stream on its own (first token after
  ``--first-ms``, then one every ``--latency-step-ms``), so TTFT differences are the
  balancer's and not an artefact of a batch's step boundaries;
- relay cost: the simulated TGI replica pacing tokens ``--step-ms`` (2 ms) apart.

It prints:

- TTFT p50/p99 direct and through the balancer, and the difference (added TTFT);
- inter-token latency p50/p99 both ways;
- relay cost: the balancer process' CPU seconds (from /proc/PID/stat) per 100,000 relayed
  token events, and the capacity that implies on one core (events/s per CPU second).

Run: ``.venv/bin/python bench/relay_overhead.py`` (about a minute on 2 cores). Figures are
ratios from the same run: the absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import aiohttp

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children) from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


@dataclass
class Round:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    events: int = 0
    failed: int = 0
    seconds: float = 0.0


async def stream_once(session: aiohttp.ClientSession, url: str, tokens: int, out: Round) -> None:
    body = {"inputs": "benchmark prompt", "parameters": {"max_new_tokens": tokens}}
    start = time.perf_counter()
    last = None
    try:
        async with session.post(f"{url}/generate_stream", json=body) as resp:
            if resp.status != 200:
                out.failed += 1
                return
            buf = b""
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                buf += chunk
                n = buf.count(b"\n\n")
                if not n:
                    continue
                buf = buf[buf.rfind(b"\n\n") + 2 :]
                if last is None:
                    out.ttft.append(now - start)
                else:
                    out.itl.append(now - last)
                out.itl.extend([0.0] * (n - 1))
                last = now
                out.events += n
    except aiohttp.ClientError:
        out.failed += 1


async def run_round(
    url: str, streams: int, requests: int, tokens: int, spread_s: float = 0.0
) -> Round:
    """``requests`` streams, ``streams`` at a time; lengths vary +/-50% (same seed both
    ways) and workers start spread over ``spread_s`` so arrivals do not come in lockstep
    waves (which would measure burst queueing, not the relay)."""
    import random

    rng = random.Random(42)
    lengths = [rng.randint(max(1, tokens // 2), tokens * 3 // 2) for _ in range(requests)]
    out = Round()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(i: int) -> None:
            await asyncio.sleep(spread_s * i / streams)
            while lengths:
                await stream_once(session, url, lengths.pop(), out)

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(streams))), 600)
        out.seconds = time.perf_counter() - start
    return out


async def wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy")


def start(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Two phases: latency at Neuron-like pacing, then relay cost at a 2 ms firehose."""
    latency = await measure(args, args.latency_step_ms, pacer=True)
    cost = await measure(args, args.step_ms, pacer=False)
    return {"latency": latency, "relay_cost": cost}


async def measure(args: argparse.Namespace, step_ms: float, pacer: bool) -> dict[str, float]:
    sim_port, lb_port = free_port(), free_port()
    py = sys.executable
    if pacer:
        sim = start([
            py, __file__, "--serve-pacer", str(sim_port),
            "--first-ms", str(args.first_ms), "--latency-step-ms", str(step_ms),
        ])  # fmt: skip
    else:
        sim = start([
            py, "-m", "supervisor.simulator", "--port", str(sim_port),
            "--batch-size", str(args.streams), "--max-concurrent-requests", "4096",
            "--prefill-ms-per-token", "0", "--prefill-base-ms", "0",
            "--decode-base-ms", str(step_ms), "--decode-ms-per-slot", "0",
        ])  # fmt: skip
    lb = start([
        py, "-m", "supervisor", "balance", "--listen", f"127.0.0.1:{lb_port}",
        "--upstream", f"http://127.0.0.1:{sim_port}", "--max-inflight-per-replica", "0",
        "--log-level", "WARNING",
    ])  # fmt: skip
    direct_url, lb_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{lb_port}"
    try:
        await wait_healthy(direct_url)
        await wait_healthy(lb_url)
        await run_round(lb_url, args.streams, args.streams, 10)  # warm up connections
        direct, balanced = Round(), Round()
        lb_cpu = 0.0
        for _ in range(args.rounds):
            spread = args.tokens * step_ms / 1000
            d = await run_round(direct_url, args.streams, args.requests, args.tokens, spread)
            before = cpu_seconds(lb.pid)
            b = await run_round(lb_url, args.streams, args.requests, args.tokens, spread)
            lb_cpu += cpu_seconds(lb.pid) - before
            for total, one in ((direct, d), (balanced, b)):
                total.ttft += one.ttft
                total.itl += one.itl
                total.events += one.events
                total.failed += one.failed
                total.seconds += one.seconds
    finally:
        stop(lb)
        stop(sim)
    ms = 1000.0
    result = {
        "replica": "pacer" if pacer else "simulated TGI",
        "step_ms": step_ms,
        "streams": args.streams,
        "requests_per_side": args.requests * args.rounds,
        "ttft_p50_direct_ms": percentile(direct.ttft, 50) * ms,
        "ttft_p50_balancer_ms": percentile(balanced.ttft, 50) * ms,
        "ttft_p99_direct_ms": percentile(direct.ttft, 99) * ms,
        "ttft_p99_balancer_ms": percentile(balanced.ttft, 99) * ms,
        "itl_p50_direct_ms": percentile(direct.itl, 50) * ms,
        "itl_p50_balancer_ms": percentile(balanced.itl, 50) * ms,
        "itl_p99_direct_ms": percentile(direct.itl, 99) * ms,
        "itl_p99_balancer_ms": percentile(balanced.itl, 99) * ms,
        "events_relayed": balanced.events,
        "events_per_s_through_balancer": balanced.events / balanced.seconds,
        "events_per_s_direct": direct.events / direct.seconds,
        "balancer_cpu_s": lb_cpu,
        "balancer_cpu_s_per_100k_events": lb_cpu / balanced.events * 100_000,
        "relay_capacity_events_per_cpu_s": balanced.events / lb_cpu if lb_cpu else float("inf"),
        "failed_direct": direct.failed,
        "failed_balancer": balanced.failed,
    }
    result["added_ttft_p50_ms"] = result["ttft_p50_balancer_ms"] - result["ttft_p50_direct_ms"]
    result["added_ttft_p99_ms"] = result["ttft_p99_balancer_ms"] - result["ttft_p99_direct_ms"]
    return result


def report(r: dict[str, float]) -> str:
    lines = [
        f"{r['replica']} replica pacing tokens {r['step_ms']:g} ms apart, "
        f"{r['streams']} concurrent streams, "
        f"{r['requests_per_side']} requests each way",
        f"  TTFT p50  direct {r['ttft_p50_direct_ms']:8.2f} ms   balancer "
        f"{r['ttft_p50_balancer_ms']:8.2f} ms   added {r['added_ttft_p50_ms']:+.2f} ms (goal <= 1)",
        f"  TTFT p99  direct {r['ttft_p99_direct_ms']:8.2f} ms   balancer "
        f"{r['ttft_p99_balancer_ms']:8.2f} ms   added {r['added_ttft_p99_ms']:+.2f} ms (goal <= 5)",
        f"  ITL  p50  direct {r['itl_p50_direct_ms']:8.2f} ms   balancer "
        f"{r['itl_p50_balancer_ms']:8.2f} ms",
        f"  ITL  p99  direct {r['itl_p99_direct_ms']:8.2f} ms   balancer "
        f"{r['itl_p99_balancer_ms']:8.2f} ms",
        f"  relayed {r['events_relayed']} events at {r['events_per_s_through_balancer']:.0f}/s "
        f"(direct {r['events_per_s_direct']:.0f}/s); balancer CPU {r['balancer_cpu_s']:.2f} s",
        f"  relay cost {r['balancer_cpu_s_per_100k_events']:.2f} CPU-s per 100k events = "
        f"{r['relay_capacity_events_per_cpu_s']:.0f} events/s on one core (goal >= 20000)",
        f"  failed: direct {r['failed_direct']}, balancer {r['failed_balancer']}",
    ]
    return "\n".join(lines)


def serve_pacer(port: int, first_ms: float, step_ms: float) -> None:
    """A replica that paces each stream independently (TGI's /generate_stream format)."""
    from aiohttp import web

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def generate_stream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = body.get("parameters", {}).get("max_new_tokens", 16)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        due = loop.time() + first_ms / 1000
        for i in range(1, n + 1):
            await asyncio.sleep(max(0.0, due - loop.time()))
            event = {"index": i, "token": {"id": i, "text": " tok", "logprob": 0.0,
                     "special": False}, "generated_text": None, "details": None}  # fmt: skip
            await resp.write(b"data:" + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
            due += step_ms / 1000
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/generate_stream", generate_stream)
    import uvloop

    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--requests", type=int, default=128, help="requests per round per side")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=2.0, help="relay-cost phase pacing")
    parser.add_argument(
        "--latency-step-ms", type=float, default=30.0, help="latency phase pacing (Neuron-like)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--first-ms", type=float, default=50.0, help="pacer's time to 1st token")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--serve-pacer", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_pacer:
        serve_pacer(args.serve_pacer, args.first_ms, args.latency_step_ms)
        sys.exit(0)
    import uvloop

    figures = uvloop.run(main(args))
    print(report(figures["latency"]))
    print(report(figures["relay_cost"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
