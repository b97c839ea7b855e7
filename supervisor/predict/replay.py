"""Predict what a published (or measured) record would show, and fit the serving terms.

``predict_record`` turns one record of the ``inf2-published.json`` schema into the
statistic that record measures (``records.target``): the formula of one static batch, or
a virtual-time run of its host (``queue.HostSimulation``) under its load.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from .queue import HostSimulation, Result, Workload, mean, percentile
from .records import cpu_sampling, kind_of, load_of, serving_engine, target
from .timing import EXCLUDED_FAMILIES, Shape, TimingModel, with_own_records

GUIDELLM_DURATION_S = 120.0
"""Length of a guidellm rate or throughput run (not in the records; the blog's runs
completed 55-88 requests at 0.77-0.85 req/s, i.e. 65-115 s)."""
SYNCHRONOUS_REQUESTS = 20
LLMPERF_REQUESTS_PER_CLIENT = 8
"""The records' note: llmperf ran ``max completed requests = 8 x concurrency``."""
LLMPERF_WAVES_UNTIL = "2024-12-09"
"""llmperf ran its clients in waves until ray-project/llmperf f1d6bed (2024-12-09, "fix:
subsequent requests cannot be sent until 'num_concurrent_requests' requests have all
finished in non-block mode"): ``token_benchmark_ray.py`` called
``RequestsLauncher.get_next_ready()`` every ``num_concurrent_requests`` launches, and that
drained ``ActorPool.get_next_unordered()`` while ``has_next()``, i.e. waited for every request
in flight. A wave of C requests on B-slot replicas runs ceil(C / replicas / B) batches one
after the other; its median TTFT is ~C/2 requests' service on a batch-1 replica."""
MAX_SIMULATED_REQUESTS = 1200
"""Past this a closed-loop run is in steady state; more only costs time."""


def static_prediction(model: TimingModel, shape: Shape, batch: int, record: dict[str, Any]):
    ttft = model.prefill_s(shape, batch, int(record["input_tokens"]))
    itl = model.full_decode_s(shape, batch)
    out = int(record["output_tokens"])
    throughput = batch * out / (ttft + out * itl)
    return {"ttft_s": ttft, "itl_ms": itl * 1e3, "output_tok_per_s": throughput}


def workload_of(record: dict[str, Any], seed: int = 0, output_fraction: float = 1.0) -> Workload:
    """The record's load; a guidellm record's answers are ``output_fraction`` of the
    requested length (``TimingModel.guidellm_output_fraction``)."""
    load = load_of(record)
    output = int(record["output_tokens"])
    if load.kind != "concurrency":  # guidellm
        output = max(1, round(output * output_fraction))
    common = {
        "input_tokens": int(record["input_tokens"]),
        "output_tokens": output,
        "input_stddev": float(record.get("input_tokens_stddev") or 0),
        "output_stddev": float(record.get("output_tokens_stddev") or 0),
        "seed": seed,
    }
    if load.kind == "concurrency":
        clients = int(load.value)
        total = min(LLMPERF_REQUESTS_PER_CLIENT * clients, max(MAX_SIMULATED_REQUESTS, clients))
        waves = str(record.get("published_date", "")) < LLMPERF_WAVES_UNTIL
        return Workload(
            concurrency=clients, max_requests=total, waves=waves, duration_s=math.inf, **common
        )
    if load.kind == "synchronous":
        return Workload(
            concurrency=1, max_requests=SYNCHRONOUS_REQUESTS, duration_s=math.inf, **common
        )
    if load.kind in ("rate", "constant"):
        return Workload(
            rate=load.value,
            constant=load.kind == "constant",
            duration_s=GUIDELLM_DURATION_S,
            **common,
        )
    if load.kind == "throughput":
        return Workload(concurrency=int(load.value), duration_s=GUIDELLM_DURATION_S, **common)
    raise ValueError(f"record {record.get('id')}: no served workload for {load.kind}")


def summarize(result: Result, statistic: str) -> dict[str, float]:
    """``p50``: llmperf's medians, with llmperf's ITL (TTFT included, see
    ``Result.llmperf_itl_ms``); ``mean``: guidellm's means of TTFT and of the gaps after
    the first token."""
    ttft = result.ttft_s()
    itl = result.llmperf_itl_ms() if statistic == "p50" else result.itl_ms()
    pick = (lambda v: percentile(v, 50)) if statistic == "p50" else mean
    return {
        "ttft_s": pick(ttft),
        "itl_ms": pick(itl),
        "output_tok_per_s": result.output_tok_per_s(),
    }


def predict_record(model: TimingModel, record: dict[str, Any]) -> dict[str, float]:
    """The record's statistic as predicted: static batch, llmperf p50 or guidellm mean."""
    shape = Shape.of_record(record)
    load = load_of(record)
    if load.kind == "static":
        return static_prediction(model, shape, int(load.value), record)
    engine = serving_engine(str(record.get("engine", "")))
    # The published setups: nginx / docker compose round-robin for TGI, vLLM's
    # data-parallel proxy also round-robins (inf2-published.md).
    sim = HostSimulation(
        model, shape, int(record.get("replicas") or 1), engine=engine, policy="round-robin"
    )
    result = sim.run(workload_of(record, output_fraction=model.guidellm_output_fraction))
    statistic = "p50" if load.kind == "concurrency" else "mean"
    return summarize(result, statistic)


def record_warnings(model: TimingModel, record: dict[str, Any]) -> list[str]:
    """Where predicting this record leaves the calibration (``Coverage.warnings``), and the
    guesses made for what it does not say."""
    out = []
    if not record.get("model_params_b"):
        out.append("the record gives no model_params_b: taken as an 8B model")
    needed = int(record["input_tokens"]) + int(record["output_tokens"])
    compiled = record.get("sequence_length")
    if compiled is None:
        out.append(f"the record gives no sequence_length: taken as input + output ({needed})")
    elif needed > compiled:
        out.append(
            f"input + output ({needed}) exceed the sequence_length {compiled}: a server would "
            "refuse such requests"
        )
    shape = Shape.of_record(record)
    sdk = str(record.get("sdk_version") or "")
    return out + model.coverage.warnings(shape, int(record["input_tokens"]), sdk)


def ape(predicted: dict[str, float], measured: dict[str, float]) -> dict[str, float]:
    """Absolute percentage error per metric present in both."""
    out = {}
    for key, value in measured.items():
        p = predicted.get(key)
        if p is not None and value and not math.isnan(p):
            out[key] = abs(p - value) / abs(value) * 100
    return out


PER_ACTIVE_S = (0.0, 0.5e-3, 1e-3, 2e-3, 3e-3, 4e-3)
OVERHEADS_S = (0.0, 0.1, 0.2)
ROUTER_RATIOS = (None, 0.3, 1.2)
"""TGI's ``waiting_served_ratio``: the router's default is 1.2, the launcher's 0.3; None =
no router rule (vLLM)."""
JOIN_STALLS_S = (0.0, 0.25, 0.5, 1.0, 2.0)
PREFILL_EXPONENTS = (1.0, 0.5, 0.25, 0.0)
CPU_SAMPLING_FACTORS = (1.0, 1.5, 2.0, 2.5)
FIT_ROUNDS = 2


def _score(model: TimingModel, served: list[dict[str, Any]]) -> float:
    errors = []
    for record in served:
        errors.extend(ape(predict_record(model, record), target(record)).values())
    # capped so that one absurd record cannot pick the parameters alone
    return sum(min(e, 200.0) for e in errors) / max(len(errors), 1)


def fit(records: list[dict[str, Any]], own: list[dict[str, Any]] | None = None) -> TimingModel:
    """Static coefficients, then per serving engine and software generation the serving
    terms that best fit its served records through the virtual-time host: a coordinate
    search, one term's grid at a time with the others held, ``FIT_ROUNDS`` times over.
    ``own``: one's measured records (already among ``records``), whose step times get
    their own multipliers on top (``timing.with_own_records``)."""
    model = TimingModel.fit_static(records)
    if own:
        model = with_own_records(model, own)
    groups: dict[str, list[dict[str, Any]]] = {}
    cpu: list[dict[str, Any]] = []
    for r in records:
        if (
            kind_of(r) == "served"
            and target(r)
            and str(r.get("model_family", "")).lower() not in EXCLUDED_FAMILIES
        ):
            if cpu_sampling(r):  # fitted last, on top of the serving terms
                cpu.append(r)
                continue
            key = f"{serving_engine(str(r.get('engine', '')))}|{Shape.of_record(r).generation}"
            groups.setdefault(key, []).append(r)
    served = [r for group in groups.values() for r in group] + cpu
    fractions = sorted(f for r in served if (f := realized_output_fraction(r)) is not None)
    if fractions:
        model = replace(model, guidellm_output_fraction=fractions[len(fractions) // 2])
    for key, served in sorted(groups.items()):
        grids: list[tuple[Any, ...]] = [
            PER_ACTIVE_S,
            OVERHEADS_S,
            ROUTER_RATIOS if key.startswith("tgi|") else (None,),
            JOIN_STALLS_S,
            PREFILL_EXPONENTS,
        ]
        terms: list[Any] = [0.0, 0.0, None, 0.0, 1.0]
        scores: dict[tuple[Any, ...], float] = {}
        for _ in range(FIT_ROUNDS):
            for i, grid in enumerate(grids):
                trials = [(*terms[:i], value, *terms[i + 1 :]) for value in grid]
                for trial in trials:
                    if trial not in scores:
                        scores[trial] = _score(model.with_serving(key, *trial), served)
                terms = list(min(trials, key=scores.__getitem__))
        model = model.with_serving(key, *terms)
    if cpu:
        factor = min(
            CPU_SAMPLING_FACTORS,
            key=lambda f: _score(replace(model, cpu_sampling_factor=f), cpu),
        )
        model = replace(model, cpu_sampling_factor=factor)
    return model


def realized_output_fraction(record: dict[str, Any]) -> float | None:
    """Tokens a guidellm run's answers really had over those it asked for: its output
    tokens/s over its requests/s (guidellm 0.1.0 counts the streamed tokens; the emulated
    prompts let the model stop at EOS), capped at 1; None for other records."""
    m = record.get("metrics") or {}
    if kind_of(record) != "served" or not m.get("req_per_s") or not m.get("output_tok_per_s"):
        return None
    return min(1.0, m["output_tok_per_s"] / m["req_per_s"] / int(record["output_tokens"]))


FITTED = "fitted-model.json"


def packaged_model() -> TimingModel:
    """The fit of the packaged data, stored beside it (refit: ``bench/predict_cv.py --write``)."""
    import json
    from importlib import resources

    from .timing import model_from_json

    text = resources.files(__package__).joinpath(FITTED).read_text("utf-8")
    return model_from_json(json.loads(text))
