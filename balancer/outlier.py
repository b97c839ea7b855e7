"""Passive outlier detection: take a replica out after consecutive failures, within a budget.

Envoy's model (outlier detection, ``consecutive_5xx`` + ``max_ejection_percent``): the relay
reports each attempt's outcome; ``eject_after_failures`` failures in a row eject a replica
until the health checker re-admits it (``rise`` passing checks). Two rules keep one bad
request from emptying the fleet:

- **Ejection budget.** At most ``max_ejected_fraction`` of the ready replicas are ejected
  by this detector at once (never less than one replica, as Envoy), and never the last
  routable one (Envoy's panic threshold: with nothing left to route to, a suspect replica
  beats none). Health checks still take any replica out that really stops answering.
- **Request-correlated failures.** A replica that *answered* with a failure (424, 5xx, a
  generation error event) is blamed only when the same request then succeeded on another
  replica: that proves the request could be served. A failure that followed the request to
  every replica it tried — or a request that ended before another replica could judge it
  (one replica to try, queue timeout, client gone) — is not evidence against a replica:
  a prompt that crashes the batch must not eject replicas, whatever the client does.
  Transport failures (connect errors, timeouts, a stream cut mid-way) always count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from balancer.metrics import BalancerMetrics
from balancer.upstream import Registry, Replica, ReplicaState

log = logging.getLogger("neuron_fleet.outlier")


class OutlierDetector:
    def __init__(
        self,
        registry: Registry,
        metrics: BalancerMetrics,
        eject_after_failures: int,
        max_ejected_fraction: float,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.eject_after_failures = eject_after_failures
        self.max_ejected_fraction = max_ejected_fraction
        self._over_budget_logged: set[str] = set()

    @property
    def budget(self) -> int:
        """How many replicas this detector may hold ejected at once."""
        return max(1, math.floor(self.max_ejected_fraction * len(self.registry) + 1e-9))

    def _room_to_eject(self, replica: Replica) -> str | None:
        """None if ``replica`` may be ejected now, else why not."""
        others = [r for r in self.registry.replicas if r is not replica]
        # Only ready replicas hold the budget: one given up by the supervisor (failed) or
        # restarting is out of rotation for its own reasons.
        ejected = sum(1 for r in others if r.ejected and r.state is ReplicaState.READY)
        if ejected >= self.budget:
            return (
                f"{ejected} of {len(self.registry)} replicas are ejected already "
                f"(max_ejected_fraction {self.max_ejected_fraction:g})"
            )
        if not any(r.routable for r in others):
            return "it is the last routable replica"
        return None

    def passed(self, replica: Replica) -> None:
        replica.consecutive_failures = 0

    def failed(self, replica: Replica, kind: str) -> None:
        """Count a failure; enough in a row eject the replica, if the budget allows."""
        self.metrics.upstream_errors.labels(replica=replica.name, kind=kind).inc()
        replica.consecutive_failures += 1
        if not replica.healthy or replica.consecutive_failures < self.eject_after_failures:
            return
        refused = self._room_to_eject(replica)
        if refused is not None:
            if replica.name not in self._over_budget_logged:
                self._over_budget_logged.add(replica.name)
                log.warning(
                    "%s failed %d requests in a row (last: %s) but %s: it stays in rotation",
                    replica.name,
                    replica.consecutive_failures,
                    kind,
                    refused,
                )
            self.metrics.ejections.labels(replica=replica.name, outcome="over_budget").inc()
            return
        self._over_budget_logged.discard(replica.name)
        replica.healthy = False
        replica.ejected = True
        replica.health_successes = 0
        self.metrics.ejections.labels(replica=replica.name, outcome="ejected").inc()
        log.warning(
            "ejected %s after %d consecutive failures (last: %s); health checks re-admit it",
            replica.name,
            replica.consecutive_failures,
            kind,
        )
        self.registry.notify()


@dataclass
class RequestFailures:
    """The failures one request met, held until its outcome says whom to blame."""

    request_id: str = ""
    answered: list[tuple[Replica, str]] = field(default_factory=list)
    """Replicas that answered this request with a failure (status or error event)."""

    def add(self, replica: Replica, kind: str) -> None:
        self.answered.append((replica, kind))

    def settle(self, detector: OutlierDetector, succeeded: bool) -> None:
        """Blame the replicas that answered with a failure if the request then succeeded
        elsewhere; otherwise count the failures against the request (metrics only)."""
        if succeeded:
            for replica, kind in self.answered:
                detector.failed(replica, kind)
            self.answered.clear()
            return
        if not self.answered:
            return
        replicas = {r for r, _ in self.answered}
        # Several replicas: the request fails everywhere. One: nobody else judged it.
        verdict = "request_correlated" if len(replicas) > 1 else "unsettled"
        for replica, kind in self.answered:
            detector.metrics.upstream_errors.labels(
                replica=replica.name, kind=f"{kind}_{verdict}"
            ).inc()
        if len(replicas) > 1:
            log.warning(
                "request %s failed the same way on %d replicas (%s): blamed on the request, "
                "not on the replicas",
                self.request_id,
                len(replicas),
                ", ".join(sorted(f"{r.name}: {k}" for r, k in self.answered)),
            )
        self.answered.clear()
