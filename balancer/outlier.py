"""Passive outlier detection: take a replica out after consecutive failures, within a budget.

Envoy's model (outlier detection, ``consecutive_5xx`` + ``max_ejection_percent``): the relay
reports each attempt's outcome; ``eject_after_failures`` failures in a row eject a replica
until the health checker re-admits it (``rise`` passing checks). Two rules keep one bad
request from emptying the fleet:

- **Ejection budget.** At most ``max_ejected_fraction`` of the replicas are ejected by
  this detector at once (never less than one replica, as Envoy). Health checks still take
  any replica out that really stops answering.
- **Request-correlated failures.** A failure that followed one request from replica to
  replica (424, 5xx, a generation error event from each replica it tried) is evidence
  against the request — a prompt that crashes the batch — not against every replica. The
  relay reports such answers through a ``RequestFailures`` that counts them only when the
  request then succeeded elsewhere or was tried on a single replica.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from balancer.metrics import BalancerMetrics
from balancer.upstream import Registry, Replica

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

    def passed(self, replica: Replica) -> None:
        replica.consecutive_failures = 0

    def failed(self, replica: Replica, kind: str) -> None:
        """Count a failure; enough in a row eject the replica, if the budget allows."""
        self.metrics.upstream_errors.labels(replica=replica.name, kind=kind).inc()
        replica.consecutive_failures += 1
        if not replica.healthy or replica.consecutive_failures < self.eject_after_failures:
            return
        ejected = sum(1 for r in self.registry.replicas if r.ejected and not r.healthy)
        if ejected >= self.budget:
            if replica.name not in self._over_budget_logged:
                self._over_budget_logged.add(replica.name)
                log.warning(
                    "%s failed %d requests in a row (last: %s) but %d of %d replicas are "
                    "ejected already (max_ejected_fraction %g): it stays in rotation",
                    replica.name,
                    replica.consecutive_failures,
                    kind,
                    ejected,
                    len(self.registry),
                    self.max_ejected_fraction,
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
        """Blame the replicas, unless the failure followed the request to several of them."""
        replicas = {r for r, _ in self.answered}
        if not succeeded and len(replicas) > 1:
            for replica, kind in self.answered:
                detector.metrics.upstream_errors.labels(
                    replica=replica.name, kind=f"{kind}_request_correlated"
                ).inc()
            log.warning(
                "request %s failed the same way on %d replicas (%s): blamed on the request, "
                "not on the replicas",
                self.request_id,
                len(replicas),
                ", ".join(sorted(f"{r.name}: {k}" for r, k in self.answered)),
            )
        else:
            for replica, kind in self.answered:
                detector.failed(replica, kind)
        self.answered.clear()
