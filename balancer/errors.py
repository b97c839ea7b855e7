"""Error bodies and error events in the engine's shapes, so clients parse ours like a replica's.

TGI (``engine = "tgi"``, the default), text-generation-inference v3.3.7
``router/src/server.rs``:

- non-streaming: ``{"error": "...", "error_type": "..."}`` with an HTTP status;
- streaming, once the response has started (HTTP 200 already sent), errors are events:
  TGI routes ``data:{"error":"...","error_type":"..."}``; OpenAI routes
  ``data:{"error":{"message":"...","http_status_code":N}}`` followed by ``data:[DONE]``.

vLLM (``engine = "vllm"``), vllm 0.11.0:

- non-streaming: ``{"error": {"message", "type", "param", "code"}}``
  (``entrypoints/openai/protocol.py`` ``ErrorResponse`` / ``ErrorInfo``) with ``code`` the
  HTTP status and ``type`` its reason phrase, as vLLM's own ``http_exception_handler``
  writes for errors that are not the model's (``entrypoints/openai/api_server.py``:
  ``type=HTTPStatus(exc.status_code).phrase``);
- streaming: ``data: {"error": {...}}`` then ``data: [DONE]``, serialised by ``json.dumps``
  with its default separators (``serving_engine.py`` ``create_streaming_error_response``;
  ``serving_chat.py`` ``chat_completion_stream_generator`` yields the ``[DONE]``).

The engine is the balancer's (``BalancerConfig.engine``); ``bind_engine`` sets it for the
request being handled, so the many places that refuse a request call ``json_error`` alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextvars import ContextVar
from http import HTTPStatus

from aiohttp import HttpVersion11, web

JSON_CONTENT_TYPE = "application/json"
ENGINE_KEY = web.AppKey("neuron_fleet_engine", str)
"""app[ENGINE_KEY]: the engine whose error shapes this app writes."""
_ENGINE: ContextVar[str] = ContextVar("neuron_fleet_engine", default="tgi")


def bind_engine(request: web.Request) -> None:
    """Write this request's errors in its app's engine's shapes (set by ``create_app``).
    Called first thing for each request: by the first middleware, and by ``expect_handler``,
    which aiohttp runs before the middlewares."""
    _ENGINE.set(request.app.get(ENGINE_KEY, "tgi"))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_body(message: str, error_type: str, status: int, engine: str | None = None) -> bytes:
    """The body of an error response (``engine``: the request's, by default)."""
    if (engine or _ENGINE.get()) == "vllm":
        info = {"message": message, "type": _phrase(status), "param": None, "code": status}
        return json.dumps({"error": info}).encode()
    return json.dumps({"error": message, "error_type": error_type}).encode()


def validation_status(status: int) -> int:
    """The status of a refused request as the engine writes it: TGI answers a request it
    will not serve with 422 (``router/src/server.rs``, ``InferError::ValidationError``);
    vLLM 0.11 with 400 for every validation failure, its own 422s included
    (``entrypoints/openai/api_server.py`` ``validation_exception_handler``;
    ``serving_engine.py`` ``create_error_response`` defaults to BAD_REQUEST), so the openai
    SDK raises ``BadRequestError`` for ours as for a vLLM replica's."""
    return 400 if status == 422 and _ENGINE.get() == "vllm" else status


def json_error(
    status: int,
    message: str,
    error_type: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An error response in the engine's shape (``error_type``: TGI's; vLLM's is the
    status's phrase)."""
    return web.Response(
        status=status,
        body=error_body(message, error_type, status),
        content_type=JSON_CONTENT_TYPE,
        headers=headers,
    )


def stream_error_event(
    openai: bool, message: str, error_type: str, status: int, data_prefix: bytes = b"data:"
) -> bytes:
    """The event(s) that end a started stream with an explicit error, in the route's and
    engine's format.

    ``data_prefix`` mirrors the upstream's spelling (TGI: ``data:``; vLLM: ``data: ``).
    """
    if _ENGINE.get() == "vllm":
        doc = error_body(message, error_type, status, "vllm")
        return data_prefix + doc + b"\n\n" + data_prefix + b"[DONE]\n\n"
    if openai:
        payload = {"error": {"message": message, "type": error_type, "http_status_code": status}}
        doc = json.dumps(payload, separators=(",", ":")).encode()
        return data_prefix + doc + b"\n\n" + data_prefix + b"[DONE]\n\n"
    doc = json.dumps({"error": message, "error_type": error_type}, separators=(",", ":")).encode()
    return data_prefix + doc + b"\n\n"


async def expect_handler(request: web.Request) -> web.Response | None:
    """aiohttp's default for ``Expect``, except that a body whose Content-Length is over the
    limit gets 413 instead of "100 Continue", and an unknown expectation gets a 417 in the
    engine's shape: aiohttp answers it in plain text, and fails with an unhandled 500 when
    the header is not valid UTF-8 (its error text cannot be encoded). Pass as
    ``expect_handler=``."""
    bind_engine(request)
    if request.version != HttpVersion11:
        return None
    if request.headers.get("Expect", "").lower() == "100-continue":
        length, limit = request.content_length, request.client_max_size
        if length is not None and limit and length > limit:
            # Refuse now: "100 Continue" would invite a body we are going to refuse anyway.
            response = json_error(
                413, f"Request body of {length} bytes is over the {limit}-byte limit", "validation"
            )
            response.force_close()  # the client may send the body regardless (RFC 9110 10.1.1)
            return response
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # type: ignore[attr-defined]  # as aiohttp does
        return None
    return json_error(417, "Only `Expect: 100-continue` is supported", "validation")
