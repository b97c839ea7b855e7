"""Bad input gets a clear TGI-shaped error before any replica is touched."""

from __future__ import annotations

import pytest

from tests.upstreams import Script


@pytest.fixture
async def setup(scripted, balancer):
    replica, url = await scripted(Script(tokens=1))
    server = await balancer([url], max_body_bytes=1024)
    return replica, server


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "error_type"),
    [
        (
            "POST",
            "/generate",
            {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "validation",
        ),
        (
            "POST",
            "/generate",
            {"data": b'{"inputs": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}},
            400,
            "validation",
        ),
        (
            "POST",
            "/generate",
            {"data": b'{"inputs":"x"}', "headers": {"Content-Type": "text/plain"}},
            415,
            "validation",
        ),
        ("POST", "/generate", {"json": ["a", "list"]}, 422, "validation"),
        (
            "POST",
            "/generate",
            {"json": {"inputs": "x", "parameters": {"max_new_tokens": -5}}},
            422,
            "validation",
        ),
        (
            "POST",
            "/v1/completions",
            {"json": {"prompt": "x", "max_tokens": "lots"}},
            422,
            "validation",
        ),
        ("POST", "/generate", {"json": {"inputs": "x" * 5000}}, 413, "validation"),
        ("GET", "/nope", {}, 404, "not_found"),
        ("DELETE", "/generate", {}, 405, "method_not_allowed"),
    ],
)
async def test_bad_requests_are_refused_in_tgi_shape(
    setup, http, method, path, kwargs, status, error_type
):
    replica, server = setup
    async with http.request(method, f"{server.url}{path}", **kwargs) as resp:
        assert resp.status == status
        body = await resp.json()
    assert body["error_type"] == error_type
    assert isinstance(body["error"], str) and body["error"]
    assert replica.seen.requests == []


async def test_prompt_over_max_input_tokens_is_refused_with_a_tokenizer(
    scripted, balancer, http, tiny_tokenizer
):
    replica, url = await scripted(Script(tokens=1))
    server = await balancer([url], tokenizer_path=str(tiny_tokenizer), max_input_tokens=20)
    from tests.conftest import wait_until

    await wait_until(lambda: server.balancer.tokens.exact, what="tokenizer loaded")
    # 40 characters the tiny vocabulary has no merges for: 40 tokens, yet under the
    # character bound (20 x the longest token), so it is tokenized and counted.
    async with http.post(f"{server.url}/generate", json={"inputs": "zqxj" * 10}) as resp:
        assert resp.status == 422
        assert "must have less than 20 tokens" in (await resp.json())["error"]
    async with http.post(f"{server.url}/generate", json={"inputs": "hello world"}) as resp:
        assert resp.status == 200
    assert len(replica.seen.requests) == 1
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    from tests.conftest import metric_value

    rejected = "neuron_fleet_rejected_requests_total"
    assert metric_value(text, rejected, reason="too_many_tokens") == 1
    assert metric_value(text, rejected, reason="invalid_422") == 0  # counted once


async def test_api_keys_guard_public_routes(scripted, balancer, http):
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url], api_keys=("k-123",))
    async with http.post(f"{server.url}/generate", json={"inputs": "x"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error_type"] == "unauthorized"
    headers = {"Authorization": "Bearer k-123"}
    async with http.post(f"{server.url}/generate", json={"inputs": "x"}, headers=headers) as resp:
        assert resp.status == 200
    async with http.get(f"{server.url}/health") as resp:
        assert resp.status == 200


async def test_admin_token(scripted, balancer, http):
    _, url = await scripted(Script(tokens=1))
    server = await balancer([url], admin_token="s3cret")
    async with http.get(f"{server.url}/fleet/status") as resp:
        assert resp.status == 401
    headers = {"Authorization": "Bearer s3cret"}
    async with http.get(f"{server.url}/fleet/status", headers=headers) as resp:
        assert resp.status == 200
        assert "s3cret" not in await resp.text()
