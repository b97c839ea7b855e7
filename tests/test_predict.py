"""`neuron-fleet predict`: the timing model, the virtual-time host, the CLI on the real data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.predict.queue import HostSimulation, Workload
from supervisor.predict.records import load_records, target
from supervisor.predict.replay import packaged_model, predict_record
from supervisor.predict.timing import GENERATIONS, Shape, TimingModel

REPO = Path(__file__).resolve().parents[1]
# CI: a clean clone sits beside a copy of shared/ (../shared/reference); here: /work/shared.
SHARED_CANDIDATES = (
    REPO.parent / "shared" / "reference" / "inf2-published.json",
    Path("/work/shared/reference/inf2-published.json"),
)
SHARED = next((p for p in SHARED_CANDIDATES if p.is_file()), None)
PACKAGED = REPO / "supervisor" / "predict" / "inf2-published.json"


def predict_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "predict", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def shared_file() -> Path:
    if SHARED is None:
        pytest.skip("shared/reference/inf2-published.json is not beside the repository")
    return SHARED


def test_packaged_data_is_the_shared_file(shared_file: Path) -> None:
    assert PACKAGED.read_bytes() == shared_file.read_bytes()
    # and its description (the schema, the sources), which docs/predict.md points users to
    described = shared_file.with_suffix(".md")
    assert PACKAGED.with_suffix(".md").read_bytes() == described.read_bytes()


def test_records_json_on_the_real_file(shared_file: Path) -> None:
    done = predict_cli("--records", str(shared_file), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    records = json.loads(shared_file.read_text())
    assert [row["id"] for row in out] == [r["id"] for r in records]
    for row in out:  # only the MoE run at batch 64 (out of the fit) leaves the calibration
        assert set(row) == {"id", "predicted"} | (
            {"extrapolating"} if "bs64" in row["id"] else set()
        )
        assert set(row["predicted"]) == {"ttft_s", "itl_ms", "output_tok_per_s"}
        for value in row["predicted"].values():
            assert value is not None and math.isfinite(value) and value > 0
    # the blog's 3 x tp8 x batch 8 synchronous run: TTFT within a factor 2 of 1.585 s
    blog = next(r for r in out if r["id"].endswith("bs8-seq16512/synchronous"))
    assert 0.75 < blog["predicted"]["ttft_s"] < 3.2


def test_records_round_trip_ignores_metrics(tmp_path: Path) -> None:
    records = load_records()
    picked = [
        next(r for r in records if r["benchmark_kind"] == "static_batch"),
        next(r for r in records if r["concurrency_or_rate"].get("mode") == "synchronous"),
        next(r for r in records if r["concurrency_or_rate"]["kind"] == "concurrency"),
    ]
    scrambled = [{**r, "metrics": {"ttft_s": 123.0}} for r in picked]
    path_a, path_b = tmp_path / "a.json", tmp_path / "b.json"
    path_a.write_text(json.dumps(picked))
    path_b.write_text(json.dumps(scrambled))
    a = json.loads(predict_cli("--records", str(path_a), "--json").stdout)
    b = json.loads(predict_cli("--records", str(path_b), "--json").stdout)
    assert a == b
    assert [row["id"] for row in a] == [r["id"] for r in picked]
    # the static record is predicted by the formula: check it against the model directly
    model = packaged_model()
    direct = predict_record(model, picked[0])
    assert a[0]["predicted"]["ttft_s"] == pytest.approx(direct["ttft_s"], rel=1e-3)
    # what each kind measures, in the output's units
    assert set(target(picked[1])) == {"ttft_s", "itl_ms", "output_tok_per_s"}


def test_bad_records_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"id": "x", "tp": 8}]))
    done = predict_cli("--records", str(path), "--json")
    assert done.returncode == 2
    assert "lacks" in done.stderr and "batch_size" in done.stderr
    assert done.stdout == ""


def test_a_null_engine_reads_like_an_absent_one(tmp_path: Path) -> None:
    """One's own records may say ``"engine": null`` (engine unknown): the CLI predicts it
    as if the key were absent (optimum-neuron by SDK, TGI serving) instead of crashing."""
    records = load_records()
    picked = [
        next(r for r in records if r["benchmark_kind"] == "static_batch"),
        next(r for r in records if r["concurrency_or_rate"].get("mode") == "synchronous"),
    ]
    absent = [{k: v for k, v in r.items() if k != "engine"} for r in picked]
    null = [{**r, "engine": None} for r in absent]
    path_absent, path_null = tmp_path / "absent.json", tmp_path / "null.json"
    path_absent.write_text(json.dumps(absent))
    path_null.write_text(json.dumps(null))
    done_null = predict_cli("--records", str(path_null), "--json")
    assert done_null.returncode == 0, done_null.stderr
    done_absent = predict_cli("--records", str(path_absent), "--json")
    assert done_absent.returncode == 0, done_absent.stderr
    assert json.loads(done_null.stdout) == json.loads(done_absent.stdout)
    assert [row["id"] for row in json.loads(done_null.stdout)] == [r["id"] for r in picked]


def test_shipped_fit_is_the_fit_of_the_shipped_data() -> None:
    fresh = TimingModel.fit_static(load_records())
    shipped = packaged_model()
    assert fresh.coef.keys() == shipped.coef.keys()
    for key, value in fresh.coef.items():
        assert shipped.coef[key] == pytest.approx(value, rel=1e-6, abs=1e-12)


def test_calibration_refits_on_ones_own_points(tmp_path: Path) -> None:
    records = [r for r in load_records() if r["benchmark_kind"] == "static_batch"]
    doubled = []
    for r in records:  # a host twice as slow as the published one
        m = dict(r["metrics"])
        for key in ("ttft_s", "itl_ms", "ttft_ms_p50", "tpot_ms_p50"):
            if key in m:
                m[key] = m[key] * 2
        doubled.append({**r, "metrics": m})
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(doubled))
    args = ("--model-size", "8", "--model-family", "llama-3.1-8b", "--tp", "8",
            "--batch-size", "8", "--input-tokens", "1500", "--output-tokens", "250",
            "--rate", "0.2", "--json")  # fmt: skip
    base = json.loads(predict_cli(*args).stdout)
    mine = predict_cli(*args, "--calibration", str(path), "--calibration-only")
    assert mine.returncode == 0, mine.stderr
    slow = json.loads(mine.stdout)
    assert slow["itl_p50_ms"] == pytest.approx(2 * base["itl_p50_ms"], rel=0.15)
    # without --calibration-only one's points join the published ones, and their own
    # multipliers say how their host differs: with this many of them, nearly all the way
    added = predict_cli(*args, "--calibration", str(path))
    assert added.returncode == 0, added.stderr
    assert "with the packaged ones" in added.stderr and "decode x" in added.stderr
    assert json.loads(added.stdout)["itl_p50_ms"] > base["itl_p50_ms"] * 1.7


def test_ten_own_points_move_a_prediction_most_of_the_way(tmp_path: Path) -> None:
    """Found by a fresh-eyes check: nine records of a host twice as slow, added to the
    published hundreds, moved the predicted ITL by 4 %. Their own multipliers (shrunk by
    their number) move it most of the way, and say so."""
    mine = []
    for r in load_records():
        if (r["id"].startswith("on-static/llama3.1-8b@9d371f56") and r["batch_size"] in (1, 4, 16)
                and r["input_tokens"] in (256, 1024, 1792)):  # fmt: skip
            m = {k: v * 2 if k in ("ttft_s", "itl_ms") else v for k, v in r["metrics"].items()}
            mine.append({**r, "id": "mine/" + r["id"], "metrics": m})
    assert len(mine) == 9
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(mine))
    args = ("--model-size", "8", "--model-family", "llama-3.1-8b", "--input-tokens", "1000",
            "--output-tokens", "256", "--rate", "1", "--json")  # fmt: skip
    base = json.loads(predict_cli(*args).stdout)["itl_p50_ms"]
    added = predict_cli(*args, "--calibration", str(path))
    assert added.returncode == 0, added.stderr
    assert 1.5 * base < json.loads(added.stdout)["itl_p50_ms"] < 2.1 * base
    assert "your records against the published fit" in added.stderr


def test_extrapolation_is_announced() -> None:
    inside = predict_cli(
        "--model-size", "8", "--tp", "8", "--batch-size", "8", "--sequence-length", "4096",
        "--input-tokens", "1500", "--output-tokens", "250", "--rate", "0.5", "--json",
    )  # fmt: skip
    assert inside.returncode == 0, inside.stderr
    assert "extrapolating" not in inside.stderr
    assert json.loads(inside.stdout)["extrapolating"] == []
    outside = predict_cli(
        "--model-size", "400", "--tp", "4", "--batch-size", "128", "--sdk", "3.1",
        "--sequence-length", "65536", "--cores", "32",
        "--input-tokens", "60000", "--output-tokens", "250", "--rate", "0.01", "--json",
    )  # fmt: skip
    assert outside.returncode == 0, outside.stderr
    said = outside.stderr
    for words in ("model size 400B", "tp 4 was never measured", "batch size 128",
                  "input length 60000", "Neuron SDK 3.1 is newer",
                  "sequence length 65536"):  # fmt: skip
        assert words in said, said
    result = json.loads(outside.stdout)
    assert len(result["extrapolating"]) == 6
    assert "would not load" in result["warning"]  # 400B on 4 cores


def test_sweep_ranks_layouts_and_plots(tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    done = predict_cli(
        "--model-size", "8", "--model-family", "llama-3.1-8b", "--cores", "16",
        "--input-tokens", "1500", "--output-tokens", "250", "--sweep", "--ttft-slo", "2",
        "--plot", str(png), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    rates = [row["max_rate_within_slo"] for row in out["layouts"]]
    assert rates == sorted(rates, reverse=True) and rates[0] > 0
    assert all(row["replicas"] * row["tp"] <= 16 for row in out["layouts"])
    assert {row["tp"] for row in out["layouts"]} >= {2, 4, 8}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_without_slo_is_refused() -> None:
    done = predict_cli("--model-size", "8", "--input-tokens", "10", "--output-tokens", "10",
                       "--sweep")  # fmt: skip
    assert done.returncode == 2 and "--ttft-slo" in done.stderr


shapes = st.builds(
    Shape,
    params_b=st.floats(1, 200),
    tp=st.sampled_from([1, 2, 4, 8, 12, 24]),
    batch_size=st.integers(1, 64),
    sequence_length=st.integers(256, 32768),
    kv_bytes=st.integers(16_000, 1_000_000),
    generation=st.sampled_from(GENERATIONS),
)


@settings(max_examples=200, deadline=None)
@given(shape=shapes, n=st.integers(1, 63), tokens=st.integers(1, 30000))
def test_step_times_are_monotone(shape: Shape, n: int, tokens: int) -> None:
    model = packaged_model()
    prefill = model.prefill_s(shape, n, tokens)
    assert 0 < prefill <= model.prefill_s(shape, n + 1, tokens)
    assert prefill <= model.prefill_s(shape, n, tokens * 2) + 1e-12
    bigger = Shape(shape.params_b * 1.5, shape.tp, shape.batch_size, shape.sequence_length,
                   shape.kv_bytes, shape.generation)  # fmt: skip
    assert model.full_decode_s(shape, n) <= model.full_decode_s(bigger, n)
    assert model.full_decode_s(shape, n) <= model.full_decode_s(shape, n + 1)
    assert model.decode_s(shape, n, "tgi") <= model.decode_s(shape, n + 1, "tgi")


@settings(max_examples=25, deadline=None)
@given(
    rate=st.floats(0.05, 2.0),
    replicas=st.integers(1, 4),
    batch=st.sampled_from([1, 4, 8, 16]),
)
def test_more_load_never_lowers_ttft_or_raises_a_cap(
    rate: float, replicas: int, batch: int
) -> None:
    """Same arrivals spread thinner: one more replica never makes the median TTFT worse; the
    host never completes more than it was sent, and tokens come after their request."""
    model = packaged_model()
    shape = Shape(8.0, 8, batch, 4096, 131072)

    def run(n: int):
        return HostSimulation(model, shape, n, policy="fleet").run(
            Workload(input_tokens=1500, output_tokens=100, rate=rate, duration_s=60, seed=7)
        )

    few, many = run(replicas), run(replicas + 1)
    assert (
        sorted(many.ttft_s())[len(many.ttft_s()) // 2]
        <= sorted(few.ttft_s())[len(few.ttft_s()) // 2] + 1e-9
    )
    sent = len(few.requests)
    assert len(few.completed) <= sent and len(many.completed) <= len(many.requests)
    for r in few.completed:
        assert r.first_token_at >= r.arrival and r.finished_at >= r.first_token_at


def test_simulate_replica_takes_its_timing_from_the_model() -> None:
    import argparse

    from supervisor.simulator.cli import add_arguments, config_from_args
    from supervisor.simulator.engine import NeuronBatcher, NeuronTiming

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    blog = config_from_args(parser.parse_args([]), env={})
    assert blog.timing == NeuronTiming()  # no --model-size: the blog's calibration
    args = ["--model-size", "70", "--tp", "24", "--batch-size", "4", "--max-total-tokens", "4096"]
    big = config_from_args(parser.parse_args(args), env={})
    model = packaged_model()
    shape = big.timing.shape
    assert (shape.params_b, shape.tp, shape.batch_size, shape.sequence_length) == (70, 24, 4, 4096)
    batcher = NeuronBatcher(batch_size=4, max_concurrent_requests=8, timing=big.timing)
    import random

    from supervisor.simulator.engine import Job

    for i in range(2):
        batcher.add(Job(ordinal=i, input_length=1000, max_new_tokens=5, rng=random.Random(i)))
    prefill = batcher.plan(0.0)
    assert prefill.kind == "prefill" and len(prefill.jobs) == 2
    assert prefill.duration == pytest.approx(model.prefill_s(shape, 2, 1000))
    batcher.complete(prefill, prefill.duration)
    decode = batcher.plan(1.0)
    assert decode.duration == pytest.approx(model.decode_s(shape, 2, "tgi"))
    assert decode.duration > NeuronTiming().decode(2)  # a 70B step is slower than the 8B's


def test_demo_model_size_reaches_the_simulated_replicas() -> None:
    import argparse
    import tomllib

    from supervisor.demo import DEMO_TOML, demo_toml
    from supervisor.predict.timing import SimulatorTiming
    from supervisor.simulator.cli import add_arguments, config_from_args

    assert demo_toml(None) == DEMO_TOML
    sim = tomllib.loads(demo_toml(70))["launcher"]["simulated"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(sim["extra_args"]), env={})
    assert isinstance(config.timing, SimulatorTiming)
    assert config.timing.shape.params_b == 70 and config.timing.shape.tp == 8


def test_tgi_router_waits_for_company_or_twenty_steps() -> None:
    """A request arriving while one runs: with the router rule (waiting_served_ratio 1.2 of
    1 running = 1) it joins at the next step; with 4 running it needs 4 waiting, so a lone
    request waits max_waiting_tokens (20) decode steps."""
    from supervisor.predict.queue import MAX_WAITING_TOKENS, Request

    base = packaged_model()
    shape = Shape(8.0, 8, 8, 4096, 131072, family="llama-3.1-8b")
    step = base.decode_s(shape, 4, "tgi")
    arrival = base.prefill_s(shape, 4, 100) + 3.5 * step  # while the 4 early ones decode

    def ttft_of_late_request(ratio: float | None) -> float:
        model = base.with_serving("tgi|on-nxd", 0.0, 0.0, ratio)
        sim = HostSimulation(model, shape, 1, engine="tgi", policy="fleet")
        early = [Request(0.0, 100, 500) for _ in range(4)]
        late = Request(arrival, 100, 10)
        for r in [*early, late]:
            sim._push(r.arrival, "arrive", r)
        while sim._heap:  # drive the event loop as run() does, with our requests
            import heapq

            at, _, kind, payload = heapq.heappop(sim._heap)
            sim.now = at
            if kind == "arrive":
                sim._route(payload)
            elif kind == "wake":  # an idle replica plans once this instant's arrivals are in
                if not payload.busy:
                    sim._plan(payload)
            elif payload[1] == payload[0].version:
                sim._end_step(payload[0])
                sim._plan(payload[0])
        return late.first_token_at - late.arrival

    prefill = base.prefill_s(shape, 1, 100)
    eager = ttft_of_late_request(None)
    assert eager <= step + prefill + 1e-9
    waits = ttft_of_late_request(1.2)
    assert waits >= (MAX_WAITING_TOKENS - 2) * step


def _one_replica_run(model: TimingModel, shape: Shape, workload: Workload):
    return HostSimulation(model, shape, 1, engine="tgi", policy="fleet").run(workload)


def test_llmperf_itl_counts_the_wait_for_the_first_token() -> None:
    """llmperf divides the whole request (TTFT included) by its output tokens; guidellm's
    ITL is the gaps after the first token. On a batch-1 replica with 4 clients the queueing
    dominates the first and is absent from the second."""
    model = packaged_model()
    shape = Shape(8.0, 8, 1, 4096, 131072, family="llama-3.1-8b")
    result = _one_replica_run(
        model, shape, Workload(input_tokens=500, output_tokens=50, concurrency=4, max_requests=12)
    )
    for r in result.completed:
        llmperf = (r.finished_at - r.arrival) / r.output_tokens * 1e3
        assert llmperf in result.llmperf_itl_ms()
    decode_ms = model.decode_s(shape, 1, "tgi") * 1e3
    assert max(result.itl_ms()) == pytest.approx(decode_ms, rel=0.05)
    assert sorted(result.llmperf_itl_ms())[6] > 2 * decode_ms


def test_llmperf_waves_wait_for_the_whole_wave() -> None:
    """Before llmperf's 2024-12-09 fix a new wave of C requests starts only when all C of
    the previous one finished: on a batch-1 replica the median TTFT is about half the
    steady closed loop's (C - 1 services)."""
    model = packaged_model()
    shape = Shape(8.0, 8, 1, 4096, 131072, family="llama-3.1-8b")

    def run(waves: bool):
        workload = Workload(
            input_tokens=500, output_tokens=50, concurrency=6, max_requests=36, waves=waves
        )
        return _one_replica_run(model, shape, workload)

    waves, steady = run(True), run(False)
    assert len(waves.completed) == len(steady.completed) == 36
    by_arrival = sorted(waves.requests, key=lambda r: r.arrival)
    for k in range(1, 6):  # wave k starts exactly when the last of wave k - 1 finished
        previous, current = by_arrival[(k - 1) * 6 : k * 6], by_arrival[k * 6 : (k + 1) * 6]
        assert {r.arrival for r in current} == {max(r.finished_at for r in previous)}
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    assert median(waves.ttft_s()) < 0.75 * median(steady.ttft_s())


def test_llmperf_records_before_the_fix_run_in_waves() -> None:
    from supervisor.predict.replay import workload_of

    records = {r["id"]: r for r in load_records()}
    old = records["tgi-llmperf/llama-3-70b/tp24-bs1/2024-06-05/c8"]
    assert workload_of(old).waves
    assert not workload_of({**old, "published_date": "2025-01-10"}).waves


def test_a_join_pauses_the_running_not_the_joining() -> None:
    """join_stall_s delays the tokens of the requests already decoding by the stall, and
    leaves the joining request's first token at the end of its prefill."""
    base = packaged_model()
    shape = Shape(8.0, 8, 8, 4096, 131072, family="llama-3.1-8b")
    light = Workload(input_tokens=500, output_tokens=200, rate=0.3, duration_s=90, seed=3)

    def run(stall: float):
        return _one_replica_run(
            base.with_serving("tgi|on-nxd", 0.0, 0.0, None, stall), shape, light
        )

    calm, stalled = run(0.0), run(1.0)
    assert len(stalled.completed) > 15
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert median(stalled.ttft_s()) < median(calm.ttft_s()) + 0.2
    assert mean(stalled.itl_ms()) > mean(calm.itl_ms()) + 3


def test_rounded_chart_values_weigh_less_in_the_fit() -> None:
    """A chart TTFT of 0.1 s (rounded to 0.1 s) is 0.05-0.15 s: its relative residual is
    scaled down; a precise value keeps its plain relative error; few records of a family
    move its multiplier only part of the way (shrinkage)."""
    from supervisor.predict.records import rounding_step
    from supervisor.predict.timing import SHRINK_RECORDS, _multipliers, error_scale

    records = load_records()
    chart = next(r for r in records if str(r.get("value_precision", "")).startswith("chart"))
    aws = next(r for r in records if r["id"].startswith("aws-inf2-perf"))
    assert rounding_step(chart, "ttft_s") == 0.1 and rounding_step(aws, "ttft_s") == 0.0
    assert error_scale(0.1, 0.0) == pytest.approx(0.1)
    assert error_scale(0.1, 0.1) > 2 * error_scale(0.1, 0.0)
    assert error_scale(8.0, 0.1) == pytest.approx(8.0, rel=0.01)
    # one record 10x slower than the model: the multiplier is shrunk towards 1
    single, _ = _multipliers([((1.0, 0.0), 10.0, 10.0)])
    assert single == pytest.approx(10 ** (1 / (1 + SHRINK_RECORDS)))
    many, _ = _multipliers([((1.0, 0.0), 10.0, 10.0)] * 40)
    assert 8 < many < 10


def test_cpu_sampling_records_are_told_apart_and_slow_the_decode() -> None:
    """The chunked-prefill study's configs B and C sample on the CPU (config D only for the
    prefill); their decode steps are the on-device steps times the fitted factor."""
    from dataclasses import replace

    from supervisor.predict.records import cpu_sampling

    study = [r for r in load_records() if "chunked-prefill-study" in r["id"]]
    flagged = {r["id"].split("/")[-2] for r in study if cpu_sampling(r)}
    assert flagged == {"std-cpu-sampling", "chunked-cpu-sampling"}
    shape = Shape(8.0, 8, 32, 4096, 131072, family="llama-3.1-8b")
    model = replace(packaged_model(), cpu_sampling_factor=2.0)
    on_cpu = replace(shape, cpu_sampling=True)
    assert model.full_decode_s(on_cpu, 32) == pytest.approx(2 * model.full_decode_s(shape, 32))
    assert packaged_model().cpu_sampling_factor > 1.2  # the shipped fit saw them


def test_served_prefill_scales_with_the_fitted_exponent() -> None:
    """prefill_exponent e: a server's prefill of n waiting requests takes one prefill times
    n^e; e = 1 keeps prefill_s (one sequence after the other), e = 0 is one call for all."""
    base = packaged_model()
    shape = Shape(8.0, 8, 32, 4096, 131072, family="llama-3.1-8b")
    one = base.prefill_s(shape, 1, 1500)
    serial = base.with_serving("tgi|on-nxd", 0.0, 0.0, None, 0.0, 1.0)
    batched = base.with_serving("tgi|on-nxd", 0.0, 0.0, None, 0.0, 0.0)
    quarter = base.with_serving("tgi|on-nxd", 0.0, 0.0, None, 0.0, 0.25)
    assert serial.served_prefill_s(shape, 16, 1500) == base.prefill_s(shape, 16, 1500)
    assert batched.served_prefill_s(shape, 16, 1500) == pytest.approx(one)
    assert quarter.served_prefill_s(shape, 16, 1500) == pytest.approx(2 * one)
    assert base.served_prefill_s(shape, 16, 1500, "vllm") == base.prefill_s(shape, 16, 1500)


@pytest.mark.parametrize(
    ("family", "tp", "per_core"),
    [
        ("llama-3-70b", 24, 1),  # 8 KV heads replicated to one per core (tp % 8 == 0)
        ("llama-3.1-8b", 8, 1),
        ("llama-3.1-8b", 2, 4),  # 8 KV heads sharded over 2 cores
        ("llama-3.1-8b", 12, 3),  # 12 % 8 != 0: converted to MHA, 32 heads padded to 36
        ("mistral-small-22b", 12, 4),  # 48 heads, converted to MHA
        ("llama-2-7b", 8, 4),  # MHA: 32 heads over 8 cores
        ("llama-2-13b", 24, 2),  # MHA: 40 heads padded to 48
        ("qwen2.5-7b", 8, 1),  # 4 KV heads replicated
    ],
)
def test_a_core_keeps_whole_kv_heads_as_nxd_shards_them(
    family: str, tp: int, per_core: int
) -> None:
    """neuronx-distributed-inference modules/attention/gqa.py: REPLICATE_TO_TP_DEGREE
    when tp is a multiple of the KV heads, else CONVERT_TO_MHA; MHA pads to tp."""
    from supervisor.predict.records import heads, kv_bytes_per_token, kv_heads_per_core

    attention, kv = heads(family)
    assert kv_heads_per_core(attention, kv, tp) == per_core
    shape = Shape(8.0, tp, 8, 4096, kv_bytes_per_token(family, 8.0), heads=(attention, kv))
    assert shape.kv_bytes_per_core == pytest.approx(shape.kv_bytes / kv * per_core)


def test_replicated_kv_heads_cost_decode_time_and_memory() -> None:
    """A grouped-query 8B model at tp 24 keeps a whole KV head per core: each decode slot
    reads more cache than at a 1/24 share, and batch 64 of 16k tokens no longer fits."""
    from supervisor.predict.plan import Layout

    model = packaged_model()
    gqa = Shape(8.0, 24, 64, 16512, 131072, heads=(32, 8))
    as_if_sharded = Shape(8.0, 24, 64, 16512, 131072, heads=(24, 24))
    assert gqa.kv_bytes_per_core == 3 * as_if_sharded.kv_bytes_per_core
    assert model.full_decode_s(gqa, 64) > model.full_decode_s(as_if_sharded, 64)
    assert not Layout(1, gqa).fits() and Layout(1, as_if_sharded).fits()


def test_slo_runs_are_long_enough_for_a_monotone_p99() -> None:
    """p99 of a 300 s run at 0.5 req/s is its second-largest TTFT: the blog's layout gave
    6.3 s at 0.55 req/s and 4.9 s at 0.65. Pooled fixed-count runs make it rise with load."""
    from supervisor.predict.plan import Layout, at_rate

    model = packaged_model()
    shape = Shape(8.0, 8, 8, 16512, 131072, family="llama-3.1-8b")
    base = Workload(input_tokens=15900, output_tokens=450, input_stddev=100, output_stddev=50)
    p99 = [at_rate(model, Layout(3, shape), base, r).ttft_p99_s for r in (0.45, 0.55, 0.65)]
    assert p99 == sorted(p99), p99


def test_records_say_where_they_leave_the_calibration(tmp_path: Path) -> None:
    """An SDK older than the calibration (2.17: its Llama-2-70B table runs 3.2x slower than
    2.18's) and a record without a parameter count are announced per record, in the JSON
    and on stderr; a record inside the calibration keeps the plain {"id", "predicted"}."""
    inside = next(r for r in load_records() if r["benchmark_kind"] == "static_batch")
    older = {**inside, "id": "older", "sdk_version": "2.17.0"}
    unsized = {k: v for k, v in inside.items() if k != "model_params_b"} | {"id": "unsized"}
    path = tmp_path / "records.json"
    path.write_text(json.dumps([inside, older, unsized]))
    done = predict_cli("--records", str(path), "--json")
    assert done.returncode == 0, done.stderr
    warned = {row["id"]: row.get("extrapolating", []) for row in json.loads(done.stdout)}
    assert warned[inside["id"]] == []
    assert any("2.17.0 is older than any calibration point" in w for w in warned["older"])
    assert any("no model_params_b" in w for w in warned["unsized"])
    assert "older: extrapolating: Neuron SDK 2.17.0" in done.stderr


def test_part_of_a_prefill_does_not_shrink_with_tp() -> None:
    """Tensor parallelism shards the matmuls, not the norms, residual adds and all-reduces
    over the whole activations: the published optimum-neuron charts of Llama-2-13B prefill
    1.8x faster per sequence at tp 24 than at tp 8, not 3x (params / tp alone)."""
    model = packaged_model()

    def per_sequence(tp: int) -> float:
        shape = Shape(13.0, tp, 16, 4096, 819200, generation="on-tnx", heads=(40, 40))
        return model.prefill_s(shape, 16, 1024) - model.prefill_s(shape, 8, 1024)

    assert 1.2 < per_sequence(8) / per_sequence(24) < 2.6


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--rate", "0"), "must be above 0"),
        (("--rate", "-1"), "must be above 0"),
        (("--concurrency", "0"), "must be above 0"),
        (("--ttft-slo", "-1"), "must be above 0"),
        (("--model-size", "0"), "must be above 0"),
        (("--input-tokens", "-100"), "must be above 0"),
        (("--sdk", "abc"), "expected a Neuron SDK version"),
        (("--input-stddev", "-5"), "must be 0 to 1e6 tokens"),
        (("--input-stddev", "1e308"), "must be 0 to 1e6 tokens"),
        (("--cores", "100000"), "must be at most 4096"),
        (("--concurrency", "1e9"), "expected a whole number"),
        (("--replicas", "4"), "needs 32 NeuronCores; the host has 24"),
        (("--plot", "x.png"), "--plot draws the curves of a --sweep"),
        (("--calibration-only",), "--calibration-only needs --calibration"),
    ],
)
def test_bad_questions_get_a_clear_answer_not_a_traceback(args: tuple[str, ...], says: str) -> None:
    """Found by a fresh-eyes check: rate 0 raised ZeroDivisionError, a negative rate hung,
    negative tokens printed figures, a layout larger than the host was simulated."""
    base = {"--model-size": "8", "--tp": "8", "--input-tokens": "100", "--output-tokens": "10"}
    flags = dict(base)
    rest = list(args)
    while rest:
        key = rest.pop(0)
        flags[key] = rest.pop(0) if rest and not rest[0].startswith("--") else ""
    argv = [x for k, v in flags.items() for x in ((k, v) if v else (k,))]
    done = predict_cli(*argv, timeout=30)
    assert done.returncode == 2, (done.returncode, done.stdout)
    assert says in done.stderr and "Traceback" not in done.stderr


def test_a_prompt_longer_than_the_compiled_length_is_refused() -> None:
    """The default compiled length is 4096: a 15,900-token prompt used to get a silent
    0.33 s TTFT (the server would refuse the request)."""
    done = predict_cli("--model-size", "8", "--input-tokens", "15900", "--output-tokens", "300")
    assert done.returncode == 2
    assert "compiled sequence length 4096" in done.stderr and "16200" in done.stderr
    ok = predict_cli("--model-size", "8", "--sequence-length", "16512", "--input-tokens",
                     "15900", "--output-tokens", "300", "--json")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["sequence_length"] == 16512


def test_an_overloaded_rate_says_so_and_an_unknown_family_is_named() -> None:
    done = predict_cli("--model-size", "8", "--model-family", "gpt-9", "--input-tokens",
                       "2000", "--output-tokens", "300", "--sequence-length", "4096",
                       "--rate", "8", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert "more than this layout serves" in out["overloaded"]
    assert any("'gpt-9' is not in the calibration" in w for w in out["extrapolating"])
    calm = predict_cli("--model-size", "8", "--input-tokens", "2000", "--output-tokens", "300",
                       "--rate", "0.5", "--json")  # fmt: skip
    calm = json.loads(calm.stdout)
    assert "overloaded" not in calm


def test_records_with_a_wrong_type_name_the_record_and_the_field(tmp_path: Path) -> None:
    record = next(r for r in load_records() if r["benchmark_kind"] == "static_batch")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{**record, "id": "mine/bad-tp", "tp": "eight"}]))
    done = predict_cli("--records", str(path), "--json")
    assert done.returncode == 2
    assert "record #0 (mine/bad-tp): tp must be a whole number above 0, not 'eight'" in done.stderr


def test_an_slo_rate_does_not_hang_on_one_seed() -> None:
    """Near the knee p99 moves in steps of one prefill; one run of 2,000 arrivals gave rates
    9 % apart between seeds (fresh-eyes check). Three pooled runs: a few percent, and the
    reported rate's own run meets the SLO."""
    from supervisor.predict.plan import Layout, max_rate_within_slo

    model = packaged_model()
    layout = Layout(6, Shape(8.0, 4, 16, 16512, 131072, family="llama-3.1-8b"))
    rates = []
    for seed in (0, 3):  # disjoint seeds: 0-2 and 3-5
        base = Workload(input_tokens=15900, output_tokens=450, input_stddev=100,
                        output_stddev=50, seed=seed)  # fmt: skip
        found = max_rate_within_slo(model, layout, base, 5.0)
        assert found.at_rate is not None and found.at_rate.ttft_p99_s <= 5.0
        assert [r for r, _ in found.tried] == sorted(r for r, _ in found.tried)
        rates.append(found.rate)
    assert abs(rates[0] - rates[1]) / max(rates) < 0.06, rates


def test_requests_arriving_together_are_prefilled_together() -> None:
    """The 2024 llmperf waves: 8 clients on 3 idle TGI replicas got their first tokens in
    one prefill's time (0.31 s, 0.29 s alone). An idle replica used to start on the first
    arrival and queue the others of the same instant behind it (0.72 s, two prefills)."""
    model = packaged_model().with_serving("tgi|on-nxd", 0.0, 0.0, None, 0.0, 0.0)
    shape = Shape(8.0, 8, 32, 4096, 131072, family="llama-3.1-8b")
    sim = HostSimulation(model, shape, 1, engine="tgi", policy="round-robin")
    together = Workload(input_tokens=1500, output_tokens=50, concurrency=3, max_requests=3,
                        duration_s=math.inf)  # fmt: skip
    ttft = sim.run(together).ttft_s()
    one = model.served_prefill_s(shape, 3, 1500, "tgi")  # exponent 0: the time of one
    assert ttft == pytest.approx([one] * 3)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"concurrency_or_rate": {"kind": "guidellm", "mode": "constant"}}, "needs rate_req_s"),
        (
            {"concurrency_or_rate": {"kind": "guidellm", "mode": "asynchronous", "rate_req_s": -1}},
            "needs rate_req_s",
        ),
        (
            {
                "concurrency_or_rate": {
                    "kind": "guidellm",
                    "mode": "asynchronous",
                    "rate_req_s": 1e308,
                }
            },
            "needs rate_req_s",
        ),
        ({"concurrency_or_rate": {"kind": "concurrency", "value": 10**7}}, "a concurrency must"),
        ({"concurrency_or_rate": {"kind": "concurrency", "value": 0}}, "a concurrency must"),
        ({"concurrency_or_rate": {"kind": "static_batch", "value": -4}}, "a static batch's"),
        ({"engine": 5}, "engine must be a string"),
        ({"model_family": 123}, "model_family must be a string"),
        ({"model_params_b": -8}, "model_params_b must be"),
        ({"model_params_b": 1e308}, "model_params_b must be"),
        ({"sequence_length": -1}, "sequence_length must be"),
        ({"replicas": 0}, "replicas must be"),
    ],
)
def test_a_record_that_cannot_be_run_is_named_not_simulated(
    tmp_path: Path, change: dict, says: str
) -> None:
    """Found by a second fresh-eyes check: these crashed (KeyError, ZeroDivisionError,
    AttributeError), hung while eating gigabytes, or printed negative figures."""
    record = next(r for r in load_records() if r["benchmark_kind"] == "static_batch")
    path = tmp_path / "odd.json"
    path.write_text(json.dumps([{**record, "id": "odd", **change}]))
    done = predict_cli("--records", str(path), "--json", timeout=30)
    assert done.returncode == 2, done.stdout
    assert "record #0 (odd)" in done.stderr and says in done.stderr
    assert "Traceback" not in done.stderr


def test_odd_but_valid_records_are_predicted_with_their_guesses_said(tmp_path: Path) -> None:
    record = next(r for r in load_records() if r["benchmark_kind"] == "static_batch")
    too_long = {**record, "id": "too-long", "input_tokens": 4000, "output_tokens": 1000,
                "sequence_length": 4096}  # fmt: skip
    unsized = {**record, "id": "\x1b[31mred", "sequence_length": None}
    path = tmp_path / "odd.json"
    path.write_text(json.dumps([too_long, unsized, {**unsized}]))
    done = predict_cli("--records", str(path))
    assert done.returncode == 0, done.stderr
    assert "exceed the sequence_length 4096" in done.stderr
    assert "no sequence_length: taken as input + output" in done.stderr
    assert "a second record with this id" in done.stderr
    assert "\x1b" not in done.stdout + done.stderr  # escaped, not sent to the terminal
    assert "\\x1b[31mred" in done.stdout


def test_json_never_carries_infinity() -> None:
    done = predict_cli("--model-size", "5000", "--input-tokens", "1000", "--output-tokens",
                       "200", "--rate", "1", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Infinity" not in done.stdout and "NaN" not in done.stdout
    json.loads(done.stdout)


def test_guidellm_constant_rate_is_evenly_spaced() -> None:
    """guidellm's constant rate type spaces requests evenly; Poisson arrivals bunch, so at
    the same rate they queue more."""
    from supervisor.predict.replay import workload_of

    served = next(r for r in load_records() if r["id"].endswith("asynchronous@2.87"))
    constant = {**served, "concurrency_or_rate": {**served["concurrency_or_rate"],
                                                   "mode": "constant"}}  # fmt: skip
    assert workload_of(constant).constant and not workload_of(served).constant
    model = packaged_model()
    assert predict_record(model, constant)["ttft_s"] < predict_record(model, served)["ttft_s"]
