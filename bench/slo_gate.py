# ruff: noqa: ASYNC240  (a sequential benchmark driver)
"""The TTFT SLO gate against HAProxy and nginx beyond capacity: goodput, not just latency.

Wall clock, one run, the same three simulated replicas (batch 8) and the same seeded
Poisson schedule for every target, at ``--load`` (default 1.3) x the fleet's capacity
measured in the same run, on the blog's shape and on mixed lengths (bench/loadgen.py):

- ``neuron-fleet-slo``: least-outstanding, FIFO, ``--ttft-slo`` = SLO (the gate);
- ``neuron-fleet-slo-sf``: the gate with ``--queue-order shortest`` (+ long-prompt floor);
- ``haproxy-slo``: leastconn, maxconn 8, ``timeout queue`` = SLO (HAProxy tuned for it);
- ``haproxy-slo-tight``: ``timeout queue`` = SLO - the workload's mean prefill time (tuned
  to the workload and the replicas' speed, which a fixed config can know for one shape);
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
import random
import statistics
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

from supervisor.simulator.engine import NeuronTiming

RESULTS = BENCH / "results"
DEFAULT_TARGETS = (
    "neuron-fleet-slo",
    "neuron-fleet-slo-sf",
    "haproxy-slo",
    "haproxy-slo-tight",
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
    draw = random.Random(5)
    mean_prompt = statistics.fmean(sampler(draw)[0] for _ in range(5000))
    mean_prefill_s = NeuronTiming().prefill(round(mean_prompt))  # inf2 seconds
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
        "mean_prefill_s": mean_prefill_s,
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
            started = target.launch(
                port,
                ups,
                wd,
                batch=plan.batch,
                speed=speed,
                slo_s=slo_s,
                mean_prefill_s=mean_prefill_s,
            )
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
        "| target | goodput (TTFT <= SLO) | x haproxy-slo | x haproxy-slo-tight | x haproxy "
        "| served / refused / failed | refusal p99 | TTFT p50 / p90 / p99 of served |",
        "|---|---|---|---|---|---|---|---|",
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
            f"{ratio(name, 'haproxy-slo')} | {ratio(name, 'haproxy-slo-tight')} | "
            f"{ratio(name, 'haproxy')} | "
            f"{s['served']} / {s['refused']} / {s['failed']} | {refusal} | "
            f"{s['ttft_p50_s']:.2f} / {s['ttft_p90_s']:.2f} / {s['ttft_p99_s']:.2f} s |"
        )
    return "\n".join(lines)


SECTION = "## TTFT SLO gate beyond capacity (bench/slo_gate.py)"


def _goals(doc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's goals, checked on one run's figures."""
    rows = []
    w = doc["workloads"]

    def good(workload: str, target: str) -> float:
        t = w.get(workload, {}).get("targets", {}).get(target)
        return t["goodput_req_per_s"] if t else float("nan")

    for workload, base, want in (
        ("mixed", "haproxy-slo", 1.05),
        ("mixed", "haproxy", 2.0),
        ("blog", "haproxy-slo", 1.0),
    ):
        for ours in ("neuron-fleet-slo", "neuron-fleet-slo-sf"):
            r = good(workload, ours) / good(workload, base)
            rows.append((f"{workload}: goodput {ours} >= {want:g}x {base}", f"{r:.2f}x", r >= want))
    for workload, res in w.items():
        for ours in ("neuron-fleet-slo", "neuron-fleet-slo-sf"):
            t = res["targets"].get(ours)
            if t and t["refused"]:
                p99 = t["refusal_p99_ms"] / 1000
                rows.append(
                    (
                        f"{workload}: {ours} p99 time to refusal <= 0.1 s",
                        f"{p99 * 1000:.1f} ms measured ({t['refusal_p99_inf2_s']:.2f} s x speed)",
                        p99 <= 0.1,
                    )
                )
    return rows


def section(results: Path = RESULTS) -> str | None:
    """BENCHMARKS.md's section (bench/report.py includes it; ``--splice`` updates it)."""
    path = results / "slo_gate.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    meta = doc["meta"]
    parts = [SECTION + "\n"]
    first = next(iter(doc["workloads"].values()))
    parts.append(
        f"Run {meta['date']} (git {meta['git_head']}), {meta['seconds'] / 60:.1f} min, load "
        f"average at start {', '.join(f'{x:.2f}' for x in meta['loadavg_at_start'])}; "
        f"{meta['haproxy'].split(' - ')[0]}; {meta['nginx']}. Wall clock, one run: 3 simulated "
        f"replicas x batch 8 at speed {first['speed']:g}, the same seeded Poisson schedule "
        f"({first['requests']} requests per workload) for every target at "
        f"{first['load']:.0%} of the capacity measured in the same run, TTFT SLO "
        f"{first['slo_s']:g} s (inf2 seconds). Goodput = requests served with TTFT <= SLO per "
        "second of the schedule (inf2). Refused = 429/503 answers; time to refusal = send to "
        "the answer's last byte, measured (a refusal never reaches a replica, so the time "
        "scaling does not apply; x speed in brackets for comparison with HAProxy's queue "
        "timeout, which does scale). Every target first served the same 24 requests (not "
        "measured). `neuron-fleet-slo` = `--ttft-slo`, FIFO; `-sf` = `--queue-order shortest` "
        "(floor 0.25 for prompts >= 4096 tokens); `haproxy-slo` = `timeout queue` = SLO; "
        "`haproxy-slo-tight` = `timeout queue` = SLO - the workload's mean prefill time; "
        "`haproxy` = `timeout queue 120s`; `nginx-blog` = the blog's config.\n"
    )
    for workload, res in doc["workloads"].items():
        parts.append(
            f"**{workload}** (capacity {res['capacity_req_per_s']:.3f} req/s, offered "
            f"{res['offered_req_per_s']:.3f}):\n\n{res['table_md']}\n"
        )
        classes = {n: t["by_class"] for n, t in res["targets"].items() if t.get("by_class")}
        if classes:
            names = sorted(next(iter(classes.values())))
            lines = [
                "| target | "
                + " | ".join(f"{c}: refused / TTFT p99 of served" for c in names)
                + " |",
                "|---|" + "---|" * len(names),
            ]
            for n, by in classes.items():
                cells = []
                for c in names:
                    b = by[c]
                    share = b["refused"] / b["requests"] if b["requests"] else float("nan")
                    cells.append(f"{share:.0%} / {b['ttft_p99_s']:.2f} s")
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
            parts.append("Per class (who carries the shedding):\n\n" + "\n".join(lines) + "\n")
    goals = _goals(doc)
    parts.append(
        "Goals (issue 14), this run:\n\n| goal | measured | met? |\n|---|---|---|\n"
        + "\n".join(f"| {g} | {m} | {'**yes**' if ok else 'no'} |" for g, m, ok in goals)
        + "\n"
    )
    sims_path = results / "policy_sim_slo.json"
    if sims_path.exists():
        sims = json.loads(sims_path.read_text())
        lines = [
            "| workload | policy | goodput (x capacity) | refused | refusal p99 | "
            "TTFT p50 / p90 / p99 of served | refused by class |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, sim in sims.items():
            for pol, f in sim["policies"].items():
                by = ", ".join(
                    f"{k.removesuffix('_refused_share')} {v:.0%}"
                    for k, v in f.items()
                    if k.endswith("_refused_share") and k != "refused_share"
                )
                lines.append(
                    f"| {key} ({sim['hours']:g} h) | {pol} | {f['goodput_req_per_s']:.3f} "
                    f"({f['goodput_req_per_s'] / sim['capacity_req_per_s']:.2f}x) | "
                    f"{f['refused_share']:.0%} | {f['refusal_p99_s']:.2f} s | "
                    f"{f['ttft_p50_s']:.2f} / {f['ttft_p90_s']:.2f} / {f['ttft_p99_s']:.2f} s "
                    f"| {by} |"
                )
        parts.append(
            "The same policies in virtual time (`bench/policy_sim.py --slo 3 --load 1.3`: the "
            "replicas' own scheduler, the balancer's own forecast and gate on a virtual clock, "
            "hours of traffic, no machine noise; nginx = round-robin into the replicas' queues, "
            "haproxy = FIFO at the balancer with no effective timeout):\n\n"
            + "\n".join(lines)
            + "\n"
        )
    findings = BENCH / "slo_findings.md"
    if findings.exists():
        parts.append(findings.read_text())
    return "\n".join(parts)


def splice(markdown: str, path: Path) -> None:
    """Put ``markdown`` in place of the section in ``path`` (or before the first workload)."""
    text = path.read_text()
    start = text.find(SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        end = len(text) if end < 0 else end + 1
        text = text[:start] + markdown + text[end:]
    else:
        anchor = text.find("## Workload 1")
        anchor = len(text) if anchor < 0 else anchor
        text = text[:anchor] + markdown + "\n" + text[anchor:]
    path.write_text(text)


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
        n = args.requests or (150 if args.quick else 800)
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
    parser.add_argument("--requests", type=int, default=0, help="per workload (default 800)")
    parser.add_argument("--quick", action="store_true", help="150 requests: a smoke run")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--splice", action="store_true", help="only rewrite BENCHMARKS.md's section from results"
    )
    if parser.parse_known_args()[0].splice:
        from harness import ROOT

        text = section(Path(parser.parse_known_args()[0].out))
        if text is None:
            sys.exit("no slo_gate.json yet: run the benchmark first")
        splice(text, ROOT / "BENCHMARKS.md")
        sys.exit(0)
    import uvloop

    sys.exit(uvloop.run(main(parser.parse_args())))
