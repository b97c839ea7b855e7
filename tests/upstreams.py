"""A scripted upstream for balancer tests: behaves exactly as a test tells it to.

The simulated TGI replica covers TGI's behaviour; this one covers the cases a balancer must
survive from *any* server: vLLM's ``data: `` spelling and missing ``/info``, 5xx answers,
overloaded first events, hangs, connections dropped mid-stream. It records what it received
and how many of its streams are still open, so tests can see cancellations arrive.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Script:
    tokens: int = 5
    token_delay_s: float = 0.0
    first_delay_s: float = 0.0
    status: int = 200
    """Non-200: answer every generation request with this status and a TGI error body."""
    first_event_error: str | None = None
    """Send this error event first on streams (TGI's overloaded quirk), then end."""
    drop_after_tokens: int | None = None
    """Abort the TCP connection after this many tokens (a crash mid-stream)."""
    hang_after_tokens: int | None = None
    """Stop sending (but keep the connection open) after this many tokens."""
    space: bool = False
    """vLLM spelling: ``data: {...}`` instead of TGI's ``data:{...}``."""
    healthy: bool = True
    has_info: bool = True
    poison: str | None = None
    """A prompt containing this fails on this replica as TGI fails a batch: 424 on
    non-streaming routes, an HTTP-200 stream whose first event is TGI's generation error."""
    die_mid_event_after: int | None = None
    """After this many tokens, send half of the next event, then abort the connection."""
    split_events: bool = False
    """Write each event in two pieces cut inside the blank line that ends it."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra response headers (e.g. a huge one)."""


@dataclass
class Observed:
    requests: list[dict[str, Any]] = field(default_factory=list)
    active_streams: int = 0
    cancelled_streams: int = 0
    completed_streams: int = 0


def token_event(i: int, space: bool, openai: bool, last: bool, n: int) -> bytes:
    prefix = b"data: " if space else b"data:"
    if openai:
        doc: dict[str, Any] = {
            "object": "chat.completion.chunk",
            "id": "",
            "created": 0,
            "model": "scripted",
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": f" tok{i}"},
                    "logprobs": None,
                    "finish_reason": "length" if last else None,
                }
            ],
        }
    else:
        doc = {
            "index": i,
            "token": {"id": i, "text": f" tok{i}", "logprob": 0.0, "special": False},
            "generated_text": "".join(f" tok{j}" for j in range(1, n + 1)) if last else None,
            "details": None,
        }
    return prefix + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


class ScriptedReplica:
    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.seen = Observed()

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/generate_stream", "/v1/chat/completions", "/v1/completions", "/generate"):
            app.router.add_post(path, self.generate)
        app.router.add_get("/health", self.health)
        app.router.add_get("/info", self.info)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.script.healthy else 503)

    async def info(self, request: web.Request) -> web.Response:
        if not self.script.has_info:
            raise web.HTTPNotFound()
        return web.json_response({"model_id": "scripted", "max_concurrent_requests": 128})

    async def metrics(self, request: web.Request) -> web.Response:
        text = (
            "# HELP tgi_queue_size Queue size\n# TYPE tgi_queue_size gauge\n"
            f"tgi_queue_size {self.seen.active_streams}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        s = self.script
        body = await request.json()
        self.seen.requests.append(
            {"path": request.path, "headers": dict(request.headers), "body": body}
        )
        if s.status != 200:
            return web.json_response(
                {"error": f"scripted {s.status}", "error_type": "generation"}, status=s.status
            )
        stream = request.path == "/generate_stream" or bool(body.get("stream"))
        openai = request.path.startswith("/v1/")
        if s.poison is not None and s.poison in json.dumps(body):
            return await self._generation_error(request, stream, openai)
        if s.first_delay_s:
            await asyncio.sleep(s.first_delay_s)
        if not stream:
            text = "".join(f" tok{j}" for j in range(1, s.tokens + 1))
            return web.json_response({"generated_text": text})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **s.headers})
        await resp.prepare(request)
        self.seen.active_streams += 1
        prefix = b"data: " if s.space else b"data:"
        try:
            if s.first_event_error is not None:
                await resp.write(prefix + s.first_event_error.encode() + b"\n\n")
                if openai:
                    await resp.write(prefix + b"[DONE]\n\n")
                return resp
            for i in range(1, s.tokens + 1):
                if s.drop_after_tokens is not None and i > s.drop_after_tokens:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if s.hang_after_tokens is not None and i > s.hang_after_tokens:
                    await asyncio.sleep(3600)
                if s.token_delay_s and i > 1:
                    await asyncio.sleep(s.token_delay_s)
                event = token_event(i, s.space, openai, i == s.tokens, s.tokens)
                if s.die_mid_event_after is not None and i > s.die_mid_event_after:
                    await resp.write(event[: len(event) // 2])
                    await asyncio.sleep(0.05)  # let the half event leave on its own
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if s.split_events:
                    await resp.write(event[:-1])
                    await asyncio.sleep(0.01)  # a separate read on the balancer's side
                    await resp.write(event[-1:])
                else:
                    await resp.write(event)
            if openai:
                await resp.write(prefix + b"[DONE]\n\n")
            await resp.write_eof()
            self.seen.completed_streams += 1
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.seen.cancelled_streams += 1
            raise
        finally:
            self.seen.active_streams -= 1

    async def _generation_error(
        self, request: web.Request, stream: bool, openai: bool
    ) -> web.StreamResponse:
        """TGI's answer when the batch failed (text-generation-inference v3.3.7,
        router/src/server.rs and router/src/infer/mod.rs): 424 + ``error_type`` generation;
        on a stream HTTP 200 and the error as its first event (OpenAI routes: always
        ``http_status_code`` 422, then ``[DONE]``)."""
        message = "Request failed during generation: Unexpected <class 'RuntimeError'>: poison"
        if not stream:
            return web.json_response({"error": message, "error_type": "generation"}, status=424)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if openai:
            doc = {"error": {"message": message, "http_status_code": 422}}
            await resp.write(b"data:" + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n")
            await resp.write(b"data:[DONE]\n\n")
        else:
            doc2 = {"error": message, "error_type": "generation"}
            await resp.write(b"data:" + json.dumps(doc2, separators=(",", ":")).encode() + b"\n\n")
        await resp.write_eof()
        return resp


async def raw_replica(
    answer: Callable[[asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, str, list[bytes]]:
    """A replica on a bare socket, for byte-exact answers no HTTP server would write: reads
    each request (head, then a Content-Length body), answers ``GET /health`` with 200 and
    any other request with ``await answer(writer)``. Returns the server, its URL and the
    heads of the requests that were not health checks."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if head.startswith(b"GET /health"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                else:
                    requests.append(head)
                    await answer(writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", requests
