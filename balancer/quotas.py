"""Fair sharing in front of admission: what one client may hold, and what all bodies may weigh.

Admission (balancer/admission.py) hands slots out in order and queues the rest up to
``max_queue``; on its own it lets one client fill the whole queue. This layer runs first:

- a client — its API key when keys are configured, else its address (the one
  ``X-Forwarded-For`` names when the peer is in ``trusted_proxies``) — may have at most the
  fleet's slot count + ``max_queued_per_client`` generation requests outstanding (in a slot
  or queued); beyond it: 429 + ``Retry-After``;
- the bodies of outstanding requests (kept until the stream ends, for retries) count
  against ``max_buffered_body_bytes``, reserved from ``Content-Length`` before the body is
  read (``max_body_bytes`` when the length is not given) at ``BODY_COST`` times their size;
  beyond it: 503 + ``Retry-After``;
- ``/tokenize``, ``/info`` and ``/v1/models`` take no slot, so they get their own small
  limits: ``max_passthrough_requests`` at a time per client and
  ``max_passthrough_total`` for all clients; beyond either: 429. They are counted only
  once the body has been read (``passthrough_slot``, called by the handler), so clients
  sending slow bodies cannot hold them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from balancer.access import refusals
from balancer.client_address import Network, client_address, parse_networks
from balancer.errors import json_error

if TYPE_CHECKING:
    from balancer.config import BalancerConfig
    from balancer.metrics import BalancerMetrics
    from balancer.upstream import Registry

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

BODY_COST = 2
"""Memory a held body costs per byte: the bytes (kept for retries) and the parsed JSON's
strings (measured: an 8 MB body, +15 MB RSS while queued)."""


@dataclass
class Quotas:
    config: BalancerConfig
    registry: Registry
    metrics: BalancerMetrics
    generation_routes: frozenset[str]
    outstanding: dict[str, int] = field(default_factory=dict)
    """Client -> its generation requests not yet answered (entries at 0 are removed)."""
    body_bytes: int = 0
    passthrough: int = 0
    """Passthrough requests being relayed (their bodies read), all clients."""
    passthrough_by_client: dict[str, int] = field(default_factory=dict)
    """Client -> its passthrough requests being relayed (entries at 0 are removed)."""
    trusted_proxies: tuple[Network, ...] = ()

    def __post_init__(self) -> None:
        self.trusted_proxies = parse_networks(self.config.trusted_proxies)

    def client(self, request: web.Request) -> str:
        """The API key when keys are configured (it was checked before this runs), else
        the socket peer's address, or the address ``X-Forwarded-For`` names when the peer
        is one of ``trusted_proxies`` (from anyone else the header is a client's say-so)."""
        if self.config.api_keys:
            return "key:" + request.headers.get("Authorization", "").partition(" ")[2].strip()
        return "addr:" + self.address(request)

    def address(self, request: web.Request) -> str:
        return client_address(
            request.remote, request.headers.getall("X-Forwarded-For", ()), self.trusted_proxies
        )

    def client_limit(self) -> int:
        """0: no per-client limit."""
        extra = self.config.max_queued_per_client
        if not extra:
            return 0
        return sum(r.slot_cap for r in self.registry.replicas) + extra

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and request.path in self.generation_routes:
            return await self._generation(request, handler)
        return await handler(request)

    async def _generation(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        cfg = self.config
        who = self.client(request)
        held = self.outstanding.get(who, 0)
        limit = self.client_limit()
        if limit and held >= limit:
            return self._refuse(
                request,
                429,
                f"This client already has {held} requests waiting or running at the balancer "
                f"(limit {limit}: slots + max_queued_per_client); retry when some finish",
                "client_quota",
            )
        length = request.content_length
        size = BODY_COST * (
            cfg.max_body_bytes if length is None else min(length, cfg.max_body_bytes)
        )
        if self.body_bytes + size > cfg.max_buffered_body_bytes:
            return self._refuse(
                request,
                503,
                "The balancer holds as many request bodies as its memory budget allows "
                "(max_buffered_body_bytes); retry shortly",
                "body_budget",
            )
        self.outstanding[who] = held + 1
        self.body_bytes += size
        try:
            return await handler(request)
        finally:
            self.body_bytes -= size
            left = self.outstanding[who] - 1
            if left:
                self.outstanding[who] = left
            else:
                del self.outstanding[who]

    @asynccontextmanager
    async def passthrough_slot(self, request: web.Request) -> AsyncIterator[web.Response | None]:
        """Yields a refusal (429) when the client or everyone is at the passthrough limit,
        else None while the slot is held. Taken after the body is read: a body that never
        arrives must not keep other clients from /info."""
        cfg = self.config
        who = self.client(request)
        mine = self.passthrough_by_client.get(who, 0)
        if cfg.max_passthrough_requests and mine >= cfg.max_passthrough_requests:
            yield self._refuse(
                request,
                429,
                f"This client already has {mine} /tokenize, /info or /v1/models requests "
                "running (max_passthrough_requests); retry shortly",
                "passthrough_limit",
            )
            return
        if cfg.max_passthrough_total and self.passthrough >= cfg.max_passthrough_total:
            yield self._refuse(
                request,
                429,
                f"{self.passthrough} /tokenize, /info and /v1/models requests are already "
                "running (max_passthrough_total); retry shortly",
                "passthrough_limit",
            )
            return
        self.passthrough += 1
        self.passthrough_by_client[who] = mine + 1
        try:
            yield None
        finally:
            self.passthrough -= 1
            left = self.passthrough_by_client[who] - 1
            if left:
                self.passthrough_by_client[who] = left
            else:
                del self.passthrough_by_client[who]

    def _refuse(self, request: web.Request, status: int, message: str, reason: str) -> web.Response:
        """Counted by ``reason``; logged with the client's address (never its key)."""
        self.metrics.rejected.labels(reason=reason).inc()
        refusals.warn(
            reason,
            "refused %s %s from %s: %s",
            request.method,
            request.path,
            self.address(request),
            reason,
        )
        return json_error(status, message, "overloaded", headers={"Retry-After": "1"})
