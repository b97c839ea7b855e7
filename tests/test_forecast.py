"""The online forecast, the queue orders and the SLO gate's decision, on a fake clock."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from balancer.admission import Admission, QueueTimeout
from balancer.forecast import Ewma, Forecast, LinearFit, ceil_seconds
from balancer.policy import LeastOutstanding
from balancer.queue_order import QueueOrder
from balancer.slo import BadDeadline, SloGate, budget_s
from balancer.ticket import Ticket
from balancer.upstream import Registry, Replica, ReplicaState


def ready_replica(name: str, cap: int = 2) -> Replica:
    return Replica(
        name, f"http://127.0.0.1:1/{name}", slot_cap=cap, state=ReplicaState.READY, healthy=True
    )


def finish(f: Forecast, t: Ticket, prefill_s: float, step_s: float, tokens: int) -> None:
    """Play a stream on ``t`` (already started): first token after ``prefill_s``, then
    ``tokens - 1`` more ``step_s`` apart; the forecast observes it when it ends normally."""
    assert t.started_at is not None
    t.first_token_at = t.started_at + prefill_s
    t.last_token_at = t.first_token_at + step_s * (tokens - 1)
    t.generated = tokens
    f.observe(t, complete=True)


def teach(
    f: Forecast,
    replica: str,
    *,
    a: float,
    b: float,
    step: float,
    n: int = 200,
    ratio: float = 1.0,
    seed: int = 1,
) -> None:
    """Feed ``n`` finished streams whose prefill is ``a + b * prompt`` and whose decode steps
    take ``step`` seconds, each generating ``ratio`` of its budget."""
    rng = random.Random(seed)
    for _ in range(n):
        prompt = rng.randint(100, 10_000)
        budget = rng.randint(10, 200)
        t = Ticket(prompt, budget, arrived_at=0.0)
        f.started(t, replica, now=0.5)  # waited 0.5 s for its slot
        finish(f, t, a + b * prompt, step, max(2, round(budget * ratio)))
        f.ended(t)


def test_linear_fit_recovers_intercept_and_slope() -> None:
    fit = LinearFit()
    for x in range(0, 20_000, 97):
        fit.add(x, 0.02 + 1e-4 * x)
    a, b = fit.coefficients()  # type: ignore[misc]
    assert a == pytest.approx(0.02, abs=1e-6) and b == pytest.approx(1e-4, rel=1e-6)


def test_linear_fit_is_the_mean_when_x_barely_varies() -> None:
    fit = LinearFit()
    for x in (15_900, 15_950, 15_880, 15_910):
        fit.add(x, 1.6)
    assert fit.coefficients() == (pytest.approx(1.6), 0.0)
    tiny = LinearFit()
    for _ in range(6):
        tiny.add(8, 0.004)  # a warm-up of tiny prompts says nothing about long ones
    assert tiny.predict(16_000) == pytest.approx(0.004)


def test_linear_fit_forgets_old_samples() -> None:
    fit = LinearFit(half_life=16)
    for x in range(100, 10_000, 50):
        fit.add(x, 2e-4 * x)  # a slow replica...
    for x in range(100, 10_000, 50):
        fit.add(x, 1e-4 * x)  # ...restarted on faster hardware
    assert fit.predict(5_000) == pytest.approx(0.5, rel=0.02)


def test_ewma_starts_as_a_plain_mean() -> None:
    e = Ewma(half_life=64)
    for x in (1.0, 2.0, 3.0):
        e.add(x)
    assert e.value == pytest.approx(2.0)


def test_forecast_learns_prefill_step_and_how_early_requests_end() -> None:
    f = Forecast()
    assert not f.ready
    teach(f, "r0", a=0.05, b=1e-4, step=0.03, ratio=0.5)
    assert f.ready
    assert f.prefill_s("r0", 10_000) == pytest.approx(1.05, rel=0.03)
    assert f.step_s("r0") == pytest.approx(0.03, rel=1e-6)
    assert f.expected_tokens(100) == pytest.approx(50, rel=0.05)
    # A replica it knows nothing about is assumed to be like the others.
    assert f.prefill_s("new", 10_000) == pytest.approx(f.prefill_s("r0", 10_000))
    ticket = Ticket(1_000, 100, arrived_at=0.0)
    assert f.service_s("r0", ticket) == pytest.approx(0.15 + 49 * 0.03, rel=0.05)


def test_requests_without_a_budget_use_the_tokens_observed_for_such_requests() -> None:
    f = Forecast()
    for tokens in (40, 60):
        t = Ticket(10, None, arrived_at=0.0)
        f.started(t, "r0", 0.0)
        finish(f, t, 0.1, 0.01, tokens)
    assert f.expected_tokens(None) == pytest.approx(50)


def test_cut_streams_teach_timing_but_not_how_requests_end() -> None:
    f = Forecast()
    t = Ticket(1_000, 100, arrived_at=0.0)
    f.started(t, "r0", 0.0)
    t.first_token_at, t.last_token_at, t.generated = 0.2, 0.5, 4
    f.observe(t, complete=False)
    assert f.ready and f.end_ratio.count == 0


def busy_replica(f: Forecast, budgets: tuple[int, ...]) -> tuple[Replica, list[Ticket]]:
    """A replica whose slots all hold streams that just sent their first token."""
    replica = ready_replica("r0", cap=len(budgets))
    running = []
    for budget in budgets:
        t = Ticket(0, budget, arrived_at=0.0)
        f.started(t, "r0", now=0.0)
        t.first_token_at = t.last_token_at = 0.0
        t.generated = 1
        replica.inflight += 1
        running.append(t)
    return replica, running


def test_prediction_waits_for_the_first_slot_to_free_then_the_queue_ahead() -> None:
    f = Forecast()
    teach(f, "r0", a=0.0, b=1e-4, step=0.01)
    # Two streams hold the slots: 100 and 300 tokens (1 s and 3 s) to go.
    replica, running = busy_replica(f, (101, 301))
    new = Ticket(5_000, 10, arrived_at=0.0)
    p = f.predict(new, [replica], [], now=0.0)
    assert p is not None and p.wait_s == pytest.approx(1.0, rel=0.01)
    assert p.ttft_s == pytest.approx(1.0 + 0.5, rel=0.01)
    # One queued ahead (prefill 0.1 s + 2 s decode) takes the slot that frees at 1 s;
    # the new one gets the slot freeing at 3 s.
    ahead = [Ticket(1_000, 201, arrived_at=0.0)]
    p = f.predict(new, [replica], ahead, now=0.0)
    assert p is not None and p.wait_s == pytest.approx(3.0, rel=0.01)
    # 0.75 s later the first stream is 75 tokens further: 25 tokens (0.25 s) to go.
    running[0].generated, running[0].last_token_at = 76, 0.75
    p = f.predict(new, [replica], [], now=0.75)
    assert p is not None and p.wait_s == pytest.approx(0.25, rel=0.05)


def test_prediction_follows_the_replicas_speed_now_not_the_average() -> None:
    f = Forecast()
    teach(f, "r0", a=0.0, b=1e-4, step=0.01)
    replica, running = busy_replica(f, (101, 101))
    for t in running:  # under load every step takes twice as long (prefill pauses)
        t.generated, t.last_token_at = 51, 1.0
    p = f.predict(Ticket(0, 10, arrived_at=1.0), [replica], [], now=1.0)
    assert p is not None and p.wait_s == pytest.approx(50 * 0.02, rel=0.02)


def test_a_stream_running_past_the_average_ends_by_its_budget() -> None:
    f = Forecast()
    teach(f, "r0", a=0.0, b=1e-4, step=0.01, ratio=0.5)  # requests end at half the budget
    replica, running = busy_replica(f, (100,))
    running[0].generated, running[0].last_token_at = 90, 0.89
    p = f.predict(Ticket(0, 10, arrived_at=0.89), [replica], [], now=0.89)
    # Half of what its budget still allows (10 tokens), not the average's "already done".
    assert p is not None and p.wait_s == pytest.approx(5 * 0.01, rel=0.05)


def test_a_free_slot_means_no_wait_and_no_forecast_before_learning() -> None:
    f = Forecast()
    replica = ready_replica("r0")
    new = Ticket(1_000, 10, arrived_at=0.0)
    assert f.predict(new, [replica], [], now=0.0) is None
    teach(f, "r0", a=0.0, b=1e-4, step=0.01)
    p = f.predict(new, [replica], [], now=0.0)
    assert p is not None and p.wait_s == 0.0 and p.ttft_s == pytest.approx(0.1, rel=0.02)


# ------------------------------------------------------------------ queue order


class W:
    def __init__(self, key: float, long: bool = False) -> None:
        self.deadline = key
        self.long = long


def test_shortest_order_uses_the_learned_slot_time() -> None:
    f = Forecast()
    order = QueueOrder("shortest", 0.5, f)
    short, long_ = Ticket(100, 10, 0.0), Ticket(100, 500, 0.0)
    assert order.key(3.0, 0, 100, long_) == 3.0  # nothing learned: arrival order
    teach(f, "r0", a=0.0, b=1e-4, step=0.02)
    assert order.key(3.0, 0, 100, long_) == pytest.approx(3.0 + 0.5 * (0.01 + 499 * 0.02))
    assert order.key(3.0, 0, 100, short) < order.key(3.0, 0, 100, long_)


def test_the_floor_gives_long_prompts_their_share_of_slots() -> None:
    order = QueueOrder("shortest", 0.5, Forecast(), long_share=0.25)
    queue = [W(1.0), W(2.0), W(3.0, long=True)]
    # Nothing granted yet: the long one is owed its share first.
    assert [w.deadline for w in order.in_turn(queue)] == [3.0, 1.0, 2.0]
    order.granted(True)
    assert [w.deadline for w in order.in_turn(queue)] == [1.0, 2.0, 3.0]
    for _ in range(3):
        order.granted(False)
    assert next(iter(order.in_turn(queue))).long  # 1 of 4 grants: owed again


def test_ahead_of_replays_the_floor() -> None:
    order = QueueOrder("shortest", 0.5, Forecast(), long_share=0.25)
    order.granted(True)
    queue = [W(1.0), W(2.0), W(3.0), W(4.0), W(5.0)]
    # After 3 short grants long prompts would fall under 1 in 4: the new long request
    # (key 10, last in order) is served 4th, not 6th.
    ahead = order.ahead_of(queue, 10.0, long=True)
    assert [w.deadline for w in ahead] == [1.0, 2.0, 3.0]
    assert len(order.ahead_of(queue, 10.0, long=False)) == 5
    # FIFO: everyone queued is ahead; the floor does not apply.
    fifo = QueueOrder("fifo", 0.5, Forecast(), long_share=0.25)
    assert len(fifo.ahead_of(queue, 10.0, long=True)) == 5


def test_floor_share_is_checked() -> None:
    with pytest.raises(ValueError, match="share"):
        QueueOrder("shortest", 0.5, None, long_share=1.0)


# ------------------------------------------------------------------ the gate


def test_deadline_header_tighter_than_the_slo_wins() -> None:
    assert budget_s(2.0, None) == (2.0, False)
    assert budget_s(2.0, "0.5") == (0.5, True)
    assert budget_s(2.0, "5") == (2.0, False)  # the SLO caps a looser deadline
    assert budget_s(None, "1.5") == (1.5, True)
    for bad in ("abc", "-1", "0", "nan", "inf"):
        with pytest.raises(BadDeadline):
            budget_s(2.0, bad)


def test_ceil_seconds() -> None:
    assert ceil_seconds(0.01) == 1 and ceil_seconds(2.2) == 3


def gate_with_busy_replica() -> tuple[SloGate, Forecast, Replica]:
    f = Forecast()
    teach(f, "r0", a=0.0, b=1e-4, step=0.01)
    replica = ready_replica("r0", cap=1)
    registry = Registry([replica])
    admission = Admission(registry, LeastOutstanding(), 16, 60.0, forecast=f)
    busy = Ticket(0, 401, arrived_at=0.0)  # 4 s of service left
    f.started(busy, "r0", now=0.0)
    replica.inflight = 1
    return SloGate(f, admission, registry), f, replica


def test_gate_refuses_what_would_miss_the_budget_with_the_overshoot_as_retry_after() -> None:
    gate, _, _ = gate_with_busy_replica()
    late = Ticket(1_000, 10, arrived_at=0.0, budget_s=1.0)
    refusal = gate.check(late, now=0.0)
    assert refusal is not None and refusal.reason == "ttft_slo"
    assert refusal.predicted_s == pytest.approx(4.1, rel=0.02)
    assert refusal.headers["Retry-After"] == "4"  # ceil(4.1 - 1.0)
    assert 3050 <= int(refusal.headers["retry-after-ms"]) <= 3150
    assert "4.10 s" in refusal.message and "SLO of 1 s" in refusal.message
    by_header = gate.check(Ticket(1_000, 10, 0.0, budget_s=1.0), now=0.0, by_header=True)
    assert by_header is not None and by_header.reason == "ttft_deadline"


def test_gate_admits_what_fits_and_sets_when_to_give_up() -> None:
    gate, _, _ = gate_with_busy_replica()
    ok = Ticket(1_000, 10, arrived_at=0.0, budget_s=5.0)
    assert gate.check(ok, now=0.0) is None
    assert ok.predicted_ttft == pytest.approx(4.1, rel=0.02)
    assert ok.latest_start == pytest.approx(5.0 - 0.1, rel=0.01)


def test_margin_is_the_recent_99th_percentile_of_lateness_per_prompt_class() -> None:
    f = Forecast()
    short, long_ = Ticket(100, 10, 0.0), Ticket(10_000, 10, 0.0, long=True)
    assert f.margin_s(short) == 0.0
    for i in range(100):
        f.ttft_error(short, i / 100)  # 0.00 .. 0.99 s late
    assert f.margin_s(short) == pytest.approx(0.98)  # 1 % above it: the worst alone is not
    assert f.margin_s(long_) == 0.0  # long prompts' forecasts have their own record
    for _ in range(256):  # a better forecast since: the old errors age out
        f.ttft_error(short, -0.1)
    assert f.margin_s(short) == 0.0


def test_slow_requests_keep_their_own_margin() -> None:
    f = Forecast()
    teach(f, "r0", a=0.0, b=1e-4, step=0.01)
    quick, slow = Ticket(100, 10, 0.0), Ticket(100, 1_000, 0.0)
    for _ in range(10):
        f.classify(Ticket(100, 100, 0.0))  # the median slot time: ~1 s
    f.classify(quick)
    f.classify(slow)
    assert (quick.slow, slow.slow) == (False, True)
    for _ in range(50):
        f.ttft_error(slow, 2.0)  # slow requests were overtaken: 2 s late
    assert f.margin_s(slow) == pytest.approx(2.0) and f.margin_s(quick) == 0.0


def test_gate_refuses_what_only_its_margin_pushes_over_the_budget() -> None:
    gate, f, _ = gate_with_busy_replica()
    ticket = Ticket(1_000, 10, arrived_at=0.0, budget_s=4.5)  # forecast 4.1 s: fits
    assert gate.check(ticket, now=0.0) is None
    for _ in range(20):
        f.ttft_error(ticket, 0.5)  # first tokens came 0.5 s later than forecast
    refusal = gate.check(Ticket(1_000, 10, arrived_at=0.0, budget_s=4.5), now=0.0)
    assert refusal is not None and refusal.predicted_s == pytest.approx(4.6, rel=0.02)


def test_gate_never_refuses_a_request_a_free_slot_is_waiting_for() -> None:
    gate, f, replica = gate_with_busy_replica()
    replica.inflight = 0
    f.inflight.clear()
    huge = Ticket(100_000, 10, arrived_at=0.0, budget_s=1.0)  # its own prefill: 10 s
    assert gate.check(huge, now=0.0) is None


async def test_a_queued_request_leaves_once_it_can_no_longer_make_its_budget() -> None:
    gate, _, _ = gate_with_busy_replica()
    admission = gate.queue
    assert isinstance(admission, Admission)
    ticket = Ticket(0, 10, arrived_at=time.monotonic(), budget_s=10.0)
    ticket.latest_start = ticket.arrived_at + 0.05
    with pytest.raises(QueueTimeout) as excinfo:
        await admission.acquire(10, prompt_tokens=0, ticket=ticket)
    assert excinfo.value.reason == "ttft_slo_expired"
    assert admission.queue_depth == 0


async def test_ahead_of_follows_the_queue_order_of_admission() -> None:
    f = Forecast()
    teach(f, "r0", a=0.0, b=1e-4, step=0.01)
    replica = ready_replica("r0", cap=1)
    replica.inflight = 1  # busy: everything queues
    for order in ("deadline", "shortest"):
        admission = Admission(
            Registry([replica]), LeastOutstanding(), 16, 60.0, order=order, ageing=0.3, forecast=f
        )
        long_ticket = Ticket(10_000, 500, arrived_at=time.monotonic())
        waiting = asyncio.create_task(
            admission.acquire(10_500, prompt_tokens=10_000, ticket=long_ticket)
        )
        await asyncio.sleep(0)
        assert admission.queue_depth == 1
        now = time.monotonic()
        short = Ticket(100, 10, arrived_at=now)
        assert admission.ahead_of(short, now) == [], order  # it would overtake
        assert admission.ahead_of(Ticket(10_000, 600, arrived_at=now), now) == [long_ticket]
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting


# --------------------------------------------------------------------------- issue 18


def gate_on(f: Forecast, replica: Replica) -> SloGate:
    registry = Registry([replica])
    return SloGate(f, Admission(registry, LeastOutstanding(), 16, 60.0, forecast=f), registry)


def test_a_non_streaming_answer_is_forecast_from_the_time_it_has_run() -> None:
    """Its tokens are never seen until it ends: it used to be forecast as if in prefill
    forever (its whole decode still ahead), refusing what a twin sent straight could serve."""
    f = Forecast()
    teach(f, "r0", a=0.0, b=1e-4, step=0.03)
    replica = ready_replica("r0", cap=1)
    answer = Ticket(1_000, 200, arrived_at=0.0, stream=False)  # 0.1 s + 199 x 0.03 = 6.07 s
    f.started(answer, "r0", now=0.0)
    replica.inflight = 1
    gate = gate_on(f, replica)
    # Early on it really would hold the slot past a 3 s budget: refused at once.
    early = Ticket(1_000, 10, arrived_at=1.0, budget_s=3.0)
    refusal = gate.check(early, now=1.0)
    assert refusal is not None and refusal.predicted_s == pytest.approx(5.17, rel=0.02)
    # 5 s in, about 1.07 s of it is left: a 3 s budget fits (was forecast 6.07 s: refused).
    late = Ticket(1_000, 10, arrived_at=5.0, budget_s=3.0)
    assert gate.check(late, now=5.0) is None
    assert late.predicted_ttft == pytest.approx(1.07 + 0.1, rel=0.02)
    # Running past its expected end: it stops by its budget, not never.
    p = f.predict(Ticket(0, 10, arrived_at=7.0), [replica], [], now=7.0)
    assert p is not None and p.wait_s < 0.5


def test_young_streams_first_steps_do_not_set_the_step_time() -> None:
    """One long prefill (1.6 s) paused the batch: streams that had just begun read it as
    their whole step time (the old per-stream mean: ~1.2 s a step for all of them). Pooled
    over the steps past each stream's second token, the step time stays near what
    the replica really does."""
    f = Forecast()
    teach(f, "r0", a=0.0, b=1e-4, step=0.03)
    replica = ready_replica("r0", cap=4)
    old = Ticket(0, 200, arrived_at=0.0)
    f.started(old, "r0", now=0.0)
    for n, at in ((1, 0.0), (2, 0.03), (101, 0.03 + 99 * 0.03 + 1.6)):
        old.last_token_at = at
        if n == 1:
            old.first_token_at = at
        old.generated = n
    now = old.last_token_at
    for _ in range(3):  # admitted just before the long prefill: 2 tokens, 1.6 s apart
        young = Ticket(0, 200, arrived_at=now - 2.0)
        f.started(young, "r0", now=now - 2.0)
        young.first_token_at = young.last_token_at = now - 1.6
        young.generated = 1
        young.last_token_at = now
        young.generated = 2
    replica.inflight = 4
    step = f.step_s("r0")
    assert step == pytest.approx((99 * 0.03 + 1.6 + 8 * 0.03) / (99 + 8), rel=0.01)  # 0.045
    # The old stream frees the first slot: 99 tokens to go at that step, ~4.5 s (the old
    # mean step, ~1.2 s, said ~119 s). A 6 s budget is met; a 2 s one is refused at once.
    gate = gate_on(f, replica)
    fits = Ticket(1_000, 10, arrived_at=now, budget_s=6.0)
    assert gate.check(fits, now=now) is None
    assert fits.predicted_ttft == pytest.approx(99 * step + 0.1, rel=0.02)
    assert gate.check(Ticket(1_000, 10, arrived_at=now, budget_s=2.0), now=now) is not None


def test_the_margin_ages_out_by_time_not_by_count() -> None:
    """One 6 s stall made the forecast 6 s late once. It used to stay the margin until 100
    more samples came (at light load: refusals 10-24 s later); now one request's lateness
    never sets the margin alone, lateness seen more often counts for MARGIN_MAX_AGE_S, and
    a slow replica that keeps being late keeps its margin."""
    from balancer.forecast import MARGIN_MAX_AGE_S

    gate, f, _ = gate_with_busy_replica()  # a new request's forecast: 4.1 s
    stalled = Ticket(1_000, 10, arrived_at=94.0)
    f.ttft_error(stalled, 6.0, at=100.0)
    for i in range(5):
        f.ttft_error(stalled, 0.1, at=100.0 + i)
    # One request's lateness is not a trend: it never sets the margin alone.
    assert f.margin_s(stalled, now=105.0) == pytest.approx(0.1)
    assert gate.check(Ticket(1_000, 10, arrived_at=0.0, budget_s=5.0), now=105.0) is None
    # Two of them are: the margin is 6 s, a 5 s budget is refused right after...
    f.ttft_error(stalled, 6.0, at=100.5)
    assert f.margin_s(stalled, now=105.0) == pytest.approx(6.0)
    refused = gate.check(Ticket(1_000, 10, arrived_at=0.0, budget_s=5.0), now=105.0)
    assert refused is not None  # 4.1 + 6 s over a 5 s budget
    # ...and not once they are MARGIN_MAX_AGE_S old, however few samples came since.
    later = 100.5 + MARGIN_MAX_AGE_S + 0.5
    assert f.margin_s(stalled, now=later) == pytest.approx(0.1)
    assert gate.check(Ticket(1_000, 10, arrived_at=0.0, budget_s=5.0), now=later) is None
    # Still late by 1 s on every request: the margin stays.
    for i in range(20):
        f.ttft_error(stalled, 1.0, at=later + i)
    assert f.margin_s(stalled, now=later + 20) == pytest.approx(1.0)
    assert gate.check(Ticket(1_000, 10, arrived_at=0.0, budget_s=5.0), now=later + 20)


def test_one_stalled_stream_does_not_teach_a_stalled_replica() -> None:
    """A replica stopped for 6 s under one stream (its first token 6 s late) used to teach
    the prefill fit "6 s" for a while; a replica that really became 3x slower is followed
    as fast as by a forecast that never saw the stall."""
    f, twin = Forecast(), Forecast()
    for forecast in (f, twin):
        teach(forecast, "r0", a=0.01, b=0.0, step=0.03, n=20)
    stalled = Ticket(100, 10, arrived_at=0.0)
    f.started(stalled, "r0", now=0.0)
    finish(f, stalled, 6.0, 0.03, 10)
    f.ended(stalled)
    assert f.prefill_s("r0", 100) < 0.02  # was 0.3 s
    for forecast in (f, twin):
        teach(forecast, "r0", a=0.03, b=0.0, step=0.09, n=40, seed=2)
    assert f.prefill_s("r0", 100) == pytest.approx(twin.prefill_s("r0", 100), rel=0.1)
    assert f.step_s("r0") == pytest.approx(twin.step_s("r0"), rel=0.1)
