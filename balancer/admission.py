"""Admission: a slot on a replica now, or a place in a bounded queue until one frees.

A request is bound to a replica only when that replica has a free slot (HAProxy's
``maxconn`` + queue model). Neuron replicas have a static number of batch slots; sending a
request to a full replica only moves the queue into the replica, where it can no longer go
to whichever replica frees a slot first.

Every request joins the queue at its place and admission then dispatches: whenever a slot
could match a waiter (a request arrives, a slot frees, a replica comes back) free slots go
to waiters in queue order, skipping a waiter that excluded that replica. So a retry waiting
for "any replica but A" never keeps a new request off an idle A. A retry that found A busy
or unreachable excludes it only in the incarnation it failed in
(``balancer.upstream.excluded``): once A restarted, the retry may take it. A waiter that
gives up (timeout, or its client left) is removed, and a slot granted to it at the same
instant is given back.

A request's ``Ticket`` is its place in line: a retry (its replica failed before anything
reached the client) presents the same ticket, so it keeps its arrival order and its
``queue_timeout_s`` deadline instead of starting over at the back.

The queue's order (``fifo``, ``deadline``, ``shortest``) and the floor that keeps long
prompts served under shortest-first are ``balancer/queue_order.py``'s. Each granted slot and
each release is reported to the forecast (``balancer/forecast.py``), which predicts from
them when slots free; a request whose TTFT budget can no longer be met once it has waited
until ``ticket.latest_start`` leaves the queue (``QueueTimeout``, ``ttft_slo_expired``).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from balancer.forecast import NO_BUDGET_TOKENS, Forecast
from balancer.policy import Policy
from balancer.queue_order import QUEUE_ORDERS, QueueOrder, estimated_service_s
from balancer.ticket import Ticket
from balancer.upstream import Registry, Replica, Tried, excluded

log = logging.getLogger("neuron_fleet.admission")

__all__ = [
    "QUEUE_ORDERS",
    "Admission",
    "QueueFull",
    "QueueTimeout",
    "Ticket",
    "estimated_service_s",
]


class QueueFull(Exception):
    """The wait queue is at its bound: shed load now (429)."""


class QueueTimeout(Exception):
    """Waited ``queue_timeout`` for a slot without getting one (503)."""

    def __init__(self, waited_s: float, no_replica: bool, reason: str = "") -> None:
        super().__init__(waited_s)
        self.waited_s = waited_s
        self.no_replica = no_replica
        self.reason = reason or ("no_replica" if no_replica else "queue_timeout")
        """``no_replica``, ``queue_timeout`` or ``ttft_slo_expired`` (its TTFT budget)."""


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[Replica]
    work: int
    exclude: Tried
    ticket: Ticket
    deadline: float = 0.0
    """The queue's sort key (``Ticket.order_key``)."""

    @property
    def long(self) -> bool:
        return self.ticket.long


class Admission:
    def __init__(
        self,
        registry: Registry,
        policy: Policy,
        max_queue: int,
        queue_timeout_s: float,
        on_wait: Callable[[float], None] | None = None,
        order: str = "fifo",
        ageing: float = 0.3,
        forecast: Forecast | None = None,
        long_share: float = 0.0,
    ) -> None:
        self.order = QueueOrder(order, ageing, forecast, long_share)
        self.forecast = forecast
        self.registry = registry
        self.policy = policy
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._queue: list[_Waiter] = []
        """Sorted by ``deadline``; ties keep arrival order."""
        self._on_wait = on_wait
        registry.subscribe(self.dispatch)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def _take(self, replica: Replica, work: int, ticket: Ticket) -> Replica:
        replica.inflight += 1
        replica.outstanding_work += work
        if self.forecast is not None:
            self.forecast.started(ticket, replica.name, time.monotonic())
        return replica

    def ahead_of(self, ticket: Ticket, now: float) -> list[Ticket]:
        """The queued requests a new request would wait behind (for the forecast)."""
        new = ticket.new_tokens if ticket.new_tokens is not None else NO_BUDGET_TOKENS
        key = self.order.key(now, ticket.prompt_tokens + new, ticket.prompt_tokens, ticket)
        waiting = [w for w in self._queue if not w.future.done()]
        return [w.ticket for w in self.order.ahead_of(waiting, key, ticket.long)]

    async def acquire(
        self,
        work: int,
        exclude: Tried | None = None,
        prompt_tokens: int = 0,
        ticket: Ticket | None = None,
    ) -> Replica:
        """Wait for a slot; raises QueueFull, QueueTimeout, or CancelledError (client left).

        Pass the request's ``ticket`` on a retry to keep its place and its deadline, and the
        replicas it failed on (``exclude``: each with the incarnation it failed in).
        """
        if ticket is None:
            ticket = Ticket()
        if ticket.order_key is None:
            ticket.order_key = self.order.key(ticket.arrived_at, work, prompt_tokens, ticket)
        if not ticket.admitted and len(self._queue) >= self.max_queue:
            raise QueueFull()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), work, exclude or {}, ticket)
        waiter.deadline = ticket.order_key
        bisect.insort_right(self._queue, waiter, key=_deadline)
        self.dispatch()
        waited = 0.0
        if not waiter.future.done():
            queued_at = time.monotonic()
            give_up, reason = queued_at + self.queue_timeout_s - ticket.queued_s, ""
            if ticket.latest_start is not None and ticket.latest_start < give_up:
                give_up, reason = ticket.latest_start, "ttft_slo_expired"
            try:
                async with asyncio.timeout(max(give_up - time.monotonic(), 0.0)):
                    await waiter.future
            except BaseException as exc:
                self._forget(waiter)
                ticket.queued_s += time.monotonic() - queued_at
                if isinstance(exc, TimeoutError):
                    no_replica = not self.registry.routable()
                    if reason and self.forecast is not None:
                        self._forecast_missed(ticket)
                    raise QueueTimeout(
                        ticket.queued_s, no_replica, "" if no_replica else reason
                    ) from None
                raise
            waited = time.monotonic() - queued_at
            ticket.queued_s += waited
        ticket.admitted = True
        if self._on_wait is not None:
            self._on_wait(waited)
        return waiter.future.result()

    def _forecast_missed(self, ticket: Ticket) -> None:
        """A request dropped for its budget never sees a first token: its forecast was
        late by at least budget - forecast, which the gate's margin must learn too."""
        if ticket.predicted_ttft is not None and ticket.budget_s is not None:
            assert self.forecast is not None
            self.forecast.ttft_error(
                ticket, ticket.budget_s - ticket.predicted_ttft, time.monotonic()
            )

    def _forget(self, waiter: _Waiter) -> None:
        """Drop a waiter that gave up; if a slot was granted at the same instant, return it."""
        try:
            self._queue.remove(waiter)
        except ValueError:
            pass
        if not waiter.future.done():
            waiter.future.cancel()
        elif not waiter.future.cancelled():
            self.release(waiter.future.result(), waiter.work, waiter.ticket)

    def release(self, replica: Replica, work: int, ticket: Ticket | None = None) -> None:
        """Give a slot back and hand it to the first waiter that can use it."""
        if ticket is not None and self.forecast is not None:
            self.forecast.ended(ticket)
        replica.inflight -= 1
        replica.outstanding_work -= work
        if replica.inflight < 0:  # a bug, but never let a counter drift for good
            log.error("in-flight count of %s went negative; reset to 0", replica.name)
            replica.inflight = 0
            replica.outstanding_work = 0
        self.dispatch()

    def dispatch(self) -> None:
        """Grant free slots to waiters in queue order (skipping those that excluded them)."""
        while self._queue:
            head = self._queue[0]
            if head.future.done():
                del self._queue[0]
                continue
            free = [r for r in self.registry.replicas if r.routable and r.has_free_slot]
            if not free:
                return
            for waiter in self.order.in_turn(self._queue):
                if waiter.future.done():
                    continue
                exclude = waiter.exclude
                candidates = [r for r in free if not excluded(r, exclude)] if exclude else free
                replica = self.policy.pick(candidates, waiter.work)
                if replica is not None:
                    self._queue.remove(waiter)
                    self.order.granted(waiter.long)
                    waiter.future.set_result(self._take(replica, waiter.work, waiter.ticket))
                    break
            else:
                return


def _deadline(waiter: _Waiter) -> float:
    return waiter.deadline
