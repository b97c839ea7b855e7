"""The TTFT SLO gate end to end: real balancer, simulated and scripted replicas, real clients.

The forecast is learned from the first streams of each test (nothing is configured about
the replicas' speed); then a burst beyond the slots must be answered 429 + Retry-After in
TGI's shape before any admitted stream ends, and a queued request whose replica slowed down
behind the forecast's back must leave with 503 once its budget is gone.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest

from tests.conftest import admin_headers, metric_value, read_sse, wait_until
from tests.upstreams import Script

pytestmark = pytest.mark.timeout(60)

BODY = {"model": "tgi", "prompt": "x" * 400, "max_tokens": 100, "stream": True}


async def teach(http: aiohttp.ClientSession, base: str, n: int = 4) -> None:
    """Sequential streams: the forecast learns prefill, step time and how requests end."""
    for _ in range(n):
        async with http.post(f"{base}/v1/completions", json=BODY) as resp:
            assert resp.status == 200
            await resp.read()


async def metrics(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(f"{base}/metrics") as resp:
        return await resp.text()


async def test_a_burst_beyond_the_slots_is_refused_at_once_with_retry_after(
    simulator, balancer, http
) -> None:
    url = await simulator(batch_size=2, speed=20.0)
    server = await balancer([url], max_inflight_per_replica=2, ttft_slo_s=0.1)
    base = server.url
    await teach(http, base)

    async def one() -> tuple[int, float, dict, str | None, bytes]:
        sent = time.monotonic()
        async with http.post(f"{base}/v1/completions", json=BODY) as resp:
            if resp.status != 200:
                doc = await resp.json()
                return (
                    resp.status,
                    time.monotonic() - sent,
                    doc,
                    resp.headers.get("Retry-After"),
                    b"",
                )
            body = await resp.read()
            return 200, time.monotonic() - sent, {}, None, body

    results = await asyncio.gather(*(one() for _ in range(16)))
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    # Admitted on a forecast that then proved optimistic: dropped once its budget is gone.
    expired = [r for r in results if r[0] == 503 and r[2]["error_type"] == "overloaded"]
    assert len(served) + len(refused) + len(expired) == 16, [r[0] for r in results]
    assert len(expired) <= 4
    assert len(served) >= 2  # the two free slots are never refused
    assert len(refused) >= 8
    for _, _, doc, retry_after, _ in refused:
        assert doc["error_type"] == "overloaded"
        assert "predicted time to first token" in doc["error"]
        assert retry_after is not None and int(retry_after) >= 1
    # "No" comes at once: every refusal arrived before the first admitted stream ended.
    assert max(r[1] for r in refused) < min(r[1] for r in served)
    for *_, body in served:
        assert body.rstrip().endswith(b"data:[DONE]")

    text = await metrics(http, base)
    assert metric_value(text, "neuron_fleet_rejected_requests_total", reason="ttft_slo") == len(
        refused
    )
    refused_count = sum(
        metric_value(
            text, "neuron_fleet_ttft_slo_requests_total", outcome="refused", prompt_class=c
        )
        for c in ("short", "long")
    )
    assert refused_count == len(refused)
    scored = sum(
        metric_value(text, "neuron_fleet_ttft_slo_requests_total", outcome=o, prompt_class="short")
        for o in ("met", "missed")
    )
    assert scored == len(served) + 4  # the teaching streams were scored too
    errors = metric_value(text, "neuron_fleet_ttft_forecast_error_seconds_count")
    assert 1 <= errors <= scored


async def test_openai_sdk_sees_a_rate_limit_error_it_can_back_off_on(
    simulator, balancer, http
) -> None:
    url = await simulator(batch_size=1, speed=20.0)
    server = await balancer([url], max_inflight_per_replica=1, ttft_slo_s=0.05)
    await teach(http, server.url)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    # Hold the only slot with a long stream, then ask for more.
    holder = asyncio.create_task(
        client.completions.create(model="tgi", prompt="hello", max_tokens=400)
    )
    await wait_until(lambda: server.registry.replicas[0].inflight == 1, what="slot taken")
    with pytest.raises(openai.RateLimitError) as excinfo:
        await client.completions.create(model="tgi", prompt="hello", max_tokens=20)
    assert excinfo.value.status_code == 429
    assert int(excinfo.value.response.headers["Retry-After"]) >= 1
    assert int(excinfo.value.response.headers["retry-after-ms"]) >= 1
    completion = await holder
    assert completion.choices[0].text


async def test_openai_sdk_retries_when_the_forecast_says_a_slot_will_be_free(
    simulator, balancer, http
) -> None:
    url = await simulator(batch_size=1, speed=20.0)
    server = await balancer([url], max_inflight_per_replica=1, ttft_slo_s=0.05)
    await teach(http, server.url)
    holder = asyncio.create_task(
        openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0
        ).completions.create(model="tgi", prompt="hello", max_tokens=300)
    )
    await wait_until(lambda: server.registry.replicas[0].inflight == 1, what="slot taken")
    # The SDK's own retry loop, driven by retry-after-ms / Retry-After: no client code.
    patient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=6)
    completion = await patient.completions.create(model="tgi", prompt="hello", max_tokens=5)
    assert completion.choices[0].text
    await holder
    text = await metrics(http, server.url)
    assert metric_value(text, "neuron_fleet_rejected_requests_total", reason="ttft_slo") >= 1


async def test_a_queued_request_that_can_no_longer_make_it_leaves_with_503(
    scripted, balancer, http
) -> None:
    replica, url = await scripted(Script(tokens=5, token_delay_s=0.001))
    server = await balancer([url], max_inflight_per_replica=1, ttft_slo_s=0.3)
    base = server.url
    await teach(http, base)
    replica.script.token_delay_s = 0.4  # the replica slows down: the forecast lags behind

    async def post() -> tuple[int, dict]:
        async with http.post(f"{base}/v1/completions", json=BODY) as resp:
            if resp.status == 200:
                await resp.read()
                return 200, {}
            return resp.status, await resp.json()

    first = asyncio.create_task(post())
    await wait_until(lambda: server.registry.replicas[0].inflight == 1, what="slot taken")
    status, doc = await post()  # admitted on the stale forecast, then its budget runs out
    assert status == 503
    assert doc["error_type"] == "overloaded" and "TTFT budget" in doc["error"]
    assert (await first)[0] == 200
    text = await metrics(http, base)
    assert (
        metric_value(text, "neuron_fleet_rejected_requests_total", reason="ttft_slo_expired") == 1
    )
    assert (
        metric_value(
            text, "neuron_fleet_ttft_slo_requests_total", outcome="expired", prompt_class="short"
        )
        == 1
    )
    assert server.registry.replicas[0].inflight == 0 and server.balancer.admission.queue_depth == 0


async def test_a_request_deadline_header_works_without_an_slo(scripted, balancer, http) -> None:
    replica, url = await scripted(Script(tokens=5, token_delay_s=0.001))
    server = await balancer([url], max_inflight_per_replica=1)
    base = server.url
    await teach(http, base)
    replica.script.token_delay_s = 0.2
    first = asyncio.create_task(http.post(f"{base}/v1/completions", json=BODY))
    await wait_until(lambda: server.registry.replicas[0].inflight == 1, what="slot taken")
    headers = {"X-TTFT-Deadline": "0.0001"}
    async with http.post(f"{base}/v1/completions", json=BODY, headers=headers) as resp:
        assert resp.status == 429
        doc = await resp.json()
    assert "the request's TTFT deadline" in doc["error"]
    async with http.post(
        f"{base}/v1/completions", json=BODY, headers={"X-TTFT-Deadline": "soon"}
    ) as resp:
        assert resp.status == 400
        doc = await resp.json()
    assert doc["error_type"] == "validation" and "X-TTFT-Deadline" in doc["error"]
    async with await first as resp:
        assert resp.status == 200
        events = await read_sse(resp)
    assert events[-1] == b"data:[DONE]"
    text = await metrics(http, base)
    assert metric_value(text, "neuron_fleet_rejected_requests_total", reason="ttft_deadline") == 1
    assert metric_value(text, "neuron_fleet_rejected_requests_total", reason="bad_deadline") == 1


async def test_without_an_slo_nothing_is_refused_and_nothing_is_scored(
    simulator, balancer, http
) -> None:
    url = await simulator(batch_size=1, speed=50.0)
    server = await balancer([url], max_inflight_per_replica=1)
    await teach(http, server.url, n=2)

    async def one() -> int:
        async with http.post(f"{server.url}/v1/completions", json=BODY) as resp:
            await resp.read()
            return resp.status

    assert await asyncio.gather(*(one() for _ in range(6))) == [200] * 6
    text = await metrics(http, server.url)
    assert "neuron_fleet_ttft_slo_requests_total{" not in text
    # ...but the forecast still learned (the shortest-first order uses it).
    assert server.balancer.forecast.ready


def test_balance_cli_takes_the_slo_and_refuses_nonsense() -> None:
    import argparse

    from balancer.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    up = ["--upstream", "http://127.0.0.1:1"]
    args = parser.parse_args([*up, "--ttft-slo", "2.5", "--queue-order", "shortest"])
    config = config_from_args(args)
    assert (config.ttft_slo_s, config.queue_order) == (2.5, "shortest")
    assert config_from_args(parser.parse_args(up)).ttft_slo_s is None
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(SystemExit):
            parser.parse_args([*up, "--ttft-slo", bad])


async def test_fleet_status_shows_what_the_forecast_learned(simulator, balancer, http) -> None:
    from supervisor.status_cli import format_table

    url = await simulator(batch_size=2, speed=20.0)
    server = await balancer([url], max_inflight_per_replica=2, ttft_slo_s=2.0)
    admin = admin_headers(server)
    async with http.get(f"{server.url}/fleet/status", headers=admin) as resp:
        before = await resp.json()
    assert before["ttft_slo_s"] == 2.0 and before["replicas"][0]["forecast"] is None
    await teach(http, server.url)
    async with http.get(f"{server.url}/fleet/status", headers=admin) as resp:
        status = await resp.json()
    learned = status["replicas"][0]["forecast"]
    assert learned["streams_seen"] == 4
    # The simulator at speed 20: a decode step of one running slot is (28.5 + 1.3) / 20 ms.
    assert 0.0005 < learned["decode_step_s"] < 0.1  # generous: a shared, busy machine
    table = format_table(status)
    assert "TTFT SLO 2 s" in table and "forecast: r0 prefill" in table


async def test_non_streaming_answers_are_scored_on_their_response_head(
    simulator, balancer, http
) -> None:
    """A non-streaming client gets its first token with the whole answer: scored on the
    response head, under outcomes of its own, and nothing is taught to the forecast (its
    first token's time at the replica is unseen)."""
    url = await simulator(batch_size=2, speed=50.0)
    server = await balancer([url], max_inflight_per_replica=2, ttft_slo_s=30.0)
    gen = {"inputs": "hello", "parameters": {"max_new_tokens": 20}}
    async with http.post(f"{server.url}/generate", json=gen) as resp:  # TGI's /generate
        assert resp.status == 200 and (await resp.json())["generated_text"]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    chat = await client.chat.completions.create(  # OpenAI's chat, no stream
        model="tgi",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=20,
        extra_headers={"X-TTFT-Deadline": "0.0001"},  # tighter than any answer can come
    )
    assert chat.choices[0].message.content
    text = await metrics(http, server.url)

    def outcome(name: str) -> float:
        return metric_value(
            text, "neuron_fleet_ttft_slo_requests_total", outcome=name, prompt_class="short"
        )

    assert (outcome("response_met"), outcome("response_missed")) == (1, 1)
    assert (outcome("met"), outcome("missed")) == (0, 0)  # streams' first tokens only
    assert metric_value(text, "neuron_fleet_ttft_forecast_error_seconds_count") == 0
    assert not server.balancer.forecast.ready  # learned nothing from whole answers

    # A stream next to them is still scored on its first token event, and teaches.
    stream = await client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "hello"}], max_tokens=5, stream=True
    )
    async for _ in stream:
        pass
    text = await metrics(http, server.url)
    assert outcome("met") == 1 and server.balancer.forecast.ready


def test_slo_score_counts_streams_and_whole_answers_apart() -> None:
    from balancer.forecast import Forecast
    from balancer.metrics import BalancerMetrics
    from balancer.slo import SloScore
    from balancer.ticket import Ticket
    from balancer.upstream import Registry

    metrics_ = BalancerMetrics(Registry(), lambda: 0)
    forecast = Forecast()
    score = SloScore(forecast, metrics_)

    def count(outcome: str) -> float:
        return metrics_.slo_requests.labels(outcome=outcome, prompt_class="short")._value.get()

    # A stream: first token 0.5 s after arrival, forecast said 0.2 s, budget 1 s.
    for _ in range(2):  # twice: one request's lateness alone never sets the margin
        stream = Ticket(10, 5, arrived_at=100.0, budget_s=1.0, predicted_ttft=0.2)
        forecast.started(stream, "r0", 100.1)
        stream.first_token_at, stream.last_token_at, stream.generated = 100.5, 100.9, 5
        score.stream_ended(stream, complete=True)
    assert count("met") == 2 and forecast.ready
    assert forecast.margin_s(stream) == pytest.approx(0.3)  # it was 0.3 s late
    # Whole answers: the head 0.8 s / 1.5 s after arrival, budget 1 s.
    for head_at in (100.8, 101.5):
        score.response_ended(Ticket(10, 5, arrived_at=100.0, budget_s=1.0), head_at)
    assert (count("response_met"), count("response_missed")) == (1, 1)
    assert forecast.margin_s(stream) == pytest.approx(0.3)  # not taught by whole answers
    # No budget: not scored.
    score.response_ended(Ticket(10, 5, arrived_at=100.0), 105.0)
    assert count("response_missed") == 1


async def test_a_slot_held_by_a_non_streaming_answer_frees_when_its_tokens_would_be_done(
    simulator, balancer, http
) -> None:
    """Issue 18: a non-streaming answer holding the only slot used to be forecast as if in
    prefill forever (its whole decode still ahead), so a stream arriving near its end was
    refused though it would have met the SLO. Now: refused at once early on (it really
    would miss), admitted and served within the SLO near the end."""
    url = await simulator(batch_size=1, speed=2.0)  # a decode step: ~15 ms
    server = await balancer([url], max_inflight_per_replica=1, ttft_slo_s=0.9)
    base = server.url
    await teach(http, base)
    whole = {"inputs": "x" * 400, "parameters": {"max_new_tokens": 100}}  # ~1.5 s
    started = time.monotonic()
    answer = asyncio.create_task(http.post(f"{base}/generate", json=whole))
    await wait_until(lambda: server.balancer.inflight == 1, what="the answer holds the slot")  # type: ignore[union-attr]

    async def stream_ttft() -> tuple[int, float]:
        sent = time.monotonic()
        async with http.post(f"{base}/v1/completions", json=BODY) as resp:
            if resp.status != 200:
                await resp.read()
                return resp.status, time.monotonic() - sent
            await resp.content.readuntil(b"\n\n")
            ttft = time.monotonic() - sent
            await resp.read()
            return 200, ttft

    early_status, early_s = await stream_ttft()  # ~1.4 s of it left: over 0.9 s
    assert early_status == 429 and early_s < 0.2
    await asyncio.sleep(max(0.0, started + 1.1 - time.monotonic()))  # ~0.4 s left
    status, ttft = await stream_ttft()
    assert status == 200, "refused although the slot frees within the SLO"
    assert ttft <= 0.9
    resp = await answer
    assert resp.status == 200
    resp.release()
