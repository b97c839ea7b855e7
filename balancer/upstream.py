"""Replicas and the registry both halves of neuron-fleet share.

One `Replica` object per upstream server is the single source of truth:

- the supervisor moves its lifecycle ``state`` (starting -> ready -> draining -> stopped,
  failed) and fills in process facts (pid, restarts, last exit);
- the health checker and the relay record observations (``healthy``, consecutive failures);
- admission counts ``inflight`` requests against ``slot_cap``;
- policies only read it.

A replica gets traffic only when it is ``routable``: lifecycle state READY *and* healthy.
Each time it becomes routable again (a supervised restart, health checks re-admitting it) it
starts a new ``incarnation``: a request that failed on it without reaching the process, or
was told it was busy, excludes it only for the incarnation it failed in (balancer/retry.py),
so a retry may return to a restarted replica; any other failure excludes it for good.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("neuron_fleet.upstream")


class ReplicaState(enum.StrEnum):
    """Lifecycle states, as shown by ``/fleet/status`` and the ``replica_state`` metric."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(eq=False)
class Replica:
    """One upstream TGI/OpenAI-compatible server."""

    name: str
    url: str
    """Base URL without a trailing slash, e.g. ``http://127.0.0.1:8081``."""
    slot_cap: int = 8
    """Most in-flight requests sent to this replica at once; 0 means no cap."""
    cores: str | None = None
    """NeuronCore range this replica owns (``"0-7"``), informational in balance-only mode."""

    state: ReplicaState = ReplicaState.STARTING
    healthy: bool = False
    """Health checker / passive ejection verdict; ``state`` is the supervisor's."""
    inflight: int = 0
    outstanding_work: int = 0
    """Tokens still to prefill + to generate over the in-flight requests (work-aware policy)."""

    consecutive_failures: int = 0
    ejected: bool = False
    """Taken out by passive outlier detection (balancer/outlier.py), until health re-admits."""
    health_successes: int = 0
    health_failures: int = 0
    ever_healthy: bool = False

    incarnation: int = 0
    """Times it came (back) into rotation: bumped by ``Registry.notify`` when it turns
    routable. Requests that failed here exclude it for this incarnation only."""
    in_rotation: bool = field(default=False, repr=False)
    """Whether it was routable at the last ``Registry.notify`` (to see it come back)."""

    # Process facts, filled in by the supervisor (None in balance-only mode).
    pid: int | None = None
    stopping_pid: int | None = None
    """The process the supervisor is stopping on purpose (stop, restart, unhealthy): the
    connections it breaks are not the requests' doing (balancer/quarantine.py)."""
    port: int | None = None
    restarts: int = 0
    started_at: float | None = None
    last_exit: str | None = None
    start_duration_s: float | None = None
    """Seconds from process start to the first healthy answer, for the last start."""
    failed_reason: str | None = None
    """Why the supervisor gave up on this replica (state FAILED), for operators."""

    # Per-replica metric children, cached here so the hot path skips label lookups.
    metrics: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")

    @property
    def routable(self) -> bool:
        return self.state is ReplicaState.READY and self.healthy

    @property
    def has_free_slot(self) -> bool:
        return self.slot_cap <= 0 or self.inflight < self.slot_cap

    @property
    def display_state(self) -> str:
        """State as an operator sees it: a READY replica that fails health is 'unhealthy'."""
        if self.state is ReplicaState.READY and not self.healthy:
            return ReplicaState.UNHEALTHY.value
        return self.state.value

    def uptime_s(self, now: float | None = None) -> float | None:
        if self.started_at is None:
            return None
        return (time.monotonic() if now is None else now) - self.started_at

    def start_left_s(self, now: float) -> float | None:
        """Seconds until a starting replica should be ready, judged by how long its last
        start took (negative: overdue; all of it while no process runs yet, e.g. in restart
        backoff); None when unknown (a first start, balance-only)."""
        if self.start_duration_s is None:
            return None
        if self.started_at is None:
            return self.start_duration_s
        return self.start_duration_s - (now - self.started_at)


Tried = Mapping[Replica, int]
"""The replicas a request failed on, each with the incarnation it failed in (or
``EVERY_INCARNATION``)."""
EVERY_INCARNATION = -1
"""In ``Tried``: the request may have caused its failure there (the process died under it,
hung on it or answered it with a failure), so it never goes back, restarted or not: a
prompt that kills every process it reaches must not walk the restarts through its
retries (each death counts towards the supervisor's crash loop)."""


def excluded(replica: Replica, tried: Tried) -> bool:
    """Whether ``replica`` failed this request in its current incarnation (so not again);
    one that restarted since is a fresh process and may take the request, unless the
    request may have caused the failure (``EVERY_INCARNATION``)."""
    failed_in = tried.get(replica)
    return failed_in is not None and (
        failed_in == replica.incarnation or failed_in == EVERY_INCARNATION
    )


class Registry:
    """Ordered collection of replicas, looked up by name."""

    def __init__(self, replicas: Iterable[Replica] = ()) -> None:
        self._replicas: dict[str, Replica] = {}
        self._listeners: list[Callable[[], None]] = []
        self._exit_listeners: list[Callable[[Replica, int], None]] = []
        for replica in replicas:
            self.add(replica)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a replica may have become routable (or not)."""
        self._listeners.append(listener)

    def on_process_exit(self, listener: Callable[[Replica, int], None]) -> None:
        """Call ``listener(replica, pid)`` when the supervisor sees a replica process exit."""
        self._exit_listeners.append(listener)

    def process_exited(self, replica: Replica, pid: int) -> None:
        """The supervisor saw process ``pid`` of ``replica`` exit (``replica.stopping_pid``
        says whether it was stopped on purpose). Never called in balance-only mode. Called
        from the supervisor's reap: a listener's failure is logged, never raised, so the
        supervisor still finishes reaping and restarting the replica."""
        for listener in self._exit_listeners:
            try:
                listener(replica, pid)
            except Exception:
                log.exception("a listener failed on the exit of %s pid %d", replica.name, pid)

    def notify(self) -> None:
        """Tell listeners (admission) that states changed: call after moving a state.

        Every writer of ``state`` or ``healthy`` (supervisor, health checker, outlier
        detection, admin) calls this, so it is where a replica coming back into rotation
        starts a new incarnation."""
        for replica in self._replicas.values():
            routable = replica.routable
            if routable and not replica.in_rotation:
                replica.incarnation += 1
            replica.in_rotation = routable
        for listener in self._listeners:
            listener()

    def set_state(self, replica: Replica, state: ReplicaState) -> None:
        replica.state = state
        self.notify()

    def add(self, replica: Replica) -> None:
        if replica.name in self._replicas:
            raise ValueError(f"duplicate replica name {replica.name!r}")
        self._replicas[replica.name] = replica
        replica.in_rotation = replica.routable

    def remove(self, name: str) -> Replica:
        return self._replicas.pop(name)

    def get(self, name: str) -> Replica | None:
        return self._replicas.get(name)

    def __iter__(self) -> Iterator[Replica]:
        return iter(list(self._replicas.values()))

    def __len__(self) -> int:
        return len(self._replicas)

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def routable(self) -> list[Replica]:
        return [r for r in self._replicas.values() if r.routable]

    def ready_count(self) -> int:
        return sum(1 for r in self._replicas.values() if r.routable)
