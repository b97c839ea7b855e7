"""The stop that loses nothing behind a front load balancer, and /health a front can act on.

In process: the balancer's two shutdown steps (``announce_stop``: /health 503 while requests
are still served with ``Connection: close``; ``refuse_new``: 503 + Retry-After) and
Retry-After on every refusal, ours or a replica's. As a subprocess: ``neuron-fleet serve``
with ``--shutdown-delay`` signalled by PID, and its logs on stdout (a container's PID 1).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import admin_headers, free_ports, wait_until
from tests.test_serve import (
    CHAT,
    demo_config,
    fleet_status,
    get,
    post_json,
    start_serve,
    stop,
    wait_for,
)
from tests.upstreams import Script

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]

GENERATE = {"inputs": "Hello", "parameters": {"max_new_tokens": 8}}


async def _health(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object], str]:
    async with http.get(f"{url}/health") as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After", "")


async def test_shutdown_steps_serve_then_refuse(simulator, balancer, http) -> None:
    replica = await simulator(batch_size=4, speed=20.0)
    server = await balancer([replica])
    url = server.url
    assert (await _health(http, url))[0] == 200

    # A stream that started before the stop finishes whole, whatever comes after.
    slow = {"inputs": "Hello", "parameters": {"max_new_tokens": 200}}
    before = await http.post(f"{url}/generate_stream", json=slow)
    assert before.status == 200

    server.announce_stop()
    async with http.get(f"{url}/live") as resp:  # liveness is not readiness
        assert resp.status == 200 and await resp.json() == {"status": "alive"}
    status, body, retry_after = await _health(http, url)
    assert status == 503 and body["error_type"] == "healthcheck", body
    assert "shutting down" in str(body["error"]) and retry_after == "5"
    # Still served (the front has not noticed yet), but the connection is not kept.
    async with http.post(f"{url}/generate", json=GENERATE) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers.get("Connection", "").lower() == "close"
        assert "generated_text" in await resp.json()

    server.refuse_new()
    async with http.post(f"{url}/generate", json=GENERATE) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "5"
        assert resp.headers.get("Connection", "").lower() == "close"
        doc = await resp.json()
        assert doc["error_type"] == "unavailable" and "shutting down" in doc["error"]
    assert not server.balancer.idle  # the first stream is still going

    events = (await before.read()).split(b"\n\n")
    assert b'"generated_text":"' in [e for e in events if e][-1]
    assert await server.wait_idle(10)


async def _half_sent(server, head: bytes, body: bytes):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
    writer.write(head % len(body) + body[:10])
    await writer.drain()
    connections = server._runner.server.connections
    await wait_until(lambda: len(connections) == 1, what="the connection accepted")
    # the handler starts and waits for the rest of the body
    await wait_until(lambda: server.balancer.handling == 1, what="the handler started")
    return reader, writer


@pytest.mark.parametrize(
    "head",
    [
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n",
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n",
    ],
    ids=["generate", "tokenize"],
)
async def test_the_drain_waits_for_a_request_still_sending_its_body(
    scripted, balancer, head: bytes
) -> None:
    """A request that began before the drain but is still reading its body is not idle:
    the drain waits for it, and it gets a 503 + Retry-After (it had not started), not a
    connection closed under it by stop()."""
    _, url = await scripted(Script(tokens=3))
    server = await balancer([url])
    body = json.dumps(GENERATE).encode()
    reader, writer = await _half_sent(server, head, body)
    await server.begin_shutdown(0.0)
    assert not server.balancer.idle
    waiting = asyncio.create_task(server.wait_idle(10.0))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # still waiting for the body
    writer.write(body[10:])
    await writer.drain()
    assert await waiting
    answer = await asyncio.wait_for(reader.read(), 10)
    await server.stop()
    writer.close()
    head_bytes, _, rest = answer.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"Retry-After: 5" in head_bytes
    assert json.loads(rest)["error_type"] == "unavailable"


async def _phase(http: aiohttp.ClientSession, server) -> tuple[str, bool]:
    async with http.get(f"{server.url}/fleet/status", headers=admin_headers(server)) as resp:
        assert resp.status == 200
        status = await resp.json()
    return status["phase"], status["draining"]


async def test_begin_shutdown_waits_the_delay_before_refusing(simulator, balancer, http) -> None:
    server = await balancer([await simulator()])
    assert await _phase(http, server) == ("serving", False)
    # A delay long enough for the checks below on a loaded machine; they must see it running.
    delay_s = 3.0
    started = time.monotonic()
    task = asyncio.create_task(server.begin_shutdown(delay_s=delay_s))
    await wait_until(lambda: server.balancer.stopping, what="the stop began")
    assert not server.balancer.draining
    assert await _phase(http, server) == ("stopping", False)  # what an operator sees
    async with http.post(f"{server.url}/generate", json=GENERATE) as resp:
        assert resp.status == 200
    assert time.monotonic() - started < delay_s, "the delay ended before we could check"
    await task
    assert time.monotonic() - started > delay_s - 0.05  # the event loop's timers: ms ticks
    assert server.balancer.draining
    assert await _phase(http, server) == ("draining", True)
    async with http.post(f"{server.url}/generate", json=GENERATE) as resp:
        assert resp.status == 503


async def test_health_states(simulator, balancer, http) -> None:
    server = await balancer([await simulator()])
    status, body, _ = await _health(http, server.url)
    assert status == 200 and body == {"status": "ok", "ready_replicas": 1, "replicas": 1}
    server.balancer.starting = True  # the supervisor sets it until min_ready replicas serve
    status, body, retry_after = await _health(http, server.url)
    assert status == 503 and "min_ready" in str(body["error"]) and retry_after
    server.balancer.starting = False
    for replica in server.registry:
        replica.healthy = False
    status, body, retry_after = await _health(http, server.url)
    assert status == 503 and "No ready replica" in str(body["error"]) and retry_after


async def test_a_replicas_refusal_gets_retry_after(scripted, balancer, http) -> None:
    """A replica's 429 passed through (nowhere else to retry) carries Retry-After."""
    _, url = await scripted(Script(status=429))
    server = await balancer([url], retries=0)
    async with http.post(f"{server.url}/generate", json=GENERATE) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "5"


async def test_queue_full_and_timeout_carry_retry_after(scripted, balancer, http) -> None:
    # The queued request times out (1.5 s) well before the slot frees (3 s); the third request
    # has the 1.5 s to find the queue full, even on a loaded machine.
    _, url = await scripted(Script(tokens=3, first_delay_s=3.0))
    server = await balancer([url], max_inflight_per_replica=1, max_queue=1, queue_timeout_s=1.5)
    busy = asyncio.create_task(http.post(f"{server.url}/generate", json=GENERATE))
    await wait_until(lambda: server.balancer.inflight == 1, what="the slot taken")
    queued = asyncio.create_task(http.post(f"{server.url}/generate", json=GENERATE))
    await wait_until(lambda: server.balancer.admission.queue_depth == 1, what="one queued")
    async with http.post(f"{server.url}/generate", json=GENERATE) as full:
        assert full.status == 429 and full.headers["Retry-After"]
    timed_out = await queued
    assert timed_out.status == 503 and timed_out.headers["Retry-After"]
    timed_out.release()
    (await busy).release()


# -- neuron-fleet serve as a process ----------------------------------------------------------

DELAY_S = 5
"""--shutdown-delay of the process tests: long enough that SIGTERM -> /health 503 -> one chat
completion fits inside it on a loaded 2-core machine (it was 2 s)."""


def test_serve_sigterm_keeps_serving_for_the_delay_then_refuses(tmp_path: Path) -> None:
    listen, *replica_ports = free_ports(4)
    config = demo_config(tmp_path, replica_ports[0], drain_timeout_s=10)
    # The delay is long enough for the checks inside it on a loaded machine (CI: 2 cores).
    proc = start_serve(
        config, listen, None, "--shutdown-delay", str(DELAY_S), "--log-stream", "stdout"
    )
    base = f"http://127.0.0.1:{listen}"
    try:
        wait_for(lambda: _status(base) == 200, seconds=20, what="ready")
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: _status(base) == 503, seconds=DELAY_S, what="/health 503 after SIGTERM")
        code, text = post_json(f"{base}/v1/chat/completions", CHAT)
        assert code == 200 and text.rstrip().endswith("data:[DONE]")
        assert time.monotonic() - signalled < DELAY_S, "the delay ended before we could check"
        wait_for(lambda: _refused(base), seconds=DELAY_S + 10, what="refusals after the delay")
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err[-3000:]
        # Logs on stdout (a container's log), none on stderr but the replicas' own.
        assert "/health now answers 503" in out and "refusing new requests" in out
        assert "stopped in" in out and "Traceback" not in out + err
        assert "INFO" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def test_serve_health_is_503_until_min_ready(tmp_path: Path) -> None:
    """/health turns 200 only once min_ready replicas serve (the in-process test above
    covers the "Starting" answer itself; here replicas come up close together)."""
    listen, *replica_ports = free_ports(4)
    config = demo_config(tmp_path, replica_ports[0])
    text = config.read_text().replace("startup_delay_s = 0", "startup_delay_s = 1")
    config.write_text(text.replace("min_ready = 1 ", "min_ready = 3 ", 1))
    proc = start_serve(config, listen, None)
    base = f"http://127.0.0.1:{listen}"
    try:
        wait_for(lambda: _status(base) == 503 or proc.poll() is not None, seconds=10)
        assert proc.poll() is None, proc.communicate()[1][-3000:]

        def ready() -> bool:
            status, body = get(f"{base}/health", timeout=2)
            if status == 503:
                assert json.loads(body)["error_type"] == "healthcheck", body
                return False
            assert status == 200, body
            # Readiness only grows while starting: checked after the 200, it must be 3.
            assert fleet_status(base)["ready_replicas"] == 3
            return True

        wait_for(ready, seconds=20, what="/health 200")
        returncode, err = stop(proc)
        assert returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def _status(base: str) -> int:
    try:
        return get(f"{base}/health", timeout=1)[0]
    except OSError:
        return 0


def _open_stream(url: str, body: dict[str, object]) -> http.client.HTTPResponse:
    """A streaming request whose response has begun (its first byte read)."""
    stream = urllib.request.urlopen(
        urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        ),
        timeout=30,
    )
    assert stream.status == 200
    stream.read(1)
    return stream


def _refused(base: str) -> bool:
    request_body = json.dumps(CHAT).encode()
    request = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=request_body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5):
            return False
    except urllib.error.HTTPError as exc:
        assert exc.code == 503 and exc.headers["Retry-After"], exc
        return True


def _balance_in_front_of_a_replica(
    *args: str,
) -> tuple[subprocess.Popen[str], subprocess.Popen[str], str]:
    """A simulated replica and `neuron-fleet balance ARGS` in front of it, as processes
    (output piped); the balancer's base URL."""
    replica_port, listen = free_ports(2)
    replica = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "simulate-replica", "--port", str(replica_port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    argv = [sys.executable, "-m", "supervisor", "balance", "--listen", f"127.0.0.1:{listen}"]
    argv += ["--upstream", f"http://127.0.0.1:{replica_port}", "--health-interval", "0.2"]
    balancer = subprocess.Popen(
        [*argv, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return replica, balancer, f"http://127.0.0.1:{listen}"


def test_balance_cli_shutdown_delay(tmp_path: Path) -> None:
    """`neuron-fleet balance` (no supervisor) runs the same two steps on SIGTERM."""
    replica, balancer, base = _balance_in_front_of_a_replica(
        "--shutdown-delay", str(DELAY_S), "--log-stream", "stdout"
    )
    try:
        wait_for(lambda: _status(base) == 200, seconds=20, what="balancer ready")
        balancer.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: _status(base) == 503, seconds=DELAY_S, what="/health 503 after SIGTERM")
        code, text = post_json(f"{base}/v1/chat/completions", CHAT)
        assert code == 200 and text.rstrip().endswith("data:[DONE]")
        assert time.monotonic() - signalled < DELAY_S, "the delay ended before we could check"
        # Nothing in flight: once the delay is over it refuses, drains at once and exits.
        out, err = balancer.communicate(timeout=DELAY_S + 20)
        assert balancer.returncode == 0, err[-3000:]
        assert time.monotonic() - signalled >= DELAY_S, "exited before the shutdown delay"
        # --log-stream stdout: as serve in a container, the log lines go to stdout
        assert "refusing new requests" in out and "INFO" in out
        assert "refusing new requests" not in err
    finally:
        for proc in (balancer, replica):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


@pytest.mark.parametrize("phase", ["delay", "drain"])
def test_balance_cli_second_signal_stops_at_once(tmp_path: Path, phase: str) -> None:
    """As `serve`: a second SIGTERM/SIGINT during the shutdown delay or the drain skips the
    rest of it, instead of leaving an operator waiting minutes."""
    delay = "120" if phase == "delay" else "0"
    replica, balancer, base = _balance_in_front_of_a_replica(
        "--shutdown-delay", delay, "--drain-timeout", "120"
    )
    stream = None
    try:
        wait_for(lambda: _status(base) == 200, seconds=20, what="balancer ready")
        if phase == "drain":  # a long stream keeps the drain busy
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 5000}}
            stream = _open_stream(f"{base}/generate_stream", body)
        balancer.send_signal(signal.SIGTERM)
        wait_for(lambda: _status(base) != 200, seconds=5, what="the stop began")
        with pytest.raises(subprocess.TimeoutExpired):
            balancer.wait(timeout=1.0)  # still in the delay / drain
        balancer.send_signal(signal.SIGINT)
        _, err = balancer.communicate(timeout=15)
        assert balancer.returncode == 0, err[-3000:]
        assert "SIGINT again: stopping now" in err
    finally:
        if stream is not None:
            stream.close()
        for proc in (balancer, replica):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate_stream", {"inputs": "Hello", "parameters": {"max_new_tokens": 5000}}),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 5000}),
    ],
)
def test_a_drain_timeout_ends_a_stream_with_an_error_event(
    tmp_path: Path, path: str, body: dict[str, object]
) -> None:
    """A stream still running when the drain timeout runs out gets an explicit error event
    in its route's format and a clean end of the response (it was cut mid-chunk, which the
    client saw as a chunked-encoding error, not as the end of the stream)."""
    replica, balancer, base = _balance_in_front_of_a_replica("--drain-timeout", "1")
    stream = None
    try:
        wait_for(lambda: _status(base) == 200, seconds=20, what="balancer ready")
        stream = _open_stream(f"{base}{path}", body)
        balancer.send_signal(signal.SIGTERM)
        text = stream.read().decode()  # http.client.IncompleteRead on a cut chunked body
        _, err = balancer.communicate(timeout=20)
        assert balancer.returncode == 0, err[-3000:]
        events = [e for e in text.split("\n\n") if e.strip()]
        assert "drain timeout" in events[-2 if path.startswith("/v1") else -1], events[-3:]
        if path.startswith("/v1"):
            assert events[-1].replace(" ", "") == "data:[DONE]"
            assert '"http_status_code":503' in events[-2].replace(" ", "")
        else:
            assert '"error_type":"incomplete_generation_stream"' in events[-1].replace(" ", "")
    finally:
        if stream is not None:
            stream.close()
        for proc in (balancer, replica):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
