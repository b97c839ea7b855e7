"""HTTP face of a simulated vLLM 0.11 replica (``simulate-replica --engine vllm``).

What optimum-neuron's vLLM plugin serves: ``python -m vllm.entrypoints.openai.api_server``
(vllm==0.11.0). The wire below is read from the vllm-0.11.0 wheel, file by file:

- routes (``entrypoints/openai/api_server.py``): ``POST /v1/chat/completions``,
  ``/v1/completions``, ``/tokenize``; ``GET /v1/models``, ``/version``, ``/metrics``;
  ``GET /health`` and ``/ping``: 200 with an empty body, 503 (empty) once the engine is
  dead (``health`` catches ``EngineDeadError``). With ``--api-key`` every path that starts
  with ``/v1`` needs ``Authorization: Bearer <key>``, else 401 ``{"error":"Unauthorized"}``
  (``AuthenticationMiddleware``).
- errors (``protocol.py`` ``ErrorResponse``/``ErrorInfo``; ``serving_engine.py``
  ``create_error_response``): ``{"error":{"message","type","param":null,"code"}}`` with the
  HTTP status in ``code``; a bad request is 400 ``BadRequestError`` (context length,
  ``max_tokens``: ``serving_engine.py`` ``_validate_input``), an unknown model 404
  ``NotFoundError`` (``_check_model``); FastAPI's ``HTTPException`` handler writes
  ``type`` as the status phrase (``api_server.py`` ``http_exception_handler``).
- streams (``serving_chat.py`` ``chat_completion_stream_generator``,
  ``serving_completion.py`` ``completion_stream_generator``): ``data: `` + pydantic's compact
  JSON + blank line, ended by ``data: [DONE]``. Chat: a first chunk per choice with
  ``delta: {"role":"assistant","content":""}`` once the first output arrives, then one chunk
  per token (``exclude_unset``: ``token_ids`` present as null), the last with
  ``finish_reason`` and ``stop_reason``; ``stream_options.include_usage`` adds a
  ``choices: []`` chunk with ``usage``. Completions: every field (``exclude_unset=False``),
  the first chunk carrying the prompt's ``prompt_token_ids``. An exception inside a stream
  becomes ``data: {"error": {...}}`` (``json.dumps``: spaces after separators) with the
  default code 400, then ``data: [DONE]``.
- engine death (``v1/engine/exceptions.py`` ``EngineDeadError``: "EngineCore encountered an
  issue. See stack trace (above) for the root cause."): streams get it as that code-400
  event; new requests a 500 (``create_chat_completion`` raises the dead error before
  generating: ``api_server.py`` turns it into ``HTTPException(500)``); ``/health`` 503; the
  server exits at the launcher's next watchdog check (``launcher.py`` ``watchdog_loop``,
  every ``VLLM_WATCHDOG_TIME_S`` = 5 s). Here a device failure (``--fail-generation-*``,
  ``--poison-prompt``) is that death.
- metrics (``v1/metrics/loggers.py`` ``PrometheusStatLogger``): ``vllm:*`` families with
  labels ``model_name`` and ``engine``.

Scheduling: ``max-num-seqs`` (``batch_size``) slots filled at step boundaries from vLLM's
unbounded waiting queue (no 429: vLLM has no concurrency cap), each step decoding the running
requests and then prefilling the admitted ones (``vllm_scheduler.ContinuousBatcher``, as
optimum-neuron's vLLM model runner does); durations from the shared timing model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .engine import (
    Clock,
    Engine,
    FaultAction,
    GenerationError,
    GenerationSpec,
    SimConfig,
    SimError,
)
from .vllm_scheduler import ContinuousBatcher

log = logging.getLogger("supervisor.simulator.vllm")

VLLM_VERSION = "0.11.0"
ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."
WATCHDOG_S = 5.0
"""vllm 0.11.0 ``entrypoints/launcher.py`` ``VLLM_WATCHDOG_TIME_S``."""
UNBOUNDED = 1 << 30
"""vLLM's waiting queue has no cap: the scheduler takes what it can, the rest waits."""
FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}
"""vLLM's finish reasons (``v1/engine/__init__.py`` ``FinishReason``: stop, length, abort)."""
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}
"""FastAPI's ``StreamingResponse(media_type="text/event-stream")`` (starlette adds the
charset for text types)."""
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5]
TTFT_BUCKETS += [5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0]
ITL_BUCKETS += [7.5, 10.0, 20.0, 40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0]
E2E_BUCKETS += [60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]

VLLM_ENGINE = web.AppKey("vllm_engine", Engine)
ON_ENGINE_DEATH = web.AppKey("vllm_on_engine_death", list)
"""Callbacks run once when the engine dies (``serve`` schedules the exit)."""


def _compact(obj: Any) -> str:
    """pydantic's ``model_dump_json`` spelling: no spaces, UTF-8 as is."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def error_doc(message: str, err_type: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


def error_response(
    message: str, err_type: str = "BadRequestError", code: int = 400
) -> web.Response:
    return web.json_response(error_doc(message, err_type, code), status=code, dumps=_compact)


def stream_error(message: str, err_type: str = "BadRequestError", code: int = 400) -> bytes:
    """``create_streaming_error_response``: ``json.dumps`` with its default separators."""
    return b"data: " + json.dumps(error_doc(message, err_type, code)).encode() + b"\n\n"


class BadRequest(Exception):
    def __init__(self, message: str, err_type: str = "BadRequestError", code: int = 400):
        super().__init__(message)
        self.message, self.err_type, self.code = message, err_type, code


class VllmMetrics:
    """The ``vllm:*`` families a replica's ``/metrics`` shows (vllm 0.11.0
    ``v1/metrics/loggers.py``), with its labels ``model_name`` and ``engine``."""

    def __init__(self, engine: Engine, model: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        values = (model, "0")
        reg = self.registry

        def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            Gauge(name, doc, labels, registry=reg).labels(*values).set_function(read)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Any:
            return Histogram(name, doc, labels, registry=reg, buckets=buckets).labels(*values)

        gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            lambda: engine.running,
        )
        gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            lambda: engine.queued,
        )
        cap = engine.config.batch_size * engine.config.max_total_tokens
        gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            lambda: engine.batcher.current_max_tokens / cap,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=reg
        ).labels(*values)
        self.generation_tokens = Counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            labels,
            registry=reg,
        ).labels(*values)
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=reg,
        )
        for reason in ("stop", "length", "abort"):
            self.success.labels(*values, reason)
        self.values = values
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            E2E_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            E2E_BUCKETS,
        )
        self.prompt_hist = histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            _one_two_five(engine.config.max_total_tokens),
        )

    def finished(self, reason: str) -> None:
        self.success.labels(*self.values, reason).inc()


def _one_two_five(top: int) -> list[float]:
    """``v1/metrics/loggers.py`` ``build_1_2_5_buckets(max_model_len)``: 1, 2, 5, 10, ...
    up to the context length."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > top:
                return out
            out.append(float(value))
        exponent += 1


class _Dead(Exception):
    """The engine died while this request was in it."""


class VllmReplica:
    """Route handlers of one simulated vLLM server."""

    def __init__(self, config: SimConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.model = config.model_id
        self.metrics = VllmMetrics(engine, self.model)
        self.dead = False
        self.on_death: list[Callable[[], None]] = []

    # ---- engine death

    def _die(self) -> None:
        if self.dead:
            return
        self.dead = True
        log.error("simulated EngineCore died: %s", ENGINE_DEAD_MESSAGE)
        self.engine.die(GenerationError("EngineCore died"))
        for callback in self.on_death:
            callback()

    # ---- request plumbing

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            # api_server.py validate_json_request -> RequestValidationError -> 400
            raise BadRequest(
                "[\"Unsupported Media Type: Only 'application/json' is allowed\"]",
                "Bad Request",
            )
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            raise BadRequest(f"JSON decode error: {exc}", "Bad Request") from None
        if not isinstance(body, dict):
            raise BadRequest("Input should be a valid dictionary", "Bad Request")
        model = body.get("model")
        if model and model != self.model:
            raise BadRequest(f"The model `{model}` does not exist.", "NotFoundError", 404)
        return body

    def _spec(self, prompt: str, input_length: int, max_tokens: Any) -> GenerationSpec:
        """``serving_engine.py`` ``_validate_input`` with ``max_model_len`` =
        ``max_total_tokens``; without ``max_tokens`` vLLM generates up to the context
        length (capped here at ``default_max_new_tokens``, as the TGI face does)."""
        limit = self.config.max_total_tokens
        if input_length >= limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"request has {input_length} input tokens. Please reduce the length of the "
                "input messages."
            )
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}.")
            if input_length + max_tokens > limit:
                raise BadRequest(
                    f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. "
                    f"This model's maximum context length is {limit} tokens and your "
                    f"request has {input_length} input tokens ({max_tokens} > {limit} - "
                    f"{input_length})."
                )
        else:
            max_tokens = min(limit - input_length, self.config.default_max_new_tokens)
        poison = self.config.faults.poison_prompt
        return GenerationSpec(
            input_length=input_length,
            max_new_tokens=max_tokens,
            poisoned=bool(poison) and poison in prompt,
        )

    async def _start(self, prompt: str, max_tokens: Any) -> tuple[Any, list[int]]:
        # serving_chat.py / serving_completion.py: after the model check, before any
        # validation, "If the engine is dead, raise the engine's DEAD_ERROR" (-> 500).
        if self.dead:
            raise BadRequest(ENGINE_DEAD_MESSAGE, "Internal Server Error", 500)
        ids = [t["id"] for t in await self.engine.tokens.tokenize(prompt)]
        spec = self._spec(prompt, len(ids), max_tokens)
        self.metrics.prompt_tokens.inc(len(ids))
        self.metrics.prompt_hist.observe(len(ids))
        return self.engine.submit(spec), ids

    async def _tokens(self, request: web.Request, generation: Any) -> Any:
        """The generation's tokens, carrying out token faults; ``_Dead`` on engine death."""
        sent = 0
        last = None
        try:
            async for event in generation:
                now = self.engine.clock.now()
                job = generation.job
                if sent == 0:
                    self.metrics.ttft.observe(now - job.queued_at)
                    if job.started_at is not None:
                        self.metrics.queue_time.observe(job.started_at - job.queued_at)
                else:
                    self.metrics.itl.observe(now - last)
                last = now
                self.metrics.generation_tokens.inc()
                yield event
                sent += 1
                action = self.engine.faults.after_token_sent(sent)
                if action is FaultAction.CRASH:
                    log.error("fault injection: crashing after %d tokens", sent)
                    os._exit(1)
                if action is FaultAction.DROP:
                    generation.cancel()
                    if request.transport is not None:
                        request.transport.close()
                    raise ConnectionResetError("drop fault")
                if action is FaultAction.HANG:
                    generation.cancel()
                    await asyncio.Event().wait()
        except SimError:
            self._die()
            raise _Dead from None
        finally:
            generation.cancel()
        job = generation.job
        self.metrics.e2e.observe(self.engine.clock.now() - job.queued_at)
        self.metrics.finished(FINISH.get(job.finish_reason or "length", "length"))

    # ---- routes

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            messages = _messages(body.get("messages"))
            prompt = await self.engine.tokens.render_chat(messages)
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            generation, ids = await self._start(prompt, max_tokens)
        except BadRequest as exc:
            return error_response(exc.message, exc.err_type, exc.code)
        except SimError as exc:
            return error_response(exc.message)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        envelope = {"id": request_id, "object": "chat.completion.chunk", "created": created}
        envelope["model"] = self.model
        if not body.get("stream"):
            return await self._chat_full(request, generation, ids, request_id, created)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await response.prepare(request)
        generated = 0
        try:
            async for event in self._tokens(request, generation):
                if generated == 0:  # the role chunk, once the first output arrives
                    role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
                    role |= {"logprobs": None, "finish_reason": None}
                    first = {**envelope, "choices": [role], "prompt_token_ids": None}
                    await response.write(b"data: " + _compact(first).encode() + b"\n\n")
                generated += 1
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": {"content": "" if event.token.special else event.token.text},
                    "logprobs": None,
                }
                if event.final:
                    reason = FINISH.get(generation.job.finish_reason or "length", "length")
                    choice |= {"finish_reason": reason, "stop_reason": None}
                else:
                    choice["finish_reason"] = None
                choice["token_ids"] = None
                chunk = {**envelope, "choices": [choice]}
                await response.write(b"data: " + _compact(chunk).encode() + b"\n\n")
            if include_usage:
                usage = _usage(len(ids), generated)
                chunk = {**envelope, "choices": [], "usage": usage}
                await response.write(b"data: " + _compact(chunk).encode() + b"\n\n")
        except _Dead:
            await _write_quietly(response, stream_error(ENGINE_DEAD_MESSAGE))
        except ConnectionResetError:
            return response
        await _write_quietly(response, b"data: [DONE]\n\n", eof=True)
        return response

    async def _chat_full(
        self, request: web.Request, generation: Any, ids: list[int], request_id: str, created: int
    ) -> web.StreamResponse:
        try:
            events = [e async for e in self._tokens(request, generation)]
        except _Dead:
            # Not caught by serving_chat.py (only ValueError is): api_server.py's
            # ``except Exception`` -> HTTPException(500) -> http_exception_handler.
            return error_response(ENGINE_DEAD_MESSAGE, "Internal Server Error", 500)
        text = "".join(e.token.text for e in events if not e.token.special)
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": None}
        message |= {"audio": None, "function_call": None, "tool_calls": []}
        message["reasoning_content"] = None
        choice = {"index": 0, "message": message, "logprobs": None}
        choice |= {
            "finish_reason": FINISH.get(generation.job.finish_reason or "length", "length"),
            "stop_reason": None,
            "token_ids": None,
        }
        doc = {"id": request_id, "object": "chat.completion", "created": created}
        doc |= {"model": self.model, "choices": [choice], "service_tier": None}
        doc |= {"system_fingerprint": None, "usage": _usage(len(ids), len(events), full=True)}
        doc |= {"prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None}
        return web.json_response(doc, dumps=_compact)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("prompt must be a string (the simulator serves one prompt)")
            generation, ids = await self._start(prompt, body.get("max_tokens", 16))
        except BadRequest as exc:
            return error_response(exc.message, exc.err_type, exc.code)
        except SimError as exc:
            return error_response(exc.message)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": request_id, "object": "text_completion", "created": created}
        head["model"] = self.model
        if not body.get("stream"):
            try:
                events = [e async for e in self._tokens(request, generation)]
            except _Dead:
                return error_response(ENGINE_DEAD_MESSAGE, "Internal Server Error", 500)
            choice = {"index": 0, "text": "".join(e.token.text for e in events)}
            choice |= {
                "logprobs": None,
                "finish_reason": FINISH.get(generation.job.finish_reason or "length", "length"),
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
            }
            doc = head | {"choices": [choice], "service_tier": None, "system_fingerprint": None}
            doc |= {"usage": _usage(len(ids), len(events), full=True), "kv_transfer_params": None}
            return web.json_response(doc, dumps=_compact)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await response.prepare(request)
        generated = 0
        try:
            async for event in self._tokens(request, generation):
                reason = None
                if event.final:
                    reason = FINISH.get(generation.job.finish_reason or "length", "length")
                choice = {
                    "index": 0,
                    "text": "" if event.token.special else event.token.text,
                    "logprobs": None,
                    "finish_reason": reason,
                    "stop_reason": None,
                    "prompt_token_ids": ids if generated == 0 else None,
                    "token_ids": None,
                }
                generated += 1
                chunk = {**head, "choices": [choice], "usage": None}
                await response.write(b"data: " + _compact(chunk).encode() + b"\n\n")
            if include_usage:
                chunk = {**head, "choices": [], "usage": _usage(len(ids), generated)}
                await response.write(b"data: " + _compact(chunk).encode() + b"\n\n")
        except _Dead:
            await _write_quietly(response, stream_error(ENGINE_DEAD_MESSAGE))
        except ConnectionResetError:
            return response
        await _write_quietly(response, b"data: [DONE]\n\n", eof=True)
        return response

    async def tokenize(self, request: web.Request) -> web.Response:
        """``serving_tokenization.py`` ``create_tokenize`` -> ``TokenizeResponse``."""
        try:
            body = await self._body(request)
            if "messages" in body:
                text = await self.engine.tokens.render_chat(_messages(body["messages"]))
            elif isinstance(body.get("prompt"), str):
                text = body["prompt"]
            else:
                raise BadRequest("Field required: prompt", "Bad Request")
        except BadRequest as exc:
            return error_response(exc.message, exc.err_type, exc.code)
        except SimError as exc:
            return error_response(exc.message)
        tokens = [t["id"] for t in await self.engine.tokens.tokenize(text)]
        doc = {"count": len(tokens), "max_model_len": self.config.max_total_tokens}
        doc |= {"tokens": tokens, "token_strs": None}
        return web.json_response(doc, dumps=_compact)

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        permission = {
            "id": f"modelperm-{uuid.uuid4().hex}",
            "object": "model_permission",
            "created": now,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        card = {"id": self.model, "object": "model", "created": now, "owned_by": "vllm"}
        card |= {"root": self.model, "parent": None}
        card |= {"max_model_len": self.config.max_total_tokens, "permission": [permission]}
        return web.json_response({"object": "list", "data": [card]}, dumps=_compact)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VLLM_VERSION}, dumps=_compact)

    async def health(self, request: web.Request) -> web.Response:
        dead = self.dead or self.engine.faults.health_fail
        return web.Response(status=503 if dead else 200)

    async def set_health(self, request: web.Request) -> web.Response:
        """Simulator-only switch, as the TGI face's: ``{"fail": true}`` -> /health 503."""
        body = json.loads(await request.read() or b"{}")
        self.engine.faults.health_fail = bool(body.get("fail"))
        return web.json_response({"health_fail": self.engine.faults.health_fail})

    async def metrics_route(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _usage(prompt: int, completion: int, full: bool = False) -> dict[str, Any]:
    """``UsageInfo`` in its field order; a whole response's ``model_dump`` also shows
    ``prompt_tokens_details``, a stream's usage chunk drops it (``exclude_none``)."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if full:
        usage["prompt_tokens_details"] = None
    return usage


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: Field required", "Bad Request")
    out = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise BadRequest("messages: Input should be a valid dictionary", "Bad Request")
        content = item.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": item["role"], "content": str(content)})
    return out


async def _write_quietly(response: web.StreamResponse, data: bytes, eof: bool = False) -> None:
    """The tail of a stream; a client that already left is no error."""
    with contextlib.suppress(ConnectionResetError):
        await response.write(data)
        if eof:
            await response.write_eof()


def _api_key_guard(api_key: str) -> Any:
    """``AuthenticationMiddleware``: every path under /v1 needs the bearer token."""

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/v1") and request.method != "OPTIONS":
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token != api_key:
                return web.json_response({"error": "Unauthorized"}, status=401, dumps=_compact)
        return await handler(request)

    return guard


def create_app(config: SimConfig, *, clock: Clock | None = None) -> web.Application:
    """A simulated vLLM server's app (``--max-num-seqs`` = ``batch_size``)."""
    engine = Engine(
        dataclasses.replace(config, max_concurrent_requests=UNBOUNDED),
        clock=clock,
        batcher=ContinuousBatcher,
    )
    replica = VllmReplica(config, engine)
    middlewares = [_api_key_guard(config.api_key)] if config.api_key else []
    app = web.Application(client_max_size=1 << 30, middlewares=middlewares)
    app[VLLM_ENGINE] = engine
    app[ON_ENGINE_DEATH] = replica.on_death
    r = app.router
    r.add_post("/v1/chat/completions", replica.chat_completions)
    r.add_post("/v1/completions", replica.completions)
    r.add_post("/tokenize", replica.tokenize)
    r.add_get("/v1/models", replica.models)
    r.add_get("/version", replica.version)
    for path in ("/health", "/ping"):
        r.add_get(path, replica.health)
    r.add_post("/ping", replica.health)
    r.add_get("/metrics", replica.metrics_route)
    r.add_post("/_sim/health", replica.set_health)

    async def close_engine(_: web.Application) -> None:
        await engine.close()

    app.on_cleanup.append(close_engine)
    return app
