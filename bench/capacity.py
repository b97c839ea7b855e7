"""The fleet's capacity for a workload, computed from the simulator's own timing model.

A discrete-event run of ``replicas`` saturated ``NeuronBatcher`` (the class the simulated
replica runs, same ``NeuronTiming``), each kept full by a closed loop of requests drawn from
the workload's sampler: completions per second in steady state at speed 1. Offered loads
(50 % ... 100 %) are fractions of this, times the simulator speed.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from supervisor.simulator.engine import Job, NeuronBatcher, NeuronTiming


def saturated_throughput(
    sampler: Callable[[random.Random], tuple[int, int, str]],
    *,
    replicas: int = 3,
    batch_size: int = 8,
    duration_s: float = 3_000.0,
    warmup_s: float = 300.0,
    seed: int = 1,
    timing: NeuronTiming | None = None,
) -> dict[str, float]:
    """Steady-state req/s and output tokens/s of the fleet at speed 1."""
    completed = 0
    tokens = 0
    for k in range(replicas):
        rng = random.Random(seed * 1000 + k)
        b = NeuronBatcher(
            batch_size=batch_size, max_concurrent_requests=10_000, timing=timing or NeuronTiming()
        )
        ordinal = 0

        def arrive(now: float, b: NeuronBatcher = b, rng: random.Random = rng) -> None:
            nonlocal ordinal
            ordinal += 1
            p, o, _ = sampler(rng)
            b.add(Job(ordinal, p, o, random.Random(ordinal), queued_at=now))

        for _ in range(batch_size * 2):  # always a queue: the replica never idles
            arrive(0.0)
        now = 0.0
        while now < duration_s:
            step = b.plan(now)
            assert step is not None
            now += step.duration
            for job, event in b.complete(step, now):
                if event.final:
                    if warmup_s < now <= duration_s:
                        completed += 1
                        tokens += job.generated
                    arrive(now)
    span = duration_s - warmup_s
    return {"req_per_s": completed / span, "output_tok_per_s": tokens / span}


if __name__ == "__main__":
    from loadgen import SAMPLERS

    for name, sampler in SAMPLERS.items():
        print(name, saturated_throughput(sampler))
