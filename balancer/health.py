"""Active health checks with rise/fall thresholds.

A busy Neuron replica can answer ``/health`` slowly; one failed check must not take it out
of rotation (sglang PR #9198), so a replica goes down after ``fall`` consecutive failures
and comes back after ``rise`` consecutive successes. A replica that was never healthy comes
up on its first success, so a fresh fleet takes traffic as soon as it can.

Passive ejection (consecutive request failures) lives in the relay; both only flip
``Replica.healthy``. The lifecycle ``state`` belongs to the supervisor.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from balancer.config import BalancerConfig
from balancer.upstream import Registry, Replica, ReplicaState

log = logging.getLogger("neuron_fleet.health")

CHECKED_STATES = frozenset({ReplicaState.READY, ReplicaState.DRAINING})


async def probe_health(
    session: aiohttp.ClientSession | None, config: BalancerConfig, replica: Replica
) -> bool:
    """One ``/health`` probe, outside the rise/fall count: whether it answers 200 within
    ``health_timeout_s`` now (the retry policy's confirmation, balancer/fate.py). Without a
    session (a relay built alone, in tests) a short-lived one."""
    timeout = aiohttp.ClientTimeout(total=config.health_timeout_s)
    own = session is None
    http = aiohttp.ClientSession() if session is None else session
    try:
        async with http.get(f"{replica.url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False
    finally:
        if own:
            await http.close()


class HealthChecker:
    def __init__(
        self, config: BalancerConfig, registry: Registry, session: aiohttp.ClientSession
    ) -> None:
        self.config = config
        self.registry = registry
        self.session = session

    async def run(self) -> None:
        """Check every replica each interval, forever (cancel to stop)."""
        while True:
            await self.check_all()
            await asyncio.sleep(self.config.health_interval_s)

    async def check_all(self) -> None:
        replicas = [r for r in self.registry.replicas if r.state in CHECKED_STATES]
        if replicas:
            await asyncio.gather(*(self.check(r) for r in replicas))

    async def check(self, replica: Replica) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.config.health_timeout_s)
        error = ""
        try:
            async with self.session.get(f"{replica.url}/health", timeout=timeout) as resp:
                ok = resp.status == 200
                if not ok:
                    error = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok = False
            error = type(exc).__name__
        self.record(replica, ok, error)
        return ok

    def record(self, replica: Replica, ok: bool, error: str = "") -> None:
        cfg = self.config
        if ok:
            replica.health_failures = 0
            replica.health_successes += 1
            if not replica.healthy and (
                not replica.ever_healthy or replica.health_successes >= cfg.health_rise
            ):
                replica.healthy = True
                replica.ever_healthy = True
                replica.consecutive_failures = 0
                replica.ejected = False
                log.info("%s is healthy", replica.name)
                self.registry.notify()
        else:
            replica.health_successes = 0
            replica.health_failures += 1
            if replica.healthy and replica.health_failures >= cfg.health_fall:
                replica.healthy = False
                log.warning(
                    "%s failed %d health checks in a row (%s): no traffic until it recovers",
                    replica.name,
                    replica.health_failures,
                    error,
                )
                self.registry.notify()
