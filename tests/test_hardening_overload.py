"""Overload: bursts of 10x and 20x the fleet's capacity against ``neuron-fleet serve``.

The fleet's capacity is its slots (3 simulated replicas x batch 8 = 24 streams at once) plus
the balancer's bounded queue (24). A burst far beyond that must be shed at once with 429 +
Retry-After, while the fleet keeps every slot busy, admitted requests wait behind at most
the queue's worth of others, and the balancer's memory stays flat whatever the burst size.
Assertions are on counts and bounds, never on wall-clock speed; figures are printed.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import pytest

from supervisor.procutil import pid_alive
from tests.conftest import free_ports
from tests.test_serve import admin_auth, demo_config, start_serve

pytestmark = pytest.mark.timeout(90)

REPLICAS, BATCH, MAX_QUEUE = 3, 8, 24
SLOTS = REPLICAS * BATCH


@dataclass
class Result:
    status: int
    sent: float
    first: float | None = None
    done: float = 0.0
    ok: bool = False
    retry_after: str | None = None
    error_type: str | None = None


@dataclass
class Sampler:
    """Polls /fleet/status and the service's RSS while a burst runs."""

    base: str
    pid: int
    samples: list[tuple[int, int]] = field(default_factory=list)
    """(queue_depth, inflight) pairs, each read in one /fleet/status answer."""
    peak_rss: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        proc = psutil.Process(self.pid)
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
                async with http.get(
                    f"{self.base}/fleet/status", headers=admin_auth(self.base)
                ) as resp:
                    status = await resp.json()
                self.samples.append((status["queue_depth"], status["inflight"]))
                await asyncio.sleep(0.01)


async def burst(base: str, n: int, max_tokens: int) -> list[Result]:
    body = {
        "model": "tgi",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
        "max_tokens": max_tokens,
    }

    async def one(session: aiohttp.ClientSession) -> Result:
        r = Result(0, time.monotonic())
        async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
            r.status = resp.status
            r.retry_after = resp.headers.get("Retry-After")
            if resp.status == 200:
                await resp.content.readuntil(b"\n\n")
                r.first = time.monotonic()
                rest = await resp.read()
                r.ok = rest.rstrip().endswith(b"data:[DONE]") and b'"error"' not in rest
            else:
                r.error_type = (await resp.json()).get("error_type")
        r.done = time.monotonic()
        return r

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with asyncio.timeout(60):
            return await asyncio.gather(*(one(session) for _ in range(n)))


async def test_bursts_beyond_capacity_are_shed_while_the_fleet_runs_full(tmp_path: Path) -> None:
    listen, *replica_ports = free_ports(4)
    config = demo_config(tmp_path, replica_ports[0])
    text = config.read_text().replace("speed = 100.0", "speed = 20.0", 1)
    config.write_text(text.replace("max_queue = 1024", f"max_queue = {MAX_QUEUE}", 1))
    proc = start_serve(config, listen)
    base = f"http://127.0.0.1:{listen}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with http.get(f"{base}/fleet/status", headers=admin_auth(base)) as resp:
                        status = await resp.json()
                    if status["ready_replicas"] == REPLICAS:
                        break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "fleet not ready"
                await asyncio.sleep(0.1)
            pids = [r["pid"] for r in status["replicas"]]
            assert status["max_queue"] == MAX_QUEUE
            assert all(r["slot_cap"] == BATCH for r in status["replicas"])
        await burst(base, SLOTS, 8)  # warm up: connections, imports, allocator arenas
        baseline = psutil.Process(proc.pid).memory_info().rss

        figures = []
        for factor in (10, 20):
            sampler = Sampler(base, proc.pid)
            stop = asyncio.Event()
            sampling = asyncio.create_task(sampler.run(stop))
            started = time.monotonic()
            results = await burst(base, factor * SLOTS, 96)
            elapsed = time.monotonic() - started
            stop.set()
            await sampling

            served = [r for r in results if r.status == 200]
            shed = [r for r in results if r.status == 429]
            assert len(served) + len(shed) == len(results), {r.status for r in results}
            assert all(r.ok for r in served)
            assert all(r.retry_after == "1" and r.error_type == "overloaded" for r in shed)
            assert len(served) >= SLOTS + MAX_QUEUE  # the first wave fills slots and queue
            assert len(shed) >= len(results) - 3 * (SLOTS + MAX_QUEUE)  # the rest is shed
            # The queue never exceeds its bound, and while anything waits, every slot works:
            # the fleet runs at capacity, not below it, however large the burst.
            assert max(q for q, _ in sampler.samples) <= MAX_QUEUE
            backlog = [i for q, i in sampler.samples if q > 0]
            assert backlog and all(i == SLOTS for i in backlog), sorted(set(backlog))
            # Bounded wait: between an admitted request's arrival and its first token, at
            # most the queue plus the slots' worth of other requests finished.
            ends = sorted(r.done for r in served)
            ahead = [sum(1 for e in ends if r.sent < e < r.first) for r in served]
            assert max(ahead) <= MAX_QUEUE + SLOTS, max(ahead)
            ttft = sorted(r.first - r.sent for r in served)  # type: ignore[operator]
            figures.append(
                f"{factor}x ({len(results)} requests): {len(served)} served, {len(shed)} "
                f"shed with 429 in {elapsed:.1f} s; queue peak "
                f"{max(q for q, _ in sampler.samples)}/{MAX_QUEUE}; at most {max(ahead)} "
                f"finished ahead of an admitted one; TTFT p50 {statistics.median(ttft):.2f} "
                f"s max {ttft[-1]:.2f} s; RSS peak {sampler.peak_rss / 2**20:.0f} MiB "
                f"(+{(sampler.peak_rss - baseline) / 2**20:.1f} over warm baseline)"
            )
            figures.append(sampler.peak_rss)
        print("\n" + "\n".join(str(f) for f in figures if isinstance(f, str)))
        peak_10x, peak_20x = figures[1], figures[3]
        # Memory is bounded by slots + queue, not by the burst: 20x costs what 10x did.
        assert peak_20x - baseline < 64 * 2**20
        assert peak_20x - peak_10x < 16 * 2**20

        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/fleet/status", headers=admin_auth(base)) as resp:
                status = await resp.json()
        assert status["queue_depth"] == 0 and status["inflight"] == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.communicate, timeout=20)
            except Exception:
                proc.kill()
                proc.communicate(timeout=5)
    assert proc.returncode == 0
    assert not any(pid_alive(pid) for pid in pids)
