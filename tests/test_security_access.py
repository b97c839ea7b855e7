"""Issue 12: an admin API no web page or local user can drive, settings the balancer refuses to
start with, bounded work per request and per client, and the smaller leaks (logs, headers,
error bodies, ``ps``, /proc, file modes).

Complements tests/test_hardening_security.py (loopback check, API keys, secrets in logs and
environments)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from balancer import token_file
from balancer.access import ADMIN_HEADER, host_allowed, insecure_settings
from balancer.config import BalancerConfig
from supervisor import cli
from supervisor.status_cli import find_token
from tests.conftest import admin_headers, free_port, metric_value, start_app, wait_until
from tests.upstreams import Script

pytestmark = pytest.mark.timeout(60)

GEN = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Generated admin tokens go to this test's own runtime folder."""
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    monkeypatch.delenv("NEURON_FLEET_ADMIN_TOKEN", raising=False)
    return folder


async def _error(resp: aiohttp.ClientResponse, status: int, error_type: str) -> str:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type
    return body["error"]


# ------------------------------------------------------------------- the admin token


async def test_a_token_is_generated_saved_0600_and_found_by_status(
    scripted, balancer, http, private_runtime_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url])
    token = server.config.admin_token
    assert token and len(token) >= 43 and server.generated_admin_token
    async with http.get(f"{server.url}/fleet/status") as resp:
        await _error(resp, 401, "unauthorized")  # no token, no admin API: ever

    path = private_runtime_dir / "neuron-fleet" / f"admin-token-{server.bound_port}"
    assert path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # `neuron-fleet status` finds it with no extra step, and never sends it elsewhere.
    assert find_token(server.url) == token
    assert find_token(f"http://10.1.2.3:{server.bound_port}") is None
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["status", "--url", server.url]) == 0
    assert "1/1 replicas ready" in capsys.readouterr().out
    # Never from argv, where `ps` shows it to every local user.
    with pytest.raises(SystemExit):
        cli.main(["status", "--url", server.url, "--token", token])

    await server.stop()
    assert not path.exists()


async def test_a_configured_token_is_not_written_anywhere(
    scripted, balancer, private_runtime_dir: Path
) -> None:
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url], admin_token="operator-set")
    assert server.config.admin_token == "operator-set" and not server.generated_admin_token
    assert not (private_runtime_dir / "neuron-fleet").exists()


def test_token_file_refuses_a_folder_of_another_user(
    private_runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (private_runtime_dir / "neuron-fleet").mkdir(mode=0o700)
    token_file.write_token(8080, "t-1")
    assert token_file.read_token(8080) == "t-1"
    os.chmod(token_file.token_path(8080), 0o644)  # readable by others: not trusted
    assert token_file.read_token(8080) is None
    monkeypatch.setattr(os, "getuid", lambda: 4242)  # someone else's folder now
    with pytest.raises(token_file.TokenFileError):
        token_file.write_token(8080, "t-2")


# ------------------------------------------------------------------- browsers, DNS rebinding


async def test_cross_site_and_rebinding_requests_are_refused(scripted, balancer, http) -> None:
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url], admin_hosts=("fleet.internal",))
    auth = {"Authorization": f"Bearer {server.config.admin_token}"}
    drain = f"{server.url}/fleet/replicas/r0/drain"
    port = server.bound_port

    # The reviewer's form POST from a web page: refused even with a valid token.
    evil = {**auth, "Origin": "http://evil.example", "Content-Type": "application/json"}
    async with http.post(drain, headers=evil) as resp:
        await _error(resp, 403, "forbidden")
    for site in ("cross-site", "same-site"):
        async with http.get(
            f"{server.url}/fleet/status", headers={**auth, "Sec-Fetch-Site": site}
        ) as resp:
            await _error(resp, 403, "forbidden")
    # DNS rebinding: the page's host name now resolves to 127.0.0.1.
    rebound = {**auth, "Host": f"attacker.example:{port}"}
    async with http.get(f"{server.url}/fleet/status", headers=rebound) as resp:
        assert "admin_hosts" in await _error(resp, 403, "forbidden")
    # A form's content type, even with the token: a browser could send that cross-site.
    form = {**auth, "Content-Type": "application/x-www-form-urlencoded"}
    async with http.post(drain, data="a=1", headers=form) as resp:
        assert ADMIN_HEADER in await _error(resp, 415, "validation")
    assert server.registry.get("r0").routable  # type: ignore[union-attr]

    # What operators' tools send is accepted.
    for headers in (
        {**auth, "Host": f"localhost:{port}"},
        {**auth, "Host": f"fleet.internal:{port}"},
        {**auth, "Sec-Fetch-Site": "none"},
        {**auth, "Origin": f"http://127.0.0.1:{port}"},
    ):
        async with http.get(f"{server.url}/fleet/status", headers=headers) as resp:
            assert resp.status == 200, headers
    async with http.post(drain, json={}, headers=auth) as resp:
        assert resp.status == 200
    async with http.post(
        f"{server.url}/fleet/replicas/r0/undrain", headers=admin_headers(server)
    ) as resp:
        assert resp.status == 200


def test_host_rules() -> None:
    for host in ("127.0.0.1:8080", "[::1]:8080", "localhost", "LOCALHOST:80", "10.0.0.5:8080"):
        assert host_allowed(host), host
    for host in ("attacker.example", "127.0.0.1.nip.io:8080", "", "[::1", "x:notaport"):
        assert not host_allowed(host), host
    assert host_allowed("Fleet.Internal:8080", ("fleet.internal",))


async def test_admin_actions_and_refusals_are_logged_with_the_client_address(
    scripted, balancer, http, caplog: pytest.LogCaptureFixture
) -> None:
    from balancer import access

    access.refusals._last.clear()
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url], api_keys=("k-secret-1",))
    caplog.set_level(logging.INFO)
    async with http.post(
        f"{server.url}/fleet/replicas/r0/drain", headers=admin_headers(server)
    ) as resp:
        assert resp.status == 200
    async with http.post(
        f"{server.url}/generate", json=GEN, headers={"Authorization": "Bearer k-guess"}
    ) as resp:
        assert resp.status == 401
    async with http.get(f"{server.url}/fleet/status") as resp:
        assert resp.status == 401
    text = caplog.text
    assert "drain r0 requested by 127.0.0.1" in text
    assert "refused POST /generate from 127.0.0.1: missing or invalid API key" in text
    assert "admin API: refused GET /fleet/status from 127.0.0.1 (401" in text
    assert "k-guess" not in text and "k-secret-1" not in text
    assert server.config.admin_token not in text  # type: ignore[operator]


# ------------------------------------------------------------------- refusing to start


def test_insecure_settings() -> None:
    public = BalancerConfig(host="0.0.0.0")
    assert "NEURON_FLEET_API_KEYS" in insecure_settings(public, False)[0]
    assert insecure_settings(replace(public, api_keys=("k",)), False) == []
    assert insecure_settings(replace(public, allow_public_without_api_keys=True), False) == []
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert insecure_settings(BalancerConfig(host=host), False) == []
    remote_admin = BalancerConfig(admin_from_any_host=True)
    assert "NEURON_FLEET_ADMIN_TOKEN" in insecure_settings(remote_admin, False)[0]
    assert insecure_settings(replace(remote_admin, admin_token="t"), True) == []


def test_balance_refuses_a_public_address_without_api_keys() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_FLEET_")}
    argv = [sys.executable, "-m", "supervisor", "balance", "--upstream", "http://127.0.0.1:9"]
    argv += ["--listen", f"0.0.0.0:{free_port()}"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 2
    assert "refusing to start" in done.stderr and "NEURON_FLEET_API_KEYS" in done.stderr


def test_serve_refuses_remote_admin_without_a_token(tmp_path: Path) -> None:
    from tests.test_serve import demo_config

    config = demo_config(tmp_path, free_port())
    config.write_text(config.read_text() + "admin_from_any_host = true\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_FLEET_")}
    argv = [sys.executable, "-m", "supervisor", "serve", "--config", str(config)]
    argv += ["--listen", f"127.0.0.1:{free_port()}"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "admin_from_any_host" in done.stderr and "NEURON_FLEET_ADMIN_TOKEN" in done.stderr


def test_balance_strips_spaces_in_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from balancer.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("NEURON_FLEET_API_KEYS", " k-1 , k-2,, ")
    config = config_from_args(parser.parse_args(["--upstream", "http://127.0.0.1:9"]))
    assert config.api_keys == ("k-1", "k-2")


# ------------------------------------------------------------------- smaller leaks


async def test_a_bearer_token_that_is_not_utf8_is_a_401_not_a_500(
    scripted, balancer, caplog: pytest.LogCaptureFixture
) -> None:
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url], api_keys=("k-1",))
    port = server.bound_port
    caplog.set_level(logging.INFO)
    for method, path in ((b"POST", b"/generate"), (b"GET", b"/fleet/status")):
        body = json.dumps(GEN).encode() if method == b"POST" else b""
        raw = (
            method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer \xff\xfe-not-utf8\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 401"), head
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_malformed_requests_are_counted_not_logged_with_their_bytes(
    scripted, balancer, http, caplog: pytest.LogCaptureFixture
) -> None:
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url])
    caplog.set_level(logging.DEBUG)
    secret = b"sk-live-do-not-log"
    raw = (
        b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + secret + b"\x01bad\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
    writer.write(raw)
    head = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.0 400")  # aiohttp answers parse errors in HTTP/1.0
    assert secret.decode() not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "malformed request from 127.0.0.1: HTTP 400" in caplog.text
    async with http.get(f"{server.url}/metrics") as resp:
        metrics = await resp.text()
    assert metric_value(metrics, "neuron_fleet_rejected_requests_total", reason="malformed_http")


async def test_no_versions_in_server_headers_nor_internals_in_502s(
    scripted, balancer, http
) -> None:
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url])
    for path in ("/health", "/metrics", "/info"):
        async with http.get(server.url + path) as resp:
            assert resp.headers["Server"] == "neuron-fleet", path
    async with http.post(f"{server.url}/generate", json=GEN) as resp:  # relayed
        assert resp.status == 200 and resp.headers["Server"] == "neuron-fleet"

    dead = await balancer([f"http://127.0.0.1:{free_port()}"], wait_ready=False, retries=0)
    dead.registry.get("r0").healthy = True  # type: ignore[union-attr]
    async with http.post(f"{dead.url}/generate", json=GEN) as resp:
        text = await _error(resp, 502, "unavailable")
    assert "127.0.0.1" not in text and "Errno" not in text and "connect" in text


def test_the_service_hides_its_environment_from_its_own_user(tmp_path: Path) -> None:
    """A native replica runs as the service's user: it must not read the supervisor's
    environment (admin token, API keys) from /proc. Run as `nobody`, both sides."""
    if os.getuid() != 0:
        pytest.skip("needs root to run both processes as another user")
    secret = "adm-in-environ-42"
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys, time\n"
        "from supervisor.procutil import hide_own_memory\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "assert hide_own_memory()\n"
        "print(os.getpid(), flush=True)\n"
        "time.sleep(30)\n"
    )
    os.chmod(tmp_path, 0o755)
    env = {**os.environ, "NEURON_FLEET_ADMIN_TOKEN": secret, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(probe)], env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        assert os.stat(f"/proc/{pid}/environ").st_uid == 0  # root-owned once not dumpable
        reader = subprocess.run(
            [
                sys.executable,
                "-c",
                "import os, sys\nos.setgid(65534); os.setuid(65534)\n"
                f"open('/proc/{pid}/environ', 'rb').read()",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert reader.returncode != 0 and "PermissionError" in reader.stderr
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_the_shipped_unit_adds_the_docker_group_only_for_docker() -> None:
    from supervisor import install

    text = (ROOT / "deploy/neuron-fleet.service").read_text()
    assert "\nSupplementaryGroups=neuron\n" in text
    assert install.service_groups("neuron", "native") == ["neuron"]
    assert install.service_groups("neuron", "docker") == ["neuron", "docker"]


# ------------------------------------------------------------------- bounded work per request


async def test_prompts_too_long_to_hold_max_input_tokens_are_refused_untokenized(
    scripted, balancer, http, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    replica, url = await scripted(Script(tokens=1))
    server = await balancer([url], tokenizer_path=str(tiny_tokenizer), max_input_tokens=50)
    tokens = server.balancer.tokens  # type: ignore[union-attr]
    await wait_until(lambda: tokens.exact, what="tokenizer loaded")
    assert tokens.max_chars is not None and 50 <= tokens.max_chars <= 50 * 64
    calls: list[int] = []
    count_now = tokens._count_now
    monkeypatch.setattr(
        tokens, "_count_now", lambda text: calls.append(len(text)) or count_now(text)
    )

    huge = {"inputs": "a" * (1024 * 1024)}  # under max_body_bytes (2000000)
    async with http.post(f"{server.url}/generate", json=huge) as resp:
        message = await _error(resp, 422, "validation")
    assert "must have less than 50 tokens" in message and str(tokens.max_chars) in message
    assert calls == [] and replica.seen.requests == []
    async with http.post(f"{server.url}/generate", json={"inputs": "hello"}) as resp:
        assert resp.status == 200
    assert calls == [5]
    async with http.get(f"{server.url}/metrics") as resp:
        metrics = await resp.text()
    assert (
        metric_value(metrics, "neuron_fleet_rejected_requests_total", reason="too_many_chars") == 1
    )


async def test_tokenization_runs_one_prompt_at_a_time(
    scripted, balancer, http, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url], tokenizer_path=str(tiny_tokenizer), max_input_tokens=100_000)
    tokens = server.balancer.tokens  # type: ignore[union-attr]
    await wait_until(lambda: tokens.exact, what="tokenizer loaded")
    lock = threading.Lock()
    running, peak = [0], [0]
    count_now = tokens._count_now

    def slow_count(text: str) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        try:
            return count_now(text)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(tokens, "_count_now", slow_count)
    body = {"inputs": "hello world " * 400}  # 4,800 characters: tokenized off the loop

    async def one() -> int:
        async with http.post(f"{server.url}/generate", json=body) as resp:
            return resp.status

    assert await asyncio.gather(*(one() for _ in range(6))) == [200] * 6
    assert peak[0] == 1


# ------------------------------------------------------------------- fair sharing


class Gate:
    """A replica whose answers wait until the test opens the gate."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/generate", self.answer)
        app.router.add_get("/info", self.answer)
        app.router.add_post("/tokenize", self.answer)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def answer(self, request: web.Request) -> web.Response:
        await request.read()
        self.waiting += 1
        try:
            await self.open.wait()
        finally:
            self.waiting -= 1
        return web.json_response({"generated_text": "ok"})


@pytest.fixture
async def gate() -> AsyncIterator[tuple[Gate, str]]:
    g = Gate()
    runner, url = await start_app(g.app())
    yield g, url
    g.open.set()
    await runner.cleanup()


async def _post(
    http: aiohttp.ClientSession, url: str, key: str, body: Any = GEN
) -> tuple[int, str | None]:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(url, json=body, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Retry-After")


async def test_one_client_cannot_fill_the_queue_for_everyone(
    gate: tuple[Gate, str], balancer, http, caplog: pytest.LogCaptureFixture
) -> None:
    from balancer import access

    access.refusals._last.clear()
    g, url = gate
    server = await balancer(
        [url], api_keys=("key-a", "key-b"), max_inflight_per_replica=1, max_queued_per_client=2
    )
    generate = f"{server.url}/generate"
    greedy = [asyncio.create_task(_post(http, generate, "key-a")) for _ in range(3)]
    await wait_until(lambda: server.balancer.admission.queue_depth == 2, what="2 queued")  # type: ignore[union-attr]
    status, retry_after = await _post(http, generate, "key-a")
    assert (status, retry_after) == (429, "1")  # 1 slot + 2 queued is key-a's share
    other = asyncio.create_task(_post(http, generate, "key-b"))
    await wait_until(lambda: server.balancer.admission.queue_depth == 3, what="key-b queued")  # type: ignore[union-attr]
    g.open.set()
    assert [s for s, _ in await asyncio.gather(*greedy, other)] == [200] * 4
    assert server.balancer.quotas.outstanding == {}  # type: ignore[union-attr]
    async with http.get(f"{server.url}/metrics") as resp:
        metrics = await resp.text()
    assert metric_value(metrics, "neuron_fleet_rejected_requests_total", reason="client_quota") == 1
    assert "refused POST /generate from 127.0.0.1: client_quota" in caplog.text
    assert "key-a" not in caplog.text


async def _post_from(
    http: aiohttp.ClientSession, url: str, forwarded_for: str
) -> tuple[int, str | None]:
    async with http.post(url, json=GEN, headers={"X-Forwarded-For": forwarded_for}) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Retry-After")


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted-proxy", "untrusted-peer"])
async def test_behind_a_trusted_proxy_each_forwarded_user_has_its_own_share(
    gate: tuple[Gate, str], balancer, http, caplog: pytest.LogCaptureFixture, trusted: bool
) -> None:
    """The shipped ALB manifests: no API keys, every connection from the proxy. With the
    proxy in trusted_proxies the right-most X-Forwarded-For address is the client; from any
    other peer the header is ignored (a client cannot pick its own key)."""
    from balancer import access

    access.refusals._last.clear()
    g, url = gate
    server = await balancer(
        [url],
        max_inflight_per_replica=1,
        max_queued_per_client=2,
        trusted_proxies=("127.0.0.0/8", "::1") if trusted else (),
    )
    generate = f"{server.url}/generate"
    # user A (the ALB appended 10.0.0.1; the client itself claimed 10.9.9.9 on the left)
    user_a = "10.9.9.9, 10.0.0.1"
    greedy = [asyncio.create_task(_post_from(http, generate, user_a)) for _ in range(3)]
    await wait_until(lambda: server.balancer.admission.queue_depth == 2, what="2 queued")  # type: ignore[union-attr]
    assert await _post_from(http, generate, "10.0.0.1") == (429, "1")
    other = asyncio.create_task(_post_from(http, generate, "10.0.0.2"))
    if trusted:
        await wait_until(lambda: server.balancer.admission.queue_depth == 3, what="B queued")  # type: ignore[union-attr]
        assert "refused POST /generate from 10.0.0.1: client_quota" in caplog.text
    else:
        assert (await other) == (429, "1")  # one client: the socket peer
    g.open.set()
    statuses = [s for s, _ in await asyncio.gather(*greedy)]
    assert statuses == [200] * 3
    if trusted:
        assert (await other)[0] == 200
    assert server.balancer.quotas.outstanding == {}  # type: ignore[union-attr]


async def test_queued_bodies_count_against_a_memory_budget(
    gate: tuple[Gate, str], balancer, http
) -> None:
    g, url = gate
    server = await balancer([url], max_buffered_body_bytes=300_000, max_queued_per_client=0)
    generate = f"{server.url}/generate"
    big = {"inputs": "x" * 100_000}
    first = asyncio.create_task(_post(http, generate, "-", big))
    await wait_until(lambda: g.waiting == 1, what="first request at the replica")
    assert await _post(http, generate, "-", big) == (503, "1")
    g.open.set()
    assert (await first)[0] == 200
    assert server.balancer.quotas.body_bytes == 0  # type: ignore[union-attr]


async def test_tokenize_info_and_models_have_their_own_small_limit(
    gate: tuple[Gate, str], balancer, http
) -> None:
    g, url = gate
    server = await balancer([url], max_passthrough_requests=2)
    held = [asyncio.create_task(http.get(f"{server.url}/info")) for _ in range(2)]
    await wait_until(lambda: g.waiting == 2, what="2 /info at the replica")
    async with http.post(f"{server.url}/tokenize", json=GEN) as resp:
        await _error(resp, 429, "overloaded")
        assert resp.headers["Retry-After"] == "1"
    g.open.set()
    for task in held:
        resp = await task
        assert resp.status == 200
        resp.release()
    async with http.get(f"{server.url}/info") as resp:
        assert resp.status == 200


async def test_slow_bodies_hold_no_passthrough_slot(gate: tuple[Gate, str], balancer, http) -> None:
    """16 GET /info announcing a body they never send, and 16 POST /tokenize sending half of
    theirs, hold nothing: the GET routes read no body, and the limit is taken once the body
    is read."""
    g, url = gate
    g.open.set()
    server = await balancer([url], client_timeout_s=30.0, max_passthrough_requests=16)
    heads = [b"GET /info HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"] * 16 + [
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    ] * 16
    streams = [await asyncio.open_connection("127.0.0.1", server.bound_port) for _ in heads]
    try:
        for (_, writer), head in zip(streams, heads, strict=True):
            writer.write(head)
            await writer.drain()
        # the GETs are answered at once although their announced bodies never come
        for reader, _ in streams[:16]:
            status = await asyncio.wait_for(reader.readline(), 10)
            assert status.startswith(b"HTTP/1.1 200"), status
        await wait_until(lambda: server.balancer.handling == 16, what="16 tokenize bodies read")  # type: ignore[union-attr]
        for path in ("/info", "/v1/models"):
            async with http.get(f"{server.url}{path}") as resp:
                assert resp.status in (200, 404), await resp.text()  # the gate has no /v1/models
        async with http.post(f"{server.url}/tokenize", json=GEN) as resp:
            assert resp.status == 200, await resp.text()
        assert server.balancer.quotas.passthrough == 0  # type: ignore[union-attr]
    finally:
        for _, writer in streams:
            writer.close()


async def test_the_passthrough_limit_is_per_client(gate: tuple[Gate, str], balancer) -> None:
    """One client (127.0.0.1) at max_passthrough_requests gets 429; another address on
    loopback (127.0.0.2) is still served; max_passthrough_total bounds them all."""
    g, url = gate
    server = await balancer([url], max_passthrough_requests=1, max_passthrough_total=2)
    one = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.1", 0)))
    two = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
    three = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.3", 0)))
    try:
        held = [asyncio.create_task(one.get(f"{server.url}/info"))]
        await wait_until(lambda: g.waiting == 1, what="client one's /info at the replica")
        async with one.post(f"{server.url}/tokenize", json=GEN) as resp:
            assert "max_passthrough_requests" in await _error(resp, 429, "overloaded")
        held.append(asyncio.create_task(two.get(f"{server.url}/info")))
        await wait_until(lambda: g.waiting == 2, what="client two's /info at the replica")
        async with three.get(f"{server.url}/info") as resp:
            assert "max_passthrough_total" in await _error(resp, 429, "overloaded")
        g.open.set()
        for task in held:
            resp = await task
            assert resp.status == 200
            resp.release()
        assert server.balancer.quotas.passthrough_by_client == {}  # type: ignore[union-attr]
    finally:
        for session in (one, two, three):
            await session.close()


async def test_connections_over_the_cap_get_a_503_and_are_closed(scripted, balancer, http) -> None:
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url], max_connections=4)
    idle = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", server.bound_port))
        idle.append(sock)
    try:
        aiohttp_server = server._runner.server  # type: ignore[union-attr]
        await wait_until(
            lambda: len(aiohttp_server.connections) == 4, what="4 connections registered"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)  # then closed by the balancer
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
        assert json.loads(body)["error_type"] == "overloaded"
    finally:
        for sock in idle:
            sock.close()
    await wait_until(lambda: len(server._runner.server.connections) == 0, what="idle closed")  # type: ignore[union-attr]
    async with http.get(f"{server.url}/metrics") as resp:
        metrics = await resp.text()
    assert (
        metric_value(metrics, "neuron_fleet_rejected_requests_total", reason="too_many_connections")
        == 1
    )


def test_status_token_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment, then the local balancer's runtime file, then the service's env file (root);
    a URL of another host gets none of the local ones."""
    env_file = tmp_path / "neuron-fleet.env"
    env_file.write_text('HF_TOKEN="hf"\nNEURON_FLEET_ADMIN_TOKEN="from-env-file"\n')
    url = "http://127.0.0.1:18080"
    assert find_token(url, str(env_file)) == "from-env-file"
    assert find_token("http://localhost:18080", str(env_file)) == "from-env-file"
    assert find_token("http://192.0.2.1:18080", str(env_file)) is None
    assert find_token(url, str(tmp_path / "absent.env")) is None
    token_file.write_token(18080, "from-runtime-file")
    assert find_token(url, str(env_file)) == "from-runtime-file"
    assert find_token("http://127.0.0.1:18081", str(env_file)) == "from-env-file"  # other port
    monkeypatch.setenv("NEURON_FLEET_ADMIN_TOKEN", "   ")  # blank: unset, as for the service
    assert find_token(url, str(env_file)) == "from-runtime-file"
    monkeypatch.setenv("NEURON_FLEET_ADMIN_TOKEN", " from-environment ")
    assert find_token(url, str(env_file)) == "from-environment"


@pytest.mark.parametrize(
    ("soft", "hard", "cap", "soft_after"),
    [(1024, 20000, 2048, 4224), (1024, 1024, 448, 1024), (65536, 65536, 2048, 65536)],
)
def test_the_connection_cap_fits_the_open_file_limit(
    soft: int, hard: int, cap: int, soft_after: int
) -> None:
    """The soft limit is raised as far as the hard one allows; past that the cap is lowered
    (accept() failing with EMFILE would be worse than a 503)."""
    code = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
        "from balancer.connections import effective_limit\n"
        "print(effective_limit(2048), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    _, hard_now = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard > hard_now:
        pytest.skip(f"hard open-file limit here is {hard_now}")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert done.stdout.split() == [str(cap), str(soft_after)], done.stderr
    assert ("lowered to" in done.stderr) == (cap < 2048)
