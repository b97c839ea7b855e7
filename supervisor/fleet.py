"""All replicas of one host: start them, take them out of rotation, restart them one by one.

``Fleet`` is the ``FleetControl`` the balancer's admin API (``/fleet/*``) calls, and what
SIGHUP / SIGTERM act on in ``serve``. It never routes traffic itself: it moves lifecycle
states in the shared registry (the balancer routes only to READY + healthy replicas and
queues requests while none is free), so taking one replica out loses no request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from balancer.upstream import Registry, Replica, ReplicaState
from supervisor.launchers import LaunchSpec
from supervisor.replica import LifecycleSettings, ReplicaProcess, ReplicaStartError

log = logging.getLogger("neuron_fleet.fleet")


FLOOR_WAIT_S = 60.0
"""Longest a rolling restart waits for enough routable replicas before its next step."""


class FleetBusyError(RuntimeError):
    """Another operation is running, or this one would leave fewer than ``min_ready``
    replicas routable; try again when it is done (or force it)."""

    http_status = 409  # the admin API answers "conflict"


@dataclass(frozen=True)
class FleetSettings:
    min_ready: int = 1
    """Replicas that must be ready before the service reports ready (systemd READY=1), and
    the floor a drain or restart may not take the fleet below unless forced."""
    drain_timeout_s: float = 300.0
    """Longest wait for a draining replica's in-flight requests before it is stopped anyway."""
    launcher: str = ""
    """Shown in /fleet/status only."""
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)

    @classmethod
    def from_config(cls, config: Any) -> FleetSettings:
        fleet = config.fleet
        return cls(
            min_ready=getattr(fleet, "min_ready", 1),
            drain_timeout_s=getattr(fleet, "drain_timeout_s", 300.0),
            launcher=str(getattr(fleet, "launcher", "")),
            lifecycle=LifecycleSettings.from_fleet(fleet),
        )


def build_registry(config: Any, plan: Any) -> Registry:
    """One STARTING ``Replica`` per planned replica, with the balancer's slot cap."""
    slot_cap = config.balancer.max_inflight_per_replica
    replicas = []
    for p in plan.replicas:
        host = "127.0.0.1" if p.host in ("0.0.0.0", "", "::") else p.host
        host = f"[{host}]" if ":" in host else host
        replicas.append(
            Replica(
                name=p.name,
                url=f"http://{host}:{p.port}",
                slot_cap=slot_cap,
                cores=p.cores,
                port=p.port,
                state=ReplicaState.STARTING,
            )
        )
    return Registry(replicas)


class Fleet:
    """Supervises one ``ReplicaProcess`` per registry entry named in ``specs``."""

    def __init__(
        self,
        registry: Registry,
        specs: Mapping[str, LaunchSpec],
        settings: FleetSettings | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings or FleetSettings()
        self._http: aiohttp.ClientSession | None = None
        self._procs: dict[str, ReplicaProcess] = {}
        for name, spec in specs.items():
            replica = registry.get(name)
            if replica is None:
                raise ValueError(f"launch spec for {name!r}, which is not in the registry")
            self._procs[name] = ReplicaProcess(replica, spec, registry, self.settings.lifecycle)
        self._operation: str | None = None
        self._restarting: set[str] = set()
        self._stopping = False

    @classmethod
    def from_config(cls, config: Any, plan: Any, registry: Registry) -> Fleet:
        from supervisor.launchers import launch_spec

        specs = {p.name: launch_spec(p, config) for p in plan.replicas}
        return cls(registry, specs, FleetSettings.from_config(config))

    # -- lifecycle of the whole fleet ---------------------------------------------------------

    def process(self, name: str) -> ReplicaProcess:
        """The supervisor of replica ``name``; KeyError if there is none."""
        try:
            return self._procs[name]
        except KeyError:
            raise KeyError(f"no replica named {name!r}") from None

    @property
    def processes(self) -> list[ReplicaProcess]:
        return list(self._procs.values())

    async def start(self) -> None:
        """Spawn every replica at once (they load in parallel, each on its own cores)."""
        if self._http is None:
            # One pool for every readiness probe; short-lived connections, no keep-alive
            # to a server that may be restarted under us.
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        for proc in self._procs.values():
            proc.use_session(self._http)
            await proc.start()

    async def wait_ready(self, count: int | None = None) -> bool:
        """Wait until ``count`` (default: min_ready) replicas are routable.

        False as soon as that became impossible (too many FAILED / STOPPED). Bound it with
        asyncio.timeout.
        """
        want = self.settings.min_ready if count is None else count
        while True:
            if self.registry.ready_count() >= want:
                return True
            alive = sum(
                1
                for r in self.registry
                if r.name in self._procs
                and r.state not in (ReplicaState.FAILED, ReplicaState.STOPPED)
            )
            if alive < want:
                return False
            await asyncio.sleep(0.1)

    async def stop(self, grace: float | None = None) -> None:
        """Stop every replica in parallel (``grace=0``: SIGKILL at once)."""
        self._stopping = True
        running = [p for p in self._procs.values() if p.is_supervising]
        if running:
            log.info("stopping %d replica(s)", len(running))
        await asyncio.gather(*(p.stop(grace) for p in self._procs.values()))
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- FleetControl (the admin API) ---------------------------------------------------------

    # One operation at a time: each one claims ``_operation`` before its first ``await``, so
    # back-to-back admin calls or a SIGHUP during a restart get 409 with what is running,
    # instead of taking a second replica out (on Neuron a start takes minutes).

    def _ensure_idle(self) -> None:
        if self._operation is not None:
            raise FleetBusyError(
                f"{self._operation} is in progress; try again when it is done "
                "(GET /fleet/status shows it)"
            )

    def _check_floor(self, replica: Replica, what: str, force: bool) -> None:
        """Refuse to take ``replica`` out if that leaves fewer than min_ready routable."""
        if force or not replica.routable:
            return
        left = self.registry.ready_count() - 1
        if left < self.settings.min_ready:
            raise FleetBusyError(
                f"{what} would leave {left} routable replica(s), below min_ready = "
                f"{self.settings.min_ready}; wait until more replicas are ready, or force it "
                "(?force=true)"
            )

    async def _wait_for_floor(self, replica: Replica, what: str, force: bool) -> None:
        """As ``_check_floor``, but first give the replica restarted just before (up, not
        yet passing health checks) up to FLOOR_WAIT_S to become routable."""
        deadline = time.monotonic() + FLOOR_WAIT_S
        while True:
            try:
                self._check_floor(replica, what, force)
                return
            except FleetBusyError:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.1)

    async def drain(self, name: str, force: bool = False) -> None:
        """Take a replica out of rotation; it keeps running and finishes what it has."""
        proc = self.process(name)
        r = proc.replica
        self._ensure_idle()
        self._check_floor(r, f"draining {name}", force)
        proc.drained = True
        if r.state is ReplicaState.READY:
            self.registry.set_state(r, ReplicaState.DRAINING)
        log.info("%s: drained (%d in flight)", name, r.inflight)

    async def undrain(self, name: str) -> None:
        """Put a drained replica back in rotation (once it is up)."""
        proc = self.process(name)
        if name in self._restarting:
            raise FleetBusyError(f"{name} is being restarted; it rejoins when ready")
        proc.drained = False
        r = proc.replica
        if r.state is ReplicaState.DRAINING and proc.is_running:
            self.registry.set_state(r, ReplicaState.READY)
        log.info("%s: back in rotation", name)

    async def restart(self, name: str, force: bool = False) -> None:
        """Drain, stop, start and wait until ready; also revives a FAILED replica.

        The replica comes back in rotation (a previous drain is cleared). Raises
        ReplicaStartError if it does not become ready, FleetBusyError while another operation
        runs or when it would leave fewer than min_ready replicas routable (unless forced).
        """
        proc = self.process(name)
        self._ensure_idle()
        self._check_floor(proc.replica, f"restarting {name}", force)
        self._operation = f"restart {name}"
        self._restarting.add(name)
        try:
            await self._restart_one(proc)
        finally:
            self._restarting.discard(name)
            self._operation = None

    async def rolling_restart(self, force: bool = False) -> None:
        """Restart every replica, one at a time, each drained first.

        Stops at the first replica that does not come back, so a bad change never takes
        down more than one replica (FAILED replicas get a new try, but do not stop it), and
        before any step that would leave fewer than min_ready replicas routable.
        """
        self._ensure_idle()
        self._operation = "rolling restart"
        procs = [p for p in self._procs.values() if p.replica.state is not ReplicaState.STOPPED]
        started = time.monotonic()
        log.info("rolling restart of %d replica(s), one at a time", len(procs))
        try:
            for i, proc in enumerate(procs, 1):
                if self._stopping:
                    raise ReplicaStartError("the fleet is shutting down")
                await self._wait_for_floor(proc.replica, f"rolling restart of {proc.name}", force)
                was_failed = proc.replica.state is ReplicaState.FAILED
                self._operation = f"rolling restart ({i}/{len(procs)}: {proc.name})"
                self._restarting.add(proc.name)
                try:
                    await self._restart_one(proc)
                except ReplicaStartError as exc:
                    if was_failed:
                        log.warning("rolling restart: %s is still failing: %s", proc.name, exc)
                        continue
                    log.error(
                        "rolling restart stopped at %s: %s; replicas after it were not restarted",
                        proc.name,
                        exc,
                    )
                    raise
                finally:
                    self._restarting.discard(proc.name)
            log.info("rolling restart done in %.1f s", time.monotonic() - started)
        finally:
            self._operation = None

    def status(self) -> dict[str, Any]:
        """Fleet-level fields for /fleet/status (per-replica facts live on the Replica)."""
        replicas = [r for r in self.registry if r.name in self._procs]
        return {
            "launcher": self.settings.launcher,
            "min_ready": self.settings.min_ready,
            "operation": self._operation,
            "drain_timeout_s": self.settings.drain_timeout_s,
            "drained": sorted(n for n, p in self._procs.items() if p.drained),
            "failed": {r.name: r.failed_reason for r in replicas if r.failed_reason},
        }

    # -- internals ----------------------------------------------------------------------------

    async def _restart_one(self, proc: ReplicaProcess) -> None:
        r = proc.replica
        if r.state is ReplicaState.READY:
            self.registry.set_state(r, ReplicaState.DRAINING)
        if proc.is_running:
            await self.wait_drained(r)
        proc.drained = False
        log.info("%s: restarting", r.name)
        await proc.restart()

    async def wait_drained(self, replica: Replica) -> bool:
        """Wait until no request is in flight on ``replica`` (False after drain_timeout_s)."""
        timeout = self.settings.drain_timeout_s
        deadline = time.monotonic() + timeout
        if replica.inflight:
            log.info("%s: waiting for %d in-flight request(s)", replica.name, replica.inflight)
        while replica.inflight > 0:
            if time.monotonic() >= deadline:
                log.warning(
                    "%s: %d request(s) still in flight after the %.0f s drain timeout; "
                    "stopping it anyway",
                    replica.name,
                    replica.inflight,
                    timeout,
                )
                return False
            await asyncio.sleep(0.05)
        return True
