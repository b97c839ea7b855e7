"""``neuron-fleet serve``: the replicas of a fleet.toml and the balancer, in one process.

``FleetService`` is the whole service: it starts the balancer first (so ``/health``
answers 503 "no ready replica" while models load), then every replica, reports to systemd,
and turns signals into actions:

    SIGTERM / SIGINT   graceful stop: /health 503 at once while requests are still served
                       for [balancer] shutdown_delay_s (a front load balancer stops sending
                       meanwhile), then refuse new requests (503 + Retry-After), let
                       in-flight requests finish (up to fleet.drain_timeout_s), stop every
                       replica in parallel, stop listening, exit 0. A second signal skips
                       the waits and kills.

It runs the same under systemd (Type=notify) and as a container's PID 1 (no systemd:
notifications are no-ops; logs go to stderr, or stdout with ``--log-stream stdout``).
    SIGHUP             rolling restart, one replica at a time, no request lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from balancer.logs import add_logging_arguments, configure_logging
from balancer.upstream import ReplicaState
from supervisor import reaper
from supervisor.fleet import Fleet, FleetBusyError, build_registry
from supervisor.replica import ReplicaStartError
from supervisor.systemd import SystemdNotifier

if TYPE_CHECKING:
    from supervisor.config import FleetConfig

log = logging.getLogger("neuron_fleet.serve")

STATUS_TICK_S = 1.0
"""Also re-check readiness this often (health flips do not always notify the registry)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", required=True, metavar="FILE", help="the fleet.toml to run")
    add("--env-file", metavar="FILE", help="KEY=VALUE file (the blog's .env): MODEL_ID, HF_TOKEN")
    add("--neuron-ls", metavar="FILE", help="read `neuron-ls -j` output from FILE, not the host")
    add("--listen", metavar="HOST:PORT", help="balancer address (overrides [balancer] listen)")
    add("--replicas", type=int, metavar="N", help="number of replicas (overrides [fleet])")
    add(
        "--shutdown-delay",
        type=float,
        metavar="S",
        help="on SIGTERM, keep serving S seconds with /health 503 before refusing new requests "
        "(overrides [balancer] shutdown_delay_s)",
    )
    add_logging_arguments(parser)


def load(args: argparse.Namespace, *, env: dict[str, str] | None = None) -> FleetConfig | int:
    """The FleetConfig for ``args``, or exit code 2 after printing every problem."""
    from supervisor.config import ConfigError, load_config
    from supervisor.neuron import NeuronLsError, read_neuron_ls_file

    overrides: dict[str, object] = {}
    if getattr(args, "listen", None):
        overrides["balancer.listen"] = args.listen
    if getattr(args, "replicas", None) is not None:
        overrides["fleet.replicas"] = args.replicas
    if getattr(args, "shutdown_delay", None) is not None:
        overrides["balancer.shutdown_delay_s"] = args.shutdown_delay
    if getattr(args, "base_port", None) is not None:
        overrides["fleet.base_port"] = args.base_port
    if getattr(args, "speed", None) is not None:
        overrides["launcher.simulated.speed"] = args.speed
    neuron_ls = getattr(args, "neuron_ls", None)
    try:
        inventory = read_neuron_ls_file(neuron_ls) if neuron_ls else None
    except (OSError, ValueError, NeuronLsError) as exc:
        print(f"neuron-fleet: cannot read --neuron-ls {neuron_ls}: {exc}", file=sys.stderr)
        return 2
    sources = {"env": env, "env_file": getattr(args, "env_file", None), "overrides": overrides}
    _remove_leftover_containers(sources, args.config)
    try:
        return load_config(args.config, inventory=inventory, **sources)
    except ConfigError as exc:
        print(f"neuron-fleet: {exc}", file=sys.stderr)
        return 2


def _remove_leftover_containers(sources: dict[str, Any], config_path: str | None) -> None:
    """Before the plan looks at the host: containers of a crashed earlier run still hold
    NeuronCores and ports (see leftovers.py). Only the launcher is needed, so the config
    is read without host checks; a config that fails here fails the real load too."""
    from supervisor.config import ConfigError, load_config
    from supervisor.leftovers import clean_up_leftovers

    try:
        config = load_config(config_path, check_host=False, **sources)
    except ConfigError:
        return
    if config.fleet.launcher == "docker":
        clean_up_leftovers(config.launcher.docker.binary)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, getattr(args, "log_stream", "stderr"))
    config = load(args)
    if isinstance(config, int):
        return config
    return serve(config)


def serve(config: FleetConfig, *, on_ready: Callable[[FleetService], None] | None = None) -> int:
    """Run the service on uvloop until it is stopped; the process exit code."""
    import uvloop

    from balancer.access import insecure_settings

    problems = insecure_settings(
        config.balancer, token_configured=bool(config.balancer.admin_token)
    )
    for problem in problems:
        print(f"neuron-fleet: refusing to start: {problem}", file=sys.stderr)
    if problems:
        return 2
    from supervisor.procutil import hide_own_memory

    hide_own_memory()
    return uvloop.run(FleetService(config, on_ready=on_ready).run())


def with_replica_key(config: FleetConfig) -> FleetConfig:
    """``config`` with a replica key made for this run (unless one is configured or
    ``[fleet] replica_auth = false``): the launchers give it to every replica, the relay
    sends it, and a replica restarted during the run gets the same one."""
    if not config.fleet.replica_auth or config.balancer.replica_api_key:
        return config
    balancer = dataclasses.replace(config.balancer, replica_api_key=secrets.token_hex(32))
    return dataclasses.replace(config, balancer=balancer)


class FleetService:
    """Balancer + fleet + systemd reporting + signals, for one FleetConfig."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        notifier: SystemdNotifier | None = None,
        on_ready: Callable[[FleetService], None] | None = None,
    ) -> None:
        from balancer.server import BalancerServer

        config = with_replica_key(config)
        self.config = config
        self.registry = build_registry(config, config.plan)
        self.fleet = Fleet.from_config(config, config.plan, self.registry)
        self.server = BalancerServer(config.balancer, self.registry, self.fleet)
        self.notifier = notifier or SystemdNotifier()
        self.on_ready = on_ready
        self.exit_code = 0
        self.ready = False
        self._stop: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._force = False
        self._forced: asyncio.Event | None = None
        self._last_status = ""
        self._signals = 0
        self._rolling: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        return self.server.url

    def status_text(self) -> str:
        replicas = list(self.registry)
        ready = sum(1 for r in replicas if r.routable)
        text = f"{ready}/{len(replicas)} replicas ready"
        failed = sum(1 for r in replicas if r.state is ReplicaState.FAILED)
        starting = sum(1 for r in replicas if r.state is ReplicaState.STARTING)
        extra = [f"{n} {what}" for n, what in ((starting, "starting"), (failed, "failed")) if n]
        operation = self.fleet.status().get("operation")
        if operation:
            extra.append(str(operation))
        return f"{text} ({', '.join(extra)})" if extra else text

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._forced = asyncio.Event()
        self._install_signals(loop)
        for warning in self.config.warnings:
            log.warning("config: %s", warning)
        fleet_cfg = self.config.fleet
        log.info(
            "neuron-fleet: %d replica(s) x %s cores, launcher %s, min_ready %d",
            len(self.registry),
            fleet_cfg.cores_per_replica,
            fleet_cfg.launcher,
            fleet_cfg.min_ready,
        )
        try:
            await self.server.start()
        except OSError as exc:
            b = self.server.config
            log.error(
                "cannot listen on %s:%s: %s; stop what holds the port (ss -ltnp 'sport = :%s') "
                "or pass --listen HOST:PORT",
                b.host,
                b.port,
                exc.strerror or exc,
                b.port,
            )
            return 1
        assert self.server.balancer is not None
        self.server.balancer.starting = True  # /health 503 until min_ready replicas serve
        try:
            self.registry.subscribe(self._changed.set)
            self.notifier.status(self.status_text())
            await self.fleet.start()
            self._tasks = [
                asyncio.create_task(self.notifier.run_watchdog(), name="systemd-watchdog"),
                asyncio.create_task(self._report(), name="status-report"),
            ]
            if reaper.needed():  # a container's PID 1: orphaned shard processes come to us
                self._tasks.append(asyncio.create_task(reaper.Reaper().run(), name="reaper"))
            await self._stop.wait()
        finally:
            await self._shutdown()
        return self.exit_code

    def request_stop(self, reason: str = "stop requested") -> None:
        """Begin a graceful stop (what SIGTERM does); a second call stops at once."""
        assert self._stop is not None
        self._signals += 1
        if self._signals == 1:
            delay = self.config.balancer.shutdown_delay_s
            drain = self.config.fleet.drain_timeout_s
            log.info(
                "%s: shutting down: serving %.0f s more with /health 503, then in-flight "
                "requests get up to %.0f s",
                reason,
                delay,
                drain,
            )
            self._stop.set()
        elif not self._force:
            log.warning("%s again: stopping now, replicas get SIGKILL", reason)
            self._force = True
            if self._forced is not None:
                self._forced.set()
            for proc in self.fleet.processes:
                proc.kill_now()

    def request_rolling_restart(self) -> None:
        if self._stop is not None and self._stop.is_set():
            return
        if self._rolling is not None and not self._rolling.done():
            log.info("SIGHUP: a rolling restart is already running")
            return
        log.info("SIGHUP: rolling restart")
        self._rolling = asyncio.create_task(self._rolling_restart(), name="rolling-restart")

    async def _rolling_restart(self) -> None:
        try:
            await self.fleet.rolling_restart()
        except (FleetBusyError, ReplicaStartError) as exc:
            log.error("rolling restart not completed: %s", exc)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        loop.add_signal_handler(signal.SIGHUP, self.request_rolling_restart)

    async def _report(self) -> None:
        """STATUS= on every change, READY=1 once min_ready replicas serve."""
        assert self._changed is not None and self._stop is not None
        min_ready = self.fleet.settings.min_ready
        while True:
            self._changed.clear()
            text = self.status_text()
            if not self.ready and self.registry.ready_count() >= min_ready:
                self.ready = True
                if self.server.balancer is not None:
                    self.server.balancer.starting = False
                self._last_status = text
                self.notifier.ready(text)  # READY=1 and STATUS= in one datagram
                log.info("ready: serving on %s; %s", self.url, text)
                if self.on_ready is not None:
                    self.on_ready(self)
            elif text != self._last_status:
                self._last_status = text
                self.notifier.status(text)
                log.debug("status: %s", text)
            if not self.ready and self._out_of_reach(min_ready):
                log.error(
                    "cannot reach min_ready = %d: too many replicas failed (see above); exiting",
                    min_ready,
                )
                self.exit_code = 1
                self._stop.set()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_TICK_S):
                    await self._changed.wait()

    def _out_of_reach(self, want: int) -> bool:
        dead = (ReplicaState.FAILED, ReplicaState.STOPPED)
        return sum(1 for r in self.registry if r.state not in dead) < want

    async def _unless_forced(self, waiting: Awaitable[bool]) -> bool:
        """``waiting``'s result, or False as soon as a second signal forces the stop."""
        assert self._forced is not None
        if self._force:
            return False
        task = asyncio.ensure_future(waiting)
        forced = asyncio.create_task(self._forced.wait())
        try:
            await asyncio.wait({task, forced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
            task.cancel()
        return task.done() and not task.cancelled() and task.result()

    async def _delay(self, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return True

    async def _shutdown(self) -> None:
        started = time.monotonic()
        for task in self._tasks:  # no more status reports: we say "stopping" from here on
            if task.get_name() == "status-report":
                task.cancel()
        # Not ready yet: /health was never 200, so no front balancer sends here: no delay.
        delay = self.config.balancer.shutdown_delay_s if self.ready else 0.0
        self.server.announce_stop(delay)
        if self._rolling is not None and not self._rolling.done():
            self._rolling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rolling
        self.notifier.stopping(
            f"stopping: /health 503, serving {delay:g} s more"
            if delay > 0
            else "stopping: finishing in-flight requests"
        )
        if delay > 0:
            await self._unless_forced(self._delay(delay))
            self.notifier.status("stopping: finishing in-flight requests")
        self.server.refuse_new()
        drain = self.config.fleet.drain_timeout_s
        if not await self._unless_forced(self.server.wait_idle(drain)) and not self._force:
            log.warning("requests still in flight after %.0f s; stopping anyway", drain)
            await self.server.end_streams()
        self.notifier.status("stopping: stopping replicas")
        await self.fleet.stop(grace=0 if self._force else None)
        await self.server.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.notifier.close()
        log.info("stopped in %.1f s", time.monotonic() - started)
