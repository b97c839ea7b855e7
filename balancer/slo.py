"""The TTFT SLO gate: say "no" on arrival, at once, to a request that would miss its SLO.

HAProxy's ``timeout queue`` refuses a request only after it waited the whole timeout, and
a long timeout serves requests so late that nobody counts them as served. With
``ttft_slo_s`` set, the forecast (``balancer/forecast.py``) predicts each request's TTFT on
arrival from the slots' predicted free times and the queue ahead of it:

- predicted TTFT (plus the forecast's recent error, its 99th percentile) over its budget:
  **429** at once, in TGI's error shape, with ``Retry-After`` (and ``retry-after-ms``) =
  the predicted time until it would fit (the predicted overshoot: the queue ahead must
  drain by that much first), counted by reason;
- admitted: it may wait in the queue until ``latest_start`` (arrival + budget - its
  predicted prefill). Still queued then, it can no longer make it and leaves with 503
  (``ttft_slo_expired``) rather than being served late;
- a request that finds a slot free with nobody queued ahead is never refused, even when
  its own prefill is predicted to exceed the budget: refusing could not help it.

The budget is the SLO, or the request's ``X-TTFT-Deadline`` header (seconds) when that is
tighter; the header alone (no ``ttft_slo_s``) also works. Until the forecast has learned
from a first completed stream the gate admits everything (it knows nothing yet).

``SloScore`` closes the loop when a served request ends: it teaches the forecast, and
scores the request against its budget (``met`` / ``missed`` for streams, on their first
token event; ``response_met`` / ``response_missed`` for non-streaming responses, on the
response head, which brings the client its first token with the whole answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from balancer.forecast import Forecast, retry_after
from balancer.metrics import BalancerMetrics
from balancer.ticket import Ticket
from balancer.upstream import Registry

DEADLINE_HEADER = "X-TTFT-Deadline"
"""A request's own TTFT budget in seconds (decimal), honoured when tighter than the SLO."""


class BadDeadline(ValueError):
    """The deadline header is not a positive number of seconds (400)."""


@dataclass(frozen=True)
class Refusal:
    reason: str
    """``ttft_slo`` (over the fleet's SLO) or ``ttft_deadline`` (over the request's own)."""
    predicted_s: float
    budget_s: float

    @property
    def headers(self) -> dict[str, str]:
        """``Retry-After`` / ``retry-after-ms``: the predicted overshoot."""
        return retry_after(self.predicted_s - self.budget_s)

    @property
    def message(self) -> str:
        what = "the TTFT SLO" if self.reason == "ttft_slo" else "the request's TTFT deadline"
        return (
            f"Model is overloaded: the predicted time to first token is "
            f"{self.predicted_s:.2f} s, over {what} of {self.budget_s:g} s; "
            f"retry in {self.headers['Retry-After']} s"
        )


def budget_s(slo_s: float | None, header: str | None) -> tuple[float | None, bool]:
    """The request's TTFT budget and whether the header set it; raises BadDeadline."""
    if header is None:
        return slo_s, False
    try:
        value = float(header)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise BadDeadline(
            f"{DEADLINE_HEADER} must be a positive number of seconds, got {header[:40]!r}"
        )
    if slo_s is not None and slo_s <= value:
        return slo_s, False
    return value, True


class QueueView(Protocol):
    """What the gate needs of the queue (``Admission``; bench/policy_sim.py's own)."""

    def ahead_of(self, ticket: Ticket, now: float) -> list[Ticket]: ...


class SloGate:
    """Decides on arrival, from the forecast and the queue ahead; keeps no state itself."""

    def __init__(self, forecast: Forecast, queue: QueueView, registry: Registry) -> None:
        self.forecast = forecast
        self.queue = queue
        self.registry = registry

    def check(self, ticket: Ticket, now: float, by_header: bool = False) -> Refusal | None:
        """Predict ``ticket``'s TTFT and refuse it if it would miss its budget; else set
        ``ticket.latest_start``, after which the queue drops it."""
        budget = ticket.budget_s
        if budget is None:
            return None
        replicas = self.registry.routable()
        ahead = self.queue.ahead_of(ticket, now)
        prediction = self.forecast.predict(ticket, replicas, ahead, now)
        if prediction is None:
            return None
        ticket.predicted_ttft = prediction.ttft_s
        self.forecast.classify(ticket)
        prefill = prediction.ttft_s - prediction.wait_s
        if prediction.wait_s <= 0:
            return None  # a slot is free for it now: refusing could not help it
        # Plus the forecast's recent lateness (its 99th percentile): admitting on a forecast
        # that proves optimistic means a drop from the queue later, a slow "no".
        expected = prediction.ttft_s + self.forecast.margin_s(ticket, now)
        if expected > budget:
            return Refusal("ttft_deadline" if by_header else "ttft_slo", expected, budget)
        ticket.latest_start = now + budget - prefill
        return None


class SloScore:
    """What a served request teaches the forecast, and its outcome against its TTFT budget.

    A non-streaming client gets its first token with the whole answer (TGI's ``/generate``,
    OpenAI's chat completion without ``stream``), so its time to first token is the time to
    the response head: scored on that, it is the truth about what the client saw. It is
    counted under outcomes of its own (``response_met`` / ``response_missed``) because the
    gate forecasts the first token, not the whole generation: mixed into ``met`` /
    ``missed`` a long non-streaming answer would read as the gate's miss (and fire the
    shedding alert) where only streaming could have helped. For the same reason it teaches
    the forecast nothing: its first token's time at the replica is unseen, and its head
    time as a "TTFT" would grow the gate's margin by whole generations and refuse streams
    for nothing.
    """

    def __init__(self, forecast: Forecast, metrics: BalancerMetrics) -> None:
        self.forecast = forecast
        self.metrics = metrics

    def stream_ended(self, ticket: Ticket, complete: bool) -> None:
        """A stream that relayed tokens ended (``complete``: normally, not cut or left)."""
        self.forecast.observe(ticket, complete)
        if ticket.budget_s is None or ticket.first_token_at is None:
            return
        ttft_s = ticket.first_token_at - ticket.arrived_at
        self._count("met" if ttft_s <= ticket.budget_s else "missed", ticket)
        if ticket.predicted_ttft is not None:
            error = ttft_s - ticket.predicted_ttft
            self.metrics.ttft_forecast_error.observe(error)
            self.forecast.ttft_error(ticket, error, ticket.first_token_at)

    def response_ended(self, ticket: Ticket, head_at: float) -> None:
        """A non-streaming answer was relayed whole; its head left at ``head_at`` (the
        loop's clock, which is ``time.monotonic()``'s)."""
        if ticket.budget_s is None:
            return
        met = head_at - ticket.arrived_at <= ticket.budget_s
        self._count("response_met" if met else "response_missed", ticket)

    def _count(self, outcome: str, ticket: Ticket) -> None:
        self.metrics.slo_requests.labels(outcome=outcome, prompt_class=ticket.prompt_class).inc()
