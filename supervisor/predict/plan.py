"""A layout on one host, its predicted figures under a workload, the SLO rate and the sweep."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .queue import HostSimulation, Result, Workload, mean, percentile
from .timing import Shape, TimingModel

HBM_PER_CORE_GB = 16.0
"""Inferentia2 has 32 GB of HBM per device and 2 NeuronCores per device (AWS, "Amazon EC2
Inf2 instances": https://aws.amazon.com/ec2/instance-types/inf2/)."""
USABLE_HBM = 0.85
"""Runtime, compiled graphs and scratch take the rest (a rule of thumb, not measured)."""
TP_DEGREES = (1, 2, 4, 8, 12, 24)
"""The NxD Inference feature guide lists TP 1, 2, 4, 8 and 24 on Inf2; 12 comes from
transformers-neuronx-era optimum-neuron (inf2-published.md)."""
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
RATE_RUN_S = 300.0
RATE_RUN_REQUESTS = 2000
"""A Poisson run lasts ``RATE_RUN_S`` or long enough for this many arrivals, whichever is
longer: p99 of 150 requests (300 s at 0.5 req/s) is their second largest, so noisy that
p99 was not monotone in the rate (3 x tp8 x batch 8 on the blog's workload: 6.3 s at
0.55 req/s, 4.9 s at 0.65) and the SLO bisection landed anywhere; of 2,000 it is the 20th."""


@dataclass(frozen=True)
class Layout:
    replicas: int
    shape: Shape
    engine: str = "tgi"
    policy: str = "fleet"

    @property
    def cores(self) -> int:
        return self.replicas * self.shape.tp

    def label(self) -> str:
        return f"{self.replicas} x tp{self.shape.tp} x batch {self.shape.batch_size}"

    def memory_per_core_gb(self) -> float:
        s = self.shape
        weights = 2.0 * s.params_b * 1e9 / s.tp  # bf16
        kv = s.batch_size * s.sequence_length * s.kv_bytes_per_core
        return (weights + kv) / 1e9

    def fits(self) -> bool:
        return self.memory_per_core_gb() <= HBM_PER_CORE_GB * USABLE_HBM


@dataclass(frozen=True)
class Figures:
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_ms: float
    itl_mean_ms: float
    output_tok_per_s: float
    req_per_s: float
    completed: int


def figures(result: Result) -> Figures:
    ttft, itl = result.ttft_s(), result.itl_ms()
    done = len(result.completed)
    return Figures(
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        itl_p50_ms=percentile(itl, 50),
        itl_mean_ms=mean(itl),
        output_tok_per_s=result.output_tok_per_s(),
        req_per_s=done / result.duration_s if result.duration_s else 0.0,
        completed=done,
    )


def simulate(model: TimingModel, layout: Layout, workload: Workload) -> Figures:
    sim = HostSimulation(
        model, layout.shape, layout.replicas, engine=layout.engine, policy=layout.policy
    )
    return figures(sim.run(workload))


def at_rate(model: TimingModel, layout: Layout, base: Workload, rate: float) -> Figures:
    duration = max(RATE_RUN_S, RATE_RUN_REQUESTS / rate) if rate > 0 else RATE_RUN_S
    return simulate(model, layout, base.with_load(rate=rate, duration_s=duration))


def capacity(model: TimingModel, layout: Layout, base: Workload) -> float:
    """Requests/s the host completes when saturated (closed loop, twice the slots)."""
    clients = 2 * layout.replicas * layout.shape.batch_size
    workload = base.with_load(
        concurrency=clients, max_requests=max(4 * clients, 60), duration_s=math.inf
    )
    return simulate(model, layout, workload).req_per_s


def max_rate_within_slo(
    model: TimingModel, layout: Layout, base: Workload, ttft_slo_s: float, steps: int = 8
) -> tuple[float, Figures | None]:
    """The highest Poisson rate whose p99 TTFT meets the SLO (bisection below capacity)."""
    hi = capacity(model, layout, base)
    if hi <= 0:
        return 0.0, None
    lo, best = 0.0, None
    for _ in range(steps):
        rate = (lo + hi) / 2
        result = at_rate(model, layout, base, rate)
        if result.ttft_p99_s <= ttft_slo_s and result.completed > 0:
            lo, best = rate, result
        else:
            hi = rate
    return lo, best


@dataclass(frozen=True)
class SweepRow:
    layout: Layout
    max_rate: float
    at_max: Figures | None
    curve: tuple[tuple[float, float], ...]
    """(rate, TTFT p99) points for the plot."""


def layouts(
    shape: Shape, cores: int, *, engine: str, policy: str, batch_sizes=BATCH_SIZES
) -> list[Layout]:
    out = []
    for tp in TP_DEGREES:
        if tp > cores:
            continue
        for batch in batch_sizes:
            s = replace(shape, tp=tp, batch_size=batch)
            layout = Layout(cores // tp, s, engine, policy)
            if layout.fits():
                out.append(layout)
    return out


def sweep(
    model: TimingModel,
    candidates: list[Layout],
    base: Workload,
    ttft_slo_s: float,
    curve_points: int = 6,
) -> list[SweepRow]:
    rows = []
    for layout in candidates:
        rate, best = max_rate_within_slo(model, layout, base, ttft_slo_s, steps=7)
        top = max(rate * 1.5, 0.05)
        curve = []
        for i in range(1, curve_points + 1):
            r = top * i / curve_points
            curve.append((r, at_rate(model, layout, base, r).ttft_p99_s))
        rows.append(SweepRow(layout, rate, best, tuple(curve)))
    rows.sort(key=lambda row: row.max_rate, reverse=True)
    return rows


def plot(rows: list[SweepRow], path: str, ttft_slo_s: float, top: int = 8) -> None:
    """TTFT p99 against arrival rate for the best layouts (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows[:top]:
        xs = [r for r, _ in row.curve]
        ys = [t for _, t in row.curve]
        ax.plot(xs, ys, marker="o", label=row.layout.label())
    ax.axhline(ttft_slo_s, color="grey", linestyle="--", label=f"SLO {ttft_slo_s:g} s")
    ax.set_xlabel("arrival rate (requests/s, Poisson)")
    ax.set_ylabel("TTFT p99 (s)")
    ax.set_yscale("log")
    ax.set_title("neuron-fleet predict --sweep")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
