"""A listening site with a cap on open client connections.

aiohttp accepts every connection it is offered (3,000 idle ones in a second were measured),
each holding a file descriptor and buffers until ``client_timeout_s`` closes it. Past
``max_connections`` a new connection gets a TGI-shaped 503 with ``Retry-After`` and is
closed, and the ones already open are untouched. The count is the aiohttp server's own list
of connections (``web.Server.connections``, aiohttp 3.14.5 web_server.py), which a handler
joins in ``connection_made``, so a burst accepted in one loop turn can pass the cap by a few.

``max_connections_per_client`` caps the connections one socket address holds, so one
address cannot take them all: the protocol the factory returns (``_Gate``) learns the peer
in ``connection_made`` and either hands the transport to aiohttp's handler
(``transport.set_protocol``, asyncio and uvloop both have it) or answers the 503 itself.
Peers in ``trusted_proxies`` are exempt: a front proxy carries many clients, whose shares
the per-client quotas (balancer/quotas.py) keep apart by ``X-Forwarded-For``.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable, Sequence

from aiohttp import web

from balancer.access import refusals
from balancer.client_address import Network, is_trusted
from balancer.errors import error_body

log = logging.getLogger("neuron_fleet.connections")

REFUSE_AFTER_S = 1.0
"""How long a refused connection may take to send its request before we just close it."""


def refusal(message: str, engine: str) -> bytes:
    """The whole 503 response a refused connection gets, in the engine's shape."""
    body = error_body(message, "overloaded", 503, engine)
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        "Retry-After: 1\r\n"
        "Server: neuron-fleet\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


TOO_MANY = "Too many open connections to the balancer; retry shortly"
TOO_MANY_FROM_YOU = (
    "Too many open connections from your address (max_connections_per_client); close idle "
    "ones or retry shortly"
)


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

    _timer: asyncio.TimerHandle | None = None

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._timer = asyncio.get_running_loop().call_later(REFUSE_AFTER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.transport.write(self.answer)  # type: ignore[attr-defined]
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _Gate(_Refuse):
    """Admits a connection to aiohttp's handler unless its address holds its share."""

    def __init__(self, factory: CappedFactory) -> None:
        super().__init__(factory.client_refusal)
        self.factory = factory

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        handler = self.factory.admit(transport)
        if handler is None:
            super().connection_made(transport)
            return
        transport.set_protocol(handler)
        handler.connection_made(transport)


SWEEP_EVERY = 1024
"""Admitted connections between two sweeps of addresses whose connections all closed."""


class CappedFactory:
    """The protocol factory of ``loop.create_server``: aiohttp's handler, or a refusal."""

    def __init__(
        self,
        server: web.Server,
        limit: int,
        on_refuse: Callable[[], None],
        per_client: int = 0,
        trusted: Sequence[Network] = (),
        on_refuse_client: Callable[[], None] | None = None,
        engine: str = "tgi",
    ) -> None:
        self.server = server
        self.refusal = refusal(TOO_MANY, engine)
        self.client_refusal = refusal(TOO_MANY_FROM_YOU, engine)
        self.limit = limit
        self.on_refuse = on_refuse
        self.on_refuse_client = on_refuse_client or on_refuse
        self.per_client = per_client
        self.trusted = tuple(trusted)
        self.by_address: dict[str, list[asyncio.BaseProtocol]] = {}
        """Address -> aiohttp handlers of its connections (closed ones pruned lazily:
        aiohttp 3.14.5 base_protocol.py ``BaseProtocol.connected`` is False once the
        connection is lost)."""
        self._admitted = 0

    def __call__(self) -> asyncio.Protocol:
        if self.limit and len(self.server.connections) >= self.limit:
            self.on_refuse()
            refusals.warn(
                "too_many_connections",
                "refused a connection: %d open (max_connections)",
                self.limit,
            )
            return _Refuse(self.refusal)
        if self.per_client:
            return _Gate(self)
        return self.server()  # type: ignore[return-value]

    def open_from(self, address: str) -> int:
        """Open connections from ``address`` (admitted through the gate)."""
        handlers = [h for h in self.by_address.get(address, ()) if h.connected]  # type: ignore[attr-defined]
        if handlers:
            self.by_address[address] = handlers
        else:
            self.by_address.pop(address, None)
        return len(handlers)

    def admit(self, transport: asyncio.BaseTransport) -> asyncio.BaseProtocol | None:
        """aiohttp's handler for this connection, or None when its address holds its share
        (``max_connections_per_client``) and is not a trusted proxy."""
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else ""
        if is_trusted(address, self.trusted):
            address = ""  # a front proxy: never capped per address
        if address:
            held = self.open_from(address)
            if held >= self.per_client:
                self.on_refuse_client()
                refusals.warn(
                    "too_many_connections_per_client",
                    "refused a connection from %s: %d open (max_connections_per_client)",
                    address,
                    held,
                )
                return None
        handler = self.server()
        if address:
            self.by_address.setdefault(address, []).append(handler)
            self._admitted += 1
            if self._admitted % SWEEP_EVERY == 0:
                for other in list(self.by_address):
                    self.open_from(other)
        return handler


class CappedTCPSite(web.BaseSite):
    """``web.TCPSite`` with a connection cap (0: none)."""

    __slots__ = (
        "_engine",
        "_host",
        "_limit",
        "_on_refuse",
        "_on_refuse_client",
        "_per_client",
        "_port",
        "_trusted",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limit: int,
        on_refuse: Callable[[], None],
        per_client: int = 0,
        trusted: Sequence[Network] = (),
        on_refuse_client: Callable[[], None] | None = None,
        engine: str = "tgi",
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._limit = limit
        self._on_refuse = on_refuse
        self._per_client = per_client
        self._trusted = tuple(trusted)
        self._on_refuse_client = on_refuse_client
        self._engine = engine

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert isinstance(server, web.Server)
        self._server = await asyncio.get_running_loop().create_server(
            CappedFactory(
                server,
                effective_limit(self._limit),
                self._on_refuse,
                self._per_client,
                self._trusted,
                self._on_refuse_client,
                self._engine,
            ),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
