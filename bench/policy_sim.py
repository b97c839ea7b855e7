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

With ``--slo S`` it compares instead, at ``--load`` (e.g. 1.3), what users of a TTFT SLO of
S seconds get: goodput (requests/s served with TTFT <= S), refusals and how long a refusal
takes, TTFT of served requests, for

- ``nginx``: ``rr``, the queue in the replicas;
- ``haproxy``: ``lor-cap``, FIFO queue, no timeout that matters (``timeout queue 120s``);
- ``haproxy-slo``: the same, a waiter dropped after S in the queue (``timeout queue`` = S);
- ``haproxy-slo-tight``: dropped after S - the workload's mean prefill time;
- ``gate``: neuron-fleet's SLO gate (balancer/slo.py), FIFO, on the balancer's own online
  forecast (balancer/forecast.py) driven by this virtual clock;
- ``gate-sf``: the gate with the ``shortest`` queue order and the long-prompt floor
  (balancer/queue_order.py).

Run: ``python bench/policy_sim.py [--load 0.9] [--hours 20] [--order fifo]``, or
``python bench/policy_sim.py --slo 3 --load 1.3 --hours 6``.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable

from balancer.forecast import Forecast
from balancer.queue_order import QueueOrder, estimated_service_s
from balancer.slo import SloGate
from balancer.ticket import Ticket
from balancer.upstream import Registry, Replica, ReplicaState
from supervisor.simulator.engine import Job, NeuronBatcher, NeuronTiming, Step

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


def push_arrivals(
    events: list, seq: itertools.count, rng: random.Random, rate: float, duration_s: float
) -> None:
    """Poisson arrivals at ``rate`` per second until ``duration_s``, as "arrive" events."""
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration_s:
            return
        heapq.heappush(events, (t, next(seq), "arrive", -1))


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

    push_arrivals(events, seq, rng, rate, duration_s)
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


SLO_POLICIES = ("nginx", "haproxy", "haproxy-slo", "haproxy-slo-tight", "gate", "gate-sf")


class _Waiting:
    """A queued request in the SLO simulation (what balancer.queue_order sorts)."""

    def __init__(self, job: Job, ticket: Ticket, key: float) -> None:
        self.job, self.ticket, self.deadline = job, ticket, key

    @property
    def long(self) -> bool:
        return self.ticket.long


class _Queue:
    """The balancer queue as the SLO gate sees it (``Admission.ahead_of``)."""

    def __init__(self, order: QueueOrder) -> None:
        self.order = order
        self.items: list[_Waiting] = []

    def ahead_of(self, ticket: Ticket, now: float) -> list[Ticket]:
        key = self.order.key(now, 0, ticket.prompt_tokens, ticket)
        return [w.ticket for w in self.order.ahead_of(self.items, key, ticket.long)]


def simulate_slo(
    policy: str,
    sampler: Callable[[random.Random], tuple[int, int, str]],
    rate: float,
    slo_s: float,
    *,
    replicas: int = 3,
    batch: int = 8,
    duration_s: float = 21_600.0,
    warmup_s: float = 600.0,
    seed: int = 3,
    long_tokens: int = 4096,
    mean_prefill_s: float = 0.0,
) -> dict[str, object]:
    """One SLO policy (``SLO_POLICIES``) under Poisson arrivals: per measured request its
    class, TTFT (None if refused) and time to refusal."""
    if policy == "nginx":
        r = simulate(
            "rr",
            sampler,
            rate,
            replicas=replicas,
            batch=batch,
            duration_s=duration_s,
            warmup_s=warmup_s,
            seed=seed,
        )
        served = [(c, t, None) for c, v in r["ttft"].items() for t in v]
        return {"requests": served, "measured_s": duration_s - warmup_s}
    rng = random.Random(seed)
    batchers = [
        NeuronBatcher(batch_size=batch, max_concurrent_requests=1_000_000) for _ in range(replicas)
    ]
    names = [f"r{i}" for i in range(replicas)]
    fleet = Registry(
        Replica(n, f"sim://{n}", slot_cap=batch, state=ReplicaState.READY, healthy=True)
        for n in names
    )
    reps = fleet.replicas
    forecast = Forecast()
    ordering = "shortest" if policy == "gate-sf" else "fifo"
    queue = _Queue(QueueOrder(ordering, 0.3, forecast, 0.25 if policy == "gate-sf" else 0.0))
    gate = SloGate(forecast, queue, fleet) if policy.startswith("gate") else None
    step: list[Step | None] = [None] * replicas
    tickets: dict[int, Ticket] = {}
    cls: dict[int, str] = {}
    out: list[tuple[str, float | None, float | None]] = []
    events: list[tuple[float, int, str, int]] = []
    seq = itertools.count()
    ordinal = itertools.count(1)

    def start_step(i: int, now: float) -> None:
        if step[i] is None:
            s = step[i] = batchers[i].plan(now)
            if s is not None:
                heapq.heappush(events, (now + s.duration, next(seq), "step", i))

    def record(n: int, ttft: float | None, refusal: float | None) -> None:
        if tickets[n].arrived_at > warmup_s:
            out.append((cls[n], ttft, refusal))

    def dispatch(now: float) -> None:
        while queue.items:
            free = [i for i in range(replicas) if reps[i].inflight < batch]
            if not free:
                return
            waiter = next(iter(queue.order.in_turn(queue.items)))
            queue.items.remove(waiter)
            queue.order.granted(waiter.long)
            # lor-remaining: fewest in flight, then least work left (neuron-fleet's policy).
            i = min(free, key=lambda k: (reps[k].inflight, reps[k].outstanding_work, k))
            reps[i].inflight += 1
            reps[i].outstanding_work += waiter.job.input_length + waiter.job.max_new_tokens
            forecast.started(waiter.ticket, names[i], now)
            batchers[i].add(waiter.job)
            start_step(i, now)

    push_arrivals(events, seq, rng, rate, duration_s)
    while events:
        now, _, kind, i = heapq.heappop(events)
        if kind == "arrive":
            p, o, c = sampler(rng)
            n = next(ordinal)
            job = Job(n, p, o, random.Random(n), queued_at=now)
            ticket = Ticket(p, o, now, budget_s=slo_s, long=p >= long_tokens)
            tickets[n], cls[n] = ticket, c
            if gate is not None and gate.check(ticket, now) is not None:
                record(n, None, 0.0)
                continue
            key = queue.order.key(now, p + o, p, ticket)
            bisect.insort_right(queue.items, _Waiting(job, ticket, key), key=lambda w: w.deadline)
            give_up = ticket.latest_start
            if policy == "haproxy-slo":
                give_up = now + slo_s
            elif policy == "haproxy-slo-tight":
                give_up = now + slo_s - mean_prefill_s
            if give_up is not None:
                heapq.heappush(events, (give_up, next(seq), "expire", n))
            dispatch(now)
        elif kind == "expire":
            waiter = next((w for w in queue.items if w.job.ordinal == i), None)
            if waiter is not None:
                queue.items.remove(waiter)
                record(i, None, now - waiter.ticket.arrived_at)
                tk = waiter.ticket
                if tk.predicted_ttft is not None and tk.budget_s is not None:
                    forecast.ttft_error(tk, tk.budget_s - tk.predicted_ttft, now)
        else:
            s = step[i]
            step[i] = None
            assert s is not None
            for job, ev in batchers[i].complete(s, now):
                tk = tickets[job.ordinal]
                tk.last_token_at = now  # before generated, as the relay does
                tk.generated += 1
                reps[i].outstanding_work -= 1 + (job.input_length if ev.index == 1 else 0)
                if ev.index == 1:
                    tk.first_token_at = now
                    ttft = now - tk.arrived_at
                    record(job.ordinal, ttft, None)
                    if tk.predicted_ttft is not None:
                        forecast.ttft_error(tk, ttft - tk.predicted_ttft, now)
                if ev.final:
                    reps[i].inflight -= 1
                    reps[i].outstanding_work -= job.max_new_tokens - job.generated
                    forecast.observe(tk, complete=True)
                    forecast.ended(tk)
            start_step(i, now)
            dispatch(now)
    return {"requests": out, "measured_s": duration_s - warmup_s}


def slo_figures(run: dict[str, object], slo_s: float) -> dict[str, float]:
    reqs = run["requests"]
    assert isinstance(reqs, list)
    span = float(run["measured_s"])  # type: ignore[arg-type]
    served = [t for _, t, _ in reqs if t is not None]
    refusals = [r for _, t, r in reqs if t is None and r is not None]
    good = [t for t in served if t <= slo_s]
    return {
        "requests": len(reqs),
        "goodput_req_per_s": len(good) / span,
        "served_req_per_s": len(served) / span,
        "refused_share": len(refusals) / len(reqs) if reqs else float("nan"),
        "refusal_p50_s": pct(refusals, 50),
        "refusal_p99_s": pct(refusals, 99),
        "ttft_p50_s": pct(served, 50),
        "ttft_p90_s": pct(served, 90),
        "ttft_p99_s": pct(served, 99),
        **{
            f"{c}_refused_share": sum(1 for k, t, _ in reqs if k == c and t is None)
            / max(1, sum(1 for k, _, _ in reqs if k == c))
            for c in sorted({k for k, _, _ in reqs})
        },
    }


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
    ap.add_argument("--slo", type=float, help="compare the SLO policies at this TTFT SLO (s)")
    args = ap.parse_args()
    sampler = SAMPLERS[args.workload]
    cap = saturated_throughput(sampler)["req_per_s"]
    print(f"{args.workload}: capacity {cap:.3f} req/s; load {args.load:.0%}")
    if args.slo:
        draw = random.Random(5)
        mean_prompt = sum(sampler(draw)[0] for _ in range(5000)) / 5000
        mean_prefill_s = NeuronTiming().prefill(round(mean_prompt))
        slo_out: dict[str, dict[str, float]] = {}
        for policy in SLO_POLICIES:
            f = slo_figures(
                simulate_slo(
                    policy,
                    sampler,
                    args.load * cap,
                    args.slo,
                    duration_s=args.hours * 3600,
                    mean_prefill_s=mean_prefill_s,
                ),
                args.slo,
            )
            slo_out[policy] = f
            print(
                f"{policy:12s} goodput {f['goodput_req_per_s']:.3f} req/s "
                f"({f['goodput_req_per_s'] / cap:.0%} of capacity) refused "
                f"{f['refused_share']:.0%} refusal p99 {f['refusal_p99_s']:.2f} s TTFT "
                f"p50/p90/p99 {f['ttft_p50_s']:.2f}/{f['ttft_p90_s']:.2f}/{f['ttft_p99_s']:.2f} s "
                + " ".join(
                    f"{k.removesuffix('_refused_share')}:{v:.0%}"
                    for k, v in f.items()
                    if k.endswith("_refused_share") and k != "refused_share"
                ),
                flush=True,
            )
        if args.json:
            import json
            from pathlib import Path

            path = Path(args.json)
            doc = json.loads(path.read_text()) if path.exists() else {}
            doc[f"{args.workload}@{args.load:g} slo {args.slo:g}"] = {
                "hours": args.hours,
                "capacity_req_per_s": cap,
                "slo_s": args.slo,
                "policies": slo_out,
            }
            path.write_text(json.dumps(doc, indent=1))
        raise SystemExit(0)
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
