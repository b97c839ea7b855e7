"""Routing policies: pure functions from candidate replicas to a choice.

Admission passes only replicas that can take the request right now (routable, a free slot,
not already tried for this request), so a policy only ranks. Ties rotate, so equal replicas
share load instead of the first one in the list taking everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from balancer.upstream import Replica


class Policy(Protocol):
    name: str

    def pick(self, candidates: Sequence[Replica], work: int) -> Replica | None:
        """Choose one of ``candidates`` (in registry order) for a request of ``work`` tokens."""
        ...


class _Rotating:
    """Shared tie-breaker: a counter that rotates among equally good replicas."""

    def __init__(self) -> None:
        self._turn = 0

    def _rotate(self, tied: list[Replica]) -> Replica:
        choice = tied[self._turn % len(tied)]
        self._turn += 1
        return choice


class LeastOutstanding(_Rotating):
    """Fewest in-flight requests wins (HAProxy ``leastconn``, Envoy LEAST_REQUEST).

    Among replicas with as few requests, the one with the least work still to do wins:
    a replica still prefilling a long prompt (which pauses its whole batch on Neuron) is a
    worse place for the next request than one that is only decoding.
    """

    name = "least-outstanding"

    def pick(self, candidates: Sequence[Replica], work: int) -> Replica | None:
        if not candidates:
            return None
        best = min((r.inflight, r.outstanding_work) for r in candidates)
        return self._rotate([r for r in candidates if (r.inflight, r.outstanding_work) == best])


class LeastWork(_Rotating):
    """Fewest outstanding tokens (prompt still to prefill + tokens still to generate) wins.

    On Neuron a prefill pauses every running slot of the replica, so a replica holding one
    16k-token prompt is busier than one holding three short chat turns.
    """

    name = "least-work"

    def pick(self, candidates: Sequence[Replica], work: int) -> Replica | None:
        if not candidates:
            return None
        best = min((r.outstanding_work, r.inflight) for r in candidates)
        return self._rotate([r for r in candidates if (r.outstanding_work, r.inflight) == best])


class RoundRobin:
    """Each replica in turn, whatever its load (nginx's default; kept for comparison)."""

    name = "round-robin"

    def __init__(self) -> None:
        self._last: str | None = None
        self._order: list[str] = []

    def pick(self, candidates: Sequence[Replica], work: int) -> Replica | None:
        if not candidates:
            return None
        for r in candidates:
            if r.name not in self._order:
                self._order.append(r.name)
        start = self._order.index(self._last) + 1 if self._last in self._order else 0
        by_name = {r.name: r for r in candidates}
        for offset in range(len(self._order)):
            name = self._order[(start + offset) % len(self._order)]
            if name in by_name:
                self._last = name
                return by_name[name]
        return None


POLICIES = {p.name: p for p in (LeastOutstanding, LeastWork, RoundRobin)}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown policy {name!r}: choose one of {known}") from None
