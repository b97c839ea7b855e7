"""The defects an adversarial review of the balancer found (issue 11), each reproduced."""

from __future__ import annotations

import asyncio
import json

import pytest

from balancer.admission import Admission, Ticket
from balancer.policy import LeastOutstanding
from balancer.upstream import Registry, Replica, ReplicaState
from tests.conftest import metric_value, read_sse, wait_until
from tests.upstreams import Script, raw_replica

GEN = {"inputs": "hello", "parameters": {"max_new_tokens": 5}}


def _replicas(n: int, cap: int = 1) -> list[Replica]:
    return [
        Replica(f"r{i}", f"http://x{i}", slot_cap=cap, state=ReplicaState.READY, healthy=True)
        for i in range(n)
    ]


# ---------------------------------------------------------------- 1. admission
async def test_a_queued_retry_does_not_keep_new_requests_off_an_idle_replica():
    registry = Registry(_replicas(2))
    a, b = registry.replicas
    adm = Admission(registry, LeastOutstanding(), max_queue=8, queue_timeout_s=5)
    first = await adm.acquire(1)
    busy_b = await adm.acquire(1)
    assert {first, busy_b} == {a, b}
    # A's request failed: its retry excludes A and waits for B, which is busy.
    retry = asyncio.ensure_future(adm.acquire(1, exclude={a: a.incarnation}))
    await asyncio.sleep(0)
    adm.release(a, 1)
    await asyncio.sleep(0)
    assert not retry.done()
    # A is idle: a new request takes it at once although the queue is not empty.
    assert await asyncio.wait_for(adm.acquire(1), 5) is a
    adm.release(b, 1)
    assert await asyncio.wait_for(retry, 5) is b


async def test_a_retry_keeps_its_place_and_its_deadline():
    registry = Registry(_replicas(1))
    adm = Admission(registry, LeastOutstanding(), max_queue=8, queue_timeout_s=0.3)
    held = await adm.acquire(1)
    ticket = Ticket()
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.2)
    later = asyncio.ensure_future(adm.acquire(1))  # arrives after the ticket's request
    await asyncio.sleep(0)
    retry = asyncio.ensure_future(adm.acquire(1, ticket=ticket))
    await asyncio.sleep(0)
    adm.release(held, 1)
    # The retry keeps its place (it arrived first), so it is served before ``later``.
    got = await asyncio.wait_for(retry, 5)
    assert got is held and not later.done()
    adm.release(got, 1)
    adm.release(await asyncio.wait_for(later, 5), 1)
    # ...and its deadline: 1 s of queueing in all, not a fresh 1 s for the retry (the time
    # spent on a replica between the two is not queueing). The bounds are measured, not
    # guessed: a loaded machine oversleeps, and the retry's share is whatever was left.
    adm2 = Admission(registry, LeastOutstanding(), max_queue=8, queue_timeout_s=1.0)
    hold = await adm2.acquire(1)
    ticket = Ticket()
    first = asyncio.ensure_future(adm2.acquire(1, ticket=ticket))
    await asyncio.sleep(0.6)  # queued about 0.6 s
    adm2.release(hold, 1)
    got = await asyncio.wait_for(first, 5)
    first_wait = ticket.queued_s
    assert 0.6 <= first_wait < 1.0
    await asyncio.sleep(0.5)  # on the replica, then it failed: not queue time
    started = loop.time()
    try:
        await adm2.acquire(1, ticket=ticket)  # the slot is still held (by ``got``)
    except Exception as exc:  # QueueTimeout
        waited = loop.time() - started
        assert type(exc).__name__ == "QueueTimeout"
        left = 1.0 - first_wait  # at most 0.4 s; a fresh deadline would be 1 s
        assert left - 0.02 < waited < left + 0.5
        assert 0.98 < exc.waited_s < 1.5  # reported: its queueing in all
    else:
        raise AssertionError("expected a queue timeout")
    adm2.release(got, 1)


# ---------------------------------------------------------------- end to end
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def _sdk(server):
    import openai

    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


async def test_a_poison_prompt_ejects_no_replica(scripted, balancer, http):
    """2. Every replica fails one prompt (TGI 424 / a generation error event): the failure
    follows the request, so it is the request's, and normal traffic keeps all replicas."""
    urls = [(await scripted(Script(tokens=3, poison="POISON")))[1] for _ in range(3)]
    server = await balancer(urls, eject_after_failures=2, health_interval_s=60)
    poison_native = {"inputs": "POISON", "parameters": {"max_new_tokens": 3}}
    poison_chat = {**CHAT, "messages": [{"role": "user", "content": "POISON"}], "stream": True}

    async def poison(i: int) -> tuple[int, bytes]:
        path, body = [("/generate", poison_native), ("/v1/chat/completions", poison_chat)][i % 2]
        async with http.post(f"{server.url}{path}", json=body) as resp:
            return resp.status, await resp.read()

    results = await asyncio.gather(*(poison(i) for i in range(6)))
    # The client still gets TGI's answer: 424 on /generate, the error event on the stream.
    assert {status for status, _ in results} == {424, 200}
    assert all(b"Request failed during generation" in body for _, body in results)
    assert all(r.routable for r in server.registry), [r.name for r in server.registry]
    async with http.post(f"{server.url}/generate", json=GEN) as resp:
        assert resp.status == 200
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "neuron_fleet_ejections_total", replica="r0", outcome="ejected") == 0
    assert metric_value(text, "neuron_fleet_retries_total", reason="generation_event") > 0


async def test_failures_eject_at_most_the_budget(scripted, balancer, http):
    """2. Three replicas that all cut every stream (a transport failure, always counted):
    at most one of three is ejected. (The same request breaking every replica is what the
    quarantine takes out after two, tests/test_quarantine.py: off here.)"""
    urls = [(await scripted(Script(tokens=6, die_mid_event_after=1)))[1] for _ in range(3)]
    server = await balancer(
        urls, eject_after_failures=1, health_interval_s=60, retries=0, quarantine_after=0
    )
    for _ in range(9):
        async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
            assert resp.status == 200
            assert b"Incomplete generation stream" in await resp.read()
    assert sum(not r.healthy for r in server.registry) == 1
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    over = sum(
        metric_value(text, "neuron_fleet_ejections_total", replica=f"r{i}", outcome="over_budget")
        for i in range(3)
    )
    assert over >= 2


async def test_a_replica_that_answers_503_alone_is_blamed(scripted, balancer, http):
    """2. 503 on one replica only: retried elsewhere, and that replica is ejected."""
    bad, bad_url = await scripted(Script(status=503))
    _, good_url = await scripted(Script(tokens=2))
    server = await balancer([bad_url, good_url], eject_after_failures=2, health_interval_s=60)
    for _ in range(6):
        async with http.post(f"{server.url}/generate", json=GEN) as resp:
            assert resp.status == 200
    assert len(bad.seen.requests) == 2
    assert not server.registry.get("r0").healthy


async def test_death_mid_event_ends_with_an_error_the_openai_sdk_raises(scripted, balancer):
    """3. The replica dies in the middle of an event: the client never gets the half event,
    and the openai SDK raises APIError (not JSONDecodeError) after the whole tokens."""
    import openai

    _, url = await scripted(Script(tokens=6, die_mid_event_after=2))
    server = await balancer([url], retries=0)
    client = _sdk(server)
    got: list[str] = []
    with pytest.raises(openai.APIError) as info:
        stream = await client.chat.completions.create(**{**CHAT, "stream": True})
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert got == [" tok1", " tok2"]
    assert "Incomplete generation stream" in info.value.message
    await client.close()


async def test_death_mid_event_on_the_native_route_sends_whole_events_only(
    scripted, balancer, http
):
    _, url = await scripted(Script(tokens=6, die_mid_event_after=3))
    server = await balancer([url], retries=0)
    async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
        events = await read_sse(resp)
    assert len(events) == 4
    for event in events:
        json.loads(event.removeprefix(b"data:"))  # every event is whole JSON
    assert json.loads(events[-1].removeprefix(b"data:"))["error_type"] == (
        "incomplete_generation_stream"
    )


async def test_tokens_are_counted_when_separators_are_split_across_reads(scripted, balancer, http):
    """5. Each event arrives in two reads, cut inside its blank line: all tokens count."""
    _, url = await scripted(Script(tokens=6, split_events=True))
    server = await balancer([url])
    async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
        events = await read_sse(resp)
    assert len(events) == 6
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "neuron_fleet_output_tokens_total", replica="r0") == 6
    assert server.registry.get("r0").outstanding_work == 0


async def test_a_long_non_streaming_generation_is_not_cut_at_the_first_byte_timeout(
    scripted, balancer, http
):
    """4. /generate sends nothing until it is done: bounded by response_timeout_s, not by
    the first-byte timeout meant for streams."""
    replica, url = await scripted(Script(tokens=2, first_delay_s=0.6))
    server = await balancer([url], first_byte_timeout_s=0.2, response_timeout_s=5.0)
    async with http.post(f"{server.url}/generate", json=GEN) as resp:
        assert resp.status == 200
    assert len(replica.seen.requests) == 1  # not retried
    short = await balancer([url], first_byte_timeout_s=5.0, response_timeout_s=0.2, retries=0)
    async with http.post(f"{short.url}/generate", json=GEN) as resp:
        assert resp.status == 504
        assert "response_timeout" in (await resp.json())["error"]


@pytest.mark.parametrize(
    ("event", "retried"),
    [
        # text-generation-inference v3.3.7, router/src/infer/mod.rs into_openai_event:
        ({"error": {"message": "Model is overloaded", "http_status_code": 422}}, True),
        (
            {
                "error": {
                    "message": "Request failed during generation: Unexpected RuntimeError",
                    "http_status_code": 422,
                }
            },
            True,
        ),
        (
            {
                "error": {
                    "message": "Input validation error: `temperature` must be strictly positive",
                    "http_status_code": 422,
                }
            },
            False,
        ),
        # router/src/server.rs impl From<InferError> for Event (native routes):
        ({"error": "Model is overloaded", "error_type": "overloaded"}, True),
        (
            {"error": "Incomplete generation stream", "error_type": "incomplete_generation_stream"},
            True,
        ),
        # vLLM create_streaming_error_response:
        (
            {
                "error": {
                    "message": "boom",
                    "type": "InternalServerError",
                    "param": None,
                    "code": 500,
                }
            },
            True,
        ),
        (
            {"error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}},
            False,
        ),
    ],
)
async def test_real_servers_error_events_are_recognised(scripted, balancer, http, event, retried):
    """9. TGI's OpenAI routes always say 422: the message tells busy / failed / bad input."""
    doc = json.dumps(event, separators=(",", ":"))
    _bad, bad_url = await scripted(Script(first_event_error=doc))
    good, good_url = await scripted(Script(tokens=2))
    server = await balancer([bad_url, good_url], health_interval_s=60, policy="round-robin")
    statuses = []
    for _ in range(2):  # round robin: one of them starts on the failing replica
        async with http.post(
            f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}
        ) as r:
            statuses.append((r.status, await r.read()))
    relayed_errors = sum(b'"error"' in body for _, body in statuses)
    assert relayed_errors == (0 if retried else 1)
    assert len(good.seen.requests) == (2 if retried else 1)


# ---------------------------------------------------------------- 7. smaller items
async def _raw_exchange(url: str, head: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read(4096)
    finally:
        writer.close()


async def test_an_oversized_body_is_refused_before_100_continue(scripted, balancer):
    replica, url = await scripted(Script(tokens=1))
    server = await balancer([url])
    assert server.config.max_body_bytes == 2_000_000  # TGI's --payload-limit default
    head = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 3000000\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = await _raw_exchange(server.url, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:40]
    assert b"100 Continue" not in answer
    assert b'"error_type": "validation"' in answer
    assert replica.seen.requests == []


async def test_head_health_answers(scripted, balancer, http):
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url])
    async with http.head(f"{server.url}/health") as resp:
        assert resp.status == 200


async def test_the_replica_is_asked_for_an_uncompressed_answer(scripted, balancer, http):
    replica, url = await scripted(Script(tokens=1))
    server = await balancer([url])
    headers = {"Accept-Encoding": "gzip, br"}
    async with http.post(f"{server.url}/generate", json=GEN, headers=headers) as resp:
        assert resp.status == 200
    assert replica.seen.requests[0]["headers"]["Accept-Encoding"] == "identity"


# ---------------------------------------------------------------- 6. the replica's head
async def _raw_replica(answer: bytes) -> tuple[asyncio.Server, str, list[bytes]]:
    """A replica that answers every request with ``answer`` (health checks with 200)."""

    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(answer)

    return await raw_replica(write)


async def test_a_huge_response_header_is_refused_not_buffered(balancer, http):
    big = b"x" * (2 * 1024 * 1024)
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Big: " + big + b"\r\n"
    server_, url, _ = await _raw_replica(answer + b"Content-Length: 2\r\n\r\n{}")
    try:
        server = await balancer([url], retries=0)
        async with http.post(f"{server.url}/generate", json=GEN) as resp:
            assert resp.status == 502
            assert "bad_response" in (await resp.json())["error"]
    finally:
        server_.close()


async def test_trailers_are_not_sent_as_headers(balancer, http):
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"Trailer: X-Checksum\r\n\r\n"
        b"2\r\n{}\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    server_, url, _ = await _raw_replica(answer)
    try:
        server = await balancer([url])
        async with http.post(f"{server.url}/generate", json=GEN) as resp:
            assert resp.status == 200
            assert await resp.read() == b"{}"
            assert "X-Checksum" not in resp.headers
    finally:
        server_.close()


async def test_idle_upstream_connections_are_closed_without_being_reached(
    balancer, http, monkeypatch
):
    import balancer.upstream_http as upstream_http

    monkeypatch.setattr(upstream_http, "IDLE_KEEPALIVE_S", 0.2)
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    server_, url, _ = await _raw_replica(answer)
    try:
        server = await balancer([url])
        async with http.post(f"{server.url}/generate", json=GEN) as resp:
            assert resp.status == 200
        pool = server.balancer.relay.pool
        assert sum(len(v) for v in pool._idle.values()) == 1
        await wait_until(lambda: not any(pool._idle.values()), what="idle reaped")
    finally:
        server_.close()


# ---------------------------------------------------------------- 7. the balancer's own faults
async def test_the_health_checker_survives_an_unexpected_exception(
    scripted, balancer, http, monkeypatch
):
    from balancer.health import HealthChecker

    original = HealthChecker.check_all
    calls = 0

    async def flaky(self):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("a bug in the health checker")
        await original(self)

    monkeypatch.setattr(HealthChecker, "check_all", flaky)
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url])
    r0 = server.registry.get("r0")
    await wait_until(lambda: calls > 3, what="health checks after the failure")
    r0.healthy = False  # as if ejected: only the health checker brings it back
    await wait_until(lambda: r0.healthy, what="re-admitted by the restarted checker")
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    failures = "neuron_fleet_background_task_failures_total"
    assert metric_value(text, failures, task="health-checks") == 1


async def test_a_relay_bug_is_not_blamed_on_the_replica(scripted, balancer, http, monkeypatch):
    from balancer import sse

    original = sse.EventFramer.feed
    fed = 0

    def buggy(self, piece):
        nonlocal fed
        fed += 1
        if fed == 3:  # after the commit: inside the push path
            raise RuntimeError("a bug in the relay")
        return original(self, piece)

    monkeypatch.setattr(sse.EventFramer, "feed", buggy)
    _, url = await scripted(Script(tokens=5, token_delay_s=0.01))
    server = await balancer([url], eject_after_failures=1)
    async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
        await resp.read()
    assert server.registry.get("r0").routable
    assert server.registry.get("r0").consecutive_failures == 0
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_value(
        text, "neuron_fleet_stream_errors_total", replica="r0", reason="relay_error"
    )


def test_the_ejection_budget_scales_with_the_fleet_and_health_returns_it():
    from balancer.config import BalancerConfig
    from balancer.health import HealthChecker
    from balancer.metrics import BalancerMetrics
    from balancer.outlier import OutlierDetector

    registry = Registry(_replicas(6))
    detector = OutlierDetector(registry, BalancerMetrics(registry, lambda: 0), 1, 0.34)
    assert detector.budget == 2  # floor(0.34 x 6); one of three -> at least one
    for r in registry.replicas:
        detector.failed(r, "status_500")
    assert [r.name for r in registry.replicas if not r.healthy] == ["r0", "r1"]
    health = HealthChecker(BalancerConfig(health_rise=1), registry, session=None)  # type: ignore[arg-type]
    health.record(registry.get("r0"), ok=True)
    assert registry.get("r0").healthy and not registry.get("r0").ejected
    detector.failed(registry.get("r2"), "status_500")  # budget freed: r2 goes now
    assert not registry.get("r2").healthy
    assert OutlierDetector(Registry(_replicas(1)), detector.metrics, 1, 0.34).budget == 1


async def test_a_dead_replica_is_retried_on_one_that_is_starting(scripted, balancer, http):
    """The only other replica is restarting: wait for it (in the queue, within the
    request's deadline) rather than answer the dead one's 502."""
    from tests.conftest import free_port

    _, url = await scripted(Script(tokens=2))
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    server = await balancer([dead, url], wait_ready=False, health_interval_s=60)
    r0, r1 = server.registry.get("r0"), server.registry.get("r1")
    await wait_until(lambda: r1.routable, what="r1 healthy")
    r0.healthy = True  # as if it died a moment ago: still routable
    server.registry.set_state(r1, ReplicaState.STARTING)  # restarting

    async def back() -> None:
        await asyncio.sleep(0.3)
        server.registry.set_state(r1, ReplicaState.READY)

    task = asyncio.create_task(back())
    async with http.post(f"{server.url}/generate", json=GEN) as resp:
        assert resp.status == 200
    await task
