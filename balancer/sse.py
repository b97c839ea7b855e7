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
    the HTTP status it would have answered in ``code``. vLLM 0.11's stream generators
    (``serving_chat.py`` ``chat_completion_stream_generator``, ``serving_completion.py``
    ``completion_stream_generator``) catch every exception into such an event with the
    default ``code`` 400 (``BadRequestError``), engine failures included: so a code-400
    event is judged by its message (``_VLLM_GENERATION``), like TGI's 422.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_HELD_BYTES = 1 << 20
"""A partial event larger than this is forwarded as it is (a server that never ends its
events must still stream); framing resumes at the next separator."""

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

_VLLM_GENERATION = "EngineCore encountered an issue"
"""vllm 0.11.0 ``v1/engine/exceptions.py`` ``EngineDeadError``: the engine process died
(the server exits next); every request it held gets this, mid-stream or first."""


def first_event_end(buf: bytes | bytearray) -> int:
    """Index just past the first event that is not only comments, or -1 if none is whole.

    TGI sends a ``:`` keep-alive comment after 15 s without an event, and a Neuron replica can
    take longer than that to start a request (a queue of 16k-token prefills): the first event
    that says something may follow one or more of them.
    """
    return FirstEventScanner().end(buf)


class FirstEventScanner:
    """``first_event_end`` for a buffer that only grows: each call scans only the bytes added
    since the last one (plus a separator's length), so a large first event arriving in small
    reads costs linear time, not quadratic."""

    __slots__ = ("pos", "scan")

    def __init__(self) -> None:
        self.pos = 0
        """Where the first event not yet known to be only comments starts."""
        self.scan = 0
        """Where the search for its end resumes."""

    def end(self, buf: bytes | bytearray) -> int:
        """As ``first_event_end(buf)``; ``buf`` must start with what earlier calls saw."""
        pos = self.pos
        while True:
            start = max(pos, self.scan)
            lf, crlf = buf.find(b"\n\n", start), buf.find(b"\r\n\r\n", start)
            if lf < 0 and crlf < 0:
                self.pos = pos
                self.scan = max(pos, len(buf) - 3)  # a separator may be cut by the read
                return -1
            end = lf + 2 if crlf < 0 or 0 <= lf < crlf else crlf + 4
            lines = buf[pos:end].splitlines()
            if any(line and not line.startswith(b":") for line in lines):
                self.pos = pos
                return end
            pos = self.scan = end


def separator_of(first: bytes) -> bytes:
    """The event separator a stream uses, judged from its first event."""
    return b"\r\n\r\n" if b"\r\n\r\n" in first and b"\n\n" not in first else b"\n\n"


class EventFramer:
    """Cuts a byte stream at event boundaries.

    The held start of an unfinished event is kept as a list of pieces and each new piece is
    searched alone (plus the ``len(sep) - 1`` bytes before it when it may finish a separator
    split across two reads), so a large event arriving in small reads costs linear time.
    The common case, a read that ends where an event ends, returns the piece itself."""

    __slots__ = ("held", "held_bytes", "passthrough", "sep", "tail")

    def __init__(self, sep: bytes = b"\n\n") -> None:
        self.sep = sep
        self.held: list[bytes] = []
        """The start of an event whose end has not arrived yet, as it came; in passthrough
        ``[b""]``, so the common case below never skips the passthrough checks."""
        self.held_bytes = 0
        self.passthrough = False
        """An event grew over ``MAX_HELD_BYTES``: its start went out unframed, and its
        pieces follow as they come until a separator ends it."""
        self.tail = b""
        """In passthrough: the last ``len(sep) - 1`` bytes forwarded."""

    def feed(self, piece: bytes) -> bytes:
        """The whole events ``piece`` completes (possibly empty); keeps the rest back."""
        sep = self.sep
        if not self.held and piece.endswith(sep):
            return piece  # the common case: a read ends where an event ends (no copy)
        held = self.held
        last = piece.rfind(sep)
        if last >= 0:
            cut = last + len(sep)
        elif piece and piece[0] in sep and held:  # may end a separator cut by the read
            cut = self._split_separator_end(piece)
            if cut < 0:
                return self._inside_event(piece)
        else:
            return self._inside_event(piece)
        if self.passthrough:
            self.passthrough = False
            held = []
        if cut == len(piece):
            if held:
                held.append(piece)
                piece = b"".join(held)
                self.held = []
                self.held_bytes = 0
            return piece
        rest = piece[cut:]
        if held:
            held.append(piece[:cut])
            done = b"".join(held)
        else:
            done = piece[:cut]
        self.held = [rest]
        self.held_bytes = len(rest)
        return done

    def _split_separator_end(self, piece: bytes) -> int:
        """Index in ``piece`` just past a separator that began in the previous read, or -1."""
        keep = len(self.sep) - 1
        if self.passthrough:
            before = self.tail
        else:
            before = b""
            for earlier in reversed(self.held):
                before = earlier + before
                if len(before) >= keep:
                    break
            before = before[-keep:]
        last = (before + piece[:keep]).rfind(self.sep)
        return last + len(self.sep) - len(before) if last >= 0 else -1

    def _inside_event(self, piece: bytes) -> bytes:
        """``piece`` neither ends nor completes an event: hold it, or pass it on."""
        if self.passthrough:
            keep = len(self.sep) - 1
            self.tail = piece[-keep:] if len(piece) >= keep else (self.tail + piece)[-keep:]
            return piece
        if piece:
            self.held.append(piece)
            self.held_bytes += len(piece)
        if self.held_bytes <= MAX_HELD_BYTES:
            return b""
        out = self.flush()
        self.passthrough = True
        self.held = [b""]
        self.tail = out[1 - len(self.sep) :]
        return out

    @property
    def mid_event(self) -> bool:
        """The client got part of an event (framing gave up): end it before adding one."""
        return self.passthrough

    def flush(self) -> bytes:
        """What is held at the end of the stream (a last event without its blank line)."""
        held = self.held
        self.held = []
        self.held_bytes = 0
        return held[0] if len(held) == 1 else b"".join(held)


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
    elif code == 400 and (message.startswith(_VLLM_GENERATION) or not message):
        # vLLM's catch-all 400: an engine death, or (empty message) ``EngineGenerateError``,
        # an unexpected failure in ``AsyncLLM.generate`` (vllm 0.11.0 v1/engine/async_llm.py,
        # raised without a message). A bad request always says what is wrong.
        return ErrorEvent(GENERATION, message)
    return ErrorEvent(CLIENT, message)
