"""Shared fixtures: real servers on loopback ports, started and stopped per test."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web

from balancer.config import BalancerConfig, UpstreamSpec
from balancer.server import BalancerServer
from tests.upstreams import Script, ScriptedReplica

LOOPBACK = "127.0.0.1"


@pytest.fixture(autouse=True, scope="session")
def _private_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Admin tokens that balancers generate (balancer/token_file.py) go to a folder of this
    test session, inherited by the services the tests spawn, not the user's own."""
    folder = tmp_path_factory.mktemp("xdg-runtime")
    folder.chmod(0o700)
    saved = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("XDG_RUNTIME_DIR", None)
    else:
        os.environ["XDG_RUNTIME_DIR"] = saved


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests run on the loop production runs on (``uvloop.run``): its transports differ from
    asyncio's (they are not ``asyncio.Transport`` subclasses, and write and buffer differently)."""
    return {"uvloop": uvloop.new_event_loop}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` consecutive free ports (replicas use base_port + k)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for port in range(base, base + n):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(base, base + n))
    raise RuntimeError("no free port range")


async def start_app(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://{LOOPBACK}:{bound}"


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` (bounded in time) instead of sleeping a guessed amount."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


FAST = dict(
    health_interval_s=0.1,
    health_timeout_s=1.0,
    health_rise=2,
    health_fall=2,
    queue_timeout_s=10.0,
    first_byte_timeout_s=10.0,
    response_timeout_s=10.0,
    idle_timeout_s=10.0,
)


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[tuple[ScriptedReplica, str]]]]:
    runners: list[web.AppRunner] = []

    async def make(script: Script | None = None) -> tuple[ScriptedReplica, str]:
        replica = ScriptedReplica(script)
        runner, url = await start_app(replica.app())
        runners.append(runner)
        return replica, url

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def simulator() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start in-process simulated TGI replicas: ``url = await simulator(batch_size=2)``."""
    from supervisor.simulator.engine import SimConfig
    from supervisor.simulator.server import create_app

    runners: list[web.AppRunner] = []

    async def make(**fields: Any) -> str:
        fields.setdefault("speed", 200.0)
        app = create_app(SimConfig(**fields))
        runner, url = await start_app(app)
        runners.append(runner)
        return url

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def balancer() -> AsyncIterator[Callable[..., Awaitable[BalancerServer]]]:
    """Start a balancer in front of URLs: ``server = await balancer(urls, max_queue=4)``."""
    servers: list[BalancerServer] = []

    async def make(urls: list[str], wait_ready: bool = True, **fields: Any) -> BalancerServer:
        config = replace(
            BalancerConfig(),
            host=LOOPBACK,
            port=0,
            upstreams=tuple(UpstreamSpec(url=u, name=f"r{i}") for i, u in enumerate(urls)),
            **{**FAST, **fields},
        )
        server = BalancerServer(config)
        await server.start()
        servers.append(server)
        if wait_ready:
            await wait_until(
                lambda: server.registry.ready_count() == len(urls), what="replicas healthy"
            )
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def read_sse(resp: aiohttp.ClientResponse) -> list[bytes]:
    """All events of an SSE response, as raw bytes without the trailing blank line."""
    raw = await resp.read()
    return [e for e in raw.split(b"\n\n") if e]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tokenizer folder trained locally (never downloaded), shared by the session."""
    from tests.helpers_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


def admin_headers(server: BalancerServer) -> dict[str, str]:
    """What an admin client sends: the server's (possibly generated) token, and the header
    that marks a POST as not cross-site."""
    from balancer.access import ADMIN_HEADER

    return {"Authorization": f"Bearer {server.config.admin_token}", ADMIN_HEADER: "1"}


# -- the fake docker (tests/fakebin/docker) ---------------------------------------------------

FAKEBIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakebin")
IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.5-neuron"
TGI_33 = {"optimum_neuron": "0.3.0", "neuronxcc": "2.19.8089.0+8ab9f450"}
"""What the 3.3.5-neuron image (the launcher's default) ships (its Dockerfile.neuron)."""


@pytest.fixture
def fake_docker(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """PATH with the fake docker; its images in images.json; a private cache folder; the
    folder its calls are logged in."""
    from supervisor.config import ENV_VARS

    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    logs = tmp_path / "logs"
    logs.mkdir()
    images = tmp_path / "images.json"
    images.write_text(json.dumps({IMAGE: {"id": "sha256:aaa", **TGI_33}}))
    monkeypatch.setenv("PATH", f"{FAKEBIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKEBIN_LOG_DIR", str(logs))
    monkeypatch.setenv("FAKE_DOCKER_IMAGES", str(images))
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return logs
