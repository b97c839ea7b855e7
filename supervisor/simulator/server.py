"""HTTP face of a simulated TGI Neuron replica: TGI's routes and wire formats over ``Engine``.

Wire formats follow ``/work/shared/reference/tgi-neuron-interface.md``: SSE events are
``data:`` + compact JSON + blank line (no space after the colon), OpenAI routes end with
``data:[DONE]``, and streaming routes answer 200 with the error as the first event.

Checked against text-generation-inference v3.3.7 (the ``latest-neuron`` image's version):

- OpenAI routes' stream error event: ``{"error":{"message":..,"http_status_code":422}}``,
  422 whatever the error (router/src/infer/mod.rs ``into_openai_event``);
- finish reasons: ``length`` / ``eos_token`` / ``stop_sequence`` natively; the OpenAI routes
  say ``stop`` for ``eos_token`` only (router/src/lib.rs ``FinishReason::format(true)``);
- ``top_p`` must be > 0 and < 1 on every route, 1.0 included (router/src/validation.rs);
  ``stop`` is a list on the OpenAI routes (``Option<Vec<String>>``): a string does not
  deserialize (422);
- ``POST /`` and ``/invocations`` default ``return_full_text`` to true for a text-generation
  model or one without a pipeline tag (router/src/server.rs ``compat_generate``);
- ``details.seed`` is null and ``details.prefill`` empty: the Neuron generator returns no
  seed and no prefill tokens (backends/neuron/server/text_generation_server/generator.py);
- chat ``logprobs: true`` gives ``{"content":[{token, logprob, top_logprobs}]}`` per chunk
  (router/src/lib.rs ``ChatCompletionLogprobs``), logprob 0 as on Neuron;
- ``max_new_tokens`` is checked on its first 1024-token chunk (router/src/validation.rs).
  ``best_of`` is validated but not generated (one sequence comes back).
With ``API_KEY`` set, the generation routes and ``/tokenize`` answer 401 with an empty body
to a request without ``Authorization: Bearer <key>``, compared case-insensitively; /health,
/info, /metrics, /v1/models and /chat_tokenize stay open (router/src/server.rs: the auth
layer wraps ``base_routes`` only). The simulator's own route below is guarded too.

One route is the simulator's own: ``POST /_sim/health {"fail": true|false}`` flips ``/health``
to 503 and back at runtime (fault injection for health-checker tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .engine import (
    Clock,
    Engine,
    FaultAction,
    GenerateParams,
    Generation,
    GenerationSpec,
    InvalidRequest,
    SimConfig,
    SimError,
    TokenEvent,
    validate,
)

__all__ = ["SimServer", "create_app", "run", "serve", "start_server"]

log = logging.getLogger("supervisor.simulator")

VERSION = "3.0.0"
SYSTEM_FINGERPRINT = f"{VERSION}-native"
COMPUTE_TYPE = "gpu+optimized"  # TGI's default when COMPUTE_TYPE is unset
PAYLOAD_LIMIT = 2_000_000
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # TGI's --payload-limit default
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "x-compute-type": COMPUTE_TYPE,
}
OPENAI_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop_sequence"}
OPENAI_STREAM_ERROR_STATUS = 422
"""TGI's OpenAI stream error events carry 422 whatever the error (see the module doc)."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _error_response(err: SimError) -> web.Response:
    body = {"error": err.message, "error_type": err.error_type}
    return web.json_response(body, status=err.status, dumps=_dumps)


# --------------------------------------------------------------------------- metrics


class _Histogram:
    def __init__(self, buckets: list[float]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def family(self, name: str) -> HistogramMetricFamily:
        cumulative, rows = 0, []
        for bound, count in zip([*self.buckets, float("inf")], self.counts, strict=True):
            cumulative += count
            rows.append((floatToGoString(bound), cumulative))
        return HistogramMetricFamily(name, name, buckets=rows, sum_value=self.sum)


class TgiMetrics:
    """TGI's metric names, rendered as metrics-exporter-prometheus does (counters without
    ``_total``); one registry per app so several simulators can share a process."""

    def __init__(self, engine: Engine) -> None:
        cfg = engine.config
        self.engine = engine
        self.request_count = 0
        self.request_success = 0
        self.request_failure: Counter[str] = Counter()
        durations = [0.0001 * 1.5**k for k in range(1, 36)]  # TGI's 35 duration buckets
        self.histograms = {
            "tgi_request_duration": _Histogram(durations),
            "tgi_request_validation_duration": _Histogram(durations),
            "tgi_request_queue_duration": _Histogram(durations),
            "tgi_request_inference_duration": _Histogram(durations),
            "tgi_request_mean_time_per_token_duration": _Histogram(durations),
            "tgi_request_input_length": _Histogram(
                [cfg.max_input_tokens / 100 * (x + 1) for x in range(100)]
            ),
            "tgi_request_generated_tokens": _Histogram(
                [cfg.max_total_tokens / 100 * (x + 1) for x in range(100)]
            ),
            # Recorded at validation, buckets as generated_tokens (TGI v3.3.7 validation.rs
            # and server.rs max_new_tokens_buckets).
            "tgi_request_max_new_tokens": _Histogram(
                [cfg.max_total_tokens / 100 * (x + 1) for x in range(100)]
            ),
        }
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def fail(self, err: SimError) -> None:
        kind = {"template_error": "validation", "incomplete_generation": "incomplete"}
        self.request_failure[kind.get(err.error_type, err.error_type)] += 1

    def observe(self, name: str, value: float) -> None:
        self.histograms[name].observe(value)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield self._counter("tgi_request_count", {(): self.request_count})
        yield self._counter("tgi_request_success", {(): self.request_success})
        yield self._counter(
            "tgi_request_failure",
            {(("err", k),): v for k, v in sorted(self.request_failure.items())},
        )
        yield self._counter(
            "tgi_batch_inference_count",
            {(("method", k),): v for k, v in sorted(self.engine.steps.items())},
        )
        for name, value in (
            ("tgi_queue_size", self.engine.queued),
            ("tgi_batch_current_size", self.engine.running),
            ("tgi_batch_current_max_tokens", self.engine.batcher.current_max_tokens),
        ):
            yield GaugeMetricFamily(name, name, value=value)
        for name, hist in self.histograms.items():
            yield hist.family(name)

    @staticmethod
    def _counter(name: str, values: dict[tuple[tuple[str, str], ...], float]) -> Metric:
        metric = Metric(name, name, "counter")
        for labels, value in values.items():
            metric.add_sample(name, dict(labels), value)
        return metric

    def render(self) -> bytes:
        """Text exposition like TGI's exporter: ``prometheus_client.generate_latest`` would
        name counter families ``*_total``, which TGI's do not carry."""
        lines = []
        for family in self.registry.collect():
            lines.append(f"# HELP {family.name} {family.documentation}")
            lines.append(f"# TYPE {family.name} {family.type}")
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
                name = f"{sample.name}{{{labels}}}" if labels else sample.name
                lines.append(f"{name} {floatToGoString(sample.value)}")
        return ("\n".join(lines) + "\n").encode()


ENGINE = web.AppKey("engine", Engine)
METRICS = web.AppKey("metrics", TgiMetrics)


# --------------------------------------------------------------------------- request plumbing


class _Closed(Exception):
    """The connection is gone: the client left, or a drop fault closed it."""


async def _send(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionResetError as exc:  # the client left between two tokens
        raise _Closed from exc


async def _finish(response: web.StreamResponse, data: bytes = b"") -> web.StreamResponse:
    """Write the tail and end the stream; a client that already left is no error."""
    with contextlib.suppress(ConnectionResetError):
        if data:
            await response.write(data)
        await response.write_eof()
    return response


@dataclass
class _Call:
    """One generation in flight, with what the response needs to report about it."""

    generation: Generation
    spec: GenerationSpec
    inputs: str
    started: float


class _Replica:
    """Route handlers; state lives in the engine and the metrics."""

    def __init__(self, config: SimConfig, engine: Engine, metrics: TgiMetrics) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics

    # ---- generic steps

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"Failed to parse the request body as JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidRequest(
                "Failed to deserialize the JSON body into the target type: expected a map"
            )
        return body

    async def _begin(
        self, inputs: str, params: GenerateParams, *, stream: bool, started: float
    ) -> _Call:
        """Tokenize, validate and queue (raises ``SimError`` -> 422 / 429)."""
        try:
            length = await self.engine.tokens.count(inputs)
            spec = validate(self.config, params, inputs, length, stream=stream)
            self.metrics.observe("tgi_request_input_length", spec.input_length)
            self.metrics.observe("tgi_request_max_new_tokens", spec.max_new_tokens)
            generation = self.engine.submit(spec)
        except SimError as err:
            self.metrics.fail(err)
            raise
        now = self.engine.clock.now()
        self.metrics.observe("tgi_request_validation_duration", now - started)
        return _Call(generation, spec, inputs, started)

    async def _after_token(self, request: web.Request, call: _Call, sent: int) -> None:
        """Carry out a token fault (crash / drop / hang) once a token has left."""
        action = self.engine.faults.after_token_sent(sent)
        if action is FaultAction.NONE:
            return
        if action is FaultAction.CRASH:
            log.error("fault injection: crashing after %d tokens", self.engine.faults.tokens_sent)
            os._exit(1)
        call.generation.cancel()
        if action is FaultAction.DROP:
            if request.transport is not None:
                request.transport.close()
            raise _Closed
        await asyncio.Event().wait()  # HANG: silent until the client leaves

    async def _die_mid_event(self, response: web.StreamResponse, data: bytes) -> None:
        """Fault: write half of an event, let it leave, and exit the process."""
        await _send(response, data[: len(data) // 2])
        await asyncio.sleep(0.05)
        log.error("fault injection: dying in the middle of an event")
        os._exit(1)

    async def _collect(self, request: web.Request, call: _Call) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        try:
            async for event in call.generation:
                events.append(event)
                await self._after_token(request, call, len(events))
        except SimError as err:
            self.metrics.fail(err)
            raise
        finally:
            call.generation.cancel()
        self._record_success(call, len(events))
        return events

    def _record_success(self, call: _Call, generated: int) -> None:
        job, now = call.generation.job, self.engine.clock.now()
        started_at = job.started_at if job.started_at is not None else now
        inference = now - started_at
        m = self.metrics
        m.request_success += 1
        m.observe("tgi_request_duration", now - call.started)
        m.observe("tgi_request_queue_duration", started_at - job.queued_at)
        m.observe("tgi_request_inference_duration", inference)
        m.observe("tgi_request_mean_time_per_token_duration", inference / max(generated, 1))
        m.observe("tgi_request_generated_tokens", generated)

    def _timing_headers(self, call: _Call, generated: int) -> dict[str, str]:
        job, now = call.generation.job, self.engine.clock.now()
        started_at = job.started_at if job.started_at is not None else now
        inference = now - started_at

        def ms(seconds: float) -> str:
            return str(int(seconds * 1000))

        return {
            "x-compute-type": COMPUTE_TYPE,
            "x-compute-time": repr(now - call.started),
            "x-compute-characters": str(len(call.inputs)),
            "x-total-time": ms(now - call.started),
            "x-validation-time": ms(job.queued_at - call.started),
            "x-queue-time": ms(started_at - job.queued_at),
            "x-inference-time": ms(inference),
            "x-time-per-token": ms(inference / max(generated, 1)),
            "x-prompt-tokens": str(call.spec.input_length),
            "x-generated-tokens": str(generated),
        }

    async def _open_sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await response.prepare(request)
        return response

    async def _pump(
        self,
        request: web.Request,
        response: web.StreamResponse,
        call: _Call,
        render: Callable[[TokenEvent], list[Any]],
        sent: int = 0,
    ) -> int:
        """Stream one generation: an event per token, ``:`` keep-alives when idle."""
        keepalive = self.config.keepalive_interval / self.config.speed
        try:
            while True:
                event = await call.generation.next(keepalive)
                if event is None:
                    await _send(response, b":\n\n")
                    continue
                for obj in render(event):
                    data = self._sse(obj)
                    if self.engine.faults.tears_next_event():
                        await self._die_mid_event(response, data)
                    await _send(response, data)
                sent += 1
                await self._after_token(request, call, sent)
                if event.final:
                    self._record_success(call, event.index)
                    return sent
        except SimError as err:
            self.metrics.fail(err)
            raise
        finally:
            call.generation.cancel()

    # ---- native routes

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, compat=False)

    async def compat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, compat=True)

    async def _generate(
        self, request: web.Request, *, compat: bool, body: dict[str, Any] | None = None
    ) -> web.StreamResponse:
        started = self.engine.clock.now()
        try:
            body = body if body is not None else await self._json(request)
            if compat:
                body = _full_text_by_default(body)
            if compat and body.get("stream"):
                return await self._generate_stream(request, body, started)
            inputs = _inputs(body)
            params = GenerateParams.from_json(body.get("parameters"))
        except SimError as err:
            return _error_response(err)
        self.metrics.request_count += 1
        try:
            call = await self._begin(inputs, params, stream=False, started=started)
            events = await self._collect(request, call)
        except SimError as err:
            return _error_response(err)
        except _Closed:
            return web.Response()
        job = call.generation.job
        text = job.text if not params.return_full_text else call.inputs + job.text
        result: dict[str, Any] = {"generated_text": text}
        if params.details or params.decoder_input_details:
            result["details"] = {
                "finish_reason": job.finish_reason,
                "generated_tokens": len(events),
                # The Neuron generator returns neither a seed nor prefill tokens, even with
                # decoder_input_details (generator.py: GeneratedText(...), prefill_tokens=None).
                "seed": None,
                "prefill": [],
                "tokens": [e.token.to_json() for e in events],
            }
        headers = self._timing_headers(call, len(events))
        return web.json_response([result] if compat else result, headers=headers, dumps=_dumps)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        started = self.engine.clock.now()
        try:
            body = await self._json(request)
        except SimError as err:
            return _error_response(err)
        return await self._generate_stream(request, body, started)

    async def _generate_stream(
        self, request: web.Request, body: dict[str, Any], started: float
    ) -> web.StreamResponse:
        try:
            inputs = _inputs(body)
            params = GenerateParams.from_json(body.get("parameters"))
        except SimError as err:
            return _error_response(err)
        self.metrics.request_count += 1
        call: _Call | None = None
        error: SimError | None = None
        try:
            call = await self._begin(inputs, params, stream=True, started=started)
        except SimError as err:
            error = err
        response = await self._open_sse(request)
        if call is not None:

            def render(event: TokenEvent) -> list[Any]:
                job = call.generation.job
                final = event.final
                text = (call.inputs if params.return_full_text else "") + job.text
                details = None
                if final and params.details:
                    details = {
                        "finish_reason": job.finish_reason,
                        "generated_tokens": event.index,
                        "seed": None,
                        "input_length": call.spec.input_length,
                    }
                return [
                    {
                        "index": event.index,
                        "token": event.token.to_json(),
                        "generated_text": text if final else None,
                        "details": details,
                    }
                ]

            try:
                await self._pump(request, response, call, render)
            except SimError as err:
                error = err
            except _Closed:
                return response
        if error is None:
            return await _finish(response)
        return await _finish(
            response, self._sse({"error": error.message, "error_type": error.error_type})
        )

    @staticmethod
    def _sse(obj: Any) -> bytes:
        return b"data:" + _dumps(obj).encode() + b"\n\n"

    # ---- OpenAI routes

    @staticmethod
    def _openai_params(body: dict[str, Any], max_tokens: Any) -> GenerateParams:
        """Map OpenAI fields onto TGI parameters (temperature 0 means greedy, as in TGI)."""
        temperature = body.get("temperature")
        if temperature == 0:
            temperature = None
        stop = body.get("stop")
        if isinstance(stop, str):
            raise InvalidRequest(
                "Failed to deserialize the JSON body into the target type: stop: invalid type: "
                f"string {json.dumps(stop)}, expected a sequence"
            )
        raw = {
            "max_new_tokens": max_tokens,
            "seed": body.get("seed"),
            "stop": stop,
            "temperature": temperature,
            "top_p": body.get("top_p"),
            "details": True,
        }
        return GenerateParams.from_json(raw)

    def _model_name(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        return (
            model if isinstance(model, str) and model and model != "tgi" else self.config.model_id
        )

    def _envelope(self, obj: str, model: str) -> dict[str, Any]:
        return {
            "object": obj,
            "id": "",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    @staticmethod
    def _usage(call: _Call, generated: int) -> dict[str, int]:
        prompt = call.spec.input_length
        return {
            "prompt_tokens": prompt,
            "completion_tokens": generated,
            "total_tokens": prompt + generated,
        }

    async def _openai_error_stream(
        self, request: web.Request, response: web.StreamResponse | None, err: SimError
    ) -> web.StreamResponse:
        if response is None:
            response = await self._open_sse(request)
        event = {"error": {"message": err.message, "http_status_code": OPENAI_STREAM_ERROR_STATUS}}
        return await _finish(response, self._sse(event) + b"data:[DONE]\n\n")

    async def chat_completions(
        self, request: web.Request, body: dict[str, Any] | None = None
    ) -> web.StreamResponse:
        started = self.engine.clock.now()
        try:
            body = body if body is not None else await self._json(request)
            messages = _chat_messages(body.get("messages"))
            max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
            params = self._openai_params(body, max_tokens)
        except SimError as err:
            return _error_response(err)
        self.metrics.request_count += 1
        stream = bool(body.get("stream"))
        want_logprobs = body.get("logprobs") is True
        model = self._model_name(body)
        try:
            try:
                prompt = await self.engine.tokens.render_chat(messages)
            except SimError as err:
                self.metrics.fail(err)
                raise
            call = await self._begin(prompt, params, stream=stream, started=started)
        except SimError as err:
            if stream:
                return await self._openai_error_stream(request, None, err)
            return _error_response(err)

        if not stream:
            try:
                events = await self._collect(request, call)
            except SimError as err:
                return _error_response(err)
            except _Closed:
                return web.Response()
            job = call.generation.job
            result = self._envelope("chat.completion", model) | {
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": job.text},
                        "logprobs": _chat_logprobs(events) if want_logprobs else None,
                        "finish_reason": OPENAI_FINISH[job.finish_reason or "length"],
                    }
                ],
                "usage": self._usage(call, len(events)),
            }
            headers = self._timing_headers(call, len(events))
            return web.json_response(result, headers=headers, dumps=_dumps)

        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

        def render(event: TokenEvent) -> list[Any]:
            token = event.token
            finish = OPENAI_FINISH[call.generation.job.finish_reason or "length"]
            chunk = self._envelope("chat.completion.chunk", model) | {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "role": "assistant",
                            "content": "" if token.special else token.text,
                        },
                        "logprobs": _chat_logprobs([event]) if want_logprobs else None,
                        "finish_reason": finish if event.final else None,
                    }
                ],
                "usage": None,
            }
            if not (event.final and include_usage):
                return [chunk]
            usage = self._envelope("chat.completion.chunk", model) | {
                "choices": [],
                "usage": self._usage(call, event.index),
            }
            return [chunk, usage]

        response = await self._open_sse(request)
        try:
            await self._pump(request, response, call, render)
        except SimError as err:
            return await self._openai_error_stream(request, response, err)
        except _Closed:
            return response
        return await _finish(response, b"data:[DONE]\n\n")

    async def completions(
        self, request: web.Request, body: dict[str, Any] | None = None
    ) -> web.StreamResponse:
        started = self.engine.clock.now()
        try:
            body = body if body is not None else await self._json(request)
            prompts = body.get("prompt")
            prompts = [prompts] if isinstance(prompts, str) else prompts
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise InvalidRequest(
                    "Failed to deserialize the JSON body into the target type: "
                    "prompt: expected a string or a sequence of strings"
                )
            if not prompts:
                raise InvalidRequest("Input validation error: `prompt` cannot be empty")
            params = self._openai_params(body, body.get("max_tokens"))
        except SimError as err:
            return _error_response(err)
        self.metrics.request_count += 1
        try:
            if body.get("suffix") is not None:
                raise InvalidRequest(
                    "Suffix is not supported and can be achieved by preprocessing the prompt.",
                    error_type="suffix not supported",
                )
            if len(prompts) > self.config.max_client_batch_size:
                raise InvalidRequest(
                    "Number of prompts exceeds the maximum allowed batch size of "
                    f"{self.config.max_client_batch_size}",
                    error_type="batch size exceeded",
                )
        except SimError as err:
            self.metrics.fail(err)
            return _error_response(err)
        stream = bool(body.get("stream"))
        model = self._model_name(body)
        calls: list[_Call] = []
        try:
            for prompt in prompts:
                calls.append(await self._begin(prompt, params, stream=stream, started=started))
        except SimError as err:
            for call in calls:
                call.generation.cancel()
            if stream:
                return await self._openai_error_stream(request, None, err)
            return _error_response(err)

        if not stream:
            choices, usage = [], Counter[str]()
            try:
                for index, call in enumerate(calls):
                    events = await self._collect(request, call)
                    job = call.generation.job
                    choices.append(
                        {
                            "index": index,
                            "text": job.text,
                            "logprobs": None,
                            "finish_reason": OPENAI_FINISH[job.finish_reason or "length"],
                        }
                    )
                    usage.update(self._usage(call, len(events)))
            except SimError as err:
                return _error_response(err)
            except _Closed:
                return web.Response()
            finally:
                for call in calls:
                    call.generation.cancel()
            result = self._envelope("text_completion", model) | {
                "choices": choices,
                "usage": dict(usage),
            }
            last = calls[-1]
            headers = self._timing_headers(last, last.generation.job.generated)
            return web.json_response(result, headers=headers, dumps=_dumps)

        response = await self._open_sse(request)
        sent = 0
        try:
            # Every prompt generates concurrently in the engine; events go out prompt by prompt.
            for index, call in enumerate(calls):

                def render(event: TokenEvent, index: int = index, call: _Call = call) -> list[Any]:
                    choice = {
                        "index": index,
                        "text": event.token.text if not event.token.special else "",
                        "logprobs": None,
                        "finish_reason": "",
                    }
                    chunk = self._envelope("text_completion", model) | {"choices": [choice]}
                    if event.final:
                        choice["finish_reason"] = call.generation.job.finish_reason
                        chunk["usage"] = self._usage(call, event.index)
                    return [chunk]

                sent = await self._pump(request, response, call, render, sent)
        except SimError as err:
            return await self._openai_error_stream(request, response, err)
        except _Closed:
            return response
        finally:
            for call in calls:
                call.generation.cancel()
        return await _finish(response, b"data:[DONE]\n\n")

    async def invocations(self, request: web.Request) -> web.StreamResponse:
        """SageMaker's untagged union: chat if ``messages``, completion if ``prompt``."""
        try:
            body = await self._json(request)
        except SimError as err:
            return _error_response(err)
        if "messages" in body:
            return await self.chat_completions(request, body)
        if "prompt" in body:
            return await self.completions(request, body)
        return await self._generate(request, compat=True, body=body)

    # ---- small routes

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            inputs = _inputs(await self._json(request))
        except SimError as err:
            return _error_response(err)
        return web.json_response(await self.engine.tokens.tokenize(inputs), dumps=_dumps)

    async def chat_tokenize(self, request: web.Request) -> web.Response:
        """The chat template applied and its tokens (TGI v3.3.7 server.rs get_chat_tokenize:
        ``{"tokenize_response": [...], "templated_text": ...}``)."""
        try:
            body = await self._json(request)
            messages = _chat_messages(body.get("messages"))
            templated = await self.engine.tokens.render_chat(messages)
        except SimError as err:
            return _error_response(err)
        self.metrics.request_count += 1
        tokens = await self.engine.tokens.tokenize(templated)
        return web.json_response(
            {"tokenize_response": tokens, "templated_text": templated}, dumps=_dumps
        )

    async def health(self, request: web.Request) -> web.Response:
        if self.engine.faults.health_fail:
            body = {"error": "unhealthy", "error_type": "healthcheck"}
            return web.json_response(body, status=503, dumps=_dumps)
        return web.Response(status=200)

    async def set_health(self, request: web.Request) -> web.Response:
        """Simulator-only switch: ``{"fail": true}`` makes ``/health`` answer 503."""
        try:
            body = await self._json(request)
        except SimError as err:
            return _error_response(err)
        self.engine.faults.health_fail = bool(body.get("fail"))
        return web.json_response({"health_fail": self.engine.faults.health_fail})

    async def info(self, request: web.Request) -> web.Response:
        cfg = self.config
        return web.json_response(
            {
                "model_id": cfg.model_id,
                "model_sha": None,
                "model_pipeline_tag": None,
                "max_concurrent_requests": cfg.max_concurrent_requests,
                "max_best_of": 2,
                "max_stop_sequences": cfg.max_stop_sequences,
                "max_input_tokens": cfg.max_input_tokens,
                "max_total_tokens": cfg.max_total_tokens,
                "validation_workers": 2,
                "max_client_batch_size": cfg.max_client_batch_size,
                "router": "text-generation-router",
                "version": VERSION,
                "sha": None,
                "docker_label": None,
            },
            dumps=_dumps,
        )

    async def models(self, request: web.Request) -> web.Response:
        model = self.config.model_id
        data = [{"id": model, "object": "model", "created": 0, "owned_by": model}]
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": METRICS_TYPE})


def _chat_logprobs(events: list[TokenEvent]) -> dict[str, Any]:
    """``logprobs: true`` on the chat route (TGI v3.3.7 lib.rs ChatCompletionLogprobs): one
    entry per token; the Neuron backend's logprobs are all 0."""
    return {
        "content": [{"token": e.token.text, "logprob": 0.0, "top_logprobs": []} for e in events]
    }


def _full_text_by_default(body: dict[str, Any]) -> dict[str, Any]:
    """``POST /`` and ``/invocations``: ``return_full_text`` defaults to true (TGI's
    compat_generate, for a text-generation model)."""
    params = body.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict) or "return_full_text" in params:
        return body
    return {**body, "parameters": {**params, "return_full_text": True}}


def _inputs(body: dict[str, Any]) -> str:
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise InvalidRequest(
            "Failed to deserialize the JSON body into the target type: inputs: expected a string"
        )
    return inputs


def _chat_messages(raw: Any) -> list[dict[str, str]]:
    """Flatten OpenAI messages (string or text-part content) for templating."""
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest(
            "Failed to deserialize the JSON body into the target type: "
            "messages: expected a non-empty sequence"
        )
    messages = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise InvalidRequest(
                "Failed to deserialize the JSON body into the target type: "
                "messages: expected objects with a role"
            )
        content = item.get("content") or ""
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        messages.append({"role": item["role"], "content": str(content)})
    return messages


# --------------------------------------------------------------------------- app and server


GUARDED_ROUTES = frozenset(
    {
        "/",
        "/generate",
        "/generate_stream",
        "/v1/chat/completions",
        "/v1/completions",
        "/invocations",
        "/tokenize",
        "/_sim/health",
    }
)
"""TGI's ``base_routes`` (router/src/server.rs, v3.3.7; /vertex is not simulated) and the
simulator's own fault switch."""


def _api_key_guard(api_key: str) -> Any:
    expected = f"Bearer {api_key}".lower()

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and request.path in GUARDED_ROUTES:
            if request.headers.get("Authorization", "").lower() != expected:
                return web.Response(status=401)
        return await handler(request)

    return guard


def create_app(config: SimConfig, *, clock: Clock | None = None) -> web.Application:
    """The replica's aiohttp app. Run it with ``handler_cancellation=True`` (as ``start_server``
    does) so that a client that leaves frees its slot. ``config.engine == "vllm"``: vLLM
    0.11's wire instead (vllm_server.py)."""
    if config.engine == "vllm":
        from .vllm_server import VLLM_ENGINE
        from .vllm_server import create_app as create_vllm_app

        app = create_vllm_app(config, clock=clock)
        app[ENGINE] = app[VLLM_ENGINE]
        return app
    engine = Engine(config, clock=clock)
    metrics = TgiMetrics(engine)
    replica = _Replica(config, engine, metrics)
    middlewares = [_api_key_guard(config.api_key)] if config.api_key else []
    app = web.Application(client_max_size=PAYLOAD_LIMIT, middlewares=middlewares)
    app[ENGINE] = engine
    app[METRICS] = metrics
    r = app.router
    r.add_post("/", replica.compat)
    r.add_post("/generate", replica.generate)
    r.add_post("/generate_stream", replica.generate_stream)
    r.add_post("/v1/chat/completions", replica.chat_completions)
    r.add_post("/v1/completions", replica.completions)
    r.add_post("/invocations", replica.invocations)
    r.add_post("/tokenize", replica.tokenize)
    r.add_post("/chat_tokenize", replica.chat_tokenize)
    for path in ("/", "/health", "/ping"):
        r.add_get(path, replica.health)
    r.add_get("/info", replica.info)
    r.add_get("/v1/models", replica.models)
    r.add_get("/metrics", replica.metrics_route)
    r.add_post("/_sim/health", replica.set_health)

    async def close_engine(_: web.Application) -> None:
        await engine.close()

    app.on_cleanup.append(close_engine)
    return app


@dataclass
class SimServer:
    """A bound, running replica (see ``start_server``)."""

    runner: web.AppRunner
    app: web.Application
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def engine(self) -> Engine:
        return self.app[ENGINE]

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_server(config: SimConfig, *, clock: Clock | None = None) -> SimServer:
    """Bind now (no startup delay) and serve in the background; ``port=0`` picks a free port."""
    app = create_app(config, clock=clock)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=config.shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    return SimServer(runner, app, config.host, port)


def ready_line(config: SimConfig, url: str) -> str:
    return (
        f"simulated replica ready on {url} (batch {config.batch_size}, "
        f"max_concurrent_requests {config.max_concurrent_requests}, "
        f"max_input_tokens {config.max_input_tokens}, max_total_tokens "
        f"{config.max_total_tokens}, speed {config.speed:g}, model {config.model_id}, "
        f"engine {config.engine})"
    )


async def serve(
    config: SimConfig,
    *,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    on_ready: Callable[[SimServer], None] | None = None,
) -> None:
    """Wait out the startup delay without listening (a loading replica refuses connections),
    then serve until ``stop`` is set or SIGTERM/SIGINT arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        if config.startup_delay > 0:
            log.info("simulated replica loading for %.1f s", config.startup_delay)
            try:
                await asyncio.wait_for(stop.wait(), config.startup_delay)
                return
            except TimeoutError:
                pass
        server = await start_server(config)
        if config.engine == "vllm":
            from .vllm_server import ON_ENGINE_DEATH, WATCHDOG_S

            # vLLM's launcher stops the server at its watchdog's next check after the
            # engine died (vllm 0.11.0 entrypoints/launcher.py watchdog_loop); exit 0.
            server.app[ON_ENGINE_DEATH].append(
                lambda: loop.call_later(WATCHDOG_S / config.speed, stop.set)
            )
        log.info(ready_line(config, server.url))
        if on_ready is not None:
            on_ready(server)
        try:
            await stop.wait()
        finally:
            log.info("simulated replica on %s stopping", server.url)
            await server.stop()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run(config: SimConfig) -> int:
    """Blocking entry point on uvloop; returns 0 after SIGTERM/SIGINT."""
    import uvloop

    uvloop.run(serve(config))
    return 0
