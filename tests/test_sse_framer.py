"""balancer/sse.py's framing: whole events only, in linear time, and framing that resumes
after an event too large to hold (review finding 9)."""

from __future__ import annotations

import asyncio
import json
import random

import openai
import pytest

from balancer.sse import MAX_HELD_BYTES, EventFramer, FirstEventScanner, first_event_end
from tests.upstreams import raw_replica

pytestmark = pytest.mark.timeout(60)


def _stream(rng: random.Random, sep: bytes, n: int) -> bytes:
    events = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.1:
            events.append(b": keep-alive")
        else:
            text = "".join(rng.choice("ab \n\r") for _ in range(rng.randint(0, 12)))
            events.append(b"data:" + json.dumps({"token": {"text": text}}).encode())
    return b"".join(e + sep for e in events)


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
def test_the_framer_forwards_exactly_the_whole_events_so_far(sep: bytes) -> None:
    """Random streams cut at random places (separators split across reads, many events per
    read, one byte per read): after each read the output is every whole event so far."""
    rng = random.Random(7)
    for _ in range(200):
        data = _stream(rng, sep, rng.randint(1, 20)) + b'data:{"partial'
        framer = EventFramer(sep)
        out, pos = b"", 0
        while pos < len(data):
            step = rng.choice((1, 2, 3, 5, 17, 64, 1000))
            piece, pos = data[pos : pos + step], pos + step
            got = framer.feed(piece)
            out += got
            assert out == data[: data[:pos].rfind(sep) + len(sep)] if sep in data[:pos] else not out
        assert out + framer.flush() == data
        assert not framer.mid_event


def test_framing_resumes_after_an_event_over_the_limit() -> None:
    """The reviewer's case: after one event over MAX_HELD_BYTES, later events are framed
    again, so a stream cut mid-event never sends the client half an event."""
    framer = EventFramer(b"\n\n")
    big = b"data:" + b"x" * (MAX_HELD_BYTES + 10) + b"\n\n"
    first = framer.feed(big[: MAX_HELD_BYTES + 5])
    assert first == big[: MAX_HELD_BYTES + 5] and framer.mid_event  # went out unframed
    assert framer.feed(big[MAX_HELD_BYTES + 5 : -1]) == big[MAX_HELD_BYTES + 5 : -1]
    assert framer.feed(b"\n") == b"\n"  # the separator split across reads ends it
    assert not framer.mid_event
    small = b'data:{"token":{"text":" hi"}}\n\n'
    assert framer.feed(small) == small
    assert framer.feed(small[:12]) == b""  # half an event is held again
    assert framer.flush() == small[:12]


def test_passthrough_ends_inside_a_piece_and_holds_what_follows() -> None:
    framer = EventFramer(b"\n\n")
    framer.feed(b"data:" + b"x" * (MAX_HELD_BYTES + 1))
    assert framer.mid_event
    assert framer.feed(b'yy\n\ndata:{"a":1}\n\ndata:{"b') == b'yy\n\ndata:{"a":1}\n\n'
    assert not framer.mid_event and framer.flush() == b'data:{"b'


def test_the_first_event_scanner_matches_a_full_scan() -> None:
    rng = random.Random(11)
    for _ in range(200):
        sep = rng.choice((b"\n\n", b"\r\n\r\n"))
        data = b": ping" + sep + b": ping" + sep + _stream(rng, sep, 3)
        scanner = FirstEventScanner()
        buf = bytearray()
        pos = 0
        while pos < len(data):
            step = rng.choice((1, 2, 3, 7, 50))
            buf += data[pos : pos + step]
            pos += step
            assert scanner.end(buf) == first_event_end(bytes(buf))
        assert scanner.end(buf) == first_event_end(data) >= 0


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _chat_chunk(text: str) -> bytes:
    doc = {
        "id": "1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


async def test_openai_sdk_gets_an_api_error_when_a_stream_dies_after_a_huge_event(balancer):
    """A replica streams a chat chunk over 1 MiB, then small ones, then dies in the middle of
    one (a chunked body cut short). The openai SDK must see our error event (APIError), not
    half an event glued to it (a JSON error)."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        writer.write(_chunk(_chat_chunk("hello")))
        huge = _chat_chunk("x" * (MAX_HELD_BYTES + 100_000))
        for i in range(0, len(huge), 65536):
            writer.write(_chunk(huge[i : i + 65536]))
            await writer.drain()
        for _ in range(3):
            writer.write(_chunk(_chat_chunk(" more")))
        writer.write(_chunk(_chat_chunk(" cut")[:20]))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()

    server_, url, _ = await raw_replica(answer)
    try:
        server = await balancer([url], retries=0)
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        texts = []
        with pytest.raises(openai.APIError) as excinfo:
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            async for chunk in stream:
                texts.append(chunk.choices[0].delta.content)
        assert not isinstance(excinfo.value, openai.APIConnectionError)
        assert texts[0] == "hello" and len(texts[1]) == MAX_HELD_BYTES + 100_000
        assert texts[2:] == [" more"] * 3
        await client.close()
    finally:
        server_.close()
