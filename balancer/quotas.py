"""Fair sharing in front of admission: what one client may hold, and what all bodies may weigh.

Admission (balancer/admission.py) hands slots out in order and queues the rest up to
``max_queue``; on its own it lets one client fill the whole queue. This layer runs first:

- a client — its API key when keys are configured, else its address (the one
  ``X-Forwarded-For`` names when the peer is in ``trusted_proxies``) — may have at most the
  fleet's slot count + ``max_queued_per_client`` generation requests outstanding (in a slot
  or queued); beyond it: 429 + ``Retry-After``;
- request bodies (kept until the response ends, for retries) count against
  ``max_buffered_body_bytes`` at ``BODY_COST`` times the bytes *received* (``read_body``),
  never the length a client announces: headers announcing a body that never comes hold
  nothing. One client may hold ``max_buffered_body_bytes_per_client`` of it; the request
  whose bytes pass its share gets 413 + ``Retry-After`` (RFC 9110 15.5.14: "If the
  condition is temporary, the server SHOULD generate a Retry-After"), the one whose bytes
  pass the total 503 + ``Retry-After``. A body must arrive within ``body_timeout_s``, else
  408 (slowloris). Both close the connection: the rest of the body is not read;
- ``/tokenize``, ``/info`` and ``/v1/models`` take no slot, so they get their own small
  limits: ``max_passthrough_requests`` at a time per client and
  ``max_passthrough_total`` for all clients; beyond either: 429. They are counted only
  once the body has been read (``passthrough_slot``, called by the handler), so clients
  sending slow bodies cannot hold them.
"""

from __future__ import annotations

import asyncio
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

BODY_ACCOUNT = web.RequestKey("body_account", "BodyAccount")

BODY_COST = 2
"""Memory a held body costs per byte: the bytes (kept for retries) and the parsed JSON's
strings (measured: an 8 MB body, +15 MB RSS while queued)."""


class BodyRefused(Exception):
    """A body refused while it arrived (413 over a share, 503 over the total, 408 too slow):
    the handler answers it in the engine's error shape and closes the connection."""

    def __init__(
        self,
        status: int,
        message: str,
        reason: str,
        error_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.error_type = error_type
        """``overloaded`` for a share or budget (come back later), else as the status says."""
        self.headers = headers or {}


@dataclass
class BodyAccount:
    """What one request's body holds of the budgets, released when its handler ends."""

    client: str
    held: int = 0


@dataclass
class Quotas:
    config: BalancerConfig
    registry: Registry
    metrics: BalancerMetrics
    generation_routes: frozenset[str]
    outstanding: dict[str, int] = field(default_factory=dict)
    """Client -> its generation requests not yet answered (entries at 0 are removed)."""
    body_bytes: int = 0
    """Budget held by all request bodies (``BODY_COST`` x bytes received)."""
    body_by_client: dict[str, int] = field(default_factory=dict)
    """Client -> budget its bodies hold (entries at 0 are removed)."""
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
        if request.method != "POST":
            return await handler(request)
        account = request[BODY_ACCOUNT] = BodyAccount(self.client(request))
        try:
            if request.path in self.generation_routes:
                return await self._generation(request, handler, account.client)
            return await handler(request)
        finally:
            self._release(account)

    async def read_body(self, request: web.Request) -> bytes:
        """The whole body, each chunk counted against the budgets as it arrives; raises
        BodyRefused (413 over ``max_body_bytes`` or the client's share, 503 over the total,
        408 after ``body_timeout_s``).

        Reads ``request.content`` chunk by chunk instead of ``request.read()``: aiohttp
        3.14.5 (web_request.py, ``BaseRequest.read``) first raises the stream's buffer limit
        to ``client_max_size`` and counts nothing until the whole body is in. Bytes not read
        yet wait in aiohttp's StreamReader, which pauses the socket past its high-water mark
        (streams.py ``StreamReader.feed_data``: 2 x its limit, the server's read_bufsize,
        ``helpers.DEFAULT_CHUNK_SIZE`` = 256 KiB), so what is not counted yet is bounded per
        connection; this loop reads them as they come."""
        account = request.get(BODY_ACCOUNT)  # None: not a POST (the middleware skips those)
        cfg = self.config
        body = bytearray()
        try:
            async with asyncio.timeout(cfg.body_timeout_s):
                while chunk := await request.content.readany():
                    if len(body) + len(chunk) > cfg.max_body_bytes:
                        raise BodyRefused(
                            413,
                            f"Request body is over the {cfg.max_body_bytes}-byte limit",
                            "invalid_413",
                            "validation",
                        )
                    if account is not None:
                        self._charge(request, account, len(chunk))
                    body += chunk
        except TimeoutError:
            self._log(request, "invalid_408")
            raise BodyRefused(
                408,
                f"The request body did not arrive within {cfg.body_timeout_s:g} s "
                f"(body_timeout_s): {len(body)} bytes came",
                "invalid_408",
                "timeout",
            ) from None
        return bytes(body)

    def _charge(self, request: web.Request, account: BodyAccount, size: int) -> None:
        cfg = self.config
        cost = BODY_COST * size
        who = account.client
        mine = self.body_by_client.get(who, 0)
        share = cfg.max_buffered_body_bytes_per_client
        if share and share < cfg.max_buffered_body_bytes and mine + cost > share:
            self._log(request, "client_body_budget")
            raise BodyRefused(
                413,
                f"This client's request bodies at the balancer already hold {mine} bytes of "
                f"its {share}-byte share (max_buffered_body_bytes_per_client, bodies count "
                f"twice); retry when some requests finish",
                "client_body_budget",
                "overloaded",
                {"Retry-After": "1"},
            )
        if self.body_bytes + cost > cfg.max_buffered_body_bytes:
            self._log(request, "body_budget")
            raise BodyRefused(
                503,
                "The balancer holds as many request bodies as its memory budget allows "
                "(max_buffered_body_bytes); retry shortly",
                "body_budget",
                "overloaded",
                {"Retry-After": "1"},
            )
        account.held += cost
        self.body_bytes += cost
        self.body_by_client[who] = mine + cost

    def _release(self, account: BodyAccount) -> None:
        if not account.held:
            return
        self.body_bytes -= account.held
        left = self.body_by_client[account.client] - account.held
        if left:
            self.body_by_client[account.client] = left
        else:
            del self.body_by_client[account.client]
        account.held = 0

    async def _generation(
        self, request: web.Request, handler: Handler, who: str
    ) -> web.StreamResponse:
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
        self.outstanding[who] = held + 1
        try:
            return await handler(request)
        finally:
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
        self._log(request, reason)
        return json_error(status, message, "overloaded", headers={"Retry-After": "1"})

    def _log(self, request: web.Request, reason: str) -> None:
        """Logged with the client's address (never its key), once per reason and period."""
        refusals.warn(
            reason,
            "refused %s %s from %s: %s",
            request.method,
            request.path,
            self.address(request),
            reason,
        )
