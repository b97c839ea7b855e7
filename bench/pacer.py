"""A replica that paces every stream on its own clock (OpenAI ``/v1/completions`` SSE).

First token ``--first-ms`` after the request arrives, then one every ``--step-ms``: no
batch, no step boundaries, so a TTFT or ITL difference between direct and through a
balancer is the balancer's. (bench/relay_overhead.py has the same pacer for TGI's
``/generate_stream``; the peers' routers only forward the OpenAI routes.)

Run: ``python bench/pacer.py --port P [--first-ms 50] [--step-ms 30]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web


def make_app(first_ms: float, step_ms: float) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "pacer", "object": "model"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = int(body.get("max_tokens") or 16)
        resp = web.StreamResponse(
            # TGI's SSE headers (tgi-neuron-interface.md): X-Accel-Buffering: no tells nginx
            # not to buffer, as the real replica (and the simulated one) do.
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        due = loop.time() + first_ms / 1000
        for i in range(1, n + 1):
            await asyncio.sleep(max(0.0, due - loop.time()))
            chunk = {
                "object": "text_completion",
                "id": "",
                "model": "pacer",
                "choices": [
                    {
                        "index": 0,
                        "text": " tok",
                        "logprobs": None,
                        "finish_reason": "length" if i == n else "",
                    }
                ],
            }
            await resp.write(b"data:" + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
            due += step_ms / 1000
        await resp.write(b"data:[DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first-ms", type=float, default=50.0)
    parser.add_argument("--step-ms", type=float, default=30.0)
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    web.run_app(
        make_app(args.first_ms, args.step_ms),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
    )
