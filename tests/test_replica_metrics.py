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
