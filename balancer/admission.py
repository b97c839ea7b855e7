"""Admission: a slot on a replica now, or a place in a bounded queue until one frees.

A request is bound to a replica only when that replica has a free slot (HAProxy's
``maxconn`` + queue model). Neuron replicas have a static number of batch slots; sending a
request to a full replica only moves the queue into the replica, where it can no longer go
to whichever replica frees a slot first.

Freeing a slot hands it straight to the first waiter in queue order; a waiter that gives up
(timeout, or its client left) is removed, and a slot granted to it at the same instant is
given back.

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
class _Waiter:
    future: asyncio.Future[Replica]
    work: int
    exclude: frozenset[Replica]
    enqueued_at: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    """The queue's sort key: ``enqueued_at`` for FIFO."""


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

    def _candidates(self, exclude: frozenset[Replica]) -> list[Replica]:
        return [
            r for r in self.registry.replicas if r.routable and r.has_free_slot and r not in exclude
        ]

    def _take(self, replica: Replica, work: int) -> Replica:
        replica.inflight += 1
        replica.outstanding_work += work
        return replica

    def try_acquire(self, work: int, exclude: frozenset[Replica] = frozenset()) -> Replica | None:
        """A slot right now, or None; never queues."""
        replica = self.policy.pick(self._candidates(exclude), work)
        return None if replica is None else self._take(replica, work)

    async def acquire(
        self, work: int, exclude: frozenset[Replica] = frozenset(), prompt_tokens: int = 0
    ) -> Replica:
        """Wait for a slot; raises QueueFull, QueueTimeout, or CancelledError (client left)."""
        if not self._queue:
            replica = self.try_acquire(work, exclude)
            if replica is not None:
                if self._on_wait is not None:
                    self._on_wait(0.0)
                return replica
        if len(self._queue) >= self.max_queue:
            raise QueueFull()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), work, exclude)
        waiter.deadline = waiter.enqueued_at
        if self.ageing:
            waiter.deadline += self.ageing * estimated_service_s(work, prompt_tokens)
        bisect.insort_right(self._queue, waiter, key=_deadline)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                replica = await waiter.future
        except BaseException as exc:
            self._forget(waiter)
            if isinstance(exc, TimeoutError):
                waited = time.monotonic() - waiter.enqueued_at
                raise QueueTimeout(waited, no_replica=not self.registry.routable()) from None
            raise
        if self._on_wait is not None:
            self._on_wait(time.monotonic() - waiter.enqueued_at)
        return replica

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
