"""The simulated replica over real loopback sockets: TGI's routes, wire formats, errors,
faults, disconnects, and the ``openai`` / ``text-generation`` clients against it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from text_generation import AsyncClient

from supervisor.simulator.engine import FaultConfig, NeuronTiming, SimConfig
from supervisor.simulator.server import SimServer, serve, start_server
from tests.conftest import free_port
from tests.helpers_tokenizer import build_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
PROMPT = "What is Deep Learning?"


# --------------------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def replica(**overrides: Any) -> AsyncIterator[SimServer]:
    """A replica on a free loopback port; fast (speed 1000) unless told otherwise."""
    options: dict[str, Any] = {"port": 0, "speed": 1000.0}
    options.update(overrides)
    server = await start_server(SimConfig(**options))
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def split_events(body: bytes) -> list[bytes]:
    """SSE events of a complete body; asserts every event ends with a blank line."""
    assert body.endswith(b"\n\n"), body[-80:]
    return body[:-2].split(b"\n\n")


def data(event: bytes) -> Any:
    assert event.startswith(b"data:") and not event.startswith(b"data: "), event
    return json.loads(event[len(b"data:") :])


async def next_event(resp: aiohttp.ClientResponse) -> bytes:
    """Read one SSE event (lines up to the blank line) from a live response."""
    lines = []
    while True:
        line = await resp.content.readline()
        if not line:
            raise EOFError(b"".join(lines))
        if line == b"\n":
            return b"".join(lines).rstrip(b"\n")
        lines.append(line)


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    text = await (await http.get(f"{url}/metrics")).text()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


async def eventually(probe: Any, expected: Any, within: float = 10.0) -> None:
    """Poll an async probe until it returns ``expected`` (fails after ``within`` seconds)."""
    for _ in range(int(within / 0.01)):
        if (value := await probe()) == expected:
            return
        await asyncio.sleep(0.01)
    assert value == expected


def gen_body(max_new_tokens: int, **params: Any) -> dict[str, Any]:
    return {"inputs": PROMPT, "parameters": {"max_new_tokens": max_new_tokens, **params}}


def chat_body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, **extra}


def assert_sse_headers(resp: aiohttp.ClientResponse) -> None:
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"


# --------------------------------------------------------------------------- wire formats


async def test_generate_json_headers_and_details(http: aiohttp.ClientSession) -> None:
    async with replica() as r:
        resp = await http.post(f"{r.url}/generate", json=gen_body(5, details=True, seed=7))
        assert resp.status == 200
        body = await resp.json()
        for header in (
            "x-compute-type",
            "x-compute-time",
            "x-total-time",
            "x-validation-time",
            "x-queue-time",
            "x-inference-time",
            "x-time-per-token",
        ):
            assert header in resp.headers
        assert resp.headers["x-prompt-tokens"] == str(-(-len(PROMPT) // 4))
        assert resp.headers["x-generated-tokens"] == "5"
        details = body["details"]
        assert details["finish_reason"] == "length" and details["generated_tokens"] == 5
        # The Neuron generator returns no seed and no prefill tokens (TGI v3.3.7 generator.py).
        assert details["seed"] is None and details["prefill"] == []
        assert body["generated_text"] == "".join(t["text"] for t in details["tokens"])
        assert all(t["logprob"] == 0.0 and not t["special"] for t in details["tokens"])
        # deterministic from the seed; without details the key is absent
        again = await (await http.post(f"{r.url}/generate", json=gen_body(5, seed=7))).json()
        assert again == {"generated_text": body["generated_text"]}


async def test_generate_stream_wire_format(http: aiohttp.ClientSession) -> None:
    async with replica() as r:
        resp = await http.post(f"{r.url}/generate_stream", json=gen_body(4, details=True))
        assert_sse_headers(resp)
        events = split_events(await resp.read())
        assert len(events) == 4  # one per token, no [DONE] on this route
        payloads = [data(e) for e in events]
        assert [p["index"] for p in payloads] == [1, 2, 3, 4]
        for p in payloads[:-1]:
            assert p["generated_text"] is None and p["details"] is None
            assert set(p["token"]) == {"id", "text", "logprob", "special"}
        last = payloads[-1]
        assert last["generated_text"] == "".join(p["token"]["text"] for p in payloads)
        assert last["details"] == {
            "finish_reason": "length",
            "generated_tokens": 4,
            "seed": None,
            "input_length": -(-len(PROMPT) // 4),
        }
        plain = split_events(
            await (await http.post(f"{r.url}/generate_stream", json=gen_body(2))).read()
        )
        assert data(plain[-1])["details"] is None and data(plain[-1])["generated_text"]


async def test_chat_stream_include_usage_and_done(http: aiohttp.ClientSession) -> None:
    async with replica(model_id="my/model") as r:
        body = chat_body(3, stream=True, stream_options={"include_usage": True})
        resp = await http.post(f"{r.url}/v1/chat/completions", json=body)
        assert_sse_headers(resp)
        events = split_events(await resp.read())
        assert events[-1] == b"data:[DONE]"
        chunks = [data(e) for e in events[:-1]]
        assert len(chunks) == 4  # 3 tokens + the usage chunk
        for chunk in chunks[:3]:
            assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "my/model"
            assert chunk["system_fingerprint"] == "3.0.0-native" and chunk["usage"] is None
            assert chunk["choices"][0]["delta"]["role"] == "assistant"
        assert [c["choices"][0]["finish_reason"] for c in chunks[:3]] == [None, None, "length"]
        usage = chunks[3]
        assert usage["choices"] == []
        assert usage["usage"]["completion_tokens"] == 3
        assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 3

        no_usage = await http.post(f"{r.url}/v1/chat/completions", json=chat_body(2, stream=True))
        events = split_events(await no_usage.read())
        assert len(events) == 3 and events[-1] == b"data:[DONE]"


async def test_chat_non_stream_and_model_echo(http: aiohttp.ClientSession) -> None:
    async with replica(model_id="my/model") as r:
        resp = await http.post(f"{r.url}/v1/chat/completions", json=chat_body(4, model="tgi"))
        assert resp.status == 200 and "x-generated-tokens" in resp.headers
        body = await resp.json()
        assert body["object"] == "chat.completion" and body["model"] == "my/model"
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 4
        other = await http.post(f"{r.url}/v1/chat/completions", json=chat_body(1, model="x"))
        assert (await other.json())["model"] == "x"
        alias = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2}
        alias_body = await (await http.post(f"{r.url}/v1/chat/completions", json=alias)).json()
        assert alias_body["usage"]["completion_tokens"] == 2


async def test_completions_stream_and_non_stream(http: aiohttp.ClientSession) -> None:
    async with replica() as r:
        body = {"prompt": PROMPT, "max_tokens": 3, "stream": True}
        resp = await http.post(f"{r.url}/v1/completions", json=body)
        assert_sse_headers(resp)
        events = split_events(await resp.read())
        assert events[-1] == b"data:[DONE]"
        chunks = [data(e) for e in events[:-1]]
        assert all(c["object"] == "text_completion" for c in chunks)
        assert [c["choices"][0]["finish_reason"] for c in chunks] == ["", "", "length"]
        assert "usage" not in chunks[0] and chunks[-1]["usage"]["completion_tokens"] == 3

        plain = await (
            await http.post(f"{r.url}/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2})
        ).json()
        assert [c["index"] for c in plain["choices"]] == [0, 1]
        assert plain["usage"]["completion_tokens"] == 4
        assert set(plain["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}


async def test_compat_root_and_invocations(http: aiohttp.ClientSession) -> None:
    async with replica() as r:
        resp = await http.post(f"{r.url}/", json=gen_body(2))
        array = await resp.json()
        assert isinstance(array, list) and set(array[0]) == {"generated_text"}
        streamed = await http.post(f"{r.url}/", json={**gen_body(2), "stream": True})
        assert_sse_headers(streamed)
        assert data(split_events(await streamed.read())[-1])["generated_text"]

        gen = await (await http.post(f"{r.url}/invocations", json=gen_body(2))).json()
        assert isinstance(gen, list) and "generated_text" in gen[0]
        chat = await (await http.post(f"{r.url}/invocations", json=chat_body(2))).json()
        assert chat["object"] == "chat.completion"
        completion = await (
            await http.post(f"{r.url}/invocations", json={"prompt": "x", "max_tokens": 2})
        ).json()
        assert completion["object"] == "text_completion"


async def test_health_info_models_tokenize(http: aiohttp.ClientSession) -> None:
    async with replica(model_id="m", max_input_tokens=100, max_total_tokens=200) as r:
        for path in ("/", "/health", "/ping"):
            resp = await http.get(f"{r.url}{path}")
            assert resp.status == 200 and await resp.read() == b""
        info = await (await http.get(f"{r.url}/info")).json()
        assert info["model_id"] == "m" and info["version"] == "3.0.0"
        assert info["router"] == "text-generation-router"
        assert (info["max_input_tokens"], info["max_total_tokens"]) == (100, 200)
        assert info["max_concurrent_requests"] == 128
        models = await (await http.get(f"{r.url}/v1/models")).json()
        assert models == {
            "object": "list",
            "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "m"}],
        }
        tokens = await (await http.post(f"{r.url}/tokenize", json={"inputs": "hello world"})).json()
        assert [set(t) for t in tokens] == [{"id", "text", "start", "stop"}] * 3


async def test_metrics_carry_tgi_names(http: aiohttp.ClientSession) -> None:
    async with replica() as r, replica() as other:  # two registries in one process
        await (await http.post(f"{r.url}/generate", json=gen_body(3))).read()
        text = await (await http.get(f"{r.url}/metrics")).text()
        for name in (
            "tgi_request_count 1.0",
            "tgi_request_success 1.0",
            'tgi_batch_inference_count{method="prefill"} 1.0',
            'tgi_batch_inference_count{method="decode"} 2.0',
            "tgi_queue_size 0.0",
            "tgi_batch_current_size 0.0",
            "tgi_batch_current_max_tokens 0.0",
            "tgi_request_duration_count 1.0",
            "tgi_request_queue_duration_count 1.0",
            "tgi_request_inference_duration_count 1.0",
            "tgi_request_mean_time_per_token_duration_count 1.0",
            "tgi_request_generated_tokens_sum 3.0",
            "tgi_request_input_length_count 1.0",
            "tgi_request_max_new_tokens_sum 3.0",
            "# TYPE tgi_request_failure counter",
        ):
            assert name in text, name
        assert "tgi_request_count 0.0" in await (await http.get(f"{other.url}/metrics")).text()
        await http.post(f"{r.url}/generate", json=gen_body(0))  # must be strictly positive
        failures = await metric(http, r.url, 'tgi_request_failure{err="validation"}')
        assert failures == 1.0


# --------------------------------------------------------------------------- errors


async def test_validation_errors_422_and_streaming_quirk(http: aiohttp.ClientSession) -> None:
    async with replica(max_input_tokens=10, max_total_tokens=20) as r:
        too_long = {"inputs": "x" * 100, "parameters": {"max_new_tokens": 1}}
        resp = await http.post(f"{r.url}/generate", json=too_long)
        assert resp.status == 422
        body = await resp.json()
        assert body["error_type"] == "validation"
        assert body["error"] == (
            "Input validation error: `inputs` must have less than 10 tokens. Given: 25"
        )
        total = await http.post(f"{r.url}/generate", json=gen_body(15))
        assert total.status == 422 and "must be <= 20" in (await total.json())["error"]

        bad = await http.post(
            f"{r.url}/generate", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert bad.status == 422 and (await bad.json())["error_type"] == "validation"
        typed = await http.post(
            f"{r.url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": "2"}}
        )
        assert typed.status == 422 and "max_new_tokens" in (await typed.json())["error"]

        stream = await http.post(f"{r.url}/generate_stream", json=too_long)
        assert_sse_headers(stream)
        events = split_events(await stream.read())
        assert len(events) == 1 and data(events[0])["error_type"] == "validation"

        chat = await http.post(f"{r.url}/v1/chat/completions", json=chat_body(50, stream=True))
        assert_sse_headers(chat)
        events = split_events(await chat.read())
        assert data(events[0])["error"]["http_status_code"] == 422
        assert events[1:] == [b"data:[DONE]"]


async def test_overload_429_and_streaming_200_with_error_event(http: aiohttp.ClientSession) -> None:
    async with replica(batch_size=1, max_concurrent_requests=1, speed=10.0) as r:
        holder = await http.post(f"{r.url}/generate_stream", json=gen_body(5000))
        await next_event(holder)  # the only slot is busy now

        plain = await http.post(f"{r.url}/generate", json=gen_body(2))
        assert plain.status == 429
        assert await plain.json() == {"error": "Model is overloaded", "error_type": "overloaded"}

        stream = await http.post(f"{r.url}/generate_stream", json=gen_body(2))
        assert_sse_headers(stream)
        assert (
            await stream.read()
            == b'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\n'
        )

        chat = await http.post(f"{r.url}/v1/chat/completions", json=chat_body(2, stream=True))
        assert_sse_headers(chat)
        assert await chat.read() == (
            # TGI v3.3.7 router/src/infer/mod.rs into_openai_event: always 422.
            b'data:{"error":{"message":"Model is overloaded","http_status_code":422}}\n\n'
            b"data:[DONE]\n\n"
        )
        completions = await http.post(
            f"{r.url}/v1/completions", json={"prompt": "x", "stream": True}
        )
        assert (await completions.read()).startswith(
            b'data:{"error":{"message":"Model is overloaded"'
        )
        holder.close()
        assert await metric(http, r.url, 'tgi_request_failure{err="overloaded"}') == 4.0


async def test_keepalive_comment_while_idle(http: aiohttp.ClientSession) -> None:
    slow_prefill = NeuronTiming(prefill_s_per_token=0.05)  # 6 tokens -> 0.3 s before token 1
    async with replica(speed=1.0, keepalive_interval=0.05, timing=slow_prefill) as r:
        resp = await http.post(f"{r.url}/generate_stream", json=gen_body(1))
        body = await resp.read()
        assert body.startswith(b":\n\n")
        assert split_events(body.replace(b":\n\n", b""))[0].startswith(b"data:{")


# --------------------------------------------------------------------------- disconnects


async def test_disconnect_frees_running_slot_and_drops_queued(http: aiohttp.ClientSession) -> None:
    async with replica(batch_size=1, speed=10.0) as r:
        running = await http.post(f"{r.url}/generate_stream", json=gen_body(5000))
        await next_event(running)
        queued = await http.post(f"{r.url}/v1/chat/completions", json=chat_body(5, stream=True))
        assert_sse_headers(queued)  # headers go out at once, as TGI's
        assert await metric(http, r.url, "tgi_queue_size") == 1.0

        queued.close()  # left while queued: dropped at once
        await eventually(lambda: metric(http, r.url, "tgi_queue_size"), 0.0)
        assert await metric(http, r.url, "tgi_batch_current_size") == 1.0

        running.close()  # left mid-stream: the slot frees at the next token
        await eventually(lambda: metric(http, r.url, "tgi_batch_current_size"), 0.0)
        assert r.engine.running == 0 and r.engine.queued == 0
        assert await metric(http, r.url, "tgi_request_success") == 0.0


async def test_non_stream_disconnect_frees_slot(http: aiohttp.ClientSession) -> None:
    async with replica(speed=10.0) as r:
        task = asyncio.create_task(http.post(f"{r.url}/generate", json=gen_body(5000)))
        await eventually(lambda: metric(http, r.url, "tgi_batch_current_size"), 1.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await eventually(lambda: metric(http, r.url, "tgi_batch_current_size"), 0.0)


# --------------------------------------------------------------------------- faults


async def test_hang_fault_goes_silent_but_keeps_the_connection(http: aiohttp.ClientSession) -> None:
    async with replica(faults=FaultConfig(hang_after_tokens=3)) as r:
        resp = await http.post(f"{r.url}/generate_stream", json=gen_body(50))
        for index in (1, 2, 3):
            assert data(await next_event(resp))["index"] == index
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await resp.content.readline()
        assert resp.connection is not None  # still open
        assert r.engine.running == 0  # the slot itself was released
        resp.close()


async def test_drop_fault_closes_mid_stream(http: aiohttp.ClientSession) -> None:
    async with replica(faults=FaultConfig(drop_after_tokens=3)) as r:
        resp = await http.post(f"{r.url}/generate_stream", json=gen_body(50))
        received = []
        with pytest.raises(aiohttp.ClientPayloadError):
            while line := await resp.content.readline():
                if line.startswith(b"data:"):
                    received.append(data(line.rstrip(b"\n")))
        assert [p["index"] for p in received] == [1, 2, 3]
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await http.post(f"{r.url}/generate", json=gen_body(50))
        await eventually(lambda: metric(http, r.url, "tgi_batch_current_size"), 0.0)


async def test_generation_failure_fault_answers_424(http: aiohttp.ClientSession) -> None:
    async with replica(faults=FaultConfig(fail_generation_every=2)) as r:
        assert (await http.post(f"{r.url}/generate", json=gen_body(3))).status == 200
        failed = await http.post(f"{r.url}/generate", json=gen_body(3))
        assert failed.status == 424
        body = await failed.json()
        assert body["error_type"] == "generation"
        assert body["error"].startswith("Request failed during generation: ")

        ok = await http.post(f"{r.url}/generate_stream", json=gen_body(3))
        assert len(split_events(await ok.read())) == 3
        stream = await http.post(f"{r.url}/generate_stream", json=gen_body(3))
        assert_sse_headers(stream)
        events = split_events(await stream.read())
        assert len(events) == 1 and data(events[0])["error_type"] == "generation"

        await (await http.post(f"{r.url}/generate", json=gen_body(1))).read()  # request #5
        chat = await http.post(f"{r.url}/v1/chat/completions", json=chat_body(3, stream=True))
        events = split_events(await chat.read())
        assert data(events[0])["error"]["http_status_code"] == 422  # TGI: always 422
        assert events[1:] == [b"data:[DONE]"]
        assert await metric(http, r.url, 'tgi_request_failure{err="generation"}') == 3.0


async def test_health_fail_and_runtime_toggle(http: aiohttp.ClientSession) -> None:
    async with replica(faults=FaultConfig(health_fail=True)) as r:
        resp = await http.get(f"{r.url}/health")
        assert resp.status == 503
        assert await resp.json() == {"error": "unhealthy", "error_type": "healthcheck"}
        await http.post(f"{r.url}/_sim/health", json={"fail": False})
        assert (await http.get(f"{r.url}/health")).status == 200
        await http.post(f"{r.url}/_sim/health", json={"fail": True})
        assert (await http.get(f"{r.url}/ping")).status == 503


async def test_startup_delay_refuses_connections(http: aiohttp.ClientSession) -> None:
    port = free_port()
    config = SimConfig(port=port, speed=1000.0, startup_delay=0.5)
    stop = asyncio.Event()
    ready: asyncio.Future[SimServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(config, stop=stop, handle_signals=False, on_ready=ready.set_result)
    )
    try:
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.get(f"http://127.0.0.1:{port}/health")
        assert not ready.done()
        server = await asyncio.wait_for(ready, 10)
        assert server.port == port
        assert (await http.get(f"http://127.0.0.1:{port}/health")).status == 200
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


# --------------------------------------------------------------------------- subprocesses


async def spawn(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "supervisor.simulator",
        *args,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def wait_ready(
    http: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process
) -> None:
    async with asyncio.timeout(30):
        while True:
            assert proc.returncode is None, "simulator exited early"
            try:
                if (await http.get(f"{url}/health")).status == 200:
                    return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def subprocess_replica(
    http: aiohttp.ClientSession,
    *args: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    port = port or free_port()
    extra = () if env and "PORT" in env else ("--port", str(port))
    proc = await spawn(*extra, *args, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_ready(http, url, proc)
        yield proc, url
    finally:
        if proc.returncode is None:
            proc.kill()  # only the process this test started, by its PID
            await proc.wait()


async def test_crash_after_tokens_exits_abruptly(http: aiohttp.ClientSession) -> None:
    async with subprocess_replica(http, "--speed", "1000", "--crash-after-tokens", "5") as (
        proc,
        url,
    ):
        resp = await http.post(f"{url}/generate_stream", json=gen_body(3))
        assert len(split_events(await resp.read())) == 3  # 3 of the 5 tokens
        resp = await http.post(f"{url}/generate_stream", json=gen_body(10))
        received = []
        with pytest.raises(aiohttp.ClientPayloadError):
            while line := await resp.content.readline():
                if line.startswith(b"data:"):
                    received.append(line)
        assert len(received) <= 2
        assert await asyncio.wait_for(proc.wait(), 10) == 1


async def test_env_variables_and_sigterm_exit_zero(http: aiohttp.ClientSession) -> None:
    port = free_port()
    env = {
        "PORT": str(port),
        "MODEL_ID": "env/model",
        "MAX_BATCH_SIZE": "2",
        "MAX_CONCURRENT_REQUESTS": "7",
        "MAX_TOTAL_TOKENS": "4096",
        "HF_TOKEN": "hf_do_not_log_me",
    }
    async with subprocess_replica(http, "--speed", "1000", env=env, port=port) as (proc, url):
        info = await (await http.get(f"{url}/info")).json()
        assert info["model_id"] == "env/model"
        assert info["max_concurrent_requests"] == 7
        assert (info["max_input_tokens"], info["max_total_tokens"]) == (2048, 4096)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert f"simulated replica ready on http://127.0.0.1:{port} (batch 2," in log
        assert "hf_do_not_log_me" not in log


# --------------------------------------------------------------------------- real clients


async def test_openai_sdk_streams_chat_completions() -> None:
    async with replica(model_id="sdk/model") as r:
        client = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(
            model="tgi",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(text.split()) == 6
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
        assert chunks[-2].choices[0].finish_reason == "length"
        plain = await client.chat.completions.create(
            model="tgi", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert plain.model == "sdk/model" and plain.usage is not None
        await client.close()


async def test_text_generation_client_generate_stream() -> None:
    async with replica() as r:
        client = AsyncClient(r.url, timeout=30)
        responses = [resp async for resp in client.generate_stream(PROMPT, max_new_tokens=5)]
        assert [resp.token.id is not None for resp in responses] == [True] * 5
        last = responses[-1]
        assert last.generated_text == "".join(resp.token.text for resp in responses)
        assert last.details is not None and last.details.generated_tokens == 5
        full = await client.generate(PROMPT, max_new_tokens=3, seed=1)
        assert full.details.generated_tokens == 3 and len(full.details.tokens) == 3


async def test_local_tokenizer_counts_tokens(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    folder = build_tiny_tokenizer(tmp_path / "tiny")
    async with replica(tokenizer=str(folder)) as r:
        tokens = await (await http.post(f"{r.url}/tokenize", json={"inputs": PROMPT})).json()
        assert "".join(t["text"] for t in tokens) == PROMPT
        resp = await http.post(f"{r.url}/generate", json=gen_body(2))
        assert resp.headers["x-prompt-tokens"] == str(len(tokens))
        chat = await (await http.post(f"{r.url}/v1/chat/completions", json=chat_body(2))).json()
        assert chat["usage"]["prompt_tokens"] > len(tokens)


async def test_tgi_v3_3_7_details_a_client_notices(http: aiohttp.ClientSession) -> None:
    """finish_reason after a stop sequence, top_p = 1.0 and a string ``stop`` refused, and
    ``POST /`` prepending the prompt by default, as text-generation-inference v3.3.7."""
    async with replica() as r:
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "seed": 3}
        for bad in ({"top_p": 1.0}, {"stop": "x"}):
            async with http.post(f"{r.url}/v1/chat/completions", json={**chat, **bad}) as resp:
                assert resp.status == 422, bad
                assert (await resp.json())["error_type"] == "validation"
        async with http.post(f"{r.url}/v1/chat/completions", json=chat) as resp:
            text = (await resp.json())["choices"][0]["message"]["content"]
        stop = " " + text.split()[2]  # the third word: generation ends there
        async with http.post(f"{r.url}/v1/chat/completions", json={**chat, "stop": [stop]}) as resp:
            choice = (await resp.json())["choices"][0]
        assert choice["finish_reason"] == "stop_sequence"  # lib.rs FinishReason::format(true)
        async with http.post(f"{r.url}/", json={"inputs": "Hello there", "parameters": {}}) as resp:
            (answer,) = await resp.json()
        assert answer["generated_text"].startswith("Hello there")
        body = {"inputs": "Hello there", "parameters": {"return_full_text": False}}
        async with http.post(f"{r.url}/", json=body) as resp:
            (answer,) = await resp.json()
        assert not answer["generated_text"].startswith("Hello there")


async def test_max_new_tokens_over_the_limit_is_accepted_as_tgi_3_3_7(
    http: aiohttp.ClientSession,
) -> None:
    """TGI >= 3.1.1 checks the first 1024-token chunk only (v3.3.7 validation.rs): a larger
    max_new_tokens is accepted and generation ends at max_total_tokens."""
    async with replica(max_input_tokens=32, max_total_tokens=1100) as r:
        resp = await http.post(f"{r.url}/generate", json=gen_body(5000, details=True))
        assert resp.status == 200
        body = await resp.json()
        prompt_tokens = int(resp.headers["x-prompt-tokens"])
        assert body["details"]["generated_tokens"] == 1100 - prompt_tokens
        # Below 1024 the whole request is checked: 500 + the prompt > 300 is refused.
    async with replica(max_input_tokens=32, max_total_tokens=300) as r:
        resp = await http.post(f"{r.url}/generate", json=gen_body(500))
        assert resp.status == 422


async def test_chat_tokenize(http: aiohttp.ClientSession) -> None:
    async with replica() as r:
        body = {"messages": [{"role": "user", "content": "Hello there"}]}
        async with http.post(f"{r.url}/chat_tokenize", json=body) as resp:
            assert resp.status == 200
            doc = await resp.json()
        assert "Hello there" in doc["templated_text"]
        assert doc["tokenize_response"] and {"id", "text", "start", "stop"} == set(
            doc["tokenize_response"][0]
        )


async def test_chat_logprobs_as_tgi_on_neuron(http: aiohttp.ClientSession) -> None:
    async with replica() as r:
        body = chat_body(3, logprobs=True)
        async with http.post(f"{r.url}/v1/chat/completions", json=body) as resp:
            choice = (await resp.json())["choices"][0]
        content = choice["logprobs"]["content"]
        assert len(content) == 3 and all(c["logprob"] == 0.0 for c in content)
        assert "".join(c["token"] for c in content) == choice["message"]["content"]
        async with http.post(f"{r.url}/v1/chat/completions", json={**body, "stream": True}) as resp:
            events = split_events(await resp.read())
        chunks = [data(e) for e in events[:-1]]
        assert all(len(c["choices"][0]["logprobs"]["content"]) == 1 for c in chunks)
        async with http.post(f"{r.url}/v1/chat/completions", json=chat_body(2)) as resp:
            assert (await resp.json())["choices"][0]["logprobs"] is None
