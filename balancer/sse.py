"""Server-sent events as the relay needs them: where events end, and what an error event says.

The relay forwards a replica's bytes unparsed, but it must know two things about them:

- **Event boundaries.** A piece read from the socket can end in the middle of an event. The
  ``EventFramer`` forwards only whole events and holds a partial one back until the rest
  arrives, so a stream cut mid-event never reaches the client as half an event glued to our
  error event (the openai SDK would raise ``JSONDecodeError`` instead of ``APIError``), and
  token events are counted exactly even when a separator is split across two reads.
- **Error events.** TGI answers a stream with HTTP 200 and reports failures as events. What
  they look like, in text-generation-inference v3.3.7 (the ``latest-neuron`` image's
  router; ``router/src/infer/mod.rs`` ``InferError`` / ``into_openai_event`` and
  ``router/src/server.rs`` ``impl From<InferError> for Event``):

  * ``/generate_stream``: ``data:{"error":"Model is overloaded","error_type":"overloaded"}``
    (``error_type`` one of generation, overloaded, validation, incomplete_generation,
    incomplete_generation_stream, template_error, missing_template_variable, tool_error,
    stream_serialization_error);
  * OpenAI routes: ``data:{"error":{"message":"Model is overloaded","http_status_code":422}}``:
    always 422 and no type, so only the message tells an overloaded replica
    ("Model is overloaded") or a failed batch ("Request failed during generation: ...")
    from a bad request ("Input validation error: ...");
  * vLLM's OpenAI server (``create_streaming_error_response`` in
    ``vllm/entrypoints/openai/serving_engine.py``, ``engine/serving.py`` in newer
    releases): ``data: {"error":{"message":..,"type":..,"param":..,"code":N}}``, with
    the HTTP status it would have answered in ``code``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_HELD_BYTES = 1 << 20
"""A partial event larger than this is forwarded as it is (a server that never ends its
events must still stream); from then on the framer no longer holds bytes back."""

OVERLOADED = "overloaded"
GENERATION = "generation"
CLIENT = "client"
"""Verdicts on an error event: busy (retry elsewhere, not a failure), the replica failed
this request (retry elsewhere, a failure), or the request itself is wrong (relay it)."""

_TGI_TYPES = {
    "overloaded": OVERLOADED,
    "generation": GENERATION,
    "incomplete_generation": GENERATION,
    "incomplete_generation_stream": GENERATION,
    "stream_serialization_error": GENERATION,
}
_TGI_MESSAGES = (
    # InferError's Display strings (thiserror #[error(...)]), v3.3.7 router/src/infer/mod.rs.
    ("Model is overloaded", OVERLOADED),
    ("Request failed during generation", GENERATION),
    ("Incomplete generation", GENERATION),  # also "Incomplete generation stream"
    ("Stream event serialization error", GENERATION),
)


def first_event_end(buf: bytes) -> int:
    """Index just past the first event that is not only comments, or -1 if none is whole.

    TGI sends a ``:`` keep-alive comment after 15 s without an event, and a Neuron replica can
    take longer than that to start a request (a queue of 16k-token prefills): the first event
    that says something may follow one or more of them.
    """
    pos = 0
    while True:
        lf, crlf = buf.find(b"\n\n", pos), buf.find(b"\r\n\r\n", pos)
        if lf < 0 and crlf < 0:
            return -1
        end = lf + 2 if crlf < 0 or 0 <= lf < crlf else crlf + 4
        lines = buf[pos:end].splitlines()
        if any(line and not line.startswith(b":") for line in lines):
            return end
        pos = end


def separator_of(first: bytes) -> bytes:
    """The event separator a stream uses, judged from its first event."""
    return b"\r\n\r\n" if b"\r\n\r\n" in first and b"\n\n" not in first else b"\n\n"


class EventFramer:
    """Cuts a byte stream at event boundaries; counts events on the way."""

    __slots__ = ("held", "passthrough", "sep")

    def __init__(self, sep: bytes = b"\n\n") -> None:
        self.sep = sep
        self.held = b""
        """The start of an event whose end has not arrived yet."""
        self.passthrough = False

    def feed(self, piece: bytes) -> bytes:
        """The whole events ``piece`` completes (possibly empty); keeps the rest back."""
        sep = self.sep
        if not self.held and piece.endswith(sep):
            return piece  # the common case: a read ends where an event ends (no copy)
        if self.passthrough:
            return piece
        data = self.held + piece if self.held else piece
        cut = data.rfind(sep)
        if cut < 0:
            if len(data) > MAX_HELD_BYTES:
                self.passthrough = True
                self.held = b""
                return data
            self.held = data
            return b""
        cut += len(sep)
        self.held = data[cut:]
        return data[:cut]

    @property
    def mid_event(self) -> bool:
        """The client got part of an event (framing gave up): end it before adding one."""
        return self.passthrough

    def flush(self) -> bytes:
        """What is held at the end of the stream (a last event without its blank line)."""
        held, self.held = self.held, b""
        return held


@dataclass(frozen=True)
class ErrorEvent:
    verdict: str
    """OVERLOADED, GENERATION or CLIENT."""
    message: str


def parse_error_event(event: bytes) -> ErrorEvent | None:
    """What the first event of ``event`` that is not a comment reports, if it is an error
    event in TGI's or vLLM's shape."""
    for candidate in event.replace(b"\r\n", b"\n").split(b"\n\n"):
        if any(line and not line.startswith(b":") for line in candidate.split(b"\n")):
            event = candidate  # the first event that is not a keep-alive comment
            break
    else:
        return None
    payload = b"".join(line[5:] for line in event.splitlines() if line.startswith(b"data:")).strip()
    if not payload.startswith(b"{"):
        return None
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(doc, dict) or "error" not in doc:
        return None
    error = doc["error"]
    if isinstance(error, str):  # TGI's native routes
        kind = doc.get("error_type")
        return ErrorEvent(_TGI_TYPES.get(kind, CLIENT) if isinstance(kind, str) else CLIENT, error)
    if not isinstance(error, dict):
        return None
    message = str(error.get("message", ""))
    code = error.get("code", error.get("http_status_code"))
    if code == 429:
        return ErrorEvent(OVERLOADED, message)
    if isinstance(code, int) and (code >= 500 or code == 424):
        return ErrorEvent(GENERATION, message)
    if "http_status_code" in error:  # TGI's OpenAI routes: always 422, the message decides
        for prefix, verdict in _TGI_MESSAGES:
            if message.startswith(prefix):
                return ErrorEvent(verdict, message)
    return ErrorEvent(CLIENT, message)
