"""A generation request's ticket: its place in line, and what the forecast knows of it.

Plain data shared by admission (the queue), the forecast (``balancer/forecast.py``) and
the SLO gate (``balancer/slo.py``). A retry presents the same ticket, so it keeps its
arrival order, its queue deadline and its TTFT budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class Ticket:
    prompt_tokens: int = 0
    new_tokens: int | None = None
    """``max_new_tokens`` / ``max_tokens`` as requested; None: the replica's default."""
    arrived_at: float = field(default_factory=time.monotonic)
    """When the request reached the balancer: the queue's and TTFT's origin."""
    order_key: float | None = None
    """The queue's sort key, fixed at the first ``acquire`` (balancer/queue_order.py)."""
    admitted: bool = False
    """Held a slot once: a retry is not refused by ``max_queue`` (it was counted already)."""
    queued_s: float = 0.0
    """Time spent waiting in the queue over all attempts: ``queue_timeout_s`` bounds this,
    not the time spent on replicas (a retry after a first-byte timeout still gets its wait)."""
    budget_s: float | None = None
    """The TTFT it must meet (the SLO, or a tighter deadline header); None: no SLO."""
    long: bool = False
    """A long prompt (``queue_long_tokens``): the class the queue's floor protects."""
    slow: bool = False
    """Its forecast slot time is above the recent median (set by the SLO gate)."""
    predicted_ttft: float | None = None
    """Set by the SLO gate on arrival: the forecast's TTFT."""
    latest_start: float | None = None
    """Monotonic time after which waiting for a slot can no longer meet ``budget_s``."""
    started_at: float | None = None
    """When its current slot was granted (``time.monotonic()``)."""
    replica: str | None = None
    """The replica holding its current slot."""
    stream: bool = True
    """Its tokens are relayed as events the relay counts; False (a non-streaming answer):
    the forecast estimates its progress from the time it has held its slot."""
    first_token_at: float | None = None
    last_token_at: float = 0.0
    second_token_at: float | None = None
    """When ``generated`` first reached 2 (set with it, from ``last_token_at``): decode
    steps are timed from here, past the first token's wait for the batch's next step."""
    _generated: int = field(default=0, repr=False)

    @property
    def generated(self) -> int:
        """Token events relayed so far on the current attempt (the relay keeps it, setting
        ``last_token_at`` first)."""
        return self._generated

    @generated.setter
    def generated(self, n: int) -> None:
        if n < 2:
            self.second_token_at = None
        elif self._generated < 2:
            self.second_token_at = self.last_token_at
        self._generated = n

    @property
    def prompt_class(self) -> str:
        """The class the metrics and the queue's floor tell apart: ``long`` or ``short``."""
        return "long" if self.long else "short"
