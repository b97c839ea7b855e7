"""The clients users already have, streaming through the balancer to simulated replicas."""

from __future__ import annotations

import asyncio

import openai
import pytest
from text_generation import AsyncClient

from tests.conftest import metric_value


@pytest.fixture
async def fleet(simulator, balancer):
    urls = [await simulator(batch_size=2, seed=i) for i in range(2)]
    return await balancer(urls, max_inflight_per_replica=2)


async def test_openai_sdk_streams_chat_completions(fleet, http):
    client = openai.AsyncOpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="tgi",
            messages=[{"role": "user", "content": "What is deep learning?"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 12
        assert "".join(pieces).strip()
        plain = await client.completions.create(model="tgi", prompt="Hello", max_tokens=5)
        assert plain.usage.completion_tokens == 5
    finally:
        await client.close()


async def test_openai_sdk_many_concurrent_streams(fleet, http):
    client = openai.AsyncOpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> int:
        stream = await client.chat.completions.create(
            model="tgi",
            messages=[{"role": "user", "content": f"question {i}"}],
            max_tokens=8,
            stream=True,
        )
        return len([c async for c in stream if c.choices and c.choices[0].delta.content])

    try:
        counts = await asyncio.gather(*(one(i) for i in range(12)))
    finally:
        await client.close()
    assert all(c >= 7 for c in counts)  # 8 tokens; the last chunk may carry an empty delta
    async with http.get(f"{fleet.url}/metrics") as resp:
        text = await resp.text()
    served = [
        metric_value(text, "neuron_fleet_time_to_first_token_seconds_count", replica=r)
        for r in ("r0", "r1")
    ]
    assert sum(served) == 12 and min(served) > 0  # both replicas took a share


async def test_text_generation_client_streams(fleet):
    client = AsyncClient(fleet.url, timeout=30)
    tokens = [r async for r in client.generate_stream("What is Deep Learning?", max_new_tokens=9)]
    assert len(tokens) == 9
    assert tokens[-1].generated_text is not None
    assert tokens[-1].details.finish_reason.value == "length"
    response = await client.generate("Hello", max_new_tokens=4)
    assert response.details.generated_tokens == 4
