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
RATE_RUN_REQUESTS = 1000
RATE_RUN_SEEDS = 3
"""A Poisson "run" is ``RATE_RUN_SEEDS`` runs of ``RATE_RUN_REQUESTS`` arrivals (seeds
``seed``, ``seed + 1``, ...), every request counted to its end, pooled. One seed's arrivals
are the same draws at every rate, scaled by 1 / rate, so two rates compare the same
requests. Near the knee a TGI batch's tail is chaotic (which prompts share an admission):
one run of 2,000 gave 6/tp4/batch-16 on the blog's workload p99 6.3 s at 0.600 req/s and
4.9 s at 0.613; three seeds pooled smooth that. The first runs were timed (300 s): p99 of
150 requests was their second largest TTFT, and requests still queued at the end were
dropped."""


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
    requests, duration = [], 0.0
    for k in range(RATE_RUN_SEEDS):
        workload = replace(
            base.with_load(rate=rate, max_requests=RATE_RUN_REQUESTS, duration_s=math.inf),
            seed=base.seed + k,
        )
        sim = HostSimulation(
            model, layout.shape, layout.replicas, engine=layout.engine, policy=layout.policy
        )
        result = sim.run(workload)
        requests += result.requests
        duration += result.duration_s
    return figures(Result(requests, duration))


def capacity(model: TimingModel, layout: Layout, base: Workload) -> float:
    """Requests/s the host completes when saturated (closed loop, twice the slots)."""
    clients = 2 * layout.replicas * layout.shape.batch_size
    workload = base.with_load(
        concurrency=clients, max_requests=max(4 * clients, 60), duration_s=math.inf
    )
    return simulate(model, layout, workload).req_per_s


@dataclass(frozen=True)
class SloSearch:
    rate: float
    """The highest rate found whose p99 TTFT meets the SLO (0: none)."""
    at_rate: Figures | None
    tried: tuple[tuple[float, float], ...]
    """(rate, TTFT p99) of every run of the search, by rate: the sweep's plot."""


def max_rate_within_slo(
    model: TimingModel, layout: Layout, base: Workload, ttft_slo_s: float, steps: int = 8
) -> SloSearch:
    """The highest Poisson rate whose p99 TTFT meets the SLO (bisection below capacity).
    Near the knee p99 moves in steps of one prefill (a request waits behind none, one or
    two admissions), so the rate is known to a few percent (docs/predict.md)."""
    hi = capacity(model, layout, base)
    if hi <= 0:
        return SloSearch(0.0, None, ())
    lo, best, tried = 0.0, None, []
    for _ in range(steps):
        rate = (lo + hi) / 2
        result = at_rate(model, layout, base, rate)
        tried.append((rate, result.ttft_p99_s))
        if result.ttft_p99_s <= ttft_slo_s and result.completed > 0:
            lo, best = rate, result
        else:
            hi = rate
    return SloSearch(lo, best, tuple(sorted(tried)))


@dataclass(frozen=True)
class SweepRow:
    layout: Layout
    max_rate: float
    at_max: Figures | None
    curve: tuple[tuple[float, float], ...]
    """(rate, TTFT p99) points for the plot: the runs of its SLO search."""


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
) -> list[SweepRow]:
    """Every candidate's SLO rate, best first; its search's runs are its plotted curve."""
    rows = []
    for layout in candidates:
        found = max_rate_within_slo(model, layout, base, ttft_slo_s, steps=7)
        rows.append(SweepRow(layout, found.rate, found.at_rate, found.tried))
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
