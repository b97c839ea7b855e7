"""Security: admin routes for loopback (and a token), API keys on public routes, secrets that
never leak (logs, /fleet/status, metrics, ``ps``, replica environments), and headers a client
cannot use to reach or impersonate anything.

Complements tests/test_balancer_errors.py (one API key on /generate, the admin token on
/fleet/status) and tests/test_balancer_streaming.py::test_request_headers (Connection
tokens, Proxy-Authorization, one X-Forwarded-For).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from balancer import access as access_module
from balancer.access import ADMIN_HEADER, admin_denied
from balancer.config import BalancerConfig
from supervisor.procutil import child_env, pid_alive
from tests.conftest import start_app, wait_until
from tests.upstreams import Script

pytestmark = pytest.mark.timeout(60)

GEN = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}


async def _tgi_error(resp: aiohttp.ClientResponse, status: int, error_type: str) -> None:
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type


# --------------------------------------------------------------------------- admin access


def _mocked(remote: str, headers: dict[str, str] | None = None) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (remote, 40000) if name == "peername" else default
    )
    return make_mocked_request("GET", "/fleet/status", headers=headers, transport=transport)


def test_defaults_listen_on_loopback_and_keep_admin_local() -> None:
    from supervisor.config import FleetSettings

    assert BalancerConfig().host == "127.0.0.1"
    assert BalancerConfig().admin_from_any_host is False
    assert FleetSettings().host == "127.0.0.1"  # replicas too


def test_admin_refuses_remote_clients_whatever_their_headers() -> None:
    balancer = mock.Mock(config=BalancerConfig(admin_token="t"))
    for remote in ("127.0.0.1", "::1", "127.8.9.10"):
        assert admin_denied(_mocked(remote, {"Authorization": "Bearer t"}), balancer.config) is None
    spoofed = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "Forwarded": "for=::1"}
    for remote in ("10.0.0.7", "192.168.1.20", "2001:db8::1", ""):
        denied = admin_denied(_mocked(remote, spoofed), balancer.config)
        assert denied is not None and denied.status == 403
        assert json.loads(denied.body) == {  # type: ignore[arg-type]
            "error": "Admin routes answer loopback clients only",
            "error_type": "forbidden",
        }


def test_admin_from_any_host_still_needs_the_token() -> None:
    balancer = mock.Mock(config=BalancerConfig(admin_from_any_host=True, admin_token="adm-1"))
    denied = admin_denied(_mocked("10.0.0.7"), balancer.config)
    assert denied is not None and denied.status == 401
    assert denied.headers["WWW-Authenticate"] == "Bearer"
    for wrong in ("Bearer adm-2", "Bearer adm-1x", "Basic adm-1", "adm-1", "Bearer "):
        assert (
            admin_denied(_mocked("10.0.0.7", {"Authorization": wrong}), balancer.config) is not None
        )
    ok = _mocked("10.0.0.7", {"Authorization": "bearer adm-1"})
    assert admin_denied(ok, balancer.config) is None


async def test_admin_actions_need_the_token(scripted, balancer, http) -> None:
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url], admin_token="adm-secret")
    drain = f"{server.url}/fleet/replicas/r0/drain"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"X-Admin-Token": "adm-secret"}):
        async with http.post(drain, headers=headers) as resp:
            await _tgi_error(resp, 401, "unauthorized")
        async with http.post(f"{server.url}/fleet/rolling-restart", headers=headers) as resp:
            await _tgi_error(resp, 401, "unauthorized")
    async with http.post(f"{drain}?token=adm-secret") as resp:
        assert resp.status == 401  # never from the query string (it ends up in access logs)
    assert server.registry.get("r0").routable  # type: ignore[union-attr]
    admin = {"Authorization": "Bearer adm-secret", ADMIN_HEADER: "1"}
    async with http.post(drain, headers=admin) as resp:
        assert resp.status == 200
    assert not server.registry.get("r0").routable  # type: ignore[union-attr]


# --------------------------------------------------------------------------- API keys


async def test_api_keys_guard_every_public_route(scripted, balancer, http) -> None:
    replica, url = await scripted(Script(tokens=1))
    server = await balancer([url], api_keys=("key-one", "key-two"))
    guarded = [
        ("POST", "/generate", GEN),
        ("POST", "/generate_stream", GEN),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ("POST", "/v1/completions", {"prompt": "x"}),
        ("POST", "/", GEN),
        ("POST", "/invocations", GEN),
        ("POST", "/tokenize", GEN),
        ("GET", "/info", None),
        ("GET", "/v1/models", None),
        ("GET", "/no-such-route", None),  # 401, not 404: do not tell strangers what exists
    ]
    wrong = (None, "Bearer key-on", "Bearer key-one2", "Bearer KEY-ONE", "Basic key-one", "key-one")
    for method, path, body in guarded:
        for auth in wrong:
            headers = {"Authorization": auth} if auth is not None else {}
            async with http.request(method, server.url + path, json=body, headers=headers) as r:
                await _tgi_error(r, 401, "unauthorized")
                assert r.headers["WWW-Authenticate"] == "Bearer"
    assert replica.seen.requests == []
    for path in ("/health", "/ping", "/metrics"):
        async with http.get(server.url + path) as resp:
            assert resp.status == 200, path  # probes and scrapers carry no key
    for key in ("key-one", "key-two"):
        headers = {"Authorization": f"Bearer {key}"}
        async with http.post(f"{server.url}/generate", json=GEN, headers=headers) as resp:
            assert resp.status == 200
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert "key-one" not in text and "key-two" not in text


async def test_api_key_check_compares_every_key_in_constant_time(
    scripted, balancer, http, monkeypatch
) -> None:
    """No early exit on the first match and no ``==``: hmac.compare_digest on every key."""
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url], api_keys=("k-1", "k-2", "k-3"))
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(access_module.hmac, "compare_digest", spy)
    for given, status in (("k-1", 200), ("k-3", 200), ("k-4", 401)):
        calls.clear()
        headers = {"Authorization": f"Bearer {given}"}
        async with http.post(f"{server.url}/generate", json=GEN, headers=headers) as resp:
            assert resp.status == status
        assert [b for _, b in calls] == [b"k-1", b"k-2", b"k-3"]


async def test_the_api_key_is_not_forwarded_to_replicas(scripted, balancer, http) -> None:
    """The balancer checks the key; replicas (and their logs) never see it. Without keys at
    the balancer, Authorization is the replica's business (vLLM --api-key) and passes."""
    replica, url = await scripted(Script(tokens=1))
    keyed = await balancer([url], api_keys=("key-one",))
    open_ = await balancer([url])
    headers = {"Authorization": "Bearer key-one"}
    async with http.post(f"{keyed.url}/generate", json=GEN, headers=headers) as resp:
        assert resp.status == 200
    async with http.post(f"{open_.url}/generate", json=GEN, headers=headers) as resp:
        assert resp.status == 200
    first, second = ({k.lower() for k in r["headers"]} for r in replica.seen.requests)
    assert "authorization" not in first
    assert "authorization" in second


# --------------------------------------------------------------------------- headers


async def test_hop_by_hop_and_internal_headers_never_reach_a_replica(
    scripted, balancer, http
) -> None:
    replica, url = await scripted(Script(tokens=1))
    server = await balancer([url])
    headers = [
        ("Connection", "keep-alive, X-Private"),
        ("Connection", "X-Private-2"),
        ("X-Private", "1"),
        ("X-Private-2", "2"),
        ("Keep-Alive", "timeout=999"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Host", "evil.example"),
        ("X-Real-IP", "10.6.6.6"),
        ("Forwarded", "for=10.6.6.6;proto=https"),
        ("X-Neuron-Fleet-Replica", "replica-9"),
        ("X-Forwarded-For", "10.1.1.1"),
        ("X-Forwarded-For", "10.2.2.2, 10.3.3.3"),
        ("X-Request-Id", "bad id\twith<html>"),
        ("Expect", "100-continue"),
        ("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("X-Custom", "kept"),
    ]
    async with http.post(f"{server.url}/generate", json=GEN, headers=headers) as resp:
        assert resp.status == 200
        request_id = resp.headers["x-request-id"]
    seen_raw = replica.seen.requests[0]["headers"]
    seen = {k.lower(): v for k, v in seen_raw.items()}
    for name in (
        "x-private",
        "x-private-2",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
        "x-real-ip",
        "forwarded",
        "x-neuron-fleet-replica",
        "expect",
    ):
        assert name not in seen, name
    assert seen["host"] == url.removeprefix("http://")  # the replica's own, not the client's
    # Appended, never trusted: every earlier hop kept in order, then the real peer.
    assert seen["x-forwarded-for"] == "10.1.1.1, 10.2.2.2, 10.3.3.3, 127.0.0.1"
    assert seen["x-request-id"] == request_id and len(request_id) == 32  # invalid id replaced
    assert seen["traceparent"].startswith("00-0af7") and seen["x-custom"] == "kept"


async def test_hop_by_hop_response_headers_are_not_relayed(balancer, http) -> None:
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def generate(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Connection": "X-Upstream-Private",
                "X-Upstream-Private": "internal",
                "Keep-Alive": "timeout=1",
                "Proxy-Authenticate": "Basic realm=internal",
                "Trailer": "X-Sum",
                "X-Request-Id": "upstream-chosen",
                "X-Kept": "yes",
            }
        )
        await resp.prepare(request)
        await resp.write(b'data:{"token":{"id":1,"text":"a"},"generated_text":"a"}\n\n')
        await resp.write_eof()
        return resp

    up = web.Application()
    up.router.add_get("/health", health)
    up.router.add_post("/generate_stream", generate)
    runner, url = await start_app(up)
    try:
        server = await balancer([url])
        headers = {"X-Request-Id": "client-chosen"}
        async with http.post(f"{server.url}/generate_stream", json=GEN, headers=headers) as r:
            assert r.status == 200
            await r.read()
            got = {k.lower() for k in r.headers}
            assert r.headers["x-request-id"] == "client-chosen"
            assert r.headers["x-kept"] == "yes"
        assert not got & {"x-upstream-private", "keep-alive", "proxy-authenticate", "trailer"}
    finally:
        await runner.cleanup()


def test_balancer_secrets_are_not_passed_to_replicas(monkeypatch) -> None:
    monkeypatch.setenv("NEURON_FLEET_ADMIN_TOKEN", "adm")
    monkeypatch.setenv("NEURON_FLEET_API_KEYS", "k1,k2")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    env = child_env({})
    assert "NEURON_FLEET_ADMIN_TOKEN" not in env and "NEURON_FLEET_API_KEYS" not in env
    assert env["HF_TOKEN"] == "hf_x"  # a replica of a gated model needs this one


# --------------------------------------------------------------------------- no leak end to end

HF_TOKEN = "hf_secret_xyz_4815162342"
API_KEYS = ("key_abc_1234567", "key_def_7654321")
ADMIN_TOKEN = "adm_tok_0987654321"
SECRETS = (HF_TOKEN, *API_KEYS, ADMIN_TOKEN)


def _spawn(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd
    )


def _proc_text(pid: int, what: str) -> str:
    try:
        return Path(f"/proc/{pid}/{what}").read_bytes().replace(b"\0", b" ").decode("latin-1")
    except OSError:
        return ""


async def test_secrets_never_leak_from_a_running_service(tmp_path: Path) -> None:
    """`neuron-fleet serve` with HF_TOKEN, API keys and an admin token in its environment, at
    DEBUG log level: none of them in its log, /fleet/status, /metrics (with the replicas'
    metrics re-exported), /info, nor any process's command line; the replicas' environments
    hold HF_TOKEN (they may need it) but never the balancer's keys."""
    from tests.conftest import free_ports
    from tests.test_serve import ROOT, demo_config

    listen, *replica_ports = free_ports(4)
    config = demo_config(tmp_path, replica_ports[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env |= {
        "HF_TOKEN": HF_TOKEN,
        "NEURON_FLEET_API_KEYS": ",".join(API_KEYS),
        "NEURON_FLEET_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    argv = [sys.executable, "-m", "supervisor", "serve", "--config", str(config)]
    argv += ["--listen", f"127.0.0.1:{listen}", "--log-level", "DEBUG"]
    proc = _spawn(argv, env, ROOT)
    base = f"http://127.0.0.1:{listen}"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    user = {"Authorization": f"Bearer {API_KEYS[1]}"}
    seen: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:

            async def status() -> dict:
                async with http.get(f"{base}/fleet/status", headers=admin) as resp:
                    text = await resp.text()
                    seen.append(text)
                    return json.loads(text)

            async def ready() -> bool:
                try:
                    return (await status())["ready_replicas"] == 3
                except (aiohttp.ClientError, ValueError, KeyError):
                    return False

            for _ in range(300):
                if await ready():
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the fleet did not become ready")
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            async with http.post(f"{base}/v1/chat/completions", json=chat, headers=user) as r:
                assert r.status == 200
                seen.append(await r.text())
            for wrong in (f"Bearer {API_KEYS[0]}x", f"Bearer {HF_TOKEN}", f"Bearer {ADMIN_TOKEN}"):
                h = {"Authorization": wrong}
                async with http.post(f"{base}/v1/chat/completions", json=chat, headers=h) as r:
                    assert r.status == 401  # and the attempted key must not be logged either
                    seen.append(await r.text())
            async with http.get(f"{base}/info", headers=user) as r:
                seen.append(await r.text())
            async with http.get(f"{base}/metrics") as r:
                seen.append(await r.text())
            async with http.get(f"{base}/fleet/status") as r:
                assert r.status == 401
            replicas = (await status())["replicas"]
            pids = [r["pid"] for r in replicas]
            assert len(pids) == 3 and all(pids)
            cmdlines = [_proc_text(pid, "cmdline") for pid in (proc.pid, *pids)]
            assert all(cmdlines) and "supervisor.simulator" in cmdlines[1]
            for pid in pids:
                environ = _proc_text(pid, "environ")
                assert HF_TOKEN in environ
                assert API_KEYS[0] not in environ and ADMIN_TOKEN not in environ
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=20)
        assert proc.returncode == 0, err[-2000:]
        assert "DEBUG" in err and "[replica-0]" in err  # the log we search is the real one
        for text in (*seen, *cmdlines, err):
            for secret in SECRETS:
                assert secret not in text, f"secret leaked: ...{text[:200]}"
        assert not any(pid_alive(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


async def test_the_request_id_cannot_inject_into_logs_or_headers(scripted, balancer, http):
    replica, url = await scripted(Script(tokens=1))
    server = await balancer([url])
    for given in ("a" * 129, "id;rm -rf", "ünïcode", '"quoted"', "a b"):
        async with http.post(
            f"{server.url}/generate", json=GEN, headers={"X-Request-Id": given}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["x-request-id"] != given
    await wait_until(lambda: len(replica.seen.requests) == 5)
