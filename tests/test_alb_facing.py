"""What an ALB in front of a host sees: no ``/metrics`` on the port it forwards (metrics on
their own port, scraped directly), and kept-alive connections the balancer holds open for
``client_timeout_s`` (which the deploy configs set above the ALB's idle timeout)."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import pytest

from tests.conftest import LOOPBACK, metric_value
from tests.upstreams import Script

GEN = {"inputs": "x", "parameters": {"max_new_tokens": 3}}


async def test_metrics_listen_moves_metrics_off_the_forwarded_port(scripted, balancer, http):
    _, url = await scripted(Script(tokens=3))
    server = await balancer([url], metrics_listen=f"{LOOPBACK}:0")
    async with http.post(f"{server.url}/generate_stream", json=GEN) as resp:
        assert resp.status == 200
        await resp.read()
    # What the ALB forwards: no metrics there, whoever asks.
    async with http.get(f"{server.url}/metrics") as resp:
        assert resp.status == 404
        assert "neuron_fleet_" not in await resp.text()
    # Prometheus, on the pod / host directly.
    assert server.metrics_port and server.metrics_port != server.bound_port
    async with http.get(f"http://{LOOPBACK}:{server.metrics_port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert metric_value(text, "neuron_fleet_requests_total", route="/generate_stream", code="200")
    assert "tgi_queue_size{" in text  # the replicas' series come along, as on the main port
    # The metrics port serves nothing else.
    async with http.post(f"http://{LOOPBACK}:{server.metrics_port}/generate", json=GEN) as resp:
        assert resp.status in (404, 405)


async def test_without_metrics_listen_metrics_stay_on_the_main_port(scripted, balancer, http):
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url])
    async with http.get(f"{server.url}/metrics") as resp:
        assert resp.status == 200 and "neuron_fleet_queue_depth" in await resp.text()
    assert server.metrics_port is None


async def test_an_idle_kept_alive_connection_lives_for_client_timeout_s(scripted, balancer):
    """The number the deploy tests compare with the ALB's idle timeout is the real one: an
    idle kept-alive connection is closed by the balancer after client_timeout_s, not before
    (scaled down: 1.5 s here, 330 s in the ALB configs)."""
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url], client_timeout_s=1.5)
    host, port = LOOPBACK, server.bound_port
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    async def exchange() -> None:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        assert length, head
        await asyncio.wait_for(reader.readexactly(int(length.group(1))), 5)

    try:
        await exchange()
        await asyncio.sleep(0.8)  # idle, shorter than client_timeout_s: still open
        await exchange()
        started = time.monotonic()
        closed = await asyncio.wait_for(reader.read(1), 10)  # then idle until it closes
        idle = time.monotonic() - started
    finally:
        writer.close()
    assert closed == b"" and 1.2 <= idle < 6, idle


async def test_metrics_listen_port_taken_fails_the_start(scripted, balancer):
    _, url = await scripted(Script(tokens=1))
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            await balancer([url], metrics_listen=f"{LOOPBACK}:{port}")


def test_metrics_listen_is_validated(tmp_path) -> None:
    from supervisor.config import ConfigError, load_config

    def load(balancer: str):
        path = tmp_path / "fleet.toml"
        path.write_text(
            '[model]\nid = "m"\n[fleet]\nlauncher = "simulated"\ncores_per_replica = 2\n'
            f'[balancer]\nlisten = "127.0.0.1:8080"\n{balancer}\n'
        )
        return load_config(str(path), env={}, check_host=False, read_model=False)

    assert load('metrics_listen = "127.0.0.1:9400"').balancer.metrics_listen == "127.0.0.1:9400"
    with pytest.raises(ConfigError, match="metrics_listen port 8080 is the listen port"):
        load('metrics_listen = "0.0.0.0:8080"')
    with pytest.raises(ConfigError, match="metrics_listen = 'nine' is not HOST:PORT"):
        load('metrics_listen = "nine"')
