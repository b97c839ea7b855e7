"""In which order queued requests get a freed slot, and the floor that protects long prompts.

- ``fifo``: by arrival (HAProxy's model).
- ``deadline``: earliest *arrival + ageing x estimated slot time*, the estimate from fixed
  inf2 figures (``estimated_service_s``).
- ``shortest``: the same key with the slot time the forecast *learned* from the replicas
  (``balancer/forecast.py``): shortest-predicted-first with ageing. A request is overtaken
  only by requests arriving within ``ageing`` x the difference of their forecasts, so
  nothing starves.

Shortest-first makes long prompts wait (and, behind an SLO gate, get refused) far more than
short ones. The floor (``long_share``, ``shortest`` only) gives requests with long prompts
at least that share of the slots granted while any of them waits: when the last
``FLOOR_WINDOW`` grants gave them less, the next freed slot goes to the first long one in
queue order.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

from balancer.forecast import Forecast
from balancer.ticket import Ticket

QUEUE_ORDERS = ("fifo", "deadline", "shortest")
FLOOR_WINDOW = 64
"""Grants over which the long prompts' share is measured."""
PREFILL_S_PER_TOKEN = 1.0e-4
"""``deadline`` order: a prompt token's prefill time on inf2, Llama-3-8B on 8 cores (the
blog's 15.9k tokens in ~1.6 s). Only its ratio to the decode figure and ageing matter."""
DECODE_S_PER_TOKEN = 0.039
"""``deadline`` order: one generated token's time, a decode step of a full batch of 8."""


def estimated_service_s(work: int, prompt_tokens: int) -> float:
    """Seconds a request holds a slot on inf2: prefill, then one step per new token."""
    return prompt_tokens * PREFILL_S_PER_TOKEN + (work - prompt_tokens) * DECODE_S_PER_TOKEN


class Queued(Protocol):
    deadline: float
    """The sort key."""

    @property
    def long(self) -> bool: ...


W = TypeVar("W", bound=Queued)


class QueueOrder:
    """Sort keys for new waiters, the turn in which waiters take a freed slot, and the
    same rule replayed for the SLO gate's forecast (``ahead_of``)."""

    def __init__(
        self,
        order: str,
        ageing: float,
        forecast: Forecast | None = None,
        long_share: float = 0.0,
    ) -> None:
        if order not in QUEUE_ORDERS:
            raise ValueError(f"queue order {order!r}: expected one of {', '.join(QUEUE_ORDERS)}")
        if not 0.0 <= long_share < 1.0:
            raise ValueError(f"long-prompt share {long_share!r}: expected 0 <= share < 1")
        self.order = order
        self.ageing = ageing if order != "fifo" else 0.0
        self.forecast = forecast
        self.long_share = long_share if order == "shortest" else 0.0
        self._recent: deque[bool] = deque(maxlen=FLOOR_WINDOW)

    def key(
        self, enqueued_at: float, work: int, prompt_tokens: int, ticket: Ticket | None
    ) -> float:
        if not self.ageing:
            return enqueued_at
        if self.order == "deadline":
            return enqueued_at + self.ageing * estimated_service_s(work, prompt_tokens)
        if self.forecast is None or ticket is None or not self.forecast.ready:
            return enqueued_at  # nothing learned yet: arrival order
        return enqueued_at + self.ageing * self.forecast.service_s(None, ticket)

    @staticmethod
    def _owed(recent: Sequence[bool], share: float) -> bool:
        """Granting the next slot to a short request would put the long ones under share."""
        return share > 0 and sum(recent) < share * (len(recent) + 1)

    def in_turn(self, queue: Sequence[W]) -> Iterator[W]:
        """Waiters in the order they may take a freed slot (the floor first when owed)."""
        if self._owed(self._recent, self.long_share):
            longs = [w for w in queue if w.long]
            yield from longs
            yield from (w for w in queue if not w.long)
        else:
            yield from queue

    def granted(self, long: bool) -> None:
        if self.long_share:
            self._recent.append(long)

    def ahead_of(self, queue: Sequence[W], key: float, long: bool) -> list[W]:
        """The waiters served before a new one with ``key`` would be, if nobody else came."""
        pos = bisect.bisect_right([w.deadline for w in queue], key)
        if not self.long_share:
            return list(queue[:pos])
        rest: list[W | None] = [*queue[:pos], None, *queue[pos:]]  # None: the new one
        recent = deque(self._recent, maxlen=FLOOR_WINDOW)
        out: list[W] = []
        while rest:
            pick = 0
            if self._owed(recent, self.long_share):
                pick = next((i for i, w in enumerate(rest) if (long if w is None else w.long)), 0)
            w = rest.pop(pick)
            if w is None:
                return out
            out.append(w)
            recent.append(w.long)
        return out  # pragma: no cover - the new one is always in rest
