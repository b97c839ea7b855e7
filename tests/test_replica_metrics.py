"""Re-exported replica metrics keep TGI's exact names, gain a replica label, stay grouped."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from balancer.replica_metrics import relabel

TGI = """# HELP tgi_request_count Total requests
# TYPE tgi_request_count counter
tgi_request_count 7
# TYPE tgi_request_failure counter
tgi_request_failure{err="generation"} 2
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="0.5"} 1
tgi_request_duration_bucket{le="+Inf"} 3
tgi_request_duration_sum 4.5
tgi_request_duration_count 3
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 1.0
"""


def test_relabel_keeps_names_groups_families_and_drops_foreign_metrics():
    families: dict = {}
    relabel(TGI, "replica-0", families)
    relabel(TGI.replace(" 7", " 9"), "replica-1", families)
    text = "\n".join(line for f in families.values() for line in (*f.meta, *f.samples)) + "\n"
    assert 'tgi_request_count{replica="replica-0"} 7' in text
    assert 'tgi_request_count{replica="replica-1"} 9' in text
    assert 'tgi_request_failure{replica="replica-0",err="generation"} 2' in text
    assert "process_cpu" not in text
    assert text.count("# TYPE tgi_request_duration histogram") == 1
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    buckets = [s for s in parsed["tgi_request_duration"].samples if s.name.endswith("_bucket")]
    assert {s.labels["replica"] for s in buckets} == {"replica-0", "replica-1"}
    assert len(buckets) == 4


def test_loop_histogram_buckets_are_inclusive_and_cumulative():
    from prometheus_client import CollectorRegistry, generate_latest

    from balancer.metrics import LoopHistogram, _LoopCollector

    h = LoopHistogram((0.01, 0.1))
    h.observe(0.01)  # le is inclusive
    h.observe(0.05)
    h.observe(0.0, times=3)
    h.observe(7.0)
    registry = CollectorRegistry()
    registry.register(_LoopCollector({"r0": h}))
    text = generate_latest(registry).decode()
    bucket = "neuron_fleet_inter_token_latency_seconds_bucket"
    assert f'{bucket}{{le="0.01",replica="r0"}} 4.0' in text
    assert f'{bucket}{{le="0.1",replica="r0"}} 5.0' in text
    assert f'{bucket}{{le="+Inf",replica="r0"}} 6.0' in text
    assert 'neuron_fleet_inter_token_latency_seconds_count{replica="r0"} 6.0' in text


def test_engine_gauges_sum_vllm_engines_and_read_past_odd_label_values():
    from balancer.replica_metrics import normalised

    vllm = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m {x} y"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m {x} y"} 2.0\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m {x} y"} 4.0\n'
    )
    tgi = "# TYPE tgi_queue_size gauge\ntgi_queue_size 6\ntgi_batch_current_size 8\n"
    families: dict = {}
    engines: dict = {"a": {}, "b": {}}
    relabel(vllm, "a", families, engines["a"])
    relabel(tgi, "b", families, engines["b"])
    assert engines == {"a": {"running": 5.0, "waiting": 4.0}, "b": {"running": 8.0, "waiting": 6.0}}
    text = "\n".join(normalised(engines)) + "\n"
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    running = {
        s.labels["replica"]: s.value for s in parsed["neuron_fleet_replica_engine_running"].samples
    }
    assert running == {"a": 5.0, "b": 8.0}


async def test_engine_gauges_from_live_tgi_and_vllm_replicas(simulator, balancer, http):
    """A TGI and a vLLM simulated replica, each with more requests than batch slots (no
    slot cap at the balancer): one pair of gauges shows both engines' batch and queue."""
    import asyncio

    from tests.conftest import metric_value

    tgi = await simulator(batch_size=1, speed=2.0)
    vllm = await simulator(batch_size=2, speed=2.0, engine="vllm", model_id="m")
    server = await balancer([tgi, vllm], max_inflight_per_replica=0, policy="round-robin")

    async def one(url: str, body: dict) -> int:
        async with http.post(url, json=body) as resp:
            await resp.read()
            return resp.status

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}
    gen = {"inputs": "hi", "parameters": {"max_new_tokens": 40}}
    tasks = [asyncio.create_task(one(f"{tgi}/generate", gen)) for _ in range(3)]
    tasks += [asyncio.create_task(one(f"{vllm}/v1/chat/completions", chat)) for _ in range(5)]
    for _ in range(200):  # bounded: until both queues are seen full (each 0.6 s long)
        async with http.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
        if (
            metric_value(text, "neuron_fleet_replica_engine_waiting", replica="r1") == 3
            and metric_value(text, "neuron_fleet_replica_engine_waiting", replica="r0") == 2
        ):
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError(f"queues never seen full:\n{text}")
    assert metric_value(text, "neuron_fleet_replica_engine_running", replica="r1") == 2
    assert metric_value(text, "neuron_fleet_replica_engine_running", replica="r0") == 1
    assert metric_value(text, "neuron_fleet_replica_engine_waiting", replica="r0") == 2
    # the engines' own families stay re-exported, with the replica label
    assert metric_value(text, "vllm:num_requests_running", replica="r1") == 2
    assert metric_value(text, "tgi_batch_current_size", replica="r0") == 1
    assert await asyncio.gather(*tasks) == [200] * 8
