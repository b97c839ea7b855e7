# ruff: noqa: ASYNC240  (a sequential benchmark driver)
"""neuron-fleet against the peers, on the same simulated replicas, in the same run.

Workloads (see BENCHMARKS.md for the scaling and the caveats):

1. ``blog``: 3 replicas x batch 8, prompts 15,900 +/- 100 tokens, outputs 450 +/- 50;
   synchronous (1 at a time), Poisson at 50/80/90/100 % of the fleet's capacity (computed
   from the simulator's timing model, bench/capacity.py), throughput (128 in flight, the
   blog's GUIDELLM__MAX_CONCURRENCY).
2. ``mixed``: same fleet, prompt and output lengths each varying 10x between requests
   (chat turns, essays, long-document classification, summaries); Poisson at 80 and 90 %.
3. ``relay``: one replica, 64 concurrent streams; (a) a pacer replica (first token 50 ms,
   then one every 30 ms) for added TTFT / ITL vs direct, (b) the simulated TGI replica
   pacing tokens 2 ms apart for the balancer's CPU seconds per 100,000 relayed events
   (/proc, whole process tree: nginx and HAProxy workers, router threads included).

Workloads 1-2 run the simulator at ``--speed S`` (default 20): every simulated duration is
divided by S and so is the arrival rate; all times in the results are multiplied back by S
(and rates divided by S) so they read as inf2 seconds. Workload 3 is not scaled.

Run: ``bench/.venv/bin/python bench/compare.py`` (what bench/run_all.sh does); ``--quick``
for a short smoke run; ``--workloads blog,mixed,relay``; ``--targets a,b``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import platform
import random
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from capacity import saturated_throughput
from harness import BENCH, PY, Proc, free_ports, stop_all, wait_http
from loadgen import (
    SAMPLERS,
    Req,
    Result,
    by_class,
    fixed_requests,
    poisson_schedule,
    run_closed,
    run_open,
    summarize,
    to_rows,
    ttft_samples,
)
from targets import TARGETS, start_replicas

RESULTS = BENCH / "results"


# --------------------------------------------------------------------------- plans


@dataclass
class Level:
    name: str
    kind: str  # "sync" | "poisson" | "throughput"
    fraction: float = 0.0
    n: int = 0
    concurrency: int = 1
    duration: float = 0.0  # scaled seconds (closed loops)


@dataclass
class FleetPlan:
    workload: str
    speed: float
    replicas: int = 3
    batch: int = 8
    levels: list[Level] = field(default_factory=list)
    full: list[str] = field(default_factory=list)
    """Targets that run every level."""
    partial: dict[str, list[str]] = field(default_factory=dict)
    """Targets that run only some levels (by name)."""


def blog_plan(speed: float, quick: bool) -> FleetPlan:
    k = 0.25 if quick else 1.0
    levels = [
        Level("sync", "sync", n=2 if quick else 3, duration=60),
        Level("p50", "poisson", 0.5, n=int(50 * k)),
        Level("p80", "poisson", 0.8, n=int(120 * k)),
        Level("p90", "poisson", 0.9, n=int(270 * k)),
        Level("p100", "poisson", 1.0, n=int(120 * k)),
        Level(
            "throughput",
            "throughput",
            concurrency=128,
            duration=180 / speed * (0.5 if quick else 1),
        ),
    ]
    return FleetPlan(
        "blog",
        speed,
        levels=levels,
        full=[
            "nginx-blog",
            "nginx-lc",
            "haproxy",
            "vllm-router-rr",
            "sglang-router-rr",
            "neuron-fleet",
        ],
        partial={
            "vllm-router-p2": ["p90"],
            "sglang-router-ca": ["p90"],
            "neuron-fleet-lw": ["p90"],
            "neuron-fleet-dl": ["p90"],
            "neuron-fleet-cap9": ["throughput"],  # experiment: slot cap = batch + 1
        },
    )


def mixed_plan(speed: float, quick: bool) -> FleetPlan:
    k = 0.25 if quick else 1.0
    return FleetPlan(
        "mixed",
        speed,
        levels=[
            Level("p80", "poisson", 0.8, n=int(180 * k)),
            Level("p90", "poisson", 0.9, n=int(420 * k)),
        ],
        full=[
            "nginx-blog",
            "nginx-lc",
            "haproxy",
            "vllm-router-rr",
            "sglang-router-rr",
            "neuron-fleet",
            "neuron-fleet-lw",
            "neuron-fleet-dl",
        ],
    )


# --------------------------------------------------------------------------- helpers


def scale_summary(s: dict[str, Any], speed: float) -> dict[str, Any]:
    """Measured at speed S -> inf2-equivalent: times x S (TTFT/ITL in ms), rates / S."""
    out: dict[str, Any] = {}
    for k, v in s.items():
        if k.startswith(("ttft_", "itl_")):
            out[k + "_ms"] = v * speed * 1000 if isinstance(v, float) else v
        elif k.startswith("latency_"):
            out[k + "_s"] = v * speed if isinstance(v, float) else v
        elif k in ("req_per_s", "output_tok_per_s"):
            out[k] = v / speed
        elif k == "span_s":
            out[k] = v * speed
        else:
            out[k] = v
    return out


async def warm_up(url: str, n: int = 6) -> None:
    """Open connections through the balancer (tiny requests, not measured)."""
    reqs = [Req(0.0, 8, 2, "warmup", i) for i in range(n)]
    await run_closed(url, reqs, concurrency=n, duration_s=30, timeout_s=20)


async def replicas_idle(urls: Sequence[str], timeout: float = 30.0) -> None:
    """Wait until no replica has a request queued or running (bounded)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            busy = 0
            for u in urls:
                try:
                    async with session.get(u + "/metrics") as resp:
                        text = await resp.text()
                except (aiohttp.ClientError, TimeoutError):
                    continue
                for line in text.splitlines():
                    if line.startswith(("tgi_queue_size", "tgi_batch_current_size")):
                        busy += int(float(line.split()[-1]))
            if busy == 0:
                return
            await asyncio.sleep(0.2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- workloads 1-2


async def measure_capacity(
    plan: FleetPlan, sampler: Any, tmp: Path, duration_s: float
) -> dict[str, float]:
    """Saturate the replicas directly (no balancer): each gets its own closed loop of
    batch + 4 requests, so it always has a queue. Completions per second in the last 2/3,
    scaled back to speed 1. This is the fleet's real capacity on this machine at this speed
    (the model's figure ignores event-loop overheads and 1 ms timer granularity)."""
    wd = tmp / plan.workload / "capacity"
    reps, ups = start_replicas(plan.replicas, wd, speed=plan.speed, batch=plan.batch, seed=42)
    try:
        for p, u in zip(reps, ups, strict=True):
            await wait_http(u + "/health", 60, p)
        seed = 77
        runs = await asyncio.gather(
            *(
                run_closed(
                    u,
                    fixed_requests(sampler, 2000, seed + i),
                    concurrency=plan.batch + 4,
                    duration_s=duration_s,
                    timeout_s=duration_s + 5,
                )
                for i, u in enumerate(ups)
            )
        )
        window = (duration_s / 3, duration_s)
        merged = [r for run in runs for r in run]
        s = summarize(merged, window=window)
        return {
            "req_per_s": s["req_per_s"] / plan.speed,
            "output_tok_per_s": s["output_tok_per_s"] / plan.speed,
        }
    finally:
        stop_all(reps)


async def run_fleet(
    plan: FleetPlan, targets: Sequence[str], tmp: Path, explicit: bool = False
) -> dict[str, Any]:
    sampler = SAMPLERS[plan.workload]
    model_cap = saturated_throughput(sampler, replicas=plan.replicas, batch_size=plan.batch)
    cap = await measure_capacity(plan, sampler, tmp, duration_s=300 / plan.speed)
    log(
        f"workload {plan.workload}: capacity {cap['req_per_s']:.3f} req/s, "
        f"{cap['output_tok_per_s']:.0f} output tok/s measured at speed {plan.speed:g} "
        f"(timing model: {model_cap['req_per_s']:.3f} req/s, "
        f"{model_cap['output_tok_per_s']:.0f} tok/s); offered loads are fractions of the "
        "measured figure"
    )
    order = [t for t in plan.full + list(plan.partial) if t in targets]
    if explicit:  # targets named on the command line but not in the plan: every level
        order += [t for t in targets if t not in order and t in TARGETS]
    out: dict[str, Any] = {
        "workload": plan.workload,
        "speed": plan.speed,
        "replicas": plan.replicas,
        "batch": plan.batch,
        "capacity_req_per_s": cap["req_per_s"],
        "capacity_output_tok_per_s": cap["output_tok_per_s"],
        "capacity_model_req_per_s": model_cap["req_per_s"],
        "capacity_model_output_tok_per_s": model_cap["output_tok_per_s"],
        "levels": [vars(lv) for lv in plan.levels],
        "targets": {},
        "ttft_samples_ms": {},
        "errors": {},
    }
    rows: list[dict[str, Any]] = []
    for name in order:
        target = TARGETS[name]
        wanted = plan.partial.get(name)
        levels = [lv for lv in plan.levels if wanted is None or lv.name in wanted]
        wd = tmp / plan.workload / name
        procs: list[Proc] = []
        log(f"  {name}: {', '.join(lv.name for lv in levels)}")
        try:
            reps, ups = start_replicas(
                plan.replicas, wd, speed=plan.speed, batch=plan.batch, seed=42
            )
            procs += reps
            for p, u in zip(reps, ups, strict=True):
                await wait_http(u + "/health", 60, p)
            (port,) = free_ports(1)
            started = target.launch(port, ups, wd, batch=plan.batch, speed=plan.speed)
            procs = started.procs + procs
            await wait_http(started.url + started.health_path, 60, started.balancer)
            await warm_up(started.url)
            await replicas_idle(ups)
            res_t: dict[str, Any] = {}
            for lv in levels:
                results, window, offered = await _run_level(plan, lv, sampler, cap, started.url)
                lb = started.balancer
                summary = scale_summary(summarize(results, window=window), plan.speed)
                summary["offered_req_per_s"] = offered
                summary["offered_fraction"] = lv.fraction
                if plan.workload == "mixed":
                    summary["by_class"] = {
                        c: scale_summary(s, plan.speed) for c, s in by_class(results).items()
                    }
                summary["balancer_alive"] = lb.alive() if lb else True
                res_t[lv.name] = summary
                out["ttft_samples_ms"].setdefault(name, {})[lv.name] = [
                    round(x * plan.speed * 1000, 2) for x in ttft_samples(results)
                ]
                for row in to_rows(results):
                    row.update(target=name, level=lv.name)
                    rows.append(row)
                log(
                    f"    {lv.name:10s} ok {summary['ok']}/{summary['requests']}"
                    f" TTFT p50 {summary['ttft_p50_ms']:8.0f} p99 {summary['ttft_p99_ms']:8.0f} ms"
                    f"  ITL p50 {summary['itl_p50_ms']:5.1f} p99 {summary['itl_p99_ms']:7.1f} ms"
                    f"  {summary['req_per_s']:.3f} req/s {summary['output_tok_per_s']:6.1f} tok/s"
                    + (f"  errors {summary['errors']}" if summary["errors"] else "")
                )
                if lv.kind != "throughput":
                    await replicas_idle(ups)
            out["targets"][name] = res_t
        except Exception as exc:
            log(f"    {name} could not run: {exc}")
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            stop_all(procs)
    out["_rows"] = rows
    return out


async def _run_level(
    plan: FleetPlan, lv: Level, sampler: Any, cap: dict[str, float], url: str
) -> tuple[list[Result], tuple[float, float] | None, float]:
    seed = 1000 + sum(map(ord, plan.workload + lv.name))
    timeout = 1200 / plan.speed
    if lv.kind == "sync":
        reqs = fixed_requests(sampler, lv.n, seed)
        res = await run_closed(url, reqs, concurrency=1, duration_s=lv.duration, timeout_s=timeout)
        return res, None, 0.0
    if lv.kind == "poisson":
        rate = lv.fraction * cap["req_per_s"] * plan.speed
        reqs = poisson_schedule(sampler, rate, lv.n, seed)
        res = await run_open(url, reqs, timeout_s=timeout)
        return res, None, lv.fraction * cap["req_per_s"]
    reqs = fixed_requests(sampler, 4000, seed)
    res = await run_closed(
        url, reqs, concurrency=lv.concurrency, duration_s=lv.duration, timeout_s=timeout
    )
    return res, (0.3 * lv.duration, lv.duration), 0.0


# --------------------------------------------------------------------------- workload 3


RELAY_TARGETS = [
    "nginx-blog",
    "nginx-lc",
    "haproxy",
    "vllm-router-rr",
    "sglang-router-rr",
    "neuron-fleet",
]


async def run_relay(targets: Sequence[str], tmp: Path, quick: bool) -> dict[str, Any]:
    streams = 64
    phases = {
        "latency": {
            "replica": "pacer (first token 50 ms, then every 30 ms)",
            "tokens": 60,
            "requests": 64 if quick else 96,
            "step_ms": 30.0,
        },
        "cost": {
            "replica": "simulated TGI, batch 64, tokens 2 ms apart, no prefill",
            "tokens": 200,
            "requests": 128 if quick else 256,
            "step_ms": 2.0,
        },
    }
    out: dict[str, Any] = {"streams": streams, "phases": {}, "errors": {}}
    order = [t for t in RELAY_TARGETS if t in targets]
    for phase, cfg in phases.items():
        wd = tmp / "relay" / phase
        (rport,) = free_ports(1)
        if phase == "latency":
            replica = Proc(
                "pacer",
                [
                    PY,
                    str(BENCH / "pacer.py"),
                    "--port",
                    str(rport),
                    "--first-ms",
                    "50",
                    "--step-ms",
                    str(cfg["step_ms"]),
                ],
                wd,
            )
        else:
            replica = Proc(
                "replica",
                [
                    PY,
                    "-m",
                    "supervisor.simulator",
                    "--port",
                    str(rport),
                    "--batch-size",
                    str(streams),
                    "--max-concurrent-requests",
                    "4096",
                    "--prefill-ms-per-token",
                    "0",
                    "--prefill-base-ms",
                    "0",
                    "--decode-base-ms",
                    str(cfg["step_ms"]),
                    "--decode-ms-per-slot",
                    "0",
                    "--log-level",
                    "WARNING",
                ],
                wd,
            )
        direct_url = f"http://127.0.0.1:{rport}"
        res_p: dict[str, Any] = {k: v for k, v in cfg.items()}
        res_p["targets"] = {}
        log(f"workload relay/{phase}: {cfg['replica']}, {streams} streams")
        try:
            await wait_http(direct_url + "/health", 60, replica)
            rng = random.Random(5)
            tok = int(cfg["tokens"])
            reqs = [
                Req(0.0, 4, rng.randint(tok // 2, tok * 3 // 2), "relay", i)
                for i in range(int(cfg["requests"]))
            ]
            spread = tok * float(cfg["step_ms"]) / 1000
            await warm_up(direct_url)
            for name in order:
                target = TARGETS[name]
                procs: list[Proc] = []
                try:
                    (port,) = free_ports(1)
                    started = target.launch(port, [direct_url], wd / name, batch=streams)
                    procs = started.procs
                    await wait_http(started.url + started.health_path, 60, started.balancer)
                    await warm_up(started.url, streams)  # every stream's connection
                    direct = await run_closed(
                        direct_url, reqs, concurrency=streams, duration_s=120, spread_s=spread
                    )
                    lb = started.balancer
                    assert lb is not None
                    cpu0, t0 = lb.cpu(), time.perf_counter()
                    through = await run_closed(
                        started.url, reqs, concurrency=streams, duration_s=120, spread_s=spread
                    )
                    cpu1, t1 = lb.cpu(), time.perf_counter()
                    d, b = summarize(direct), summarize(through)
                    events = sum(r.tokens for r in through)
                    cpu = cpu1 - cpu0
                    row = {
                        "direct": _ms(d),
                        "balancer": _ms(b),
                        "events": events,
                        "cpu_s": cpu,
                        "wall_s": t1 - t0,
                        "cpu_s_per_100k_events": cpu / events * 100_000 if events else math.nan,
                        "cpu_util": cpu / (t1 - t0),
                        "added_ttft_p50_ms": (b["ttft_p50"] - d["ttft_p50"]) * 1000,
                        "added_ttft_p99_ms": (b["ttft_p99"] - d["ttft_p99"]) * 1000,
                        "added_itl_p50_ms": (b["itl_p50"] - d["itl_p50"]) * 1000,
                        "added_itl_p99_ms": (b["itl_p99"] - d["itl_p99"]) * 1000,
                        "processes": 1 + len(__import__("harness").descendants(lb.pid)),
                    }
                    res_p["targets"][name] = row
                    log(
                        f"  {name:18s} +TTFT p50 {row['added_ttft_p50_ms']:+6.2f} p99 "
                        f"{row['added_ttft_p99_ms']:+6.2f} ms  +ITL p99 "
                        f"{row['added_itl_p99_ms']:+6.2f} ms  CPU "
                        f"{row['cpu_s_per_100k_events']:.2f} s/100k events "
                        f"({events} events, {b['failed']} failed)"
                    )
                except Exception as exc:
                    log(f"  {name} could not run: {exc}")
                    out["errors"][f"{phase}/{name}"] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                finally:
                    stop_all(procs)
        finally:
            stop_all([replica])
        out["phases"][phase] = res_p
    return out


def _ms(s: dict[str, Any]) -> dict[str, Any]:
    keep = ("requests", "ok", "failed", "errors")
    out = {k: s[k] for k in keep}
    for k, v in s.items():
        if k.startswith(("ttft_", "itl_")):
            out[k + "_ms"] = v * 1000
    return out


# --------------------------------------------------------------------------- output


SUMMARY_COLUMNS = [
    "target",
    "level",
    "offered_req_per_s",
    "req_per_s",
    "output_tok_per_s",
    "ok",
    "failed",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "ttft_mean_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "itl_mean_ms",
    "latency_p50_s",
    "latency_p99_s",
    "mean_output_tokens",
]


def write_fleet(result: dict[str, Any], out_dir: Path) -> None:
    name = result["workload"]
    rows = result.pop("_rows", [])
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    with open(out_dir / f"{name}_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for target, levels in result["targets"].items():
            for level, s in levels.items():
                w.writerow({"target": target, "level": level, **s})
    if rows:
        with open(out_dir / f"{name}_requests.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def write_relay(result: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "relay.json").write_text(json.dumps(result, indent=1, default=str))
    with open(out_dir / "relay_summary.csv", "w", newline="") as f:
        cols = [
            "phase",
            "target",
            "events",
            "cpu_s",
            "cpu_s_per_100k_events",
            "added_ttft_p50_ms",
            "added_ttft_p99_ms",
            "added_itl_p50_ms",
            "added_itl_p99_ms",
            "direct_itl_p99_ms",
            "balancer_itl_p99_ms",
        ]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for phase, p in result["phases"].items():
            for target, r in p["targets"].items():
                w.writerow(
                    {
                        "phase": phase,
                        "target": target,
                        **r,
                        "direct_itl_p99_ms": r["direct"]["itl_p99_ms"],
                        "balancer_itl_p99_ms": r["balancer"]["itl_p99_ms"],
                    }
                )


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md
    import os
    import subprocess

    def version(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except Exception:
            return "not found"

    pkgs = {}
    for name in ("neuron-fleet", "guidellm", "vllm-router", "sglang-router", "aiohttp", "uvloop"):
        try:
            pkgs[name] = md.version(name)
        except md.PackageNotFoundError:
            pkgs[name] = "not installed"
    import hashlib

    from harness import ROOT

    digest = hashlib.sha256()
    for f in sorted((ROOT / "balancer").glob("*.py")):
        digest.update(f.read_bytes())
    head = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "balancer", "supervisor"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.split("\n")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_head": head,
        "product_files_modified_in_work_tree": [x.strip() for x in dirty if x.strip()],
        "balancer_sources_sha256": digest.hexdigest()[:16],
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "nginx": version(["nginx", "-v"]),
        "haproxy": version(["haproxy", "-v"]),
        "packages": pkgs,
    }


async def main(args: argparse.Namespace) -> int:
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tmp" / time.strftime("%Y%m%d-%H%M%S")
    tmp.mkdir(parents=True, exist_ok=True)
    workloads = args.workloads.split(",")
    targets = args.targets.split(",") if args.targets else list(TARGETS)
    meta = machine_info()
    meta["argv"] = sys.argv
    started = time.monotonic()
    for name, make in (("blog", blog_plan), ("mixed", mixed_plan)):
        if name not in workloads:
            continue
        plan = make(args.speed, args.quick)
        if args.levels:
            keep = args.levels.split(",")
            plan.levels = [lv for lv in plan.levels if lv.name in keep]
        res = await run_fleet(plan, targets, tmp, explicit=bool(args.targets))
        write_fleet(res, out_dir)
    if "relay" in workloads:
        res = await run_relay(targets, tmp, args.quick)
        write_relay(res, out_dir)
    meta["seconds"] = time.monotonic() - started
    meta["loadavg_at_end"] = __import__("os").getloadavg()
    (out_dir / f"meta_compare_{'_'.join(workloads)}.json").write_text(json.dumps(meta, indent=1))
    log(f"done in {meta['seconds']:.0f} s; results in {out_dir}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="blog,mixed,relay")
    parser.add_argument("--targets", default="", help="comma-separated subset of targets")
    parser.add_argument("--speed", type=float, default=20.0, help="simulator speed (1-2)")
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--levels", default="", help="comma-separated subset of levels")
    parser.add_argument("--out", default=str(RESULTS))
    import uvloop

    sys.exit(uvloop.run(main(parser.parse_args())))
