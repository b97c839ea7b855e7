"""Byte streams a real TGI replica sends, written down from its source (not invented).

text-generation-inference v3.3.7 (the version of the ``latest-neuron`` image), with
axum's SSE encoder:

- each event is ``data:`` + compact JSON (serde field order) + ``\\n\\n``, no space after
  the colon; axum's ``KeepAlive::new()`` sends ``:\\n\\n`` after 15 s of silence
  (axum 0.7 ``response/sse.rs``, 0.7.9 in TGI v3.3.7's Cargo.lock; TGI enables it with
  ``KeepAlive::default()``,
  router/src/server.rs);
- ``/generate_stream``: ``StreamResponse {index, token {id, text, logprob, special},
  [top_tokens], generated_text, details}``, details ``{finish_reason, generated_tokens, seed,
  input_length}`` on the last event only (router/src/lib.rs); no ``[DONE]``;
- ``/v1/chat/completions``: ``CompletionType`` is tagged by ``object`` first, then
  ``ChatCompletionChunk {id, created, model, system_fingerprint, choices [{index, delta
  {role, content}, logprobs, finish_reason}], usage}``; ``system_fingerprint`` is
  ``<version>-native``; the end is ``data:[DONE]`` (router/src/server.rs, lib.rs);
- errors (router/src/server.rs ``impl From<InferError> for Event``, router/src/infer/mod.rs
  ``into_openai_event``): native ``{"error":..,"error_type":..}``; OpenAI
  ``{"error":{"message":..,"http_status_code":422}}`` then ``[DONE]``. The Neuron backend
  sends logprob 0 for every token and no seed (backends/neuron/server/.../generator.py).
"""

from __future__ import annotations

FINGERPRINT = b"3.3.7-native"


def _chat_chunk(content: str, finish: str | None) -> bytes:
    reason = b"null" if finish is None else b'"' + finish.encode() + b'"'
    return (
        b'data:{"object":"chat.completion.chunk","id":"","created":1736186222,'
        b'"model":"/data/llama3-8b-neuron","system_fingerprint":"' + FINGERPRINT + b'",'
        b'"choices":[{"index":0,"delta":{"role":"assistant","content":"'
        + content.encode()
        + b'"},"logprobs":null,"finish_reason":'
        + reason
        + b'}],"usage":null}\n\n'
    )


GENERATE_STREAM = (
    b'data:{"index":1,"token":{"id":15836,"text":" Deep","logprob":0.0,"special":false},'
    b'"generated_text":null,"details":null}\n\n'
    b'data:{"index":2,"token":{"id":6975,"text":" learning","logprob":0.0,"special":false},'
    b'"generated_text":null,"details":null}\n\n'
    b":\n\n"  # axum's keep-alive after 15 s of silence (a long prefill of a newcomer)
    b'data:{"index":3,"token":{"id":374,"text":" is","logprob":0.0,"special":false},'
    b'"generated_text":" Deep learning is","details":{"finish_reason":"length",'
    b'"generated_tokens":3,"seed":null,"input_length":6}}\n\n'
)
GENERATE_STREAM_TOKENS = 3

CHAT_STREAM = (
    _chat_chunk(" Deep", None)
    + _chat_chunk(" learning", None)
    + _chat_chunk(" is", None)
    + _chat_chunk("", "stop")
    + b'data:{"object":"chat.completion.chunk","id":"","created":1736186222,'
    b'"model":"/data/llama3-8b-neuron","system_fingerprint":"3.3.7-native","choices":[],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16}}\n\n'
    b"data:[DONE]\n\n"
)
CHAT_STREAM_TOKENS = 4
"""The four chunks with a choice (the last one carries the eos token's empty text)."""

OVERLOADED_NATIVE = b'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\n'
OVERLOADED_CHAT = (
    b'data:{"error":{"message":"Model is overloaded","http_status_code":422}}\n\ndata:[DONE]\n\n'
)
GENERATION_ERROR_CHAT = (
    b'data:{"error":{"message":"Request failed during generation: Unexpected <class '
    b'\'RuntimeError\'>: NRT failure","http_status_code":422}}\n\n'
    b"data:[DONE]\n\n"
)
GENERATION_ERROR_NATIVE = (
    b'data:{"error":"Request failed during generation: Unexpected <class \'RuntimeError\'>'
    b': NRT failure","error_type":"generation"}\n\n'
)
VALIDATION_ERROR_CHAT = (
    b'data:{"error":{"message":"Input validation error: `inputs` tokens + `max_new_tokens` '
    b'must be <= 4096. Given: 4000 `inputs` tokens and 200 `max_new_tokens`",'
    b'"http_status_code":422}}\n\n'
    b"data:[DONE]\n\n"
)
MID_STREAM_GENERATION_ERROR_NATIVE = GENERATE_STREAM.split(b":\n\n")[0] + GENERATION_ERROR_NATIVE

KEEPALIVE_THEN_GENERATION_ERROR_CHAT = b":\n\n:\n\n" + GENERATION_ERROR_CHAT
"""A request that waited over 30 s for its prefill (two keep-alives), which then failed."""
