"""Published inf2 records (the schema of ``inf2-published.json``) and what a model needs of them.

The calibration data ships inside the package (``supervisor/predict/inf2-published.json``,
a copy of the team's ``shared/reference/inf2-published.json``: 380 cited records, all on
inf2.48xlarge) so an installed wheel can predict without the repository; beside it
``inf2-published.md`` describes the schema and every source.

A record is plain JSON; this module reads the few fields the timing model uses and knows
which statistic each kind of record measures (``target``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

PACKAGED_DATA = "inf2-published.json"

# Key/value bytes per token (bf16) of the architectures in the data:
# 2 (K and V) x layers x kv_heads x head_dim x 2 bytes, from each model's config.json.
# A family not listed gets an estimate (``kv_bytes_per_token``).
KV_BYTES_PER_TOKEN: dict[str, int] = {
    "llama-2-7b": 2 * 32 * 4096 * 2,  # MHA: 32 heads x 128
    "llama-2-13b": 2 * 40 * 5120 * 2,
    "codellama-13b": 2 * 40 * 5120 * 2,
    "llama-2-70b": 2 * 80 * 1024 * 2,  # GQA: 8 kv heads x 128
    "llama-3-8b": 2 * 32 * 1024 * 2,
    "llama-3.1-8b": 2 * 32 * 1024 * 2,
    "llama-3-70b": 2 * 80 * 1024 * 2,
    "llama-3.3-70b": 2 * 80 * 1024 * 2,
    "llama-3-70b-arch (deepseek-r1-distill)": 2 * 80 * 1024 * 2,
    "mistral-7b-v0.2": 2 * 32 * 1024 * 2,
    "mistral-small-22b": 2 * 56 * 1024 * 2,
    "qwen2.5-7b": 2 * 28 * 512 * 2,
    "qwen3-30b-a3b-moe": 2 * 48 * 512 * 2,
}


# (attention heads, key/value heads) of those architectures (config.json
# ``num_attention_heads``, ``num_key_value_heads``): how many KV heads one core keeps
# (``kv_heads_per_core``). A family not listed is taken as Llama-3-like (32, 8).
HEADS: dict[str, tuple[int, int]] = {
    "llama-2-7b": (32, 32),
    "llama-2-13b": (40, 40),
    "codellama-13b": (40, 40),
    "llama-2-70b": (64, 8),
    "llama-3-70b": (64, 8),
    "llama-3.3-70b": (64, 8),
    "llama-3-70b-arch (deepseek-r1-distill)": (64, 8),
    "mistral-small-22b": (48, 8),
    "qwen2.5-7b": (28, 4),
    "qwen3-30b-a3b-moe": (32, 4),
}


def heads(family: str | None) -> tuple[int, int]:
    return HEADS.get((family or "").lower(), (32, 8))


def kv_heads_per_core(attention_heads: int, kv_heads: int, tp: int) -> int:
    """KV heads one core holds, as NxD Inference shards them
    (aws-neuron/neuronx-distributed-inference, src/neuronx_distributed_inference/modules/
    attention/gqa.py: ``determine_sharding_strategy``, ``get_shardable_head_counts``):
    multi-head attention pads the heads to a multiple of tp; grouped-query attention
    with tp a multiple of the KV heads replicates them to one per core
    (REPLICATE_TO_TP_DEGREE), otherwise converts to multi-head (CONVERT_TO_MHA: as many
    KV heads as padded attention heads). So Llama-3-70B at tp 24 keeps a whole KV head per
    core (3x the cache of a 1/24 share), Mistral-Small (8 KV heads) at tp 12 four."""
    padded = -(-attention_heads // tp) * tp
    if kv_heads == attention_heads:
        return padded // tp
    if kv_heads >= tp and kv_heads % tp == 0:
        return kv_heads // tp
    if tp % kv_heads == 0:
        return 1
    return padded // tp


def kv_bytes_per_token(family: str | None, params_b: float) -> int:
    """Known families from the table; otherwise a GQA model of that size (Llama-3-like)."""
    if family is not None:
        key = family.lower()
        if key in KV_BYTES_PER_TOKEN:
            return KV_BYTES_PER_TOKEN[key]
    return int(2 * 32 * 1024 * 2 * math.sqrt(max(params_b, 0.5) / 8.0))


def generation(engine: str | None, sdk_version: str) -> str:
    """Which software stack produced the steps: the coefficients differ per stack.

    - ``tnx``: AWS transformers-neuronx samples (the Neuron SDK performance tables);
    - ``on-tnx``: optimum-neuron on Neuron SDK < 2.21 (its transformers-neuronx backend: NxD
      Inference first ships with SDK 2.21, awsdocs-neuron v2.21.0.beta
      ``libraries/nxd-inference``);
    - ``on-nxd``: optimum-neuron on SDK >= 2.21 (NxD Inference backend), TGI 3.x and vLLM.

    An unknown engine (``"engine": null`` in one's own records) reads like an absent one.
    """
    if (engine or "").startswith("transformers-neuronx"):
        return "tnx"
    version = sdk_tuple(sdk_version)
    if version is not None and version < (2, 21):
        return "on-tnx"
    return "on-nxd"


def sdk_tuple(text: str) -> tuple[int, ...] | None:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if match is None:
        return None
    return tuple(int(g) for g in match.groups() if g is not None)


def serving_engine(engine: str) -> str:
    """``vllm`` (continuous batching) or ``tgi`` (TGI Neuron's slot batching)."""
    return "vllm" if "vllm" in engine.lower() else "tgi"


@dataclass(frozen=True)
class Load:
    """How a record loaded the host (see the .md: ``concurrency_or_rate``)."""

    kind: str  # static | concurrency | synchronous | rate | throughput
    value: float = 0.0  # batch, clients, or req/s


def load_of(record: dict[str, Any]) -> Load:
    c = record["concurrency_or_rate"]
    kind = c.get("kind")
    if kind == "static_batch":
        return Load("static", float(c.get("value") or record["batch_size"]))
    if kind == "concurrency":
        return Load("concurrency", float(c["value"]))
    mode = c.get("mode")
    if mode == "synchronous":
        return Load("synchronous", 1.0)
    if mode in ("asynchronous", "poisson"):
        return Load("rate", float(c["rate_req_s"]))
    if mode == "constant":  # guidellm's constant rate type: evenly spaced requests
        return Load("constant", float(c["rate_req_s"]))
    if mode == "throughput":
        mc = c.get("max_concurrency")
        # Records without a number ran guidellm's default; 128, the value most of the
        # records that state it used, is assumed (the published runs' Little's-law
        # concurrency, req/s x latency, is 37-90: far below guidellm 0.1.0's 512).
        return Load("throughput", float(mc) if isinstance(mc, int | float) else 128.0)
    raise ValueError(f"record {record.get('id')}: unknown load {c!r}")


def target(record: dict[str, Any]) -> dict[str, float]:
    """The measured figures in the prediction's units: ttft_s, itl_ms, output_tok_per_s.

    Static batch: the batch's TTFT and one decode step; concurrency sweeps (llmperf): p50;
    guidellm: mean; throughput: all of the record's replicas together.
    """
    m = record.get("metrics") or {}
    out: dict[str, float] = {}
    if "ttft_s" in m:
        out["ttft_s"] = m["ttft_s"]
    elif "ttft_ms_p50" in m and record["benchmark_kind"] == "static_batch":
        out["ttft_s"] = m["ttft_ms_p50"] / 1e3
    elif "ttft_s_p50" in m:
        out["ttft_s"] = m["ttft_s_p50"]
    elif "ttft_ms_mean" in m:
        out["ttft_s"] = m["ttft_ms_mean"] / 1e3
    for key in ("itl_ms", "tpot_ms_p50", "itl_ms_p50", "itl_ms_mean"):
        if key in m and not (key == "itl_ms_p50" and "itl_ms_mean" in m):
            out["itl_ms"] = m[key]
            break
    for key in ("output_tok_per_s_e2e", "output_tok_per_s"):
        if key in m:
            out["output_tok_per_s"] = m[key]
            break
    return out


def cpu_sampling(record: dict[str, Any]) -> bool:
    """The record's server sampled decode tokens on the CPU: the optimum-neuron vLLM
    chunked-prefill study's configs B and C ("CPU sampling"); its config D samples decode
    on the device ("on-device sampling for decode, CPU sampling for prefill")."""
    detail = str(record.get("engine_detail", "")).lower()
    return "cpu sampling" in detail and "on-device sampling" not in detail


def rounding_step(record: dict[str, Any], metric: str) -> float:
    """How coarsely the source printed ``metric`` (0: precise). inf2-published.md: the
    optimum-neuron chart labels round TTFT to 0.1 s and ITL to integer milliseconds."""
    if str(record.get("value_precision", "")).startswith("chart bar labels"):
        return {"ttft_s": 0.1, "itl_ms": 1.0}.get(metric, 0.0)
    return 0.0


def kind_of(record: dict[str, Any]) -> str:
    """``static`` or ``served``: the two families of goals."""
    return "static" if record["benchmark_kind"] == "static_batch" else "served"


MAX_CONCURRENCY = 100_000
MAX_RATE = 10_000.0
"""Bounds of a record's load: a published benchmark is far inside them, and past them a
virtual-time run would only eat memory (a concurrency of 10^7 took gigabytes)."""


def _whole(value: Any, low: int = 1, high: int = 10**9) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _problem(record: dict[str, Any]) -> str | None:
    """What makes a record unusable, in words; None when it is fine. The schema's optional
    fields may be absent or null, never of another type."""
    for key in ("tp", "batch_size", "input_tokens", "output_tokens"):
        if not _whole(record[key]):
            return f"{key} must be a whole number above 0, not {record[key]!r}"
    for key in ("sequence_length", "replicas"):
        if record.get(key) is not None and not _whole(record[key]):
            return f"{key} must be a whole number above 0 (or absent), not {record[key]!r}"
    size = record.get("model_params_b")
    if size is not None and not (
        isinstance(size, int | float) and not isinstance(size, bool) and 0 < size <= 10_000
    ):
        return f"model_params_b must be billions of parameters above 0, not {size!r}"
    for key in ("engine", "model_family", "sdk_version", "benchmark_kind"):
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"{key} must be a string (or absent), not {record[key]!r}"
    load = record["concurrency_or_rate"]
    if not isinstance(load, dict):
        return "concurrency_or_rate must be an object (see the schema)"
    kind, mode = load.get("kind"), load.get("mode")
    if kind == "static_batch":
        if load.get("value") is not None and not _whole(load["value"]):
            return f"a static batch's value must be a whole number above 0, not {load['value']!r}"
    elif kind == "concurrency":
        if not _whole(load.get("value"), high=MAX_CONCURRENCY):
            value = load.get("value")
            return f"a concurrency must be a whole number in 1-{MAX_CONCURRENCY}, not {value!r}"
    elif mode in ("asynchronous", "constant", "poisson"):
        rate = load.get("rate_req_s")
        if not (
            isinstance(rate, int | float) and not isinstance(rate, bool) and 0 < rate <= MAX_RATE
        ):
            return f"a {mode} guidellm run needs rate_req_s in (0, {MAX_RATE:g}], not {rate!r}"
    elif mode == "throughput":
        most = load.get("max_concurrency")  # a number, or words for guidellm's default
        if isinstance(most, int | float) and not _whole(most, high=MAX_CONCURRENCY):
            return f"max_concurrency must be a whole number in 1-{MAX_CONCURRENCY}, not {most!r}"
    elif mode != "synchronous":
        return f"unknown load {load!r}: kind static_batch or concurrency, or a guidellm mode"
    return None


def load_records(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The packaged calibration data, or a JSON list in the same schema."""
    if path is None:
        text = resources.files(__package__).joinpath(PACKAGED_DATA).read_text("utf-8")
        source = f"package data {PACKAGED_DATA}"
    else:
        source = str(path)
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read records {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not JSON: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{source}: expected a JSON list of records (objects)")
    required = ("id", "tp", "batch_size", "input_tokens", "output_tokens", "concurrency_or_rate")
    for i, record in enumerate(data):
        name = f"{source}: record #{i} ({record.get('id', 'no id')})"
        missing = [k for k in required if k not in record]
        if missing:
            raise ValueError(f"{name} lacks {', '.join(missing)}")
        problem = _problem(record)
        if problem:
            raise ValueError(f"{name}: {problem}")
    return data
