"""Prometheus metrics of the balancer, all under the ``neuron_fleet_`` prefix.

Counters and histograms are updated on the request path; everything that is a *state*
(in-flight per replica, queue depth, replica up/state/restarts) is read from the registry
at scrape time by a custom collector, so it can never drift from the truth and costs
nothing per request.

Per-replica children (``.labels(replica=...)``) are resolved once per replica and cached on
the Replica object, so the token hot path does no label lookups.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from balancer.quarantine import Quarantine
from balancer.upstream import Registry, Replica, ReplicaState

PREFIX = "neuron_fleet"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2, 5)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
ERROR_BUCKETS = (-10, -5, -2, -1, -0.5, -0.25, -0.1, 0, 0.1, 0.25, 0.5, 1, 2, 5, 10)
"""Actual minus predicted TTFT (s): negative buckets hold requests served earlier than
forecast."""
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 131072)

KNOWN_ROUTES = frozenset(
    {
        "/",
        "/generate",
        "/generate_stream",
        "/v1/chat/completions",
        "/v1/completions",
        "/invocations",
        "/tokenize",
        "/chat_tokenize",
        "/detokenize",
        "/info",
        "/v1/models",
        "/version",
        "/health",
        "/ping",
        "/live",
        "/metrics",
    }
)


def route_label(path: str) -> str:
    """Bounded label values: unknown paths (scanners, typos) all count as ``other``."""
    if path in KNOWN_ROUTES:
        return path
    if path.startswith("/fleet/"):
        return "/fleet"
    return "other"


@dataclass
class LoopHistogram:
    """A histogram for the token hot path: plain counters, no lock.

    prometheus-client's Histogram takes a lock and walks its buckets on every observation;
    inter-token latency is observed once per relayed event, from the event loop's single
    thread, so a bisect into a list is enough. Exported at scrape time by ``_LoopCollector``.
    """

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += times
        self.total += value * times


@dataclass
class ReplicaMetrics:
    """The per-replica children the relay touches for every token event."""

    ttft: Histogram
    itl: LoopHistogram
    output_tokens: Counter


class BalancerMetrics:
    def __init__(
        self,
        registry: Registry,
        queue_depth: Callable[[], int],
        quarantine: Quarantine | None = None,
    ) -> None:
        self.prometheus = CollectorRegistry(auto_describe=True)
        r = self.prometheus
        p = PREFIX
        self.requests = Counter(
            f"{p}_requests",
            "Requests answered, by route and HTTP status.",
            ["route", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            f"{p}_request_duration_seconds",
            "Time from request received to last byte sent.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            f"{p}_time_to_first_token_seconds",
            "Time from request received at the balancer to the first token event sent.",
            ["replica"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl: dict[str, LoopHistogram] = {}
        """Per replica; exported as ``neuron_fleet_inter_token_latency_seconds``."""
        self.output_tokens = Counter(
            f"{p}_output_tokens", "Token events relayed to clients.", ["replica"], registry=r
        )
        self.prompt_tokens = Histogram(
            f"{p}_prompt_tokens",
            "Prompt tokens per generation request (counted or estimated).",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            f"{p}_queue_wait_seconds",
            "Time a request waited at the balancer for a free replica slot.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            f"{p}_rejected_requests",
            "Requests refused before reaching a replica, by reason.",
            ["reason"],
            registry=r,
        )
        self.ttft_forecast_error = Histogram(
            f"{p}_ttft_forecast_error_seconds",
            "Actual minus predicted time to first token of requests the SLO gate admitted.",
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.slo_requests = Counter(
            f"{p}_ttft_slo_requests",
            "Generation requests with a TTFT budget, by outcome (met, missed: streams whose "
            "first token event came within / over it; response_met, response_missed: "
            "non-streaming answers whose response head, which brings the first token with "
            "the whole answer, came within / over it; refused: 429 on arrival; expired: "
            "dropped from the queue) and prompt class (short, long). Goodput: rate of "
            'outcome=~"met|response_met".',
            ["outcome", "prompt_class"],
            registry=r,
        )
        self.retries = Counter(
            f"{p}_retries",
            "Attempts retried on another replica, by reason.",
            ["reason"],
            registry=r,
        )
        self.retry_decisions = Counter(
            f"{p}_retry_decisions",
            "What the retry policy made of failures that may be the request's own "
            "(balancer/retry.py): wait_for_fate, retry, retry_shared_break, stop_specific, "
            "stop_second_break, no_room.",
            ["decision"],
            registry=r,
        )
        self.process_fates = Counter(
            f"{p}_process_fates",
            "Replica processes watched after a request failed on them, by what became of "
            "them: survived, exited, wedged (stopped answering /health), stopped (on purpose).",
            ["replica", "fate"],
            registry=r,
        )
        self.upstream_errors = Counter(
            f"{p}_upstream_errors",
            "Failures talking to a replica, by kind.",
            ["replica", "kind"],
            registry=r,
        )
        self.upstream_responses = Counter(
            f"{p}_upstream_responses",
            "Responses received from replicas, by status code.",
            ["replica", "code"],
            registry=r,
        )
        self.client_disconnects = Counter(
            f"{p}_client_disconnects",
            "Clients that left before their response was complete, by stage.",
            ["stage"],
            registry=r,
        )
        self.stream_errors = Counter(
            f"{p}_stream_errors",
            "Streams ended with an explicit error event after they had started.",
            ["replica", "reason"],
            registry=r,
        )
        self.ejections = Counter(
            f"{p}_ejections",
            "Passive ejections of replicas after consecutive failures; outcome=over_budget "
            "when max_ejected_fraction kept the replica in rotation.",
            ["replica", "outcome"],
            registry=r,
        )
        self.background_task_failures = Counter(
            f"{p}_background_task_failures",
            "Unexpected exceptions in the balancer's background tasks (restarted after each).",
            ["task"],
            registry=r,
        )
        r.register(_StateCollector(registry, queue_depth, quarantine))
        r.register(_LoopCollector(self.itl))

    def for_replica(self, replica: Replica) -> ReplicaMetrics:
        if replica.metrics is None:
            name = replica.name
            replica.metrics = ReplicaMetrics(
                ttft=self.ttft.labels(replica=name),
                itl=self.itl.setdefault(name, LoopHistogram(ITL_BUCKETS)),
                output_tokens=self.output_tokens.labels(replica=name),
            )
        return replica.metrics


class _StateCollector(Collector):
    """Gauges (and the quarantine's count) read at scrape time."""

    def __init__(
        self,
        registry: Registry,
        queue_depth: Callable[[], int],
        quarantine: Quarantine | None,
    ) -> None:
        self._registry = registry
        self._queue_depth = queue_depth
        self._quarantine = quarantine

    def collect(self) -> Iterator[Metric]:
        p = PREFIX
        replicas = self._registry.replicas
        inflight = GaugeMetricFamily(
            f"{p}_replica_inflight", "Requests in flight on the replica.", labels=["replica"]
        )
        cap = GaugeMetricFamily(
            f"{p}_replica_slot_cap",
            "Most in-flight requests allowed (0: no cap).",
            labels=["replica"],
        )
        up = GaugeMetricFamily(
            f"{p}_replica_up",
            "1 when the replica gets traffic (ready and healthy).",
            labels=["replica"],
        )
        state = GaugeMetricFamily(
            f"{p}_replica_state",
            "1 for the replica's current state.",
            labels=["replica", "state"],
        )
        restarts = CounterMetricFamily(
            f"{p}_replica_restarts",
            "Times the supervisor restarted the replica.",
            labels=["replica"],
        )
        start = GaugeMetricFamily(
            f"{p}_replica_start_duration_seconds",
            "How long the replica's last start took until ready.",
            labels=["replica"],
        )
        for rep in replicas:
            inflight.add_metric([rep.name], rep.inflight)
            cap.add_metric([rep.name], rep.slot_cap)
            up.add_metric([rep.name], 1 if rep.routable else 0)
            shown = rep.display_state
            for s in ReplicaState:
                state.add_metric([rep.name, s.value], 1 if s.value == shown else 0)
            restarts.add_metric([rep.name], rep.restarts)
            duration = getattr(rep, "start_duration_s", None)
            if duration is not None:
                start.add_metric([rep.name], duration)
        yield from (inflight, cap, up, state, restarts, start)
        yield GaugeMetricFamily(
            f"{p}_replicas_ready",
            "Replicas getting traffic.",
            value=sum(1 for rep in replicas if rep.routable),
        )
        yield GaugeMetricFamily(
            f"{p}_replicas", "Replicas known to the balancer.", value=len(replicas)
        )
        yield GaugeMetricFamily(
            f"{p}_queue_depth",
            "Requests waiting at the balancer for a slot.",
            value=self._queue_depth(),
        )
        quarantine = self._quarantine
        yield GaugeMetricFamily(
            f"{p}_quarantined_requests",
            "Requests quarantined now: refused on arrival until quarantine_ttl_s has passed.",
            value=len(quarantine) if quarantine is not None else 0,
        )
        yield CounterMetricFamily(
            f"{p}_quarantines",
            "Requests put in quarantine after they broke quarantine_after replica processes "
            "(a query of death); identical ones are then refused: "
            'rejected_requests_total{reason="quarantined"}.',
            value=quarantine.quarantined_total if quarantine is not None else 0,
        )
        yield CounterMetricFamily(
            f"{p}_quarantine_lifts",
            "Quarantines lifted before their TTL: an identical request served in full, or "
            "an operator's DELETE /fleet/quarantine/<digest>.",
            value=quarantine.lifted_total if quarantine is not None else 0,
        )


class _LoopCollector(Collector):
    """Exports the inter-token latency histograms kept by the relay."""

    def __init__(self, histograms: dict[str, LoopHistogram]) -> None:
        self._histograms = histograms

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between consecutive token events of a stream, as relayed.",
            labels=["replica"],
        )
        for name, h in list(self._histograms.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*h.bounds, float("inf")), h.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([name], buckets, h.total)
        yield family
