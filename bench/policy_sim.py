"""Routing policies on the simulator's timing model, in virtual time (no processes, no noise).

A discrete-event run of ``replicas`` ``NeuronBatcher`` (the simulated replica's own
scheduling core: static slots, FIFO queue, prefill pausing the batch) behind a routing
policy, under Poisson arrivals. Long runs (hours of virtual time) give tail percentiles that
the wall-clock benchmark cannot afford, and isolate the *policy* from relay overheads:

- ``rr``: round-robin, bound at arrival, queue in the replica (nginx default, vllm-router rr);
- ``random``: uniform choice (power-of-two on equal/unknown loads degenerates to it);
- ``jsq``: fewest in-flight at arrival, no cap, queue in the replica (nginx least_conn);
- ``lor-cap``: slot cap = batch, FIFO queue at the balancer, bound when a slot frees
  (neuron-fleet least-outstanding, HAProxy leastconn + maxconn);
- ``prefill-aware``: as ``lor-cap`` but among replicas with a free slot prefer the one with
  the fewest prompt tokens still to prefill (requests sent that have not produced their first
  token), then fewest in-flight: a prototype of a Neuron-aware policy (see BENCHMARKS.md);
- ``least-work``: as ``lor-cap``, fewest (prompt + max_tokens) summed over in-flight
  requests (neuron-fleet least-work today: the total is only decremented at completion);
- ``remaining-work``: as ``least-work`` but counting what is *left*: prompt tokens until
  the first token, then tokens still to generate (neuron-fleet least-work);
- ``lor-remaining``: fewest in-flight, ties broken by the remaining work (neuron-fleet
  least-outstanding).

The balancer queue's order (capped policies) is ``--order``: ``fifo`` (neuron-fleet, HAProxy),
``sjf`` (least estimated service first: prefill + max_tokens decode steps) or ``edfA``
(earliest virtual deadline: arrival + A x estimated service, i.e. SJF with ageing).

Run: ``python bench/policy_sim.py [--load 0.9] [--hours 20] [--order fifo]``.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable

from balancer.admission import estimated_service_s
from supervisor.simulator.engine import Job, NeuronBatcher, Step

POLICIES = (
    "rr",
    "random",
    "jsq",
    "lor-cap",
    "least-work",
    "prefill-aware",
    "remaining-work",
    "lor-remaining",
)
CAPPED = ("lor-cap", "least-work", "prefill-aware", "remaining-work", "lor-remaining")


def simulate(
    policy: str,
    sampler: Callable[[random.Random], tuple[int, int, str]],
    rate: float,
    *,
    replicas: int = 3,
    batch: int = 8,
    duration_s: float = 72_000.0,
    warmup_s: float = 600.0,
    seed: int = 3,
    dispatch_delay_s: float = 0.0,
    cap: int | None = None,
    order: str = "fifo",
) -> dict[str, list[float]]:
    """TTFTs (s) and ITL gaps, per class, of requests arriving after the warm-up."""
    cap = batch if cap is None else cap
    rng = random.Random(seed)
    pick_rng = random.Random(seed + 1)
    batchers = [
        NeuronBatcher(batch_size=batch, max_concurrent_requests=1_000_000) for _ in range(replicas)
    ]
    step: list[Step | None] = [None] * replicas
    inflight = [0] * replicas
    pending_prefill = [0] * replicas  # prompt tokens sent, first token not yet produced
    total_work = [0] * replicas  # prompt + max_tokens of in-flight requests
    remaining = [0] * replicas  # prompt (until first token) + tokens still to generate
    where: dict[int, int] = {}
    arrived: dict[int, float] = {}
    cls: dict[int, str] = {}
    last_tok: dict[int, float] = {}
    queue: deque[Job] = deque()
    ttft: dict[str, list[float]] = {}
    itl: dict[str, list[float]] = {}
    events: list[tuple[float, int, str, int]] = []  # (time, seq, kind, replica/-1)
    seq = itertools.count()
    rr_turn = itertools.count()
    ordinal = itertools.count(1)

    def start_step(i: int, now: float) -> None:
        if step[i] is not None:
            return
        s = batchers[i].plan(now)
        step[i] = s
        if s is not None:
            heapq.heappush(events, (now + s.duration, next(seq), "step", i))

    def send(job: Job, i: int, now: float) -> None:
        inflight[i] += 1
        pending_prefill[i] += job.input_length
        total_work[i] += job.input_length + job.max_new_tokens
        remaining[i] += job.input_length + job.max_new_tokens
        where[job.ordinal] = i
        if dispatch_delay_s:
            heapq.heappush(events, (now + dispatch_delay_s, next(seq), f"add:{job.ordinal}", i))
            pending[job.ordinal] = job
        else:
            batchers[i].add(job)
            start_step(i, now)

    pending: dict[int, Job] = {}

    def choose(job: Job) -> int | None:
        free = [i for i in range(replicas) if inflight[i] < cap]
        if policy == "rr":
            return next(rr_turn) % replicas
        if policy == "random":
            return pick_rng.randrange(replicas)
        if policy == "jsq":
            least = min(inflight)
            tied = [i for i in range(replicas) if inflight[i] == least]
            return tied[next(rr_turn) % len(tied)]
        if not free:
            return None
        if policy == "lor-cap":
            least = min(inflight[i] for i in free)
            tied = [i for i in free if inflight[i] == least]
        elif policy == "lor-remaining":
            best = min((inflight[i], remaining[i]) for i in free)
            tied = [i for i in free if (inflight[i], remaining[i]) == best]
        elif policy in ("least-work", "remaining-work"):
            work = total_work if policy == "least-work" else remaining
            best = min((work[i], inflight[i]) for i in free)
            tied = [i for i in free if (work[i], inflight[i]) == best]
        else:  # prefill-aware
            best = min((pending_prefill[i], inflight[i]) for i in free)
            tied = [i for i in free if (pending_prefill[i], inflight[i]) == best]
        return tied[next(rr_turn) % len(tied)]

    def service(job: Job) -> float:
        """The balancer's own estimate of a request's time in a slot (deadline order)."""
        return estimated_service_s(job.input_length + job.max_new_tokens, job.input_length)

    def next_job() -> Job:
        if order == "fifo":
            return queue[0]
        if order == "sjf":
            return min(queue, key=service)
        ageing = float(order.removeprefix("edf"))
        return min(queue, key=lambda j: j.queued_at + ageing * service(j))

    def dispatch(now: float) -> None:
        while queue:
            job = next_job()
            i = choose(job)
            if i is None:
                return
            queue.remove(job)
            send(job, i, now)

    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration_s:
            break
        heapq.heappush(events, (t, next(seq), "arrive", -1))
    while events:
        now, _, kind, i = heapq.heappop(events)
        if kind == "arrive":
            p, o, c = sampler(rng)
            n = next(ordinal)
            job = Job(n, p, o, random.Random(n), queued_at=now)
            arrived[n], cls[n] = now, c
            if policy in CAPPED:
                queue.append(job)
                dispatch(now)
            else:
                target = choose(job)
                assert target is not None
                send(job, target, now)
        elif kind.startswith("add:"):
            job = pending.pop(int(kind[4:]))
            batchers[i].add(job)
            start_step(i, now)
        else:
            s = step[i]
            step[i] = None
            assert s is not None
            for job, ev in batchers[i].complete(s, now):
                n = job.ordinal
                measured = arrived[n] > warmup_s
                remaining[i] -= 1
                if ev.index == 1:
                    pending_prefill[i] -= job.input_length
                    remaining[i] -= job.input_length
                    if measured:
                        ttft.setdefault(cls[n], []).append(now - arrived[n])
                elif measured:
                    itl.setdefault(cls[n], []).append(now - last_tok[n])
                last_tok[n] = now
                if ev.final:
                    inflight[i] -= 1
                    total_work[i] -= job.input_length + job.max_new_tokens
                    remaining[i] -= job.max_new_tokens - job.generated
                    del last_tok[n]
            start_step(i, now)
            dispatch(now)
    return {"ttft": ttft, "itl": itl}  # type: ignore[dict-item]


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))] if v else float("nan")


if __name__ == "__main__":
    from capacity import saturated_throughput
    from loadgen import SAMPLERS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="blog", choices=sorted(SAMPLERS))
    ap.add_argument("--load", type=float, default=0.9)
    ap.add_argument("--hours", type=float, default=20.0)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--cap", type=int, default=None, help="slot cap of capped policies")
    ap.add_argument("--order", default="fifo", help="balancer queue: fifo, sjf, edf<A>")
    ap.add_argument("--json", help="merge the figures into this JSON file")
    args = ap.parse_args()
    sampler = SAMPLERS[args.workload]
    cap = saturated_throughput(sampler)["req_per_s"]
    print(f"{args.workload}: capacity {cap:.3f} req/s; load {args.load:.0%}")
    figures: dict[str, dict[str, float]] = {}
    for policy in args.policies.split(","):
        r = simulate(
            policy,
            sampler,
            args.load * cap,
            duration_s=args.hours * 3600,
            cap=args.cap,
            order=args.order,
        )
        allt = [x for v in r["ttft"].values() for x in v]
        alli = [x for v in r["itl"].values() for x in v]
        line = (
            f"{policy:14s} n={len(allt):6d} TTFT p50 {pct(allt, 50):6.2f} p90 {pct(allt, 90):6.2f}"
            f" p99 {pct(allt, 99):6.2f} s   ITL p50 {pct(alli, 50) * 1e3:5.1f} p99 "
            f"{pct(alli, 99) * 1e3:6.0f} ms"
        )
        if len(r["ttft"]) > 1:
            line += "   " + " ".join(
                f"{c}:p50/p99 {pct(v, 50):.2f}/{pct(v, 99):.2f}"
                for c, v in sorted(r["ttft"].items())
            )
        print(line, flush=True)
        figures[policy] = {
            "requests": len(allt),
            "ttft_p50_s": pct(allt, 50),
            "ttft_p90_s": pct(allt, 90),
            "ttft_p99_s": pct(allt, 99),
            "itl_p50_ms": pct(alli, 50) * 1e3,
            "itl_p99_ms": pct(alli, 99) * 1e3,
            **{f"{c}_ttft_p50_s": pct(v, 50) for c, v in r["ttft"].items()},
            **{f"{c}_ttft_p99_s": pct(v, 99) for c, v in r["ttft"].items()},
        }
    if args.json:
        import json
        from pathlib import Path

        path = Path(args.json)
        doc = json.loads(path.read_text()) if path.exists() else {}
        order = "" if args.order == "fifo" else f" queue {args.order}"
        doc[f"{args.workload}@{args.load:g}{order}"] = {
            "hours": args.hours,
            "capacity_req_per_s": cap,
            "slot_cap": args.cap or 8,
            "policies": figures,
        }
        path.write_text(json.dumps(doc, indent=1))
