"""Supervised replica processes running a small test script, behind a real balancer.

Tests of crashes, restarts and the quarantine need real processes that the real supervisor
(`supervisor.fleet.Fleet`) starts, watches and restarts: each replica runs ``script`` as
``python script PORT NAME FOLDER`` (the folder is where the script leaves marks the test
counts, e.g. one file per death).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from balancer.config import BalancerConfig
from balancer.quarantine import Quarantine
from balancer.server import BalancerServer
from balancer.upstream import Registry, Replica
from supervisor.fleet import Fleet, FleetSettings
from supervisor.launchers import LaunchSpec
from tests.conftest import free_port
from tests.test_hardening_faults import LIFECYCLE

BALANCER_DEFAULTS: dict[str, object] = {
    "host": "127.0.0.1",
    "port": 0,
    "health_interval_s": 0.1,
    "health_timeout_s": 0.5,
    "queue_timeout_s": 20.0,
    "response_timeout_s": 20.0,
}
"""Fast health checks; queue and response limits far above what a test waits."""


@dataclass
class ScriptFleet:
    server: BalancerServer
    fleet: Fleet
    registry: Registry
    replicas: list[Replica]
    folder: Path
    """Where the replica scripts leave their marks."""

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def quarantine(self) -> Quarantine:
        return self.server.balancer.quarantine

    def count(self, prefix: str) -> int:
        """Marks named ``PREFIX-...`` left by the scripts (one per POST seen, per death)."""
        return sum(1 for _ in self.folder.glob(f"{prefix}-*"))

    async def metrics(self) -> str:
        """The balancer's ``/metrics`` text."""
        async with aiohttp.ClientSession() as http, http.get(self.url + "/metrics") as r:
            return await r.text()

    async def post(self, path: str, doc: dict[str, object]) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.post(self.url + path, json=doc) as r:
            return r.status, await r.text()


@contextlib.asynccontextmanager
async def script_fleet(
    folder: Path,
    script: str,
    names: tuple[str, ...],
    slot_cap: int,
    **balancer: object,
) -> AsyncIterator[ScriptFleet]:
    """Start one replica per name running ``script`` and a balancer in front (settings:
    BALANCER_DEFAULTS updated with ``balancer``); yield once every replica is ready; stop
    both on the way out."""
    path = folder / "replica.py"
    path.write_text(script)
    replicas, specs = [], {}
    for name in names:
        port = free_port()
        replicas.append(
            Replica(name=name, url=f"http://127.0.0.1:{port}", port=port, slot_cap=slot_cap)
        )
        specs[name] = LaunchSpec(argv=(sys.executable, str(path), str(port), name, str(folder)))
    registry = Registry(replicas)
    fleet = Fleet(registry, specs, FleetSettings(min_ready=len(names), lifecycle=LIFECYCLE))
    config = BalancerConfig(**{**BALANCER_DEFAULTS, **balancer})  # type: ignore[arg-type]
    server = BalancerServer(config, registry, fleet)
    await server.start()
    await fleet.start()
    try:
        async with asyncio.timeout(20):
            assert await fleet.wait_ready()
        yield ScriptFleet(server, fleet, registry, replicas, folder)
    finally:
        await server.begin_shutdown()
        await fleet.stop(grace=1)
        await server.stop()


SCRIPT_PRELUDE = textwrap.dedent(
    """
    import json, os, sys, time, uuid
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    port, name, folder = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])


    class Replica(BaseHTTPRequestHandler):
        # Healthy on every GET (the supervisor's readiness and the balancer's health
        # checks); quiet. A script's Handler adds do_POST.
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def send_json(self, status, body):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    """
)


def replica_script(body: str) -> str:
    """A replica script for ``script_fleet``: the prelude (imports, ``port``, ``name``,
    ``folder``, a ``Replica`` handler base), ``body`` (which defines ``Handler``), serve."""
    serve = 'ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()\n'
    return SCRIPT_PRELUDE + textwrap.dedent(body) + "\n" + serve
