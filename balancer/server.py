"""Run a balancer: listen, health-check, watch timeouts, and stop gracefully.

``BalancerServer`` is used both by ``neuron-fleet balance`` (replicas given as URLs) and by
the supervisor (``serve``/``demo``), which shares its replica registry and passes itself as
the ``FleetControl`` for the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace

import aiohttp
from aiohttp import web

from balancer import token_file
from balancer.admin import FLEET_KEY, FleetControl
from balancer.app import Balancer, create_app, create_metrics_app
from balancer.client_address import WIDEST_IPV4_PREFIX, WIDEST_IPV6_PREFIX, too_wide
from balancer.config import BalancerConfig
from balancer.connections import CappedTCPSite
from balancer.health import HealthChecker
from balancer.replica_metrics import ReplicaMetricsExporter
from balancer.server_log import ServerLog
from balancer.tasks import supervised
from balancer.upstream import Registry, Replica, ReplicaState

log = logging.getLogger("neuron_fleet.server")

WATCHDOG_TICK_S = 0.25


def registry_from_config(config: BalancerConfig) -> Registry:
    """Replicas given as URLs (balance-only mode): ready for routing once health passes."""
    registry = Registry()
    for i, spec in enumerate(config.upstreams):
        cap = spec.slot_cap if spec.slot_cap is not None else config.max_inflight_per_replica
        registry.add(
            Replica(
                name=spec.name or f"replica-{i}",
                url=spec.url,
                slot_cap=cap,
                cores=spec.cores,
                state=ReplicaState.READY,
            )
        )
    return registry


class BalancerServer:
    def __init__(
        self,
        config: BalancerConfig,
        registry: Registry | None = None,
        fleet: FleetControl | None = None,
    ) -> None:
        self.generated_admin_token = not config.admin_token
        """No token was configured: one is made up and saved for `neuron-fleet status`."""
        if self.generated_admin_token:
            config = replace(config, admin_token=token_file.generate_token())
        self.config = config
        self.registry = registry if registry is not None else registry_from_config(config)
        self.fleet = fleet
        self.balancer: Balancer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.bound_port: int | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.metrics_port: int | None = None
        """Where ``/metrics`` is served when ``metrics_listen`` is set (port 0: the one bound)."""

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address is taken."""
        cfg = self.config
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=30, ttl_dns_cache=None, use_dns_cache=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=cfg.connect_timeout_s, sock_connect=cfg.connect_timeout_s
            ),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            read_bufsize=2**16,
        )
        balancer = Balancer(cfg, self.registry, self._session)
        wide = too_wide(balancer.quotas.trusted_proxies)
        if wide:
            log.warning(
                "trusted_proxies %s: wider than a load balancer needs (its subnets: IPv4 /%d "
                "or narrower, IPv6 /%d or narrower); any host in the range can name itself "
                "any client in X-Forwarded-For and so pick its per-client limits. List the "
                "load balancer's subnets only (docs/security.md, 'Behind a front proxy')",
                ", ".join(str(n) for n in wide),
                WIDEST_IPV4_PREFIX,
                WIDEST_IPV6_PREFIX,
            )
        balancer.replica_metrics = ReplicaMetricsExporter(self.registry, self._session)
        self.balancer = balancer
        app = create_app(balancer)
        if self.fleet is not None:
            app[FLEET_KEY] = self.fleet
        self._runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that leaves cancels its handler: frees its slot
            access_log=None,
            shutdown_timeout=1.0,
            # aiohttp arms this timer when a connection opens and after each response, and
            # only closes a connection still waiting for a complete request head: so it is
            # both the keep-alive idle limit and the deadline for a client trickling its
            # headers in (slowloris). Bodies have their own deadline (app._read_body).
            keepalive_timeout=cfg.client_timeout_s,
            logger=ServerLog(balancer.metrics.rejected.labels(reason="malformed_http").inc),
        )
        await self._runner.setup()
        site = CappedTCPSite(
            self._runner,
            cfg.host,
            cfg.port,
            limit=cfg.max_connections,
            on_refuse=balancer.metrics.rejected.labels(reason="too_many_connections").inc,
            per_client=cfg.max_connections_per_client,
            trusted=balancer.quotas.trusted_proxies,
            on_refuse_client=balancer.metrics.rejected.labels(
                reason="too_many_connections_per_client"
            ).inc,
            backlog=1024,
            engine=cfg.engine,
        )
        try:
            await site.start()
        except OSError:
            await self._cleanup()
            raise
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else cfg.port
        if cfg.metrics_listen:
            try:
                await self._start_metrics(cfg.metrics_listen)
            except OSError:
                await self._cleanup()
                raise
        if self.generated_admin_token:
            self._save_admin_token()
        health = HealthChecker(cfg, self.registry, self._session)
        loop = asyncio.get_running_loop()
        failed = balancer.metrics.background_task_failures
        self._tasks = [
            loop.create_task(
                supervised("health-checks", health.run, lambda n: failed.labels(task=n).inc()),
                name="health-checks",
            ),
            loop.create_task(
                supervised(
                    "stream-watchdog", self._watchdog, lambda n: failed.labels(task=n).inc()
                ),
                name="stream-watchdog",
            ),
            loop.create_task(balancer.tokens.load(), name="tokenizer-load"),
        ]
        log.info(
            "balancer listening on http://%s:%s (%d replicas, policy %s)",
            cfg.host,
            self.bound_port,
            len(self.registry),
            cfg.policy,
        )

    def _save_admin_token(self) -> None:
        assert self.config.admin_token and self.bound_port is not None
        try:
            path = token_file.write_token(self.bound_port, self.config.admin_token)
        except (OSError, token_file.TokenFileError) as exc:
            log.warning(
                "admin API: no token configured and the generated one could not be saved (%s): "
                "/fleet/* stays closed; set NEURON_FLEET_ADMIN_TOKEN to use it",
                exc,
            )
            return
        log.info(
            "admin API: no token configured; generated one in %s (0600, read by "
            "`neuron-fleet status`)",
            path,
        )

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.bound_port}"

    async def _watchdog(self) -> None:
        assert self.balancer is not None
        relay = self.balancer.relay
        loop = asyncio.get_running_loop()
        tick = min(
            WATCHDOG_TICK_S, self.config.idle_timeout_s / 4, self.config.client_timeout_s / 4
        )
        while True:
            await asyncio.sleep(tick)
            relay.check_timeouts(loop.time())

    def announce_stop(self, delay_s: float | None = None) -> None:
        """First step of a stop: ``/health`` answers 503 (a front balancer takes this host
        out) and responses close their connections, but requests are still served."""
        if self.balancer is not None and not self.balancer.stopping:
            self.balancer.stopping = True
            if delay_s:
                log.info(
                    "stopping: /health now answers 503; still serving new requests for %g s",
                    delay_s,
                )

    def refuse_new(self) -> None:
        """Second step: new requests get 503 + Retry-After; in-flight ones go on."""
        self.announce_stop()
        if self.balancer is not None and not self.balancer.draining:
            self.balancer.draining = True
            log.info("stopping: refusing new requests; finishing %d in flight", self.inflight)

    async def begin_shutdown(self, delay_s: float = 0.0) -> None:
        """Both steps, ``delay_s`` apart (``shutdown_delay_s``: longer than the time a
        front balancer takes to notice the 503 on /health, so it stops sending first)."""
        self.announce_stop(delay_s)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        self.refuse_new()

    async def end_streams(self) -> int:
        """The drain timeout ran out: end the responses still relaying, each stream with an
        explicit error event (balancer/relay.py ``Relay.end_streams``)."""
        if self.balancer is None:
            return 0
        ended = await self.balancer.relay.end_streams()
        if ended:
            log.warning("drain timeout: ended %d responses still relaying", ended)
        return ended

    @property
    def inflight(self) -> int:
        if self.balancer is None:
            return 0
        return self.balancer.inflight + self.balancer.admission.queue_depth

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight or queued; False if ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        while self.balancer is not None and not self.balancer.idle:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._cleanup()

    async def _start_metrics(self, listen: str) -> None:
        """``/metrics`` alone on ``metrics_listen`` (see BalancerConfig.metrics_listen)."""
        assert self.balancer is not None
        host, _, port = listen.rpartition(":")
        self._metrics_runner = web.AppRunner(
            create_metrics_app(self.balancer), access_log=None, shutdown_timeout=1.0
        )
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, host.strip("[]") or None, int(port))
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.metrics_port = sockets[0].getsockname()[1] if sockets else int(port)

    async def _cleanup(self) -> None:
        if self.generated_admin_token and self.bound_port is not None:
            assert self.config.admin_token
            token_file.remove_token(self.bound_port, self.config.admin_token)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self.balancer is not None:
            self.balancer.relay.pool.close()
            self.balancer.relay.policy.fates.close()  # watches still waiting for a fate
        if self._session is not None:
            await self._session.close()
            self._session = None
