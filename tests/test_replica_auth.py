"""The replica key: replicas' own ports answer generation requests from the balancer only.

Another local user can reach a replica's loopback port (TGI's router binds TCP only). With
a key made per run, passed to each replica as ``API_KEY`` (TGI's ``--api-key``) and sent by
the relay in place of the client's ``Authorization``, that port refuses generation
requests that did not come through the balancer's API keys, quotas and queue.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from supervisor.config import FleetConfig
from supervisor.launchers import launch_spec
from supervisor.serve import with_replica_key
from tests.conftest import free_ports
from tests.test_launchers import SECRET, make_config
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

KEY = "0123456789abcdef" * 4
GEN = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}


def keyed(config: FleetConfig, key: str = KEY) -> FleetConfig:
    return replace(config, balancer=replace(config.balancer, replica_api_key=key))


# -- the launchers hand the key over in the environment, never on argv -----------------


@pytest.mark.parametrize("kind", ["docker", "native", "simulated", "command"])
def test_every_launcher_passes_the_key_in_the_environment_only(tmp_path: Path, kind: str) -> None:
    extra = '[launcher.command]\ntemplate = "serve --port {port}"\n' if kind == "command" else ""
    config = keyed(make_config(tmp_path, kind, extra))
    spec = launch_spec(config.plan.replicas[0], config)
    assert spec.env["API_KEY"] == KEY
    for text in (" ".join(spec.argv), spec.display, repr(spec)):
        assert KEY not in text and SECRET not in text
    if kind == "docker":
        # by name: docker reads the value from its own environment (spec.env)
        assert spec.argv[spec.argv.index("API_KEY") - 1] == "-e"
    if kind == "command":
        assert spec.env["VLLM_API_KEY"] == KEY  # vLLM's name for the same thing


def test_no_key_no_api_key_variable(tmp_path: Path) -> None:
    for kind in ("docker", "native", "simulated"):
        spec = launch_spec(
            make_config(tmp_path, kind).plan.replicas[0], make_config(tmp_path, kind)
        )
        assert "API_KEY" not in spec.env and "API_KEY" not in spec.argv


def test_serve_makes_one_key_per_run_unless_configured_or_off(tmp_path: Path) -> None:
    config = make_config(tmp_path, "simulated")
    first, second = with_replica_key(config), with_replica_key(config)
    assert first.balancer.replica_api_key and second.balancer.replica_api_key
    assert first.balancer.replica_api_key != second.balancer.replica_api_key
    assert len(first.balancer.replica_api_key) == 64
    assert with_replica_key(keyed(config)).balancer.replica_api_key == KEY
    off = replace(config, fleet=replace(config.fleet, replica_auth=False))
    assert with_replica_key(off).balancer.replica_api_key is None
    # never shown: repr, the public (status / plan --json) view
    assert first.balancer.replica_api_key not in repr(first)
    public = json.dumps(first.to_public_dict())
    assert first.balancer.replica_api_key not in public
    assert json.loads(public)["balancer"]["replica_api_key"] == "***"


# -- the simulated replica refuses as TGI does ----------------------------------------------


async def test_simulator_with_api_key_guards_tgi_base_routes_only(simulator, http) -> None:
    url = await simulator(api_key=KEY)
    for path, body in [
        ("/generate", GEN),
        ("/generate_stream", GEN),
        ("/", GEN),
        ("/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 2}),
        ("/tokenize", {"inputs": "Hi"}),
        ("/_sim/health", {"fail": True}),
    ]:
        async with http.post(url + path, json=body) as resp:
            assert resp.status == 401, path
            assert await resp.read() == b""  # axum's bare StatusCode::UNAUTHORIZED
        wrong = {"Authorization": "Bearer nope"}
        async with http.post(url + path, json=body, headers=wrong) as resp:
            assert resp.status == 401, path
    # TGI lower-cases both sides before comparing.
    upper = {"Authorization": f"BEARER {KEY.upper()}"}
    async with http.post(url + "/generate", json=GEN, headers=upper) as resp:
        assert resp.status == 200
    for path in ("/health", "/info", "/metrics", "/v1/models"):
        async with http.get(url + path) as resp:
            assert resp.status == 200, path
    async with http.post(url + "/chat_tokenize", json={"messages": []}) as resp:
        assert resp.status != 401  # an info route in TGI: not behind the key


# -- the relay sends the key instead of what the client sent ---------------------------------


async def test_relay_replaces_the_clients_authorization_with_the_replica_key(
    scripted, balancer, http
) -> None:
    replica, url = await scripted(Script(tokens=2))
    server = await balancer([url], replica_api_key=KEY, api_keys=("client-key",))
    client = {"Authorization": "Bearer client-key"}
    for _ in range(2):
        async with http.post(server.url + "/generate_stream", json=GEN, headers=client) as resp:
            assert resp.status == 200
            await resp.read()
    sent = [r["headers"] for r in replica.seen.requests]
    assert [h.get("Authorization") for h in sent] == [f"Bearer {KEY}"] * 2
    assert all("client-key" not in json.dumps(h) for h in sent)


async def test_balancer_in_front_of_keyed_simulators(simulator, balancer, http) -> None:
    url = await simulator(api_key=KEY)
    server = await balancer([url], replica_api_key=KEY)
    async with http.post(server.url + "/generate", json=GEN) as resp:
        assert resp.status == 200
        assert (await resp.json())["generated_text"]
    async with http.post(server.url + "/tokenize", json={"inputs": "Hi"}) as resp:
        assert resp.status == 200  # a passthrough route carries the key too
    without = await balancer([url])  # a balancer that does not know the key
    async with http.post(without.url + "/generate", json=GEN) as resp:
        assert resp.status == 401  # the replica's answer, relayed, not retried into a 5xx


# -- end to end: neuron-fleet serve ----------------------------------------------------------


def _direct(port: int) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/generate",
        data=json.dumps(GEN).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.timeout(90)
@pytest.mark.parametrize("replica_auth", [True, False])
def test_serve_replica_ports_refuse_requests_around_the_balancer(
    tmp_path: Path, replica_auth: bool
) -> None:
    listen, *replica_ports = free_ports(4)
    config = demo_config(tmp_path, replica_ports[0], replica_auth=replica_auth)
    proc = start_serve(config, listen)
    base = f"http://127.0.0.1:{listen}"
    try:
        wait_for(lambda: _ready(base), seconds=30, what="balancer ready")
        code, text = post_json(f"{base}/v1/chat/completions", CHAT)
        assert code == 200 and text.rstrip().endswith("data:[DONE]")
        assert _direct(replica_ports[0]) == (401 if replica_auth else 200)
        pids = [r["pid"] for r in fleet_status(base)["replicas"]]
        environs = []
        for pid in pids:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"API_KEY" not in f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environs.append(
                    dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                )
        keys = {env.get(b"API_KEY") for env in environs}
        if replica_auth:
            assert len(keys) == 1 and None not in keys  # one key, shared by the fleet
            key = keys.pop().decode()
        else:
            assert keys == {None}
        returncode, err = stop(proc)
        assert returncode == 0, err[-3000:]
        if replica_auth:
            assert key not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def _ready(base: str) -> bool:
    try:
        return get(f"{base}/health", timeout=1)[0] == 200
    except OSError:
        return False


def test_balance_reads_the_replica_key_from_the_environment(monkeypatch) -> None:
    import argparse

    from balancer.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--upstream", "http://127.0.0.1:9"])
    monkeypatch.setenv("NEURON_FLEET_REPLICA_API_KEY", f" {KEY} ")
    assert config_from_args(args).replica_api_key == KEY
    monkeypatch.delenv("NEURON_FLEET_REPLICA_API_KEY")
    assert config_from_args(args).replica_api_key is None
    assert os.environ.get("NEURON_FLEET_REPLICA_API_KEY") is None
