"""The aiohttp application: routes, request checks, and the ``Balancer`` that owns them.

Each generation request is checked once, cheaply, before it may take a replica slot:
size (413), content type (415), JSON syntax (400), token limits (422). Everything else is
the replica's business, so any TGI- or OpenAI-compatible server keeps its own semantics.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from balancer import access
from balancer.admission import Admission
from balancer.config import BalancerConfig
from balancer.errors import (
    ENGINE_KEY,
    bind_engine,
    expect_handler,
    json_error,
    validation_status,
)
from balancer.forecast import Forecast
from balancer.health import probe_health
from balancer.metrics import BalancerMetrics, route_label
from balancer.policy import make_policy
from balancer.quarantine import Quarantine
from balancer.quotas import BodyRefused, Quotas
from balancer.relay import CLIENT_GONE, RETRY_AFTER_S, STAGE, Relay, RelayRequest
from balancer.slo import DEADLINE_HEADER, BadDeadline, SloGate, SloScore, budget_s
from balancer.ticket import Ticket
from balancer.tokens import PromptTooLong, TokenCounter, requested_new_tokens
from balancer.upstream import Registry

log = logging.getLogger("neuron_fleet.app")

GENERATION_ROUTES = (
    "/generate",
    "/generate_stream",
    "/v1/chat/completions",
    "/v1/completions",
    "/",
    "/invocations",
)
PASSTHROUGH_GET = ("/info", "/v1/models", "/version")
"""``/version``: vLLM's (``{"version": "0.11.0"}``, vllm 0.11.0 api_server.py); TGI has none."""
PASSTHROUGH_POST = ("/tokenize", "/chat_tokenize", "/detokenize")
"""``/detokenize``: vLLM's (token ids -> ``{"prompt": text}``, vllm 0.11.0 api_server.py)."""
HANDLED_ROUTES = frozenset(GENERATION_ROUTES + PASSTHROUGH_GET + PASSTHROUGH_POST)
"""Routes whose handlers a drain waits for (``Balancer.handling``)."""
OPEN_ROUTES = frozenset({"/health", "/ping", "/live", "/metrics"})
"""Answered without an API key: probes and scrapers carry none."""
DEFAULT_NEW_TOKENS = 256
"""Work estimate for requests that do not say how many tokens they want."""
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

BALANCER_KEY = web.AppKey("balancer", "Balancer")


class Balancer:
    """Everything one balancer instance owns: registry view, admission, relay, metrics."""

    def __init__(
        self,
        config: BalancerConfig,
        registry: Registry,
        session: aiohttp.ClientSession,
        tokens: TokenCounter | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.starting = False
        """Set by the supervisor until ``min_ready`` replicas serve: /health 503."""
        self.stopping = False
        """A stop began: /health 503 so a front balancer takes this host out, while
        requests are still served (``shutdown_delay_s``)."""
        self.draining = False
        """Past the delay: new requests are refused (503 + Retry-After)."""
        self.tokens = tokens or TokenCounter(
            config.tokenizer_path, config.max_input_tokens, config.tokenize_concurrency
        )
        self.forecast = Forecast()
        self.admission = Admission(
            registry,
            make_policy(config.policy),
            config.max_queue,
            config.queue_timeout_s,
            on_wait=self._observe_wait,
            order=config.queue_order,
            ageing=config.queue_ageing,
            forecast=self.forecast,
            long_share=config.queue_long_share,
        )
        self.quarantine = Quarantine(config.quarantine_after, config.quarantine_ttl_s)
        self.metrics = BalancerMetrics(
            registry, lambda: self.admission.queue_depth, self.quarantine
        )
        self.relay = Relay(
            config,
            registry,
            self.admission,
            self.metrics,
            quarantine=self.quarantine,
            probe=functools.partial(probe_health, session, config),
        )
        self.relay.score = SloScore(self.forecast, self.metrics)
        self.slo = SloGate(self.forecast, self.admission, registry)
        self.quotas = Quotas(
            config,
            registry,
            self.metrics,
            frozenset(GENERATION_ROUTES),
        )
        self.replica_metrics: Any = None
        """Optional re-exporter of the replicas' own metrics (set by the server)."""
        self.handling = 0
        """Generation and passthrough handlers running, from the moment they start (still
        reading a body or tokenizing included): a drain waits for them too."""

    @property
    def phase(self) -> str:
        """``starting`` (fewer than ``min_ready`` ready), ``serving``, ``stopping`` (the
        shutdown delay: /health 503, requests still served) or ``draining`` (new requests
        refused, in-flight ones finishing)."""
        if self.draining:
            return "draining"
        if self.stopping:
            return "stopping"
        return "starting" if self.starting else "serving"

    def _observe_wait(self, seconds: float) -> None:
        self.metrics.queue_wait.observe(seconds)

    @property
    def inflight(self) -> int:
        return sum(r.inflight for r in self.registry.replicas)

    @property
    def idle(self) -> bool:
        return (
            self.handling == 0
            and self.inflight == 0
            and self.admission.queue_depth == 0
            and self.relay.active == 0
        )

    def _refuse_draining(self, request_id: str) -> web.Response:
        return json_error(
            503,
            "The balancer is shutting down; retry on another instance",
            "unavailable",
            headers={"Retry-After": str(RETRY_AFTER_S), "x-request-id": request_id},
        )

    # ------------------------------------------------------------------ handlers
    async def generation(self, request: web.Request) -> web.StreamResponse:
        request_id = _request_id(request)
        if self.draining:
            return self._refuse_draining(request_id)
        body, doc = await _read_json(request, self)
        new_tokens = requested_new_tokens(doc)
        if new_tokens is not None and (
            not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 0
        ):
            raise _Invalid(422, f"max tokens must be a non-negative integer, got {new_tokens!r}")
        limit = self.config.max_input_tokens
        try:
            prompt_tokens = await self.tokens.count_request(doc)
        except PromptTooLong as exc:
            raise _Invalid(
                422,
                f"Input validation error: `inputs` must have less than {limit} tokens. Given: "
                f"a prompt of {exc.chars} characters, more than {limit} tokens can hold "
                f"({exc.max_chars} characters)",
                reason="too_many_chars",
            ) from None
        self.metrics.prompt_tokens.observe(prompt_tokens)
        if limit and self.tokens.exact and prompt_tokens > limit:
            raise _Invalid(
                422,
                f"Input validation error: `inputs` must have less than {limit} tokens. "
                f"Given: {prompt_tokens}",
                reason="too_many_tokens",
            )
        path = request.path
        openai = path.startswith("/v1/") or (
            path == "/invocations" and ("messages" in doc or "prompt" in doc)
        )
        work = prompt_tokens + (new_tokens if new_tokens is not None else DEFAULT_NEW_TOKENS)
        if self.config.max_total_tokens:
            work = min(work, self.config.max_total_tokens)
        try:
            budget, by_header = budget_s(
                self.config.ttft_slo_s, request.headers.get(DEADLINE_HEADER)
            )
        except BadDeadline as exc:
            raise _Invalid(400, str(exc), reason="bad_deadline") from None
        now = time.monotonic()
        stream = path == "/generate_stream" or doc.get("stream") is True
        ticket = Ticket(
            prompt_tokens,
            new_tokens,
            now,
            budget_s=budget,
            long=prompt_tokens >= self.config.queue_long_tokens,
            stream=stream,
        )
        refusal = self.slo.check(ticket, now, by_header)
        if refusal is not None:
            self.metrics.rejected.labels(reason=refusal.reason).inc()
            self.metrics.slo_requests.labels(
                outcome="refused", prompt_class=ticket.prompt_class
            ).inc()
            return json_error(
                429,
                refusal.message,
                "overloaded",
                headers={**refusal.headers, "x-request-id": request_id},
            )
        rr = RelayRequest(
            route_label(path),
            body,
            request_id,
            openai,
            admit=True,
            work=work,
            prompt_tokens=prompt_tokens,
            stream=stream,
            ticket=ticket,
        )
        if self.draining:  # the drain began while the body arrived or the prompt was counted
            return self._refuse_draining(request_id)
        return await self.relay.forward(request, rr)

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        # TGI's GET /info and /v1/models take no body: never wait for one a client announces.
        # aiohttp 3.14.5 (web_protocol.py, RequestHandler.start) reads and drops an unread
        # body after the response for up to lingering_time (10 s), then closes the
        # connection: outside any handler, so it holds no passthrough slot.
        body = b""
        if request.method == "POST" and request.can_read_body:
            body = await _read_body(request, self)
        request_id = _request_id(request)
        if self.draining:
            return self._refuse_draining(request_id)
        async with self.quotas.passthrough_slot(request) as refusal:
            if refusal is not None:
                return refusal
            rr = RelayRequest(route_label(request.path), body, request_id, False, admit=False)
            return await self.relay.forward(request, rr)

    async def health(self, request: web.Request) -> web.Response:
        """200 when this host can take a request now; 503 (+ Retry-After) while it starts,
        stops, or has no routable replica, so a front load balancer (ALB target group,
        HAProxy ``option httpchk``, a Kubernetes readiness probe) takes it out of rotation.
        Documented in docs/scale-out.md."""
        ready = self.registry.ready_count()
        total = len(self.registry)
        if self.stopping or self.draining:
            problem = "The balancer is shutting down"
        elif ready == 0:
            problem = f"No ready replica ({ready}/{total} ready); see `neuron-fleet status`"
        elif self.starting:
            problem = f"Starting: {ready}/{total} replicas ready, waiting for min_ready"
        else:
            return web.json_response({"status": "ok", "ready_replicas": ready, "replicas": total})
        return json_error(503, problem, "healthcheck", headers={"Retry-After": str(RETRY_AFTER_S)})

    async def live(self, request: web.Request) -> web.Response:
        """200 whenever the event loop answers, even while models load or the host drains:
        a liveness probe (Kubernetes) must not kill a pod that is only starting or stopping;
        /health is the readiness signal."""
        return web.json_response({"status": "alive"})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.prometheus)
        if self.replica_metrics is not None:
            body += await self.replica_metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _Invalid(Exception):
    """A request refused before it takes a slot; counted once, by ``reason``."""

    def __init__(
        self,
        status: int,
        message: str,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = validation_status(status)
        self.message = message
        self.reason = reason or f"invalid_{status}"
        self.headers = headers
        self.close = close
        """Close the connection after the answer: the rest of a refused body is not read."""
        self.error_type = error_type or ERROR_TYPES.get(status, "validation")


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.match(given) else uuid.uuid4().hex


async def _read_body(request: web.Request, balancer: Balancer) -> bytes:
    """The whole body, counted against the body budgets as it arrives, within
    ``body_timeout_s`` (balancer/quotas.py); a refusal is answered to this request only."""
    try:
        return await balancer.quotas.read_body(request)
    except BodyRefused as exc:
        raise _Invalid(
            exc.status, exc.message, exc.reason, exc.headers, close=True, error_type=exc.error_type
        ) from None


async def _read_json(request: web.Request, balancer: Balancer) -> tuple[bytes, dict[str, Any]]:
    max_bytes = balancer.config.max_body_bytes
    length = request.content_length
    if length is not None and length > max_bytes:
        raise _Invalid(413, f"Request body of {length} bytes is over the {max_bytes}-byte limit")
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise _Invalid(
            415,
            f"Expected request with `Content-Type: application/json`, got {ctype or 'none'!r}",
        )
    body = await _read_body(request, balancer)
    try:
        doc = json.loads(body)
    except UnicodeDecodeError:
        raise _Invalid(400, "Request body is not valid UTF-8") from None
    except RecursionError:  # "[[[[..." deeper than the interpreter's recursion limit
        raise _Invalid(400, "Request body is nested too deeply to parse as JSON") from None
    except ValueError as exc:
        raise _Invalid(400, f"Failed to parse the request body as JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _Invalid(422, "Request body must be a JSON object")
    return body, doc


ERROR_TYPES = {
    400: "validation",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "validation",
    415: "validation",
    422: "validation",
}


def _make_observer(balancer: Balancer) -> Any:
    metrics = balancer.metrics
    api_keys = balancer.config.api_keys

    @web.middleware
    async def observe(request: web.Request, handler: Any) -> web.StreamResponse:
        bind_engine(request)  # every error below, ours or the relay's, in the engine's shape
        started = time.monotonic()
        route = route_label(request.path)
        code = "500"
        counted = request.path in HANDLED_ROUTES
        if counted:
            balancer.handling += 1
        try:
            if (
                api_keys
                and request.path not in OPEN_ROUTES
                and not request.path.startswith("/fleet/")
            ):
                if not access.bearer_matches(request.headers.get("Authorization", ""), api_keys):
                    code = "401"
                    metrics.rejected.labels(reason="unauthorized").inc()
                    access.refusals.warn(
                        "api-401",
                        "refused %s %s from %s: missing or invalid API key",
                        request.method,
                        request.path,
                        request.remote or "?",
                    )
                    return json_error(
                        401,
                        "Missing or invalid API key: send `Authorization: Bearer <key>`",
                        "unauthorized",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
            response = await handler(request)
            code = str(response.status)
            if request.get(CLIENT_GONE):
                code = "499"
                metrics.client_disconnects.labels(stage="streaming").inc()
            return response
        except _Invalid as exc:
            code = str(exc.status)
            metrics.rejected.labels(reason=exc.reason).inc()
            error = json_error(exc.status, exc.message, exc.error_type, exc.headers)
            if exc.close:
                # Connection: close, so the rest of the body is never parsed as a request
                # (aiohttp still reads and drops it for up to lingering_time, 10 s).
                error.force_close()
            return error
        except web.HTTPException as exc:
            code = str(exc.status)
            if exc.status < 400:
                raise
            reason = exc.text or exc.reason
            if exc.status == 404:
                reason = f"No route {request.method} {request.path}"
            elif exc.status == 405:
                reason = f"Method {request.method} is not allowed on {request.path}"
            elif exc.status == 413:
                reason = f"Request body is over the {balancer.config.max_body_bytes}-byte limit"
            return json_error(
                exc.status,
                reason,
                ERROR_TYPES.get(exc.status, "error"),
                headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
            )
        except asyncio.CancelledError:
            code = "499"
            metrics.client_disconnects.labels(stage=request.get(STAGE, "request")).inc()
            raise
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.path)
            return json_error(500, "Internal error in the balancer; see its log", "internal")
        finally:
            if counted:
                balancer.handling -= 1
            metrics.requests.labels(route=route, code=code).inc()
            metrics.request_duration.labels(route=route).observe(time.monotonic() - started)

    return observe


async def _before_head(
    balancer: Balancer, request: web.Request, response: web.StreamResponse
) -> None:
    """Last look at every response head (ours and relayed replicas'), once per request.

    A refusal (429, 503) without ``Retry-After`` gets one, whoever wrote it: a replica's own
    429 passed through, an admin 503. Once a stop began, every response says
    ``Connection: close``, so a front balancer keeps no idle connection to a host that will
    soon stop listening (reusing one would fail a request it already sent). ``Server``
    names no software versions for scanners (aiohttp would send ``Python/3.11
    aiohttp/3.x``); aiohttp set its own before this hook, so it is replaced."""
    response.headers["Server"] = "neuron-fleet"
    if response.status in (429, 503) and "Retry-After" not in response.headers:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    if balancer.stopping or balancer.draining:
        # aiohttp 3.14.5 (web_response.py, StreamResponse._start) runs this hook after
        # _prepare_headers() has chosen the Connection header, so set it ourselves too;
        # force_close() makes the server close the connection after this response.
        response.force_close()
        response.headers["Connection"] = "close"


def create_metrics_app(balancer: Balancer) -> web.Application:
    """The ``metrics_listen`` listener's app: ``GET /metrics`` and nothing else."""
    app = web.Application()
    app.router.add_get("/metrics", balancer.metrics_endpoint, allow_head=False)
    return app


def create_app(balancer: Balancer) -> web.Application:
    app = web.Application(
        client_max_size=balancer.config.max_body_bytes,
        # observe first: it checks API keys, which the quotas then use to tell clients apart
        middlewares=[_make_observer(balancer), balancer.quotas.middleware],
        handler_args={"max_field_size": 16384, "max_line_size": 16384},
    )
    app[BALANCER_KEY] = balancer
    app[ENGINE_KEY] = balancer.config.engine
    app.on_response_prepare.append(functools.partial(_before_head, balancer))
    post = functools.partial(app.router.add_post, expect_handler=expect_handler)
    get = functools.partial(app.router.add_get, allow_head=False, expect_handler=expect_handler)
    for path in GENERATION_ROUTES:
        post(path, balancer.generation)
    for path in PASSTHROUGH_POST:
        post(path, balancer.passthrough)
    for path in PASSTHROUGH_GET:
        get(path, balancer.passthrough)
    for path in ("/health", "/ping", "/"):
        # HEAD too: load balancers and uptime probes often check with HEAD.
        app.router.add_get(path, balancer.health, allow_head=True, expect_handler=expect_handler)
    get("/live", balancer.live)
    if not balancer.config.metrics_listen:  # else only on its own port (server.py)
        get("/metrics", balancer.metrics_endpoint)
    from balancer.admin import add_admin_routes

    add_admin_routes(app, balancer)
    return app
