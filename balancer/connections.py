"""A listening site with a cap on open client connections.

aiohttp accepts every connection it is offered (3,000 idle ones in a second were measured),
each holding a file descriptor and buffers until ``client_timeout_s`` closes it. Past
``max_connections`` a new connection gets a TGI-shaped 503 with ``Retry-After`` and is
closed, and the ones already open are untouched. The count is the aiohttp server's own list
of connections (``web.Server.connections``, aiohttp 3.14.5 web_server.py), which a handler
joins in ``connection_made``, so a burst accepted in one loop turn can pass the cap by a few.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable

from aiohttp import web

from balancer.access import refusals
from balancer.errors import error_body

log = logging.getLogger("neuron_fleet.connections")

REFUSE_AFTER_S = 1.0
"""How long a refused connection may take to send its request before we just close it."""


def refusal(engine: str) -> bytes:
    """The whole 503 response a connection over the cap gets, in the engine's shape."""
    body = error_body(
        "Too many open connections to the balancer; retry shortly", "overloaded", 503, engine
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        "Retry-After: 1\r\n"
        "Server: neuron-fleet\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


FD_RESERVE = 128
"""Descriptors kept for replicas' health checks, log files, the tokenizer and the like."""


def effective_limit(configured: int) -> int:
    """``configured``, once every client connection can also hold one to a replica within
    ``RLIMIT_NOFILE``: the soft limit is raised as far as the hard one allows (a login
    shell's soft limit is often 1024; the systemd unit sets 65536), and the cap lowered if
    that is not enough — past the limit accept() fails with EMFILE, worse than a 503."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if not configured or soft == resource.RLIM_INFINITY:
        return configured
    needed = 2 * configured + FD_RESERVE
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    room = max(16, (soft - FD_RESERVE) // 2)
    if configured <= room:
        return configured
    log.warning(
        "max_connections %d lowered to %d: the open-file limit is %d (raise it with "
        "`ulimit -n` or LimitNOFILE=)",
        configured,
        room,
        soft,
    )
    return room


class _Refuse(asyncio.Protocol):
    """Answer the first bytes of the request with the 503 (a response written before the
    request arrives can be lost to the client's TCP reset), then close."""

    def __init__(self, response: bytes) -> None:
        self.response = response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._timer = asyncio.get_running_loop().call_later(REFUSE_AFTER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        self._timer.cancel()
        self.transport.write(self.response)  # type: ignore[attr-defined]
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()


class CappedFactory:
    """The protocol factory of ``loop.create_server``: aiohttp's handler, or a refusal."""

    def __init__(
        self,
        server: web.Server,
        limit: int,
        on_refuse: Callable[[], None],
        engine: str = "tgi",
    ) -> None:
        self.server = server
        self.limit = limit
        self.on_refuse = on_refuse
        self.refusal = refusal(engine)

    def __call__(self) -> asyncio.Protocol:
        if self.limit and len(self.server.connections) >= self.limit:
            self.on_refuse()
            refusals.warn(
                "too_many_connections",
                "refused a connection: %d open (max_connections)",
                self.limit,
            )
            return _Refuse(self.refusal)
        return self.server()  # type: ignore[return-value]


class CappedTCPSite(web.BaseSite):
    """``web.TCPSite`` with a connection cap (0: none)."""

    __slots__ = ("_engine", "_host", "_limit", "_on_refuse", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limit: int,
        on_refuse: Callable[[], None],
        backlog: int = 128,
        engine: str = "tgi",
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._limit = limit
        self._on_refuse = on_refuse
        self._engine = engine

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert isinstance(server, web.Server)
        self._server = await asyncio.get_running_loop().create_server(
            CappedFactory(server, effective_limit(self._limit), self._on_refuse, self._engine),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
