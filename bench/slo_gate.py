# ruff: noqa: ASYNC240  (a sequential benchmark driver)
"""The TTFT SLO gate against HAProxy and nginx beyond capacity: goodput, not just latency.

Wall clock, one run, the same three simulated replicas (batch 8) and the same seeded
Poisson schedule for every target, at ``--load`` (default 1.3) x the fleet's capacity
measured in the same run, on the blog's shape and on mixed lengths (bench/loadgen.py):

- ``neuron-fleet-slo``: least-outstanding, FIFO, ``--ttft-slo`` = SLO (the gate);
- ``neuron-fleet-slo-sf``: the gate with ``--queue-order shortest`` (+ long-prompt floor);
- ``haproxy-slo``: leastconn, maxconn 8, ``timeout queue`` = SLO (HAProxy tuned for it);
- ``haproxy``: the same with ``timeout queue 120s`` (as usually configured);
- ``nginx-blog``: the blog's nginx.conf (round-robin; the queue is in the replicas).

Per target: **goodput** = requests served with TTFT <= SLO per second of the schedule;
served, refused (429/503 answers) and failed counts; **time to refusal** (send to the
refusal's last byte) p50/p99; TTFT p50/p90/p99 of served requests; per class on mixed
lengths. Every target first gets the same 24 workload-shaped requests (6 at a time, not
measured), so the gate's forecast has learned what any long-running balancer knows.

Times are inf2-equivalent (x speed), as in bench/compare.py; refusal times are also given
as measured (a refusal costs balancer CPU, which the speed-up does not scale).

Run: ``.venv/bin/python bench/slo_gate.py [--quick] [--workloads blog,mixed] [--slo 3]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compare import FleetPlan, log, machine_info, measure_capacity, replicas_idle, warm_up
from harness import BENCH, Proc, free_ports, percentile, stop_all, wait_http
from loadgen import SAMPLERS, Result, fixed_requests, poisson_schedule, run_closed, run_open
from targets import TARGETS, start_replicas

RESULTS = BENCH / "results"
DEFAULT_TARGETS = (
    "neuron-fleet-slo",
    "neuron-fleet-slo-sf",
    "haproxy-slo",
    "haproxy",
    "nginx-blog",
)


def gate_summary(
    results: Sequence[Result], schedule_span_s: float, slo_s: float, speed: float
) -> dict[str, Any]:
    """Goodput and the latency users feel; ``slo_s`` in inf2 seconds, the rest measured."""
    served = [r for r in results if r.ok and r.ttft is not None]
    refused = [r for r in results if r.status in (429, 503) and r.end is not None]
    ttft = [r.ttft * speed for r in served if r.ttft is not None]
    good = [x for x in ttft if x <= slo_s]
    refusal = [r.end - r.start for r in refused if r.end is not None]
    span = schedule_span_s * speed
    statuses: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = r.error or f"http_{r.status}"
            statuses[key] = statuses.get(key, 0) + 1
    return {
        "requests": len(results),
        "served": len(served),
        "good": len(good),
        "refused": len(refused),
        "failed": len(results) - len(served) - len(refused),
        "not_ok": statuses,
        "goodput_req_per_s": len(good) / span if span > 0 else float("nan"),
        "served_req_per_s": len(served) / span if span > 0 else float("nan"),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "served_within_slo": len(good) / len(served) if served else float("nan"),
        "refusal_p50_ms": percentile(refusal, 50) * 1000,
        "refusal_p99_ms": percentile(refusal, 99) * 1000,
        "refusal_p99_inf2_s": percentile(refusal, 99) * speed,
    }


async def run_workload(
    workload: str,
    targets: Sequence[str],
    tmp: Path,
    *,
    speed: float,
    load: float,
    n: int,
    slo_s: float,
) -> dict[str, Any]:
    sampler = SAMPLERS[workload]
    plan = FleetPlan(workload, speed)
    cap = await measure_capacity(plan, sampler, tmp, duration_s=300 / speed)
    rate = load * cap["req_per_s"] * speed
    schedule = poisson_schedule(sampler, rate, n, seed=2024 + len(workload))
    span = schedule[-1].at - schedule[0].at
    warm = fixed_requests(sampler, 24, seed=99)
    log(
        f"{workload}: capacity {cap['req_per_s']:.3f} req/s (inf2); offering {load:.0%} = "
        f"{rate / speed:.3f} req/s, {n} requests over {span * speed:.0f} inf2 s; SLO {slo_s:g} s"
    )
    out: dict[str, Any] = {
        "workload": workload,
        "speed": speed,
        "load": load,
        "slo_s": slo_s,
        "capacity_req_per_s": cap["req_per_s"],
        "offered_req_per_s": rate / speed,
        "requests": n,
        "targets": {},
        "errors": {},
    }
    for name in targets:
        target = TARGETS[name]
        wd = tmp / f"slo_{workload}" / name
        procs: list[Proc] = []
        try:
            reps, ups = start_replicas(plan.replicas, wd, speed=speed, batch=plan.batch, seed=42)
            procs += reps
            for p, u in zip(reps, ups, strict=True):
                await wait_http(u + "/health", 60, p)
            (port,) = free_ports(1)
            started = target.launch(port, ups, wd, batch=plan.batch, speed=speed, slo_s=slo_s)
            procs = started.procs + procs
            await wait_http(started.url + started.health_path, 60, started.balancer)
            await warm_up(started.url)
            await run_closed(started.url, warm, concurrency=6, duration_s=600 / speed)
            await replicas_idle(ups)
            results = await run_open(started.url, schedule, timeout_s=1200 / speed)
            s = gate_summary(results, span, slo_s, speed)
            s["goodput_vs_capacity"] = s["goodput_req_per_s"] / cap["req_per_s"]
            if workload == "mixed":
                s["by_class"] = {
                    c: gate_summary([r for r in results if r.cls == c], span, slo_s, speed)
                    for c in sorted({r.cls for r in results})
                }
            out["targets"][name] = s
            log(
                f"  {name:20s} goodput {s['goodput_req_per_s']:.3f} req/s "
                f"({s['goodput_vs_capacity']:.0%} of capacity)  served {s['served']} "
                f"refused {s['refused']} failed {s['failed']}  refusal p99 "
                f"{s['refusal_p99_ms']:.1f} ms  TTFT p50/p90/p99 {s['ttft_p50_s']:.2f}/"
                f"{s['ttft_p90_s']:.2f}/{s['ttft_p99_s']:.2f} s"
            )
        except Exception as exc:
            log(f"  {name} could not run: {exc}")
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            stop_all(procs)
    return out


def table(res: dict[str, Any]) -> str:
    """The markdown table BENCHMARKS.md and the README quote."""
    lines = [
        "| target | goodput (TTFT <= SLO) | x haproxy-slo | x haproxy | served / refused / "
        "failed | refusal p99 | TTFT p50 / p90 / p99 of served |",
        "|---|---|---|---|---|---|---|",
    ]
    t = res["targets"]

    def ratio(name: str, base: str) -> str:
        if base not in t or not t[base]["goodput_req_per_s"]:
            return "-"
        return f"{t[name]['goodput_req_per_s'] / t[base]['goodput_req_per_s']:.2f}x"

    for name, s in t.items():
        refusal = (
            f"{s['refusal_p99_ms']:.1f} ms ({s['refusal_p99_inf2_s']:.2f} s)"
            if s["refused"]
            else "-"
        )
        lines.append(
            f"| {name} | {s['goodput_req_per_s']:.3f} req/s ({s['goodput_vs_capacity']:.0%}) | "
            f"{ratio(name, 'haproxy-slo')} | {ratio(name, 'haproxy')} | "
            f"{s['served']} / {s['refused']} / {s['failed']} | {refusal} | "
            f"{s['ttft_p50_s']:.2f} / {s['ttft_p90_s']:.2f} / {s['ttft_p99_s']:.2f} s |"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tmp" / time.strftime("%Y%m%d-%H%M%S")
    targets = args.targets.split(",")
    meta = machine_info()
    meta["argv"] = sys.argv
    started = time.monotonic()
    doc: dict[str, Any] = {"meta": meta, "workloads": {}}
    for workload in args.workloads.split(","):
        n = args.requests or (150 if args.quick else 600)
        res = await run_workload(
            workload, targets, tmp, speed=args.speed, load=args.load, n=n, slo_s=args.slo
        )
        res["table_md"] = table(res)
        doc["workloads"][workload] = res
        print(res["table_md"], flush=True)
    meta["seconds"] = time.monotonic() - started
    name = "slo_gate_quick.json" if args.quick else "slo_gate.json"
    (out_dir / name).write_text(json.dumps(doc, indent=1, default=str))
    log(f"done in {meta['seconds']:.0f} s; {out_dir / name}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="blog,mixed")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    parser.add_argument("--speed", type=float, default=20.0)
    parser.add_argument("--load", type=float, default=1.3)
    parser.add_argument("--slo", type=float, default=3.0, help="TTFT SLO, inf2 seconds")
    parser.add_argument("--requests", type=int, default=0, help="per workload (default 600)")
    parser.add_argument("--quick", action="store_true", help="150 requests: a smoke run")
    parser.add_argument("--out", default=str(RESULTS))
    import uvloop

    sys.exit(uvloop.run(main(parser.parse_args())))
