"""Unit tests of the simulator's Neuron timing model: no sockets, no sleeping (virtual time)."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics

import pytest

from supervisor.simulator.engine import (
    Engine,
    FakeClock,
    FaultAction,
    FaultConfig,
    FaultInjector,
    GenerateParams,
    GenerationError,
    GenerationSpec,
    InvalidRequest,
    Job,
    NeuronBatcher,
    NeuronTiming,
    OverloadedError,
    SimConfig,
    TokenCounter,
    ValidationError,
    validate,
)

T = NeuronTiming()

# The blog's GuideLLM results (seed-guidellm-results.json): Llama-3.1-8B, batch 8, tp 8.
BLOG_SYNC_TTFT_S = 1.58508
BLOG_SYNC_ITL_S = 0.02981
BLOG_THROUGHPUT_REQ_S = 0.85
BLOG_THROUGHPUT_ITL_P50_S = 0.0391
BLOG_THROUGHPUT_ITL_MEAN_S = 0.06518
BLOG_THROUGHPUT_ITL_P99_S = 1.6046


def job(ordinal: int = 1, input_length: int = 100, max_new_tokens: int = 10, **kw) -> Job:
    return Job(ordinal, input_length, max_new_tokens, random.Random(ordinal), **kw)


def batcher(batch_size: int = 2, max_concurrent: int = 4) -> NeuronBatcher:
    return NeuronBatcher(batch_size=batch_size, max_concurrent_requests=max_concurrent)


# --------------------------------------------------------------------------- batcher


def test_static_slots_fifo_queue_and_overload() -> None:
    b = batcher(batch_size=2, max_concurrent=3)
    jobs = [job(i) for i in (1, 2, 3)]
    for j in jobs:
        b.add(j)
    with pytest.raises(OverloadedError) as exc:
        b.add(job(4))
    assert (exc.value.status, exc.value.error_type) == (429, "overloaded")

    step = b.plan(0.0)
    assert step is not None and step.kind == "prefill"
    assert step.jobs == (jobs[0], jobs[1])  # FIFO, capped by the slots
    assert (b.active, b.queued) == (2, 1)
    assert jobs[2].started_at is None


def test_prefill_pauses_decoding_of_running_slots() -> None:
    b = batcher(batch_size=4)
    a = job(1, input_length=100, max_new_tokens=50)
    b.add(a)
    now = 0.0
    for _ in range(3):  # prefill + two decode steps
        step = b.plan(now)
        assert step is not None
        now += step.duration
        b.complete(step, now)
    assert a.generated == 3

    newcomer = job(2, input_length=5000, max_new_tokens=50)
    b.add(newcomer)
    step = b.plan(now)
    assert step is not None and step.kind == "prefill"
    assert step.jobs == (newcomer,)
    assert step.duration == pytest.approx(T.prefill(5000))
    now += step.duration
    events = b.complete(step, now)
    assert [j for j, _ in events] == [newcomer]  # the running slot got nothing meanwhile
    assert a.generated == 3 and newcomer.generated == 1

    step = b.plan(now)
    assert step is not None and step.kind == "decode" and set(step.jobs) == {a, newcomer}
    assert step.duration == pytest.approx(T.decode(2))


def test_decode_step_grows_with_running_slots_and_speed_divides_it() -> None:
    durations = []
    for n in range(1, 9):
        b = NeuronBatcher(batch_size=8, max_concurrent_requests=8, speed=2.0)
        for i in range(n):
            b.add(job(i + 1))
        prefill = b.plan(0.0)
        assert prefill is not None
        b.complete(prefill, 0.0)
        step = b.plan(0.0)
        assert step is not None and step.kind == "decode" and len(step.jobs) == n
        durations.append(step.duration)
    assert durations == sorted(durations) and len(set(durations)) == 8
    assert durations[0] == pytest.approx(T.decode(1) / 2)
    assert durations[7] - durations[0] == pytest.approx(7 * T.decode_s_per_slot / 2)


def test_max_new_tokens_honoured_and_slot_released() -> None:
    b = batcher(batch_size=1)
    first, second = job(1, max_new_tokens=5), job(2, max_new_tokens=3)
    b.add(first)
    b.add(second)
    finals = []
    now = 0.0
    while (step := b.plan(now)) is not None:
        now += step.duration
        finals += [(j.ordinal, e.index) for j, e in b.complete(step, now) if e.final]
    assert finals == [(1, 5), (2, 3)]
    assert first.finish_reason == second.finish_reason == "length"
    assert (b.active, b.queued) == (0, 0)


def test_cancelled_running_request_frees_its_slot_at_the_next_token() -> None:
    b = batcher(batch_size=1)
    a, waiting = job(1, max_new_tokens=100), job(2, max_new_tokens=2)
    b.add(a)
    b.add(waiting)
    step = b.plan(0.0)
    assert step is not None
    b.complete(step, 1.0)
    b.cancel(a)
    assert b.active == 1  # still holds the slot until the next token
    step = b.plan(1.0)
    assert step is not None and step.kind == "decode"
    assert b.complete(step, 2.0) == []  # no token for the cancelled request
    assert b.active == 0
    step = b.plan(2.0)
    assert step is not None and step.jobs == (waiting,)


def test_cancelled_queued_request_is_dropped_at_once() -> None:
    b = batcher(batch_size=1)
    a, queued, later = job(1), job(2), job(3)
    b.add(a)
    step = b.plan(0.0)
    assert step is not None and step.jobs == (a,)
    b.add(queued)
    b.add(later)
    b.cancel(queued)
    assert b.queued == 1
    b.complete(step, 1.0)
    b.cancel(a)
    step = b.plan(1.0)
    assert step is not None
    b.complete(step, 2.0)
    step = b.plan(2.0)
    assert step is not None and step.jobs == (later,)


def test_text_is_deterministic_from_the_seed_and_eos_and_stop_end_early() -> None:
    def text(seed: int) -> str:
        j = Job(1, 10, 20, random.Random(seed))
        for _ in range(20):
            j.produce(0.0)
        return j.text

    assert text(7) == text(7) != text(8)
    eos = Job(1, 10, 20, random.Random(1), eos_probability=1.0)
    event = eos.produce(0.0)
    assert event.final and event.token.special and eos.finish_reason == "eos_token"
    probe = Job(1, 10, 20, random.Random(3))
    first_word = probe.produce(0.0).token.text
    stopper = Job(1, 10, 20, random.Random(3), stop=(first_word,))
    assert stopper.produce(0.0).final and stopper.finish_reason == "stop_sequence"


# --------------------------------------------------------------------------- validation


CFG = SimConfig(max_input_tokens=100, max_total_tokens=115, default_max_new_tokens=20)


def test_validation_like_tgi() -> None:
    ok = validate(CFG, GenerateParams(max_new_tokens=10), "x", 100)
    assert (ok.input_length, ok.max_new_tokens) == (100, 10)
    # without max_new_tokens: max_total - input, capped by the demo default
    assert validate(CFG, GenerateParams(), "x", 90).max_new_tokens == 20
    assert validate(CFG, GenerateParams(), "x", 100).max_new_tokens == 15
    with pytest.raises(ValidationError, match=r"must have less than 100 tokens. Given: 101"):
        validate(CFG, GenerateParams(max_new_tokens=1), "x", 101)
    with pytest.raises(ValidationError, match=r"must be <= 115. Given: 100 `inputs` tokens and 16"):
        validate(CFG, GenerateParams(max_new_tokens=16), "x", 100)
    with pytest.raises(ValidationError, match="strictly positive"):
        validate(CFG, GenerateParams(max_new_tokens=0), "x", 1)
    with pytest.raises(ValidationError, match="cannot be empty"):
        validate(CFG, GenerateParams(), "", 0)
    with pytest.raises(ValidationError) as exc:
        validate(CFG, GenerateParams(top_p=1.0), "x", 1)
    assert exc.value.message.startswith("Input validation error: ")
    assert (exc.value.status, exc.value.error_type) == (422, "validation")
    assert validate(CFG, GenerateParams(truncate=10, max_new_tokens=5), "x", 500).input_length == 10


def test_parameter_type_errors_are_tgi_shaped() -> None:
    with pytest.raises(InvalidRequest) as exc:
        GenerateParams.from_json({"max_new_tokens": "ten"})
    assert exc.value.status == 422 and "max_new_tokens" in exc.value.message
    assert GenerateParams.from_json({"stop": "x", "seed": 3}).stop == ("x",)


async def test_token_estimate_without_a_tokenizer() -> None:
    counter = TokenCounter(None)
    assert await counter.count("a" * 400) == 100
    pieces = await counter.tokenize("hello world")
    assert "".join(p["text"] for p in pieces) == "hello world"
    assert [(p["start"], p["stop"]) for p in pieces] == [(0, 4), (4, 8), (8, 11)]


# --------------------------------------------------------------------------- faults


def test_fault_decisions_are_deterministic() -> None:
    f = FaultInjector(FaultConfig(crash_after_tokens=5, drop_after_tokens=3))
    assert [f.after_token_sent(n) for n in (1, 2, 3)] == [
        FaultAction.NONE,
        FaultAction.NONE,
        FaultAction.DROP,
    ]
    assert f.after_token_sent(1) is FaultAction.NONE
    assert f.after_token_sent(2) is FaultAction.CRASH  # 5 tokens in total
    hang = FaultInjector(FaultConfig(hang_after_tokens=2))
    assert hang.after_token_sent(2) is FaultAction.HANG
    every = FaultInjector(FaultConfig(fail_generation_every=3))
    assert [every.prefill_fails([job(i)]) for i in range(1, 7)] == [False, False, True] * 2
    with pytest.raises(ValueError):
        FaultConfig(hang_after_tokens=0)


# --------------------------------------------------------------------------- async engine


def engine(**kw) -> Engine:
    return Engine(SimConfig(**kw), clock=FakeClock())


async def test_engine_streams_tokens_with_virtual_time() -> None:
    eng = engine(batch_size=2)
    gen = eng.submit(GenerationSpec(input_length=1000, max_new_tokens=4))
    events = [e async for e in gen]
    assert [e.index for e in events] == [1, 2, 3, 4] and events[-1].final
    assert events[0].at - gen.job.queued_at == pytest.approx(T.prefill(1000))
    gaps = [b.at - a.at for a, b in itertools.pairwise(events)]
    assert gaps == pytest.approx([T.decode(1)] * 3)
    assert eng.steps == {"prefill": 1, "decode": 3}
    assert (eng.running, eng.queued) == (0, 0)
    await eng.close()


async def test_engine_cancellation_frees_the_slot_for_the_queue() -> None:
    eng = engine(batch_size=1)
    first = eng.submit(GenerationSpec(input_length=10, max_new_tokens=10_000))
    queued = eng.submit(GenerationSpec(input_length=10, max_new_tokens=10_000))
    second = eng.submit(GenerationSpec(input_length=10, max_new_tokens=3))
    assert (await first.next()) is not None
    queued.cancel()  # a client that leaves while queued is dropped at once
    assert eng.queued == 1
    first.cancel()
    tokens = [e async for e in second]
    assert len(tokens) == 3
    assert first.job.generated < 10 and queued.job.generated == 0
    assert (eng.running, eng.queued) == (0, 0)
    await eng.close()


async def test_generation_failure_takes_down_the_whole_batch() -> None:
    eng = engine(batch_size=4, faults=FaultConfig(fail_generation_every=2))
    running = eng.submit(GenerationSpec(input_length=10, max_new_tokens=10_000))
    assert (await running.next()) is not None
    doomed = eng.submit(GenerationSpec(input_length=10, max_new_tokens=5))
    for gen in (running, doomed):
        with pytest.raises(GenerationError) as exc:
            async for _ in gen:
                pass
        assert (exc.value.status, exc.value.error_type) == (424, "generation")
    assert eng.running == 0
    survivor = eng.submit(GenerationSpec(input_length=10, max_new_tokens=2))  # request #3
    assert len([e async for e in survivor]) == 2
    await eng.close()


async def test_engine_overload_and_next_with_max_wait() -> None:
    eng = Engine(SimConfig(batch_size=1, max_concurrent_requests=1, speed=100))  # real clock
    gen = eng.submit(GenerationSpec(input_length=1, max_new_tokens=1_000))
    with pytest.raises(OverloadedError):
        eng.submit(GenerationSpec(input_length=1, max_new_tokens=1))
    assert await gen.next() is not None
    gen.cancel()
    for _ in range(1000):  # the slot frees at the next decode step (0.3 ms here)
        if not eng.running:
            break
        await asyncio.sleep(0.001)
    idle = eng.submit(GenerationSpec(input_length=100_000, max_new_tokens=1))  # 0.1 s prefill
    assert await idle.next(0.01) is None  # nothing within the wait: caller sends a keep-alive
    idle.cancel()
    await eng.close()


# --------------------------------------------------------------------------- calibration


async def test_calibration_synchronous_profile_matches_the_blog() -> None:
    """GuideLLM 'synchronous': one request at a time, 15,900 +/- 100 prompt tokens,
    450 +/- 50 output tokens. Mean TTFT and ITL within 15 % of the blog."""
    rng = random.Random(42)
    eng = engine(batch_size=8)
    ttfts, itls = [], []
    for _ in range(11):
        spec = GenerationSpec(
            input_length=rng.randint(15_800, 16_000), max_new_tokens=rng.randint(400, 500)
        )
        gen = eng.submit(spec)
        events = [e async for e in gen]
        ttfts.append(events[0].at - gen.job.queued_at)
        itls.append((events[-1].at - events[0].at) / (len(events) - 1))
    ttft, itl = statistics.mean(ttfts), statistics.mean(itls)
    print(f"synchronous: TTFT {ttft * 1e3:.1f} ms, ITL {itl * 1e3:.2f} ms")
    assert ttft == pytest.approx(BLOG_SYNC_TTFT_S, rel=0.15)
    assert itl == pytest.approx(BLOG_SYNC_ITL_S, rel=0.15)
    await eng.close()


def _saturated_replica(seed: int, duration_s: float, warmup_s: float) -> tuple[int, list[float]]:
    """Discrete-event run of one replica kept saturated (GuideLLM 'throughput' keeps 128
    requests in flight over 3 replicas, ~43 each): completions and ITLs after the warm-up
    (all 43 arrive at once, so the first minute is one synchronized batch)."""
    rng = random.Random(seed)
    b = NeuronBatcher(batch_size=8, max_concurrent_requests=512)
    ordinal, completed, itls = 0, 0, []
    last_token_at: dict[int, float] = {}

    def arrive(now: float) -> None:
        nonlocal ordinal
        ordinal += 1
        prompt, output = rng.randint(15_800, 16_000), rng.randint(400, 500)
        b.add(Job(ordinal, prompt, output, random.Random(ordinal), queued_at=now))

    for _ in range(43):
        arrive(0.0)
    now = 0.0
    while now < duration_s:
        step = b.plan(now)
        assert step is not None
        now += step.duration
        for j, event in b.complete(step, now):
            if j.ordinal in last_token_at and now > warmup_s:
                itls.append(now - last_token_at[j.ordinal])
            last_token_at[j.ordinal] = now
            if event.final:
                completed += warmup_s < now <= duration_s
                arrive(now)
    return completed, itls


def test_calibration_three_saturated_replicas_match_the_blog() -> None:
    """Steady state of 3 saturated replicas: the blog's 0.85 req/s within 25 %, ITL p50 at a
    full batch within 15 %, mean and p99 ITL (a prefill pause) within 25 %."""
    duration, warmup = 600.0, 60.0
    runs = [_saturated_replica(seed, duration, warmup) for seed in range(3)]
    req_per_s = sum(c for c, _ in runs) / (duration - warmup)
    itls = sorted(x for _, i in runs for x in i)
    p50 = itls[len(itls) // 2]
    p99 = itls[int(len(itls) * 0.99)]
    mean = statistics.mean(itls)
    print(
        f"throughput: {req_per_s:.3f} req/s, ITL p50 {p50 * 1e3:.1f} ms, "
        f"mean {mean * 1e3:.1f} ms, p99 {p99 * 1e3:.0f} ms"
    )
    assert req_per_s == pytest.approx(BLOG_THROUGHPUT_REQ_S, rel=0.25)
    assert p50 == pytest.approx(BLOG_THROUGHPUT_ITL_P50_S, rel=0.15)
    assert mean == pytest.approx(BLOG_THROUGHPUT_ITL_MEAN_S, rel=0.25)
    assert p99 == pytest.approx(BLOG_THROUGHPUT_ITL_P99_S, rel=0.25)


def test_fake_clock_jumps() -> None:
    clock = FakeClock(10.0)
    asyncio.run(clock.sleep(2.5))
    assert clock.now() == 12.5
