"""Open- and closed-loop streaming load with per-token timing, identical for every target.

A *schedule* is a list of ``Req`` (arrival offset, prompt tokens, output tokens, class),
drawn from a seeded RNG, so every target of a run gets exactly the same requests at exactly
the same offsets (paired comparison). Requests are OpenAI ``/v1/completions`` streams (the
one route every peer forwards: nginx and HAProxy pass anything, vllm-router and
sglang-router route the OpenAI routes, the simulated TGI replica serves it). A prompt of
``p`` tokens is ``4 p`` characters, which is what the simulated replica (no tokenizer) and
neuron-fleet (estimate) both count as ``p`` tokens.

The client parses SSE incrementally: the arrival time of the chunk that completes an event
is that event's time; several events in one chunk (a buffering proxy) give 0 ms gaps, as a
real client sees them. ``:`` keep-alive comments and ``data:[DONE]`` are not tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from harness import percentile

_WORDS = (
    "the replica streams tokens from a static batch while the balancer keeps every slot busy "
    "and long prompts pause decoding for the whole batch during prefill on inferentia cores "
    "summaries of quarterly reports chat turns about weather code reviews and translations"
).split()


def _prompt_text(chars: int = 4 * 16_600) -> str:
    rng = random.Random(7)
    out, n = [], 0
    while n < chars:
        w = rng.choice(_WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


SALT_RANGE = 8192
PROMPT = _prompt_text(4 * 16_600 + SALT_RANGE)


@dataclass(frozen=True, slots=True)
class Req:
    at: float
    """Arrival offset (s, wall clock of the scaled run) for open-loop schedules."""
    prompt_tokens: int
    output_tokens: int
    cls: str = "all"
    salt: int = 0
    """Where the prompt starts in the shared text: every prompt differs from its first
    characters on (no shared prefixes for a cache-aware router to exploit)."""


@dataclass(slots=True)
class Result:
    cls: str
    prompt_tokens: int
    output_tokens: int
    scheduled: float
    start: float = 0.0
    ttft: float | None = None
    end: float | None = None
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    status: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.tokens > 0


# --------------------------------------------------------------------------- workloads


def _clip_normal(rng: random.Random, mean: float, sd: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.gauss(mean, sd)))))


def blog_sampler(rng: random.Random) -> tuple[int, int, str]:
    """The blog's shape: prompts 15,900 +/- 100 tokens, outputs 450 +/- 50 (normal, clipped
    so prompt + output fits the compiled 16,512-token sequence, as TGI would demand)."""
    p = _clip_normal(rng, 15_900, 100, 15_600, 15_990)
    o = _clip_normal(rng, 450, 50, 300, 600)
    return p, min(o, 16_512 - p), "long"


MIXED_CLASSES = (
    # name, prompt range, output range, weight: lengths vary 10x between requests.
    ("chat", (1_000, 1_600), (30, 60), 0.45),
    ("essay", (1_000, 1_600), (300, 500), 0.15),
    ("classify", (10_000, 15_900), (30, 60), 0.15),
    ("summary", (10_000, 15_900), (300, 500), 0.25),
)


def mixed_sampler(rng: random.Random) -> tuple[int, int, str]:
    """Short chat turns next to long summaries: prompt and output lengths each span 10x."""
    r = rng.random()
    chosen = MIXED_CLASSES[-1]
    for cls in MIXED_CLASSES:
        r -= cls[3]
        if r <= 0:
            chosen = cls
            break
    name, (plo, phi), (olo, ohi), _ = chosen
    return rng.randint(plo, phi), rng.randint(olo, ohi), name


SAMPLERS: dict[str, Callable[[random.Random], tuple[int, int, str]]] = {
    "blog": blog_sampler,
    "mixed": mixed_sampler,
}


def poisson_schedule(
    sampler: Callable[[random.Random], tuple[int, int, str]], rate: float, n: int, seed: int
) -> list[Req]:
    """``n`` Poisson arrivals at ``rate`` req/s (seeded: identical for every target)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        p, o, c = sampler(rng)
        out.append(Req(t, p, o, c, rng.randrange(SALT_RANGE)))
    return out


def fixed_requests(
    sampler: Callable[[random.Random], tuple[int, int, str]], n: int, seed: int
) -> list[Req]:
    rng = random.Random(seed)
    return [Req(0.0, *sampler(rng), rng.randrange(SALT_RANGE)) for _ in range(n)]


# --------------------------------------------------------------------------- client


def _body(req: Req, model: str) -> bytes:
    return json.dumps(
        {
            "model": model,
            "prompt": PROMPT[req.salt : req.salt + 4 * req.prompt_tokens],
            "max_tokens": req.output_tokens,
            "stream": True,
        }
    ).encode()


async def stream_one(
    session: aiohttp.ClientSession, url: str, req: Req, model: str, res: Result, origin: float
) -> None:
    """One streaming completion; fills ``res`` (times relative to ``origin``)."""
    clock = time.perf_counter
    body = _body(req, model)
    start = clock()
    res.start = start - origin
    last = None
    pending = b""
    try:
        async with session.post(
            url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            res.status = resp.status
            if resp.status != 200:
                res.error = f"http_{resp.status}"
                await resp.read()
                res.end = clock() - origin  # a refusal's time (summaries use ok ones only)
                return
            async for chunk in resp.content.iter_any():
                now = clock()
                buf = pending + chunk if pending else chunk
                if b"\n\n" not in buf:
                    pending = buf
                    continue
                events = buf.split(b"\n\n")
                pending = events.pop()
                n = 0
                for ev in events:
                    ev = ev.lstrip(b"\r\n")
                    if ev.startswith(b"data:"):
                        if ev.endswith(b"[DONE]"):
                            continue
                        if b'"error"' in ev[:40]:
                            res.error = "error_event"
                            continue
                        n += 1
                if not n:
                    continue
                if last is None:
                    res.ttft = now - start
                    if n > 1:
                        res.itl.extend([0.0] * (n - 1))
                else:
                    res.itl.append(now - last)
                    if n > 1:
                        res.itl.extend([0.0] * (n - 1))
                last = now
                res.tokens += n
        res.end = clock() - origin
        if res.tokens < req.output_tokens and res.error is None:
            res.error = "truncated"
    except asyncio.CancelledError:
        res.error = res.error or "cancelled"
        raise
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
        res.error = type(exc).__name__


def _session(timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        auto_decompress=False,
    )


async def run_open(
    url: str, reqs: Sequence[Req], *, model: str = "sim", timeout_s: float = 120.0
) -> list[Result]:
    """Open loop: each request starts at its arrival offset, whatever the others do."""
    results = [Result(r.cls, r.prompt_tokens, r.output_tokens, r.at) for r in reqs]
    async with _session(timeout_s) as session:
        loop = asyncio.get_running_loop()
        origin_loop = loop.time()
        origin = time.perf_counter()

        async def one(i: int, req: Req) -> None:
            delay = origin_loop + req.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await stream_one(session, url, req, model, results[i], origin)

        tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(reqs)]
        hard_stop = (reqs[-1].at if reqs else 0.0) + timeout_s + 10
        _, pending = await asyncio.wait(tasks, timeout=hard_stop)
        for t in pending:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)
    return results


async def run_closed(
    url: str,
    reqs: Sequence[Req],
    *,
    concurrency: int,
    duration_s: float,
    model: str = "sim",
    timeout_s: float = 120.0,
    spread_s: float = 0.0,
) -> list[Result]:
    """Closed loop: ``concurrency`` workers, each sending its next request as soon as the
    previous one ends, for ``duration_s``; what is still running then is cancelled (and
    counted as such). ``concurrency=1`` is GuideLLM's *synchronous* profile, a large one its
    *throughput* profile."""
    results: list[Result] = []
    queue = list(reversed(reqs))
    async with _session(timeout_s) as session:
        origin = time.perf_counter()
        stop_at = origin + duration_s

        async def worker(i: int) -> None:
            # Staggered starts so streams do not move in lockstep waves.
            await asyncio.sleep(spread_s * i / concurrency)
            while queue and time.perf_counter() < stop_at:
                req = queue.pop()
                res = Result(req.cls, req.prompt_tokens, req.output_tokens, 0.0)
                results.append(res)
                await stream_one(session, url, req, model, res, origin)

        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=duration_s)
        for t in pending:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)
    for r in results:
        if r.error is None and r.end is None:
            r.error = "cancelled"
    return results


# --------------------------------------------------------------------------- statistics


def summarize(
    results: Sequence[Result], *, window: tuple[float, float] | None = None
) -> dict[str, Any]:
    """Latency percentiles over successful requests; throughput over ``window`` (closed
    loop: requests *completed* inside it) or over first send -> last completion (open)."""
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = r.error or f"http_{r.status}"
            errors[key] = errors.get(key, 0) + 1
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.end - r.start for r in ok if r.end is not None]
    if window is not None:
        lo, hi = window
        done = [r for r in ok if r.end is not None and lo <= r.end <= hi]
        span = hi - lo
    else:
        done = ok
        starts = [r.start for r in results]
        ends = [r.end for r in ok if r.end is not None]
        span = (max(ends) - min(starts)) if ends and starts else float("nan")
    out_tokens = sum(r.tokens for r in done)
    out: dict[str, Any] = {
        "requests": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "span_s": span,
        "req_per_s": len(done) / span if span and span == span and span > 0 else float("nan"),
        "output_tok_per_s": out_tokens / span if span and span == span and span > 0 else 0.0,
        "mean_output_tokens": (sum(r.tokens for r in ok) / len(ok)) if ok else float("nan"),
    }
    for name, values in (("ttft", ttft), ("itl", itl), ("latency", e2e)):
        out[f"{name}_mean"] = (sum(values) / len(values)) if values else float("nan")
        for p in (1, 5, 10, 50, 90, 95, 99):
            out[f"{name}_p{p}"] = percentile(values, p)
        out[f"{name}_max"] = max(values) if values else float("nan")
    return out


def by_class(results: Sequence[Result]) -> dict[str, dict[str, Any]]:
    classes = sorted({r.cls for r in results})
    return {c: summarize([r for r in results if r.cls == c]) for c in classes}


def ttft_samples(results: Sequence[Result]) -> list[float]:
    return sorted(r.ttft for r in results if r.ok and r.ttft is not None)


def to_rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Per-request rows for CSV (the ITL list reduced to its count, mean and max)."""
    rows = []
    for r in results:
        d = asdict(r)
        itl = d.pop("itl")
        d["itl_count"] = len(itl)
        d["itl_mean"] = (sum(itl) / len(itl)) if itl else math.nan
        d["itl_max"] = max(itl) if itl else math.nan
        rows.append(d)
    return rows
