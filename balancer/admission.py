"""Admission: a slot on a replica now, or a place in a bounded queue until one frees.

A request is bound to a replica only when that replica has a free slot (HAProxy's
``maxconn`` + queue model). Neuron replicas have a static number of batch slots; sending a
request to a full replica only moves the queue into the replica, where it can no longer go
to whichever replica frees a slot first.

Every request joins the queue at its place and admission then dispatches: whenever a slot
could match a waiter (a request arrives, a slot frees, a replica comes back) free slots go
to waiters in queue order, skipping a waiter that excluded that replica. So a retry waiting
for "any replica but A" never keeps a new request off an idle A. A waiter that gives up
(timeout, or its client left) is removed, and a slot granted to it at the same instant is
given back.

A request's ``Ticket`` is its place in line: a retry (its replica failed before anything
reached the client) presents the same ticket, so it keeps its arrival order and its
``queue_timeout_s`` deadline instead of starting over at the back.

Queue order ``fifo`` serves by arrival (HAProxy's model). ``deadline`` serves the earliest
*virtual deadline*: arrival + ``ageing`` x the request's estimated time in a slot (its
prefill plus ``max_new_tokens`` decode steps). Short requests stop queueing behind long
ones, and a long one is overtaken only by requests that arrive within ``ageing`` x the
difference of their estimates, so nothing starves. It trades the longest requests' tail for
everyone else's wait (figures in docs/configuration.md), hence opt-in.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from balancer.policy import Policy
from balancer.upstream import Registry, Replica

log = logging.getLogger("neuron_fleet.admission")

QUEUE_ORDERS = ("fifo", "deadline")
PREFILL_S_PER_TOKEN = 1.0e-4
"""Estimate of a prompt token's prefill time: inf2, Llama-3-8B on 8 cores (the blog's 15.9k
tokens in ~1.6 s). Only its ratio to the decode figure and ``ageing`` shape the order."""
DECODE_S_PER_TOKEN = 0.039
"""Estimate of one generated token's time: a decode step of a full batch of 8 (the blog)."""


def estimated_service_s(work: int, prompt_tokens: int) -> float:
    """Seconds a request is expected to hold a slot: prefill, then one step per new token."""
    return prompt_tokens * PREFILL_S_PER_TOKEN + (work - prompt_tokens) * DECODE_S_PER_TOKEN


class QueueFull(Exception):
    """The wait queue is at its bound: shed load now (429)."""


class QueueTimeout(Exception):
    """Waited ``queue_timeout`` for a slot without getting one (503)."""

    def __init__(self, waited_s: float, no_replica: bool) -> None:
        super().__init__(waited_s)
        self.waited_s = waited_s
        self.no_replica = no_replica


@dataclass(eq=False)
class Ticket:
    """A request's place in line, kept across its retries."""

    arrived_at: float = field(default_factory=time.monotonic)
    order_key: float | None = None
    """The queue's sort key, fixed at the first ``acquire``: arrival (+ ageing x service
    estimate for the deadline order)."""
    admitted: bool = False
    """Held a slot once: a retry is not refused by ``max_queue`` (it was counted already)."""
    queued_s: float = 0.0
    """Time spent waiting in the queue over all attempts: ``queue_timeout_s`` bounds this,
    not the time spent on replicas (a retry after a first-byte timeout still gets its wait)."""


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[Replica]
    work: int
    exclude: frozenset[Replica]
    ticket: Ticket
    deadline: float = 0.0
    """The queue's sort key (``Ticket.order_key``)."""


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
    ) -> None:
        if order not in QUEUE_ORDERS:
            raise ValueError(f"queue order {order!r}: expected one of {', '.join(QUEUE_ORDERS)}")
        self.registry = registry
        self.policy = policy
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.ageing = ageing if order == "deadline" else 0.0
        self._queue: list[_Waiter] = []
        """Sorted by ``deadline``; ties keep arrival order."""
        self._on_wait = on_wait
        registry.subscribe(self.dispatch)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def _take(self, replica: Replica, work: int) -> Replica:
        replica.inflight += 1
        replica.outstanding_work += work
        return replica

    async def acquire(
        self,
        work: int,
        exclude: frozenset[Replica] = frozenset(),
        prompt_tokens: int = 0,
        ticket: Ticket | None = None,
    ) -> Replica:
        """Wait for a slot; raises QueueFull, QueueTimeout, or CancelledError (client left).

        Pass the request's ``ticket`` on a retry to keep its place and its deadline.
        """
        if ticket is None:
            ticket = Ticket()
        if ticket.order_key is None:
            ticket.order_key = ticket.arrived_at + self.ageing * estimated_service_s(
                work, prompt_tokens
            )
        if not ticket.admitted and len(self._queue) >= self.max_queue:
            raise QueueFull()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), work, exclude, ticket)
        waiter.deadline = ticket.order_key
        bisect.insort_right(self._queue, waiter, key=_deadline)
        self.dispatch()
        waited = 0.0
        if not waiter.future.done():
            queued_at = time.monotonic()
            remaining = self.queue_timeout_s - ticket.queued_s
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    await waiter.future
            except BaseException as exc:
                self._forget(waiter)
                ticket.queued_s += time.monotonic() - queued_at
                if isinstance(exc, TimeoutError):
                    no_replica = not self.registry.routable()
                    raise QueueTimeout(ticket.queued_s, no_replica=no_replica) from None
                raise
            waited = time.monotonic() - queued_at
            ticket.queued_s += waited
        ticket.admitted = True
        if self._on_wait is not None:
            self._on_wait(waited)
        return waiter.future.result()

    def _forget(self, waiter: _Waiter) -> None:
        """Drop a waiter that gave up; if a slot was granted at the same instant, return it."""
        try:
            self._queue.remove(waiter)
        except ValueError:
            pass
        if not waiter.future.done():
            waiter.future.cancel()
        elif not waiter.future.cancelled():
            self.release(waiter.future.result(), waiter.work)

    def release(self, replica: Replica, work: int) -> None:
        """Give a slot back and hand it to the first waiter that can use it."""
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
            for waiter in self._queue:
                if waiter.future.done():
                    continue
                candidates = [r for r in free if r not in waiter.exclude]
                replica = self.policy.pick(candidates, waiter.work)
                if replica is not None:
                    self._queue.remove(waiter)
                    waiter.future.set_result(self._take(replica, waiter.work))
                    break
            else:
                return


def _deadline(waiter: _Waiter) -> float:
    return waiter.deadline
