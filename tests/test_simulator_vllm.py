"""``simulate-replica --engine vllm`` over real loopback sockets: vLLM 0.11's routes, chunk
shapes, errors, engine death, max-num-seqs slots with a waiting queue, and a vLLM fleet
behind the balancer (shapes: vllm-0.11.0 wheel, cited in supervisor/simulator/vllm_server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from supervisor.simulator.engine import FaultConfig
from supervisor.simulator.server import SimServer
from tests.conftest import metric_value, wait_until
from tests.test_simulator_http import replica, split_events, subprocess_replica

MODEL = "sim/llama"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]}


def vllm(**overrides: Any) -> contextlib.AbstractAsyncContextManager[SimServer]:
    """A simulated vLLM server on a free loopback port (test_simulator_http's ``replica``)."""
    return replica(**{"engine": "vllm", "model_id": MODEL, **overrides})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def events(body: bytes) -> list[bytes]:
    out = split_events(body)
    assert all(e.startswith(b"data: ") for e in out), out  # vLLM's spelling, with a space
    return [e[len(b"data: ") :] for e in out]


async def test_chat_stream_chunks(http):
    async with vllm() as server:
        body = {**CHAT, "stream": True, "max_tokens": 3}
        body["stream_options"] = {"include_usage": True}
        async with http.post(f"{server.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = events(await resp.read())
    assert raw[-1] == b"[DONE]"
    docs = [json.loads(e) for e in raw[:-1]]
    assert len(docs) == 5  # role, 3 tokens, usage
    role, *tokens, usage = docs
    assert role["id"].startswith("chatcmpl-") and role["object"] == "chat.completion.chunk"
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        | {"finish_reason": None}
    ]
    assert all(d["id"] == role["id"] for d in docs)
    assert [list(t["choices"][0]) for t in tokens[:-1]] == [
        ["index", "delta", "logprobs", "finish_reason", "token_ids"]
    ] * 2
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert "stop_reason" in tokens[-1]["choices"][0]
    assert usage["choices"] == []
    assert list(usage["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens"]
    assert usage["usage"]["completion_tokens"] == 3
    assert b'"usage"' not in raw[1]  # token chunks: exclude_unset leaves usage out


async def test_openai_sdk_chat_and_completions():
    async with vllm() as server:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        chat = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
        assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
        stream = await client.completions.create(
            model=MODEL, prompt="Deep learning is", max_tokens=4, stream=True
        )
        chunks = [c async for c in stream]
        assert len(chunks) == 4 and chunks[-1].choices[0].finish_reason == "length"
        done = await client.completions.create(model=MODEL, prompt="x y z")
        assert done.usage.completion_tokens == 16  # CompletionRequest.max_tokens default
        with pytest.raises(openai.NotFoundError) as err:
            await client.completions.create(model="other", prompt="x")
        assert err.value.body["message"] == "The model `other` does not exist."
        await client.close()


async def test_completion_stream_carries_prompt_token_ids_first(http):
    async with vllm() as server:
        body = {"model": MODEL, "prompt": "abcdefgh", "max_tokens": 2, "stream": True}
        async with http.post(f"{server.url}/v1/completions", json=body) as resp:
            raw = events(await resp.read())
    first, second = (json.loads(e) for e in raw[:2])
    assert first["choices"][0]["prompt_token_ids"] and len(first["choices"][0]) == 7
    assert second["choices"][0]["prompt_token_ids"] is None
    assert first["usage"] is None and first["object"] == "text_completion"


async def test_small_routes_and_errors(http):
    async with vllm(max_total_tokens=64, max_input_tokens=32) as server:
        async with http.get(f"{server.url}/health") as resp:
            assert resp.status == 200 and await resp.read() == b""
        async with http.get(f"{server.url}/version") as resp:
            assert await resp.json() == {"version": "0.11.0"}
        async with http.get(f"{server.url}/v1/models") as resp:
            card = (await resp.json())["data"][0]
        assert card["id"] == MODEL and card["owned_by"] == "vllm" and card["max_model_len"] == 64
        async with http.post(f"{server.url}/tokenize", json={"prompt": "abcdefgh"}) as resp:
            doc = await resp.json()
        assert doc["count"] == len(doc["tokens"]) == 2 and doc["max_model_len"] == 64
        async with http.post(
            f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 100}
        ) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["type"] == "BadRequestError" and error["code"] == 400
        assert error["message"].startswith("'max_tokens' or 'max_completion_tokens' is too large")
        assert set(error) == {"message", "type", "param", "code"}
        async with http.post(f"{server.url}/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 400  # not application/json
        async with http.get(f"{server.url}/generate") as resp:
            assert resp.status == 404  # no TGI routes on a vLLM server


async def test_api_key_guards_v1_only(http):
    async with vllm(api_key="s3cret") as server:
        async with http.get(f"{server.url}/v1/models") as resp:
            assert resp.status == 401 and await resp.json() == {"error": "Unauthorized"}
        async with http.get(f"{server.url}/health") as resp:
            assert resp.status == 200
        auth = {"Authorization": "Bearer s3cret"}
        async with http.get(f"{server.url}/v1/models", headers=auth) as resp:
            assert resp.status == 200


async def test_max_num_seqs_slots_and_an_unbounded_waiting_queue(http):
    """Two slots, six requests, a concurrency cap of 3 that vLLM does not have: all are
    served (no 429); the metrics show 2 running and the rest waiting."""
    async with vllm(batch_size=2, max_concurrent_requests=3, speed=20.0) as server:

        async def one() -> int:
            body = {**CHAT, "max_tokens": 8}
            async with http.post(f"{server.url}/v1/chat/completions", json=body) as resp:
                await resp.read()
                return resp.status

        tasks = [asyncio.create_task(one()) for _ in range(6)]
        await wait_until(lambda: server.engine.queued == 4, what="4 waiting")
        async with http.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
        labels = {"model_name": MODEL, "engine": "0"}
        assert metric_value(text, "vllm:num_requests_running", **labels) == 2
        assert metric_value(text, "vllm:num_requests_waiting", **labels) == 4
        assert await asyncio.gather(*tasks) == [200] * 6
        async with http.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
        assert metric_value(text, "vllm:generation_tokens_total", **labels) == 48
        assert (
            metric_value(text, "vllm:request_success_total", finished_reason="length", **labels)
            == 6
        )
        assert metric_value(text, "vllm:time_to_first_token_seconds_count", **labels) == 6


async def test_engine_death_as_vllm_reports_it(http):
    """A device failure kills the engine: the stream gets vLLM's code-400 event and
    [DONE], /health turns 503 with an empty body, a new request gets 500."""
    async with vllm(faults=FaultConfig(poison_prompt="POISON")) as server:
        body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "POISON"}]}
        async with http.post(f"{server.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            raw = (await resp.read()).split(b"\n\n")
        assert raw[0] == (
            b'data: {"error": {"message": "EngineCore encountered an issue. See stack trace '
            b'(above) for the root cause.", "type": "BadRequestError", "param": null, '
            b'"code": 400}}'
        )
        assert raw[1:] == [b"data: [DONE]", b""]
        async with http.get(f"{server.url}/health") as resp:
            assert resp.status == 503 and await resp.read() == b""
        async with http.post(f"{server.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 500
            assert (await resp.json())["error"]["message"].startswith("EngineCore encountered")


async def test_engine_death_exits_the_process(http):
    """As vLLM's launcher does at its watchdog's next check (5 s, / speed here)."""
    args = ("--engine", "vllm", "--speed", "50", "--fail-generation-every", "1")
    async with subprocess_replica(http, *args, "--model-id", MODEL) as (proc, url):
        async with http.post(f"{url}/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 500
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_a_vllm_fleet_behind_the_balancer(balancer, http):
    """One replica's engine dies on its first requests: requests that failed on it together
    are not suspects (balancer/retry.py) and are retried on the other replica; the failure
    counts against the dead one and its /health (503) takes it out."""
    async with vllm(faults=FaultConfig(fail_generation_every=1)) as dead, vllm() as good:
        server = await balancer(
            [dead.url, good.url], engine="vllm", policy="round-robin", health_fall=1
        )
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)

        async def one() -> str | None:
            stream = await client.chat.completions.create(
                model=MODEL, messages=CHAT["messages"], max_tokens=3, stream=True
            )
            return [c async for c in stream][-1].choices[0].finish_reason

        assert await asyncio.gather(*(one() for _ in range(4))) == ["length"] * 4
        await client.close()
        await wait_until(lambda: not server.registry.replicas[0].routable, what="r0 out")
        async with http.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
        # The first failure there is vLLM's code-400 EngineCore event; later ones may be
        # the dead engine's 500 (retried as an answered failure).
        assert metric_value(text, "neuron_fleet_retries_total", reason="generation_event") >= 1
        assert metric_value(text, "vllm:num_requests_running", replica="r1") == 0


def test_demo_engine_vllm_runs_vllm_replicas(tmp_path):
    """`demo --engine vllm`: every simulated replica is started with `--engine vllm` and
    the balancer writes vLLM-shaped errors."""
    import argparse

    from supervisor import demo
    from supervisor.config import load_config
    from supervisor.launchers import launch_spec

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert parser.parse_args(["--engine", "vllm"]).engine == "vllm"
    with pytest.raises(SystemExit):
        parser.parse_args(["--engine", "sglang"])
    path = tmp_path / "demo.toml"
    path.write_text(demo.demo_toml(engine="vllm"))
    config = load_config(str(path), env={}, check_host=False)
    assert config.fleet.engine == config.balancer.engine == "vllm"
    assert len(config.plan.replicas) == 3
    for plan in config.plan.replicas:
        argv = launch_spec(plan, config).argv
        assert argv[argv.index("--engine") + 1] == "vllm"
    assert 'model":"m"' in demo.curl_line("http://x", "m")


VLLM_PROCESS = """
import os, sys
port = sys.argv[1]
# A real vLLM-wire process per replica: a prompt with POISON kills its engine (the stream
# gets vLLM's code-400 EngineCore event, the process exits at the watchdog's next check).
os.execv(sys.executable, [
    sys.executable, "-m", "supervisor.simulator", "--engine", "vllm", "--port", port,
    "--model-id", "m", "--speed", "100", "--poison-prompt", "POISON",
])
"""


async def test_a_prompt_that_kills_vllm_engines_is_quarantined(tmp_path):
    """Supervised vLLM-wire processes: a prompt whose first event is the engine's death
    (code 400) breaks one process per send under the containment rule (the request alone on
    a replica that died is the prime suspect: not sent on, balancer/retry.py); the second
    break quarantines it, and the third send is refused with 422 before any replica. Other
    prompts are served."""
    from tests.script_fleet import script_fleet

    async with script_fleet(
        tmp_path,
        VLLM_PROCESS,
        ("a", "b", "c"),
        slot_cap=4,
        engine="vllm",
        retries=2,
        quarantine_after=2,
    ) as setup:
        poison = {"model": "m", "messages": [{"role": "user", "content": "POISON"}]}
        poison |= {"stream": True, "max_tokens": 4}
        status, text = await setup.post("/v1/chat/completions", poison)
        assert status == 200 and "EngineCore encountered an issue" in text, text
        assert text.endswith("data: [DONE]\n\n"), text
        await wait_until(lambda: sum(r.restarts for r in setup.replicas) >= 1, what="one died")
        status, text = await setup.post("/v1/chat/completions", poison)
        assert status in (200, 422), text  # the second death is the quarantine's evidence
        await wait_until(lambda: sum(r.restarts for r in setup.replicas) >= 2, what="two died")
        status, text = await setup.post("/v1/chat/completions", poison)
        assert status == 422, text
        error = json.loads(text)["error"]
        assert error["code"] == 422 and "without being sent to a replica" in error["message"]
        assert sum(r.restarts for r in setup.replicas) == 2  # the third send broke nothing
        ok = {**poison, "messages": [{"role": "user", "content": "hello"}]}
        status, text = await setup.post("/v1/chat/completions", ok)
        assert status == 200 and text.endswith("data: [DONE]\n\n"), text


def test_continuous_batching_decodes_running_requests_in_a_prefill_step():
    """optimum-neuron's vLLM runner: a step decodes the running requests, then prefills the
    admitted ones; every one of them gets a token. TGI Neuron pauses the running ones."""
    import random

    from supervisor.simulator.engine import Job, NeuronBatcher, NeuronTiming
    from supervisor.simulator.vllm_scheduler import ContinuousBatcher

    timing = NeuronTiming()

    def run(batcher_type: type[NeuronBatcher]) -> tuple[float, dict[int, int]]:
        batcher = batcher_type(batch_size=2, max_concurrent_requests=10, timing=timing)
        first = Job(1, 100, 50, random.Random(1))
        batcher.add(first)
        step = batcher.plan(0.0)
        assert step is not None and step.kind == "prefill"
        batcher.complete(step, 1.0)  # first is running, one token out
        batcher.add(Job(2, 1000, 50, random.Random(2)))
        step = batcher.plan(1.0)
        assert step is not None and step.kind == "prefill"
        events = batcher.complete(step, 2.0)
        return step.duration, {job.ordinal: event.index for job, event in events}

    duration, tokens = run(ContinuousBatcher)
    assert tokens == {1: 2, 2: 1}  # the running request got its second token too
    assert duration == pytest.approx(timing.prefill(1000) + timing.decode(1))
    duration, tokens = run(NeuronBatcher)
    assert tokens == {2: 1}  # TGI Neuron: the prefill paused it
    assert duration == pytest.approx(timing.prefill(1000))
