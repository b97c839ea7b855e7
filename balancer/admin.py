"""Admin API: ``/fleet/status`` and per-replica drain / undrain / restart.

Who may call it is decided in balancer/access.py (loopback, bearer token, Host, no
cross-site browser request); every action is logged with the client's address. Without a
supervisor (``neuron-fleet balance``) drain and undrain still work — they only change
routing — and restart answers 501.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from balancer.access import admin_denied
from balancer.errors import expect_handler, json_error
from balancer.quarantine import DIGEST_SHOWN, Quarantine
from balancer.upstream import ReplicaState

if TYPE_CHECKING:
    from balancer.app import Balancer


class FleetControl(Protocol):
    """What the supervisor offers the admin API (``supervisor.fleet.Fleet``)."""

    async def drain(self, name: str, force: bool = False) -> None: ...
    async def undrain(self, name: str) -> None: ...
    async def restart(self, name: str, force: bool = False) -> None: ...
    async def rolling_restart(self, force: bool = False) -> None: ...
    def status(self) -> dict[str, Any]: ...


log = logging.getLogger("neuron_fleet.admin")

FLEET_KEY = web.AppKey("fleet", object)
ACTIONS = ("drain", "undrain", "restart")
QUARANTINE_SHOWN = 20
"""Newest quarantined requests listed in the status (the metric has the count)."""


def fleet_status(balancer: Balancer, fleet: FleetControl | None) -> dict[str, Any]:
    now = time.monotonic()
    replicas = []
    for r in balancer.registry.replicas:
        uptime = r.uptime_s(now)
        replicas.append(
            {
                "name": r.name,
                "url": r.url,
                "state": r.display_state,
                "healthy": r.healthy,
                "cores": r.cores,
                "pid": r.pid,
                "port": r.port,
                "inflight": r.inflight,
                "slot_cap": r.slot_cap,
                "restarts": r.restarts,
                "uptime_s": None if uptime is None else round(uptime, 1),
                "last_exit": r.last_exit,
                "start_duration_s": r.start_duration_s,
                "failed_reason": r.failed_reason,
                "forecast": balancer.forecast.describe(r.name),
            }
        )
    status: dict[str, Any] = {
        "replicas": replicas,
        "ready_replicas": balancer.registry.ready_count(),
        "queue_depth": balancer.admission.queue_depth,
        "max_queue": balancer.config.max_queue,
        "inflight": balancer.inflight,
        "policy": balancer.config.policy,
        "queue_order": balancer.config.queue_order,
        "ttft_slo_s": balancer.config.ttft_slo_s,
        "draining": balancer.draining,
        "phase": balancer.phase,
        "quarantine": quarantine_status(balancer.quarantine),
        "supervised": fleet is not None,
    }
    if fleet is not None:
        status.update(fleet.status())
    return status


def quarantine_status(
    quarantine: Quarantine, shown: int | None = QUARANTINE_SHOWN
) -> dict[str, Any]:
    """The quarantine's settings, how many requests it holds, and the newest ``shown`` of
    them (None: all). Digests only, never the request's text."""
    entries = quarantine.entries()
    now = quarantine.clock()
    return {
        "after": quarantine.after,
        "ttl_s": quarantine.ttl_s,
        "count": len(entries),
        "requests": [
            {
                "digest": e.short,
                "route": e.route,
                "broke": e.replicas,
                "expires_in_s": round(max(0.0, e.until - now), 1),
                "refused": e.refused,
            }
            for e in (entries if shown is None else entries[-shown:])
        ],
    }


def add_admin_routes(app: web.Application, balancer: Balancer) -> None:
    def fleet() -> FleetControl | None:
        return app.get(FLEET_KEY)  # type: ignore[return-value]

    async def status(request: web.Request) -> web.Response:
        denied = admin_denied(request, balancer.config)
        if denied is not None:
            return denied
        return web.json_response(fleet_status(balancer, fleet()))

    async def action(request: web.Request) -> web.Response:
        denied = admin_denied(request, balancer.config)
        if denied is not None:
            return denied
        name = request.match_info["name"]
        verb = request.match_info["action"]
        log.info("admin API: %s %s requested by %s", verb, name, request.remote)
        replica = balancer.registry.get(name)
        if replica is None:
            known = ", ".join(r.name for r in balancer.registry.replicas)
            return json_error(404, f"No replica {name!r}; known: {known}", "not_found")
        control = fleet()
        if control is not None:
            # ?force=true: take the replica out even below [fleet] min_ready.
            call = (
                control.undrain(name)
                if verb == "undrain"
                else getattr(control, verb)(name, force=_forced(request))
            )
            return await _run_operation(call, f"{verb} {name}")
        if verb == "drain":
            balancer.registry.set_state(replica, ReplicaState.DRAINING)
        elif verb == "undrain":
            balancer.registry.set_state(replica, ReplicaState.READY)
        else:
            return json_error(
                501, "Restart needs the supervisor (`neuron-fleet serve`)", "not_supported"
            )
        return web.json_response({"replica": name, "action": verb, "state": replica.display_state})

    async def rolling(request: web.Request) -> web.Response:
        denied = admin_denied(request, balancer.config)
        if denied is not None:
            return denied
        log.info("admin API: rolling restart requested by %s", request.remote)
        control = fleet()
        if control is None:
            return json_error(
                501, "Rolling restart needs the supervisor (`neuron-fleet serve`)", "not_supported"
            )
        return await _run_operation(
            control.rolling_restart(force=_forced(request)), "rolling restart"
        )

    async def quarantined(request: web.Request) -> web.Response:
        denied = admin_denied(request, balancer.config)
        if denied is not None:
            return denied
        return web.json_response(quarantine_status(balancer.quarantine, shown=None))

    async def lift(request: web.Request) -> web.Response:
        denied = admin_denied(request, balancer.config)
        if denied is not None:
            return denied
        digest = request.match_info["digest"]
        entry = balancer.quarantine.lift(digest)
        log.info("admin API: lift quarantine of %s requested by %s", digest, request.remote)
        if entry is None:
            return json_error(
                404,
                f"No quarantined request has a digest starting {digest!r} (give the "
                f"{DIGEST_SHOWN} hex digits GET /fleet/quarantine shows)",
                "not_found",
            )
        return web.json_response({"digest": entry.short, "route": entry.route, "lifted": True})

    app.router.add_get("/fleet/status", status, allow_head=False, expect_handler=expect_handler)
    app.router.add_get(
        "/fleet/quarantine", quarantined, allow_head=False, expect_handler=expect_handler
    )
    app.router.add_delete(
        r"/fleet/quarantine/{digest:[0-9a-fA-F]+}", lift, expect_handler=expect_handler
    )
    app.router.add_post(
        r"/fleet/replicas/{name}/{action:drain|undrain|restart}",
        action,
        expect_handler=expect_handler,
    )
    app.router.add_post("/fleet/rolling-restart", rolling, expect_handler=expect_handler)


def _forced(request: web.Request) -> bool:
    return request.query.get("force", "").lower() in ("1", "true", "yes")


_background: set[asyncio.Task[None]] = set()
"""Operations still running after their 202 answer (kept referenced until done)."""
OPERATION_GRACE_S = 0.2
"""How long an admin call waits for its operation: quick ones answer 200, slow ones 202."""


async def _run_operation(coro: Any, what: str) -> web.Response:
    """Run a fleet operation; answer when done, or 202 if it is still going (a restart of a
    Neuron replica takes minutes). Errors carry ``http_status`` (busy: 409, failed start: 503).
    """
    task = asyncio.get_running_loop().create_task(coro)
    done, _ = await asyncio.wait({task}, timeout=OPERATION_GRACE_S)
    if not done:
        _background.add(task)
        task.add_done_callback(_log_outcome(what))
        return web.json_response({"action": what, "accepted": True}, status=202)
    exc = task.exception()
    if exc is not None:
        if isinstance(exc, KeyError):
            return json_error(404, f"{what}: unknown replica {exc}", "not_found")
        status = getattr(exc, "http_status", 500)
        return json_error(status, f"{what} failed: {exc}", "conflict" if status == 409 else "fleet")
    return web.json_response({"action": what, "done": True})


def _log_outcome(what: str) -> Any:
    def done(task: asyncio.Task[None]) -> None:
        _background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %s", what, task.exception())
        else:
            log.info("%s finished", what)

    return done
