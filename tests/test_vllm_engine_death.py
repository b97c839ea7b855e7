"""vLLM 0.11 replicas whose engine dies, the way vLLM 0.11 reports it, under the real
supervisor and balancer (``engine = "vllm"``), with the openai SDK as the client.

What a vLLM 0.11 server does when its EngineCore dies (vllm 0.11.0 wheel):

- streams in flight get ``data: {"error": {..., "code": 400}}`` with EngineDeadError's
  message, then ``data: [DONE]`` (``entrypoints/openai/serving_chat.py``
  ``chat_completion_stream_generator``; ``v1/engine/exceptions.py``);
- new requests: ``raise self.engine_client.dead_error`` (``serving_chat.py``
  ``create_chat_completion``), turned into HTTP 500 with vLLM's error body by the route
  (``entrypoints/openai/api_server.py`` ``create_chat_completion`` -> HTTPException ->
  ``http_exception_handler``);
- ``/health`` answers 503 (``api_server.py`` ``health``);
- the process exits about 5 s later (``entrypoints/launcher.py`` ``watchdog_loop``), unless
  VLLM_KEEP_ALIVE_ON_ENGINE_DEATH is set: then it lives on, dead, answering as above.
"""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path

import openai
import pytest
from aiohttp import web

from tests.conftest import start_app, wait_until
from tests.script_fleet import replica_script, script_fleet

DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."

VLLM_DYING = replica_script(
    """
    import threading

    KEEP_ALIVE = os.environ.get("TEST_KEEP_ALIVE") == "1"
    first_life = name == "r0" and not (folder / "r0-born").exists()
    (folder / f"{name}-born").touch()
    (folder / f"life-{name}-{uuid.uuid4().hex}").touch()
    dead = threading.Event()


    def vllm_error(message, kind, code):
        info = {"message": message, "type": kind, "param": None, "code": code}
        return json.dumps({"error": info}).encode()


    def die():
        dead.set()
        (folder / f"death-{uuid.uuid4().hex}").touch()
        if not KEEP_ALIVE:  # vLLM's watchdog: the server exits ~5 s after the engine died
            threading.Timer(1.0, lambda: os._exit(1)).start()


    class Handler(Replica):
        def do_GET(self):
            status = 503 if dead.is_set() and self.path == "/health" else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            (folder / f"post-{name}-{uuid.uuid4().hex}").touch()
            if dead.is_set():
                self.send_json(500, vllm_error(DEAD, "Internal Server Error", 500))
                return
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                     "model": "m", "choices": [{"index": 0, "delta": {"content": "tok"},
                     "logprobs": None, "finish_reason": None}]}
            if not doc.get("stream"):
                body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                        "model": "m", "choices": [{"index": 0, "message": {"role": "assistant",
                        "content": "tok tok"}, "logprobs": None, "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                        "total_tokens": 3}}
                self.send_json(200, json.dumps(body).encode())
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(3):
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\\n\\n")
                self.wfile.flush()
                time.sleep(0.05)
            if first_life:
                die()
                self.wfile.write(b"data: " + vllm_error(DEAD, "BadRequestError", 400) + b"\\n\\n")
            self.wfile.write(b"data: [DONE]\\n\\n")
            self.wfile.flush()


    DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."
    """
)

MESSAGES = [{"role": "user", "content": "hi"}]


async def _stream(client: openai.AsyncOpenAI) -> str:
    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=3, stream=True
    )
    text = ""
    async for chunk in stream:
        text += chunk.choices[0].delta.content or ""
    return text


async def _after_death(fleet_url: str, requests: int) -> tuple[int, list[str]]:
    """Send ``requests`` chat requests (half streaming) one by one; (successes, failures)."""
    client = openai.AsyncOpenAI(base_url=fleet_url + "/v1", api_key="x", max_retries=0)
    ok, failures = 0, []
    try:
        for i in range(requests):
            try:
                if i % 2:
                    assert await _stream(client) == "toktoktok"
                else:
                    reply = await client.chat.completions.create(
                        model="m", messages=MESSAGES, max_tokens=3
                    )
                    assert reply.choices[0].message.content == "tok tok"
                ok += 1
            except openai.APIError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        await client.close()
    return ok, failures


async def _first_stream_dies(fleet_url: str) -> None:
    """Stream until one hits the dying replica: tokens, then the SDK raises vLLM's error."""
    client = openai.AsyncOpenAI(base_url=fleet_url + "/v1", api_key="x", max_retries=0)
    try:
        for _ in range(6):
            try:
                await _stream(client)
            except openai.APIError as exc:
                assert DEAD_MESSAGE in str(exc), exc
                return
        raise AssertionError("no stream reached the dying replica")
    finally:
        await client.close()


async def test_engine_death_midstream_then_500s_then_exit(tmp_path: Path) -> None:
    """r0's engine dies in a stream after 3 tokens, answers 500 to every new request, /health
    503, exits 1 s later: only the stream that was cut fails; everything after is served."""
    async with script_fleet(tmp_path, VLLM_DYING, ("r0", "r1", "r2"), 4, engine="vllm") as f:
        await _first_stream_dies(f.url)
        ok, failures = await _after_death(f.url, 12)
        assert failures == [] and ok == 12
        assert f.count("death") == 1


async def test_engine_dead_but_process_alive(tmp_path: Path, monkeypatch) -> None:
    """VLLM_KEEP_ALIVE_ON_ENGINE_DEATH: r0 lives on with a dead engine (500s, /health 503).
    No request after the death fails, and the supervisor restarts it."""
    monkeypatch.setenv("TEST_KEEP_ALIVE", "1")
    async with script_fleet(tmp_path, VLLM_DYING, ("r0", "r1", "r2"), 4, engine="vllm") as f:
        await _first_stream_dies(f.url)
        ok, failures = await _after_death(f.url, 12)
        assert failures == [] and ok == 12
        # The supervisor restarts a replica whose /health keeps failing: r0 lives again.
        await wait_until(lambda: f.count("life-r0") == 2, timeout=10, what="r0 restarted")
        ok, failures = await _after_death(f.url, 6)
        assert failures == [] and ok == 6


async def _vllm_error_replica(status: int, message: str) -> tuple[web.AppRunner, str]:
    """A replica that answers every generation request as vLLM 0.11 answers an error
    (``api_server.py``: JSONResponse(ErrorResponse.model_dump(), status_code=code))."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        info = {"message": message, "type": HTTPStatus(status).phrase, "param": None}
        return web.json_response({"error": {**info, "code": status}}, status=status)

    async def health(request: web.Request) -> web.Response:
        return web.Response()  # vLLM's /health: 200, empty

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_get("/health", health)
    return await start_app(app)


async def test_vllm_errors_reach_the_openai_sdk_as_the_right_exceptions(balancer) -> None:
    """A replica's own vLLM error is relayed unchanged; the balancer's own refusals are in
    vLLM's shape: the openai SDK raises the exception of each status with our message."""
    runners = []
    try:
        bad, bad_url = await _vllm_error_replica(400, "max_tokens is too large: 99999")
        dead, dead_url = await _vllm_error_replica(500, DEAD_MESSAGE)
        runners += [bad, dead]
        cases = {
            bad_url: (openai.BadRequestError, "max_tokens is too large: 99999"),
            dead_url: (openai.InternalServerError, DEAD_MESSAGE),
        }
        for url, (kind, message) in cases.items():
            server = await balancer([url], engine="vllm", max_body_bytes=2000, retries=1)
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            try:
                with pytest.raises(kind) as raised:
                    await client.chat.completions.create(model="m", messages=MESSAGES)
                assert raised.value.body["message"] == message, raised.value.body
                with pytest.raises(openai.APIStatusError) as raised:
                    big = [{"role": "user", "content": "x" * 5000}]
                    await client.chat.completions.create(model="m", messages=big)
                assert raised.value.status_code == 413
                assert "limit" in raised.value.body["message"]
                assert raised.value.body["code"] == 413
            finally:
                await client.close()
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_our_validation_refusals_are_vllms_400(balancer, scripted) -> None:
    """vLLM 0.11 answers every request it will not serve with 400 (BadRequestError), never
    422: the balancer's own validation refusals do too with engine vllm (TGI keeps 422)."""
    from tests.upstreams import Script

    _, url = await scripted(Script(tokens=2, space=True))
    for engine, status, kind in (
        ("vllm", 400, openai.BadRequestError),
        ("tgi", 422, openai.UnprocessableEntityError),
    ):
        server = await balancer([url], engine=engine)
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        try:
            with pytest.raises(kind) as raised:
                await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=-1)
            assert raised.value.status_code == status
            assert "max tokens must be a non-negative integer" in str(raised.value.body)
            with pytest.raises(kind):
                await client.post("/chat/completions", body=[1, 2], cast_to=object)
        finally:
            await client.close()


async def test_vllms_detokenize_passes_through(balancer) -> None:
    """optimum-neuron's proxy forwarded every path; vLLM's stateless /detokenize
    (vllm 0.11.0 api_server.py) goes through neuron-fleet too, as /tokenize does."""
    seen = []

    async def detokenize(request: web.Request) -> web.Response:
        doc = await request.json()
        seen.append(doc)
        return web.json_response({"prompt": " ".join(str(t) for t in doc["tokens"])})

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/health", health)
    runner, url = await start_app(app)
    try:
        server = await balancer([url], engine="vllm")
        client = openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0)
        try:
            doc = await client.post(
                "/detokenize", body={"model": "m", "tokens": [1, 2]}, cast_to=object
            )
        finally:
            await client.close()
        assert doc == {"prompt": "1 2"} and seen == [{"model": "m", "tokens": [1, 2]}]
    finally:
        await runner.cleanup()
