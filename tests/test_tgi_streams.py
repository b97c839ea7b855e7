"""Recorded TGI v3.3.7 byte streams (tests/tgi_streams.py) replayed through the balancer."""

from __future__ import annotations

import asyncio

import pytest

from tests import tgi_streams as tgi
from tests.conftest import metric_value
from tests.upstreams import raw_replica

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n"
)


async def replay(body: bytes, stride: int | None = None) -> tuple[asyncio.Server, str, list]:
    """A replica that answers every generation request with ``body`` as TGI frames it
    (chunked), cut into ``stride``-byte pieces written one by one."""

    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        step = stride or len(body)
        for at in range(0, len(body), step):
            piece = body[at : at + step]
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.001)  # separate reads on the balancer's side
        writer.write(b"0\r\n\r\n")

    return await raw_replica(write)


NATIVE = ("/generate_stream", {"inputs": "What is Deep Learning?", "parameters": {}})
CHAT = (
    "/v1/chat/completions",
    {"messages": [{"role": "user", "content": "What is Deep Learning?"}], "stream": True},
)


@pytest.mark.parametrize("stride", [None, 7, 1])
@pytest.mark.parametrize(
    ("recorded", "route", "tokens"),
    [
        (tgi.GENERATE_STREAM, NATIVE, tgi.GENERATE_STREAM_TOKENS),
        (tgi.CHAT_STREAM, CHAT, tgi.CHAT_STREAM_TOKENS),
        (b":\n\n" + tgi.CHAT_STREAM, CHAT, tgi.CHAT_STREAM_TOKENS),  # a keep-alive first
    ],
    ids=["generate_stream", "chat", "keepalive-then-chat"],
)
async def test_a_recorded_stream_is_relayed_byte_for_byte_and_counted(
    balancer, http, recorded, route, tokens, stride
):
    upstream, url, _ = await replay(recorded, stride)
    try:
        server = await balancer([url])
        path, body = route
        async with http.post(f"{server.url}{path}", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert await resp.read() == recorded
        async with http.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
        assert metric_value(text, "neuron_fleet_output_tokens_total", replica="r0") == tokens
        assert metric_value(text, "neuron_fleet_upstream_errors_total", kind="error_event") == 0
    finally:
        upstream.close()


@pytest.mark.parametrize(
    ("recorded", "route", "retried"),
    [
        (tgi.OVERLOADED_NATIVE, NATIVE, True),
        (tgi.OVERLOADED_CHAT, CHAT, True),
        (tgi.GENERATION_ERROR_NATIVE, NATIVE, True),
        (tgi.GENERATION_ERROR_CHAT, CHAT, True),
        (tgi.VALIDATION_ERROR_CHAT, CHAT, False),
        (tgi.KEEPALIVE_THEN_GENERATION_ERROR_CHAT, CHAT, True),
    ],
    ids=[
        "overloaded",
        "overloaded-chat",
        "generation",
        "generation-chat",
        "validation-chat",
        "keepalive-then-generation-chat",
    ],
)
async def test_a_recorded_first_event_error_is_retried_or_relayed(
    balancer, http, recorded, route, retried
):
    good_stream = tgi.GENERATE_STREAM if route is NATIVE else tgi.CHAT_STREAM
    bad, bad_url, bad_seen = await replay(recorded, 11)
    good, good_url, good_seen = await replay(good_stream)
    try:
        server = await balancer([bad_url, good_url], policy="round-robin", health_interval_s=60)
        path, body = route
        answers = []
        for _ in range(2):  # round robin: one of the two starts on the failing replica
            async with http.post(f"{server.url}{path}", json=body) as resp:
                assert resp.status == 200
                answers.append(await resp.read())
        if retried:  # both may start on the failing replica: each ends on the good one
            assert answers == [good_stream, good_stream]
            assert len(good_seen) == 2 and len(bad_seen) >= 1
        else:  # a bad request is the client's answer: relayed as it came, never retried
            assert sorted(answers) == sorted([recorded, good_stream])
            assert len(good_seen) == 1 and len(bad_seen) == 1
    finally:
        bad.close()
        good.close()


async def test_a_recorded_mid_stream_error_is_relayed_as_it_came(balancer, http):
    upstream, url, _ = await replay(tgi.MID_STREAM_GENERATION_ERROR_NATIVE, 5)
    try:
        server = await balancer([url])
        async with http.post(f"{server.url}{NATIVE[0]}", json=NATIVE[1]) as resp:
            assert await resp.read() == tgi.MID_STREAM_GENERATION_ERROR_NATIVE
        async with http.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
        assert metric_value(text, "neuron_fleet_output_tokens_total", replica="r0") == 2
        assert metric_value(text, "neuron_fleet_upstream_errors_total", kind="error_event") == 1
    finally:
        upstream.close()


async def test_the_openai_sdk_reads_a_recorded_chat_stream_through_the_balancer(balancer):
    import openai

    upstream, url, _ = await replay(tgi.CHAT_STREAM, 3)
    try:
        server = await balancer([url])
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
        stream = await client.chat.completions.create(
            model="tgi", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        text, reasons = "", []
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reasons.append(chunk.choices[0].finish_reason)
        assert text == " Deep learning is" and reasons[-1] == "stop"
        await client.close()
    finally:
        upstream.close()
