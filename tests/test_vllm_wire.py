"""With ``engine = "vllm"`` the balancer speaks vLLM's wire: its own errors in vLLM 0.11's
shape, vLLM's in-stream engine failure retried on another replica, vLLM's /health honoured.

Shapes: vllm 0.11.0 ``entrypoints/openai/protocol.py`` ``ErrorResponse`` and
``serving_engine.py`` ``create_streaming_error_response`` (see balancer/errors.py)."""

from __future__ import annotations

import json

import pytest

from balancer.cli import config_from_args
from balancer.config import BalancerConfig
from tests.conftest import metric_value, read_sse, wait_until
from tests.upstreams import Script

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
ENGINE_DEAD = {
    "error": {
        # vllm 0.11.0 v1/engine/exceptions.py EngineDeadError, as the stream generators send it
        "message": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
}


def assert_vllm_error(doc: dict, status: int) -> str:
    """``doc`` is vLLM's ErrorResponse for ``status``; returns its message."""
    assert set(doc) == {"error"}, doc
    error = doc["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status and error["param"] is None
    assert isinstance(error["type"], str) and error["type"]
    return error["message"]


async def test_engine_death_before_the_first_token_is_retried_and_counted(scripted, balancer, http):
    """vLLM 0.11 reports its engine's death in-stream as a code-400 error event: not the
    client's fault, so it goes to another replica and counts against the one that sent it."""
    dead, dead_url = await scripted(Script(first_event_error=json.dumps(ENGINE_DEAD), space=True))
    good, good_url = await scripted(Script(tokens=3, space=True))
    server = await balancer(
        [dead_url, good_url], engine="vllm", health_interval_s=60, policy="round-robin"
    )
    for _ in range(2):  # round robin: one of the two starts on the dead replica
        async with http.post(f"{server.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
            events = await read_sse(resp)
        assert not any(b'"error"' in e for e in events), events
        assert events[-1] == b"data: [DONE]" and len(events) == 4
    failed = len(dead.seen.requests)
    assert failed >= 1 and len(good.seen.requests) == 2
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "neuron_fleet_retries_total", reason="generation_event") == failed
    assert (
        metric_value(text, "neuron_fleet_upstream_errors_total", replica="r0", kind="error_event")
        == failed
    )


async def test_a_bad_request_error_event_is_still_relayed(scripted, balancer, http):
    """The same code 400 with a message that says what is wrong: the request's error."""
    bad = {"error": {"message": "max_tokens is too large", "type": "BadRequestError"}}
    bad["error"].update(param=None, code=400)
    _, url = await scripted(Script(first_event_error=json.dumps(bad), space=True))
    good, good_url = await scripted(Script(tokens=2, space=True))
    server = await balancer([url, good_url], engine="vllm", policy="round-robin")
    bodies = []
    for _ in range(2):
        async with http.post(f"{server.url}/v1/chat/completions", json=CHAT) as resp:
            bodies.append(await resp.read())
    assert sum(b"max_tokens is too large" in b for b in bodies) == 1
    assert len(good.seen.requests) == 1


async def test_balancer_errors_take_vllms_shape(scripted, balancer, http):
    _, url = await scripted(Script(tokens=2, space=True))
    server = await balancer([url], engine="vllm", max_body_bytes=1000, api_keys=("k",))
    auth = {"Authorization": "Bearer k"}
    async with http.post(
        f"{server.url}/v1/chat/completions",
        data=b"{not json",
        headers={**auth, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        assert "parse" in assert_vllm_error(await resp.json(), 400)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    async with http.post(f"{server.url}/v1/completions", json=big, headers=auth) as resp:
        assert resp.status == 413
        assert_vllm_error(await resp.json(), 413)
    async with http.post(f"{server.url}/v1/completions", json=CHAT) as resp:
        assert resp.status == 401
        assert_vllm_error(await resp.json(), 401)
    async with http.get(f"{server.url}/nowhere", headers=auth) as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        assert_vllm_error(await resp.json(), 404)


async def test_no_replica_and_the_tgi_default(scripted, balancer, http):
    """503 with no ready replica in vLLM's shape; an engine-less balancer keeps TGI's."""
    replica, url = await scripted(Script(tokens=2, space=True))
    vllm = await balancer([url], engine="vllm", health_fall=1, queue_timeout_s=0.3)
    tgi = await balancer([url], health_fall=1, queue_timeout_s=0.3)
    replica.script.healthy = False  # vLLM's /health: 503 with an empty body, engine dead
    await wait_until(lambda: vllm.registry.ready_count() == 0 == tgi.registry.ready_count())
    async with http.post(f"{vllm.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 503
        assert "no replica is ready" in assert_vllm_error(await resp.json(), 503)
        assert resp.headers["Retry-After"]
    async with http.post(f"{tgi.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 503
        doc = await resp.json()
        assert doc["error_type"] == "unavailable" and isinstance(doc["error"], str)


async def test_midstream_failure_ends_with_vllms_error_event(scripted, balancer, http):
    _, url = await scripted(Script(tokens=10, drop_after_tokens=3, space=True))
    server = await balancer([url], engine="vllm")
    async with http.post(f"{server.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        events = await read_sse(resp)
    assert len(events) == 5  # 3 tokens, the error event, [DONE]
    assert events[3].startswith(b'data: {"error": {"message": ')  # json.dumps, as vLLM
    message = assert_vllm_error(json.loads(events[3].removeprefix(b"data: ")), 502)
    assert "failed mid-stream" in message
    assert events[4] == b"data: [DONE]"


def test_engine_is_validated():
    with pytest.raises(ValueError, match="engine must be one of tgi, vllm"):
        BalancerConfig(engine="sglang")
    import argparse

    from balancer.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--upstream", "http://127.0.0.1:1", "--engine", "vllm"])
    assert config_from_args(args).engine == "vllm"
    with pytest.raises(SystemExit):
        parser.parse_args(["--upstream", "http://127.0.0.1:1", "--engine", "sglang"])


async def test_vllms_version_route_passes_through(simulator, balancer, http):
    url = await simulator(engine="vllm", model_id="m")
    server = await balancer([url], engine="vllm")
    async with http.get(f"{server.url}/version") as resp:
        assert resp.status == 200 and await resp.json() == {"version": "0.11.0"}
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "neuron_fleet_requests_total", route="/version", code="200") == 1


async def test_expect_refusal_and_connection_cap_take_vllms_shape(scripted, balancer):
    """The two refusals written outside any handler: the connection cap's 503 and the 413
    before "100 Continue" (aiohttp runs the expect handler before the middlewares)."""
    import asyncio

    from tests.conftest import wait_until
    from tests.test_balancer_review import _raw_exchange

    replica, url = await scripted(Script(tokens=1, space=True))
    server = await balancer([url], engine="vllm", max_connections=1)
    host, port = server.url.removeprefix("http://").split(":")
    _held_reader, held = await asyncio.open_connection(host, int(port))  # the one place
    try:
        await asyncio.sleep(0.1)
        refused = await _raw_exchange(server.url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        held.close()
    assert refused.startswith(b"HTTP/1.1 503"), refused[:40]
    assert_vllm_error(json.loads(refused.partition(b"\r\n\r\n")[2]), 503)
    runner_server = server._runner.server  # the aiohttp server: its open connections
    await wait_until(lambda: not runner_server.connections, what="the held connection closed")
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 3000000\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = await _raw_exchange(server.url, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:40]
    assert_vllm_error(json.loads(answer.partition(b"\r\n\r\n")[2]), 413)
    assert replica.seen.requests == []
