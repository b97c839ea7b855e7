"""Error bodies and error events in TGI's shapes, so clients parse our errors like a replica's.

Non-streaming: ``{"error": "...", "error_type": "..."}`` with an HTTP status.
Streaming, once the response has started (HTTP 200 already sent), errors are events:
TGI routes ``data:{"error":"...","error_type":"..."}``; OpenAI routes
``data:{"error":{"message":"...","http_status_code":N}}`` followed by ``data:[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import HttpVersion11, web

JSON_CONTENT_TYPE = "application/json"


def error_body(message: str, error_type: str) -> bytes:
    return json.dumps({"error": message, "error_type": error_type}).encode()


def json_error(
    status: int,
    message: str,
    error_type: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A TGI-shaped error response."""
    return web.Response(
        status=status,
        body=error_body(message, error_type),
        content_type=JSON_CONTENT_TYPE,
        headers=headers,
    )


def stream_error_event(
    openai: bool, message: str, error_type: str, status: int, data_prefix: bytes = b"data:"
) -> bytes:
    """The event(s) that end a started stream with an explicit error, in the route's format.

    ``data_prefix`` mirrors the upstream's spelling (TGI: ``data:``; vLLM: ``data: ``).
    """
    if openai:
        payload = {"error": {"message": message, "type": error_type, "http_status_code": status}}
        doc = json.dumps(payload, separators=(",", ":")).encode()
        return data_prefix + doc + b"\n\n" + data_prefix + b"[DONE]\n\n"
    doc = json.dumps({"error": message, "error_type": error_type}, separators=(",", ":")).encode()
    return data_prefix + doc + b"\n\n"


async def expect_handler(request: web.Request) -> web.Response | None:
    """aiohttp's default for ``Expect``, except that a body whose Content-Length is over the
    limit gets 413 instead of "100 Continue", and an unknown expectation gets a TGI-shaped
    417: aiohttp answers it in plain text, and fails with an unhandled 500 when the header
    is not valid UTF-8 (its error text cannot be encoded). Pass as ``expect_handler=``."""
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
