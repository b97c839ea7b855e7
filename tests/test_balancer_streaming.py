"""Streaming through the balancer: bytes unchanged, retries before the first byte only,
explicit error events after it, and cancellation that reaches the replica."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.conftest import metric_value, read_sse, wait_until
from tests.upstreams import Script

CHAT = {"model": "tgi", "messages": [{"role": "user", "content": "hi"}], "stream": True}
GEN = {"inputs": "hello", "parameters": {"max_new_tokens": 5}}


async def test_stream_is_relayed_byte_for_byte(scripted, balancer, http):
    _, url = await scripted(Script(tokens=7))
    server = await balancer([url])
    async with http.post(f"{url}/generate_stream", json=GEN) as direct:
        expected = await direct.read()
    async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        got = await resp.read()
    assert got == expected
    assert got.count(b"\n\n") == 7


async def test_vllm_spelling_and_no_info_route(scripted, balancer, http):
    _, url = await scripted(Script(tokens=3, space=True, has_info=False))
    server = await balancer([url])
    async with http.post(f"{server.url}/v1/chat/completions", json=CHAT) as resp:
        events = await read_sse(resp)
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: ") for e in events)
    async with http.get(f"{server.url}/info") as resp:
        assert resp.status == 404  # passed through: the replica has no /info


async def test_events_arrive_one_by_one_not_buffered(scripted, balancer, http):
    _, url = await scripted(Script(tokens=4, token_delay_s=0.3))
    server = await balancer([url])
    async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
        first = await resp.content.readuntil(b"\n\n")
        # The first event is here while the upstream still has 0.9 s of tokens to send.
        assert b'"index":1' in first
        assert not resp.content.at_eof()
        rest = await resp.read()
    assert rest.count(b"\n\n") == 3


async def test_retry_on_5xx_goes_to_another_replica(scripted, balancer, http):
    bad, bad_url = await scripted(Script(status=503))
    good, good_url = await scripted(Script(tokens=2))
    server = await balancer([bad_url, good_url], eject_after_failures=100)
    for _ in range(4):
        async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
            assert resp.status == 200
            assert len(await read_sse(resp)) == 2
    assert len(good.seen.requests) == 4
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "neuron_fleet_retries_total", reason="status_503") == len(
        bad.seen.requests
    )


async def test_overloaded_first_event_is_retried(scripted, balancer, http):
    _busy, busy_url = await scripted(
        Script(first_event_error='{"error":"Model is overloaded","error_type":"overloaded"}')
    )
    ok, ok_url = await scripted(Script(tokens=3))
    server = await balancer([busy_url, ok_url])
    for _ in range(3):
        async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
            events = await read_sse(resp)
        assert not any(b"overloaded" in e for e in events)
        assert len(events) == 3
    assert len(ok.seen.requests) == 3


async def test_connection_refused_is_retried(scripted, balancer, http):
    from tests.conftest import free_port

    dead_url = f"http://127.0.0.1:{free_port()}"
    _, url = await scripted(Script(tokens=2))
    server = await balancer([url], wait_ready=True)
    # Add the dead replica as ready+healthy, as if it crashed after its last health check.
    from balancer.upstream import Replica, ReplicaState

    dead = Replica("dead", dead_url, state=ReplicaState.READY, healthy=True)
    server.registry.add(dead)
    for _ in range(4):
        async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
            assert resp.status == 200
            assert len(await read_sse(resp)) == 2
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "neuron_fleet_retries_total", reason="connect_error") >= 1


async def test_midstream_failure_ends_with_error_event_openai(scripted, balancer, http):
    _, url = await scripted(Script(tokens=10, drop_after_tokens=3, space=True))
    server = await balancer([url])
    async with http.post(f"{server.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        events = await read_sse(resp)
    assert len(events) == 5  # 3 tokens, the error event, [DONE]
    error = json.loads(events[3].removeprefix(b"data: "))
    assert "failed mid-stream" in error["error"]["message"]
    assert events[4] == b"data: [DONE]"
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "neuron_fleet_stream_errors_total", replica="r0") == 1


async def test_midstream_failure_ends_with_error_event_tgi(scripted, balancer, http):
    _, url = await scripted(Script(tokens=10, drop_after_tokens=2))
    server = await balancer([url])
    async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
        events = await read_sse(resp)
    assert len(events) == 3
    error = json.loads(events[2].removeprefix(b"data:"))
    assert error["error_type"] == "incomplete_generation_stream"


async def test_idle_upstream_is_cut_with_error_event(scripted, balancer, http):
    _, url = await scripted(Script(tokens=10, hang_after_tokens=2))
    server = await balancer([url], idle_timeout_s=0.5)
    async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
        events = await read_sse(resp)
    assert len(events) == 3
    assert b"idle_timeout" in events[2]


async def test_first_byte_timeout_answers_504(scripted, balancer, http):
    _, url = await scripted(Script(first_delay_s=5))
    server = await balancer([url], first_byte_timeout_s=0.3, retries=0)
    async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
        assert resp.status == 504
        body = await resp.json()
    assert body["error_type"] == "timeout"


async def test_client_disconnect_mid_stream_cancels_upstream(scripted, balancer):
    replica, url = await scripted(Script(tokens=1000, token_delay_s=0.02))
    server = await balancer([url])
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{server.url}/generate_stream", json=GEN)
        await resp.content.readuntil(b"\n\n")
        resp.close()  # the client leaves mid-stream
    await wait_until(lambda: replica.seen.cancelled_streams == 1, what="upstream cancelled")
    await wait_until(lambda: server.balancer.inflight == 0, what="slot released")
    assert replica.seen.active_streams == 0


async def test_client_disconnect_while_waiting_first_byte(scripted, balancer):
    _replica, url = await scripted(Script(first_delay_s=30))
    server = await balancer([url])
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(session.post(f"{server.url}/generate_stream", json=GEN))
        await wait_until(lambda: server.balancer.inflight == 1, what="request in flight")
        task.cancel()
    await wait_until(lambda: server.balancer.inflight == 0, what="slot released")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
    assert (
        metric_value(text, "neuron_fleet_client_disconnects_total", stage="waiting_first_byte") == 1
    )


async def test_request_headers(scripted, balancer, http):
    replica, url = await scripted(Script(tokens=1))
    server = await balancer([url])
    headers = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "x-request-id": "abc-123",
        "X-Forwarded-For": "10.9.9.9",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "drop me",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
    }
    async with http.post(f"{server.url}/generate", json=GEN, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"] == "abc-123"
    seen = {k.lower(): v for k, v in replica.seen.requests[0]["headers"].items()}
    assert seen["traceparent"] == headers["traceparent"]
    assert seen["x-request-id"] == "abc-123"
    assert seen["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert "x-secret-hop" not in seen
    assert "proxy-authorization" not in seen
    async with http.post(f"{server.url}/generate", json=GEN) as resp:
        generated = resp.headers["x-request-id"]
    assert len(generated) == 32
    seen = {k.lower(): v for k, v in replica.seen.requests[1]["headers"].items()}
    assert seen["x-request-id"] == generated


async def test_client_disconnect_while_queued_frees_its_place(scripted, balancer):
    replica, url = await scripted(Script(tokens=1000, token_delay_s=0.02))
    server = await balancer([url], max_inflight_per_replica=1)
    async with aiohttp.ClientSession() as session:
        held = await session.post(f"{server.url}/generate_stream", json=GEN)
        await held.content.readuntil(b"\n\n")
        task = asyncio.ensure_future(session.post(f"{server.url}/generate_stream", json=GEN))
        await wait_until(lambda: server.balancer.admission.queue_depth == 1, what="queued")
        task.cancel()
        await wait_until(lambda: server.balancer.admission.queue_depth == 0, what="dequeued")
        held.close()
    await wait_until(lambda: server.balancer.inflight == 0, what="slot released")
    assert len(replica.seen.requests) == 1  # the queued request never reached the replica
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
    assert metric_value(text, "neuron_fleet_client_disconnects_total", stage="queued") == 1


async def test_error_event_relayed_on_the_last_attempt_is_counted_once(scripted, balancer, http):
    _, url = await scripted(
        Script(first_event_error='{"error":"Model is overloaded","error_type":"overloaded"}')
    )
    server = await balancer([url], retries=0)
    async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
        events = await read_sse(resp)
    assert b"overloaded" in events[0]  # nothing left to retry on: relayed as TGI sent it
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert (
        metric_value(text, "neuron_fleet_upstream_errors_total", replica="r0", kind="error_event")
        == 1
    )
