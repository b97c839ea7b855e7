"""Step durations of one Neuron replica, fitted to published inf2 figures.

Two steps, as in TGI Neuron and vLLM on Neuron (see ``supervisor/simulator/engine.py``):

* **prefill** of ``n`` admitted sequences. optimum-neuron prefills one sequence at a time,
  padded to the compiled length (``inf2-published.md``: TTFT ~linear in batch and flat in
  input length); the AWS transformers-neuronx samples pad to a power-of-two bucket::

      prefill = a0 + n * (a1 * work + a2 * Lp * layers * hidden)
      work = w * Lp * (1 + Lp / L0)     w = params / tp, L0: ``attention_length``

  ``a2``: what every core repeats whatever the tp (``_prefill_columns``).

  A batch-1 model is not faster per sequence than a batched one, it pads less
  (``Shape.padded_input``).

* **decode**: one token for every slot of the compiled batch ``B`` (static Neuron graphs run
  the whole batch), weights and the KV cache of the compiled sequence length ``S`` read
  once per step::

      decode(B) = d0 + d1 * w + d2 * B * w + d3 * B * S * kv_core + d4 * layers * tp

  ``kv_core``: KV bytes per token on one core. A core keeps whole KV heads, so a
  grouped-query model over more cores than KV heads keeps more than ``kv / tp``
  (``records.kv_heads_per_core``, after NxD Inference's sharding): Llama-3-70B at tp 24
  reads 3x the cache a 1/24 share would, and the fit sees it (static ITL error in
  leave-one-tp-out 28 -> 14 %, docs/predict.md).

  A server adds ``per_active_s`` per running request to every step (the router and the
  Python server handle each slot's token: the blog's ITL goes from 29.8 ms with one
  request to 39.1 ms with eight), fitted on the served records.

Each software generation (``records.generation``) and model family gets multipliers of
the fixed and per-sequence prefill and of the per-step and per-slot decode, shrunk
towards 1 (``_multipliers``). The fit minimises *relative*
squared error with non-negative coefficients (each term is a cost), on the static-batch
records; the served records fit ``per_active_s`` and a per-request serving overhead through
the virtual-time simulator (``replay.fit``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .records import (
    cpu_sampling,
    generation,
    heads,
    kv_bytes_per_token,
    kv_heads_per_core,
    load_of,
    rounding_step,
    sdk_tuple,
    target,
)

GENERATIONS = ("tnx", "on-tnx", "on-nxd")
LATEST_GENERATION = "on-nxd"


@dataclass(frozen=True)
class Shape:
    """One replica as compiled: what its step times depend on."""

    params_b: float
    tp: int
    batch_size: int
    sequence_length: int
    kv_bytes: int
    generation: str = LATEST_GENERATION
    family: str | None = None
    """A model family of the calibration (``model_family``) gets its own correction."""
    cpu_sampling: bool = False
    """Decode samples on the host CPU instead of on the device (``records.cpu_sampling``)."""
    heads: tuple[int, int] = (32, 8)
    """(attention heads, KV heads): ``records.HEADS``."""

    @property
    def kv_bytes_per_core(self) -> float:
        """KV cache bytes per token on one core (``records.kv_heads_per_core``)."""
        attention, kv = self.heads
        return self.kv_bytes / kv * kv_heads_per_core(attention, kv, self.tp)

    def padded_input(self, input_tokens: int) -> int:
        """The prompt length a prefill really computes. transformers-neuronx pads to a
        power-of-two bucket: the AWS tables' TTFT grows with the input. The optimum-neuron
        charts' batch-1 TTFT before SDK 2.21 grows with the input too, but linearly (0.1 s
        up to 768 tokens, 0.2 s from 1024 to 1792, chart labels rounded to 0.1 s: a
        power-of-two bucket would double it at 1280), so it is taken as padded to 128;
        batched optimum-neuron models and NxD ones are flat up to the compiled sequence
        length (inf2-published.md, "Bucketing and padding")."""
        if self.generation == "tnx":
            return max(128, 1 << max(0, math.ceil(math.log2(max(input_tokens, 1)))))
        if self.generation == "on-tnx" and self.batch_size == 1:
            return 128 * math.ceil(max(input_tokens, 1) / 128)
        return self.sequence_length

    @classmethod
    def of_record(cls, record: dict[str, Any]) -> Shape:
        params = float(record.get("model_params_b") or 8.0)
        family = record.get("model_family")
        return cls(
            params_b=params,
            tp=int(record["tp"]),
            batch_size=int(record["batch_size"]),
            sequence_length=int(
                record.get("sequence_length") or record["input_tokens"] + record["output_tokens"]
            ),
            kv_bytes=kv_bytes_per_token(family, params),
            generation=generation(record.get("engine", ""), str(record.get("sdk_version", ""))),
            family=(family or "").lower() or None,
            cpu_sampling=cpu_sampling(record),
            heads=heads(family),
        )


def nnls(a: np.ndarray, b: np.ndarray, iterations: int = 500) -> np.ndarray:
    """Non-negative least squares (Lawson & Hanson's active set), small problems only."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(iterations):
        w = a.T @ (b - a @ x)
        if passive.all() or w[~passive].max(initial=-np.inf) <= 1e-12:
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            mask = passive & (z <= 0)
            alpha = np.min(x[mask] / (x[mask] - z[mask]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x


def layers_hidden(params_b: float) -> float:
    """layers x hidden of a dense model of this size: ~131072 (P / 8B)^0.73 fits
    Llama-2-7B/13B, Llama-3-8B/70B (32 x 4096, 40 x 5120, 80 x 8192)."""
    return 131072 * (max(params_b, 0.5) / 8.0) ** 0.73


def attention_length(params_b: float) -> float:
    """The prompt length at which attention costs as much as the weights in a prefill.

    Per token, the weights cost ~2 P FLOPs and attention ~2 L layers hidden (scores and
    values over L earlier tokens), so prefill work ~ P L (1 + L / L0), L0 = P / (2 layers
    hidden). At 16k tokens an 8B prefill costs 5.4x its 4k prefill, not 4x (the blog:
    1.585 s against ~0.29 s per sequence at 4096).
    """
    return params_b * 1e9 / (2 * layers_hidden(params_b))


def _prefill_columns(shape: Shape, sequences: int, input_tokens: int) -> dict[str, float]:
    """A fixed part, the matmul work tp shares (``a1``), and the work every core repeats
    (``a2``): tensor parallelism shards the matmuls only; the norms, residual adds and
    rotary embedding over the whole L x hidden activations of each layer, and the two
    all-reduces of them per layer, do not shrink with tp. Without ``a2`` the fit took tp 24
    to prefill 3x faster than tp 8; published optimum-neuron charts of Llama-2-13B at both
    show 1.8x (bench/predict_holdout.md). A batch-1 model is not faster per sequence than a
    batched one, it pads less (``Shape.padded_input``; the charts' batch-1 TTFT is
    0.1-0.3 s, a batch-4 model's ~0.27 s per sequence padded to 4096)."""
    lp = shape.padded_input(input_tokens)
    work = shape.params_b / shape.tp * lp * (1 + lp / attention_length(shape.params_b)) / 1e3
    repeated = lp * layers_hidden(shape.params_b) / 1e9
    return {"a0": 1.0, "a1": sequences * work, "a2": sequences * repeated}


def layers_of(params_b: float) -> float:
    """Decoder layers of a dense model of this size (Llama-2-7B 32, 13B 40, 70B 80)."""
    return 32 * (max(params_b, 0.5) / 7.5) ** 0.4


def _decode_columns(shape: Shape, batch: int) -> dict[str, float]:
    w = shape.params_b / shape.tp
    return {
        "d0": 1.0,
        "d1": w,
        "d2": batch * w,
        "d3": batch * shape.sequence_length * shape.kv_bytes_per_core / 1e9,
        "d4": layers_of(shape.params_b) * shape.tp / 1e3,
    }


RELATIVE_MISFIT = 0.1
"""The model's typical relative error on a precise value: a rounded value weighs as if it
were ``rounding_sd / RELATIVE_MISFIT`` large (``error_scale``)."""


def error_scale(measured: float, step: float) -> float:
    """What a residual is divided by in the fit: the value itself (relative error), or more
    for a value rounded to ``step`` (a chart's 0.1 s TTFT is 0.05-0.15 s: a 50 % error on
    it is only rounding). Uniform rounding has a standard deviation of step / sqrt(12)."""
    return math.hypot(measured, step / math.sqrt(12) / RELATIVE_MISFIT)


def _solve(rows: list[tuple[dict[str, float], float, float]]) -> dict[str, float]:
    names = sorted({k for cols, _, _ in rows for k in cols})
    a = np.array([[cols.get(n, 0.0) / s for n in names] for cols, _, s in rows])
    x = nnls(a, np.array([y / s for _, y, s in rows]))
    return dict(zip(names, (float(v) for v in x), strict=True))


@dataclass(frozen=True)
class Coverage:
    """What the fit saw: outside of it the model extrapolates (and says so)."""

    params_b: tuple[float, float] = (0.0, 0.0)
    tp: frozenset[int] = frozenset()
    batch_size: tuple[int, int] = (0, 0)
    input_tokens: tuple[int, int] = (0, 0)
    sequence_length: tuple[int, int] = (0, 0)
    generations: frozenset[str] = frozenset()
    sdk_max: tuple[int, ...] = ()
    sdk_min: tuple[int, ...] = ()

    def warnings(self, shape: Shape, input_tokens: int, sdk: str | None = None) -> list[str]:
        out = []
        lo, hi = self.params_b
        if not lo <= shape.params_b <= hi:
            out.append(f"model size {shape.params_b:g}B is outside the calibrated {lo:g}-{hi:g}B")
        if shape.tp not in self.tp:
            seen = ", ".join(str(t) for t in sorted(self.tp))
            out.append(f"tp {shape.tp} was never measured (calibrated: {seen})")
        lo, hi = self.batch_size
        if not lo <= shape.batch_size <= hi:
            out.append(f"batch size {shape.batch_size} is outside the calibrated {lo}-{hi}")
        lo, hi = self.input_tokens
        if not lo <= input_tokens <= hi:
            out.append(f"input length {input_tokens} is outside the calibrated {lo}-{hi} tokens")
        lo, hi = self.sequence_length
        if not lo <= shape.sequence_length <= hi:
            out.append(
                f"sequence length {shape.sequence_length} is outside the calibrated {lo}-{hi}"
            )
        if shape.generation not in self.generations:
            out.append(f"no calibration points for the {shape.generation} software generation")
        version = sdk_tuple(sdk or "")
        if version is not None and self.sdk_max and version > self.sdk_max:
            top = ".".join(str(v) for v in self.sdk_max)
            out.append(f"Neuron SDK {sdk} is newer than any calibration point ({top})")
        if version is not None and self.sdk_min and version < self.sdk_min:
            # older stacks were slower in ways the fit cannot know: the SDK 2.17 table's
            # Llama-2-70B runs 3.2x slower than 2.18's (bench/predict_holdout.md)
            low = ".".join(str(v) for v in self.sdk_min)
            out.append(f"Neuron SDK {sdk} is older than any calibration point ({low})")
        return out


@dataclass(frozen=True)
class TimingModel:
    """Fitted coefficients (seconds) plus the serving parameters and the coverage."""

    coef: dict[str, float] = field(default_factory=dict)
    family_factor: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    """``generation`` and ``family|generation`` -> multipliers of (fixed prefill,
    per-sequence prefill, per-step decode, per-slot decode): what a size-only
    model misses of a software stack or a model family (kernels, GQA, vocabulary)."""
    per_active_s: dict[str, float] = field(default_factory=dict)
    """``engine|generation`` (e.g. ``tgi|on-nxd``) -> seconds per running request per
    decode step (the server's per-token work)."""
    overhead_s: dict[str, float] = field(default_factory=dict)
    """``engine|generation`` -> seconds per request added to TTFT (HTTP, tokenization)."""
    router_ratios: dict[str, float | None] = field(default_factory=dict)
    """``tgi|generation`` -> the router's ``waiting_served_ratio`` that fits (None: new
    requests join at the next step, as in vLLM); see ``queue._tgi_admits``."""
    join_stall_s: dict[str, float] = field(default_factory=dict)
    """``engine|generation`` -> seconds an admission into a running batch pauses the
    requests already decoding, beyond the prefill itself (the joining request's first
    token is not delayed). Fitted: the published TGI guidellm runs' ITL nearly doubles at
    0.5 req/s on three replicas while their TTFT rises by 15 %, far more than the joining
    prefills (~0.3 s each) explain; see docs/predict.md."""
    prefill_exponent: dict[str, float] = field(default_factory=dict)
    """``engine|generation`` -> e: a server's prefill of n admitted requests takes the time
    of one times n^e (1: one sequence after the other, as ``prefill_s``; 0: all in one
    call). Fitted: the published llmperf runs of 2024 (TGI Neuron on transformers-neuronx)
    median a TTFT of 0.3-1.1 s for waves of 11-32 simultaneous requests per replica, where
    one-by-one prefills of 0.3 s would take 1.6-4.6 s."""
    cpu_sampling_factor: float = 1.0
    """Decode step with CPU sampling / with on-device sampling: fitted on the served records
    that sample on the CPU (inf2-published.md: on-device sampling "roughly halves ITL");
    1 when the calibration has none."""
    guidellm_output_fraction: float = 1.0
    """Median share of the requested answer length that the calibration's guidellm runs
    really generated (``replay.realized_output_fraction``: their answers stop at EOS; the
    blog's averaged 293 of 450 tokens). Only replays of guidellm records use it."""
    coverage: Coverage = Coverage()

    def _factors(self, shape: Shape) -> tuple[float, float, float, float]:
        """The generation's corrections times the family's (1 when the fit never saw it)."""
        out = [1.0, 1.0, 1.0, 1.0]
        for key in (shape.generation, f"{shape.family}|{shape.generation}", OWN):
            factors = self.family_factor.get(key)
            if factors:
                out = [a * b for a, b in zip(out, factors, strict=True)]
        return out[0], out[1], out[2], out[3]

    def prefill_parts(self, shape: Shape, sequences: int, input_tokens: int) -> tuple[float, float]:
        """(fixed, per-sequence work) of a prefill before corrections."""
        cols = _prefill_columns(shape, sequences, input_tokens)
        per_sequence = sum(self.coef.get(k, 0.0) * cols[k] for k in ("a1", "a2"))
        return self.coef.get("a0", 0.0), per_sequence

    def decode_parts(self, shape: Shape, batch: int) -> tuple[float, float]:
        """(per step, per slot of the batch) before corrections."""
        cols = _decode_columns(shape, batch)
        fixed = sum(self.coef.get(k, 0.0) * cols[k] for k in ("d0", "d1", "d4"))
        per_batch = sum(self.coef.get(k, 0.0) * cols[k] for k in ("d2", "d3"))
        return fixed, per_batch

    def prefill_s(self, shape: Shape, sequences: int, input_tokens: int) -> float:
        if sequences <= 0:
            return 0.0
        fixed, per_sequence = self.prefill_parts(shape, sequences, input_tokens)
        f = self._factors(shape)
        return fixed * f[0] + per_sequence * f[1]

    def full_decode_s(self, shape: Shape, batch: int) -> float:
        fixed, per_batch = self.decode_parts(shape, batch)
        f = self._factors(shape)
        step = fixed * f[2] + per_batch * f[3]
        return step * self.cpu_sampling_factor if shape.cpu_sampling else step

    def serving_key(self, shape: Shape, engine: str) -> str:
        """The fitted serving terms for this engine and software generation, else the
        engine's on the newest generation fitted (a new stack is assumed to serve like it)."""
        key = f"{engine}|{shape.generation}"
        if key in self.overhead_s:
            return key
        return f"{engine}|{LATEST_GENERATION}"

    def decode_s(self, shape: Shape, active: int, engine: str = "tgi") -> float:
        """One served decode step of the compiled batch with ``active`` requests running."""
        per_active = self.per_active_s.get(self.serving_key(shape, engine), 0.0)
        return self.full_decode_s(shape, shape.batch_size) + per_active * active

    def serving_overhead_s(self, shape: Shape, engine: str) -> float:
        return self.overhead_s.get(self.serving_key(shape, engine), 0.0)

    def router_ratio(self, shape: Shape, engine: str) -> float | None:
        return self.router_ratios.get(self.serving_key(shape, engine))

    def join_stall(self, shape: Shape, engine: str) -> float:
        return self.join_stall_s.get(self.serving_key(shape, engine), 0.0)

    def served_prefill_s(
        self, shape: Shape, sequences: int, input_tokens: int, engine: str = "tgi"
    ) -> float:
        """A server's prefill of ``sequences`` admitted requests (``prefill_exponent``)."""
        exponent = self.prefill_exponent.get(self.serving_key(shape, engine), 1.0)
        if exponent >= 1.0 or sequences <= 1:
            return self.prefill_s(shape, sequences, input_tokens)
        return self.prefill_s(shape, 1, input_tokens) * sequences**exponent

    def with_serving(
        self,
        key: str,
        per_active_s: float,
        overhead_s: float,
        ratio: float | None = None,
        join_stall_s: float = 0.0,
        prefill_exponent: float = 1.0,
    ) -> TimingModel:
        return replace(
            self,
            per_active_s={**self.per_active_s, key: per_active_s},
            overhead_s={**self.overhead_s, key: overhead_s},
            router_ratios={**self.router_ratios, key: ratio},
            join_stall_s={**self.join_stall_s, key: join_stall_s},
            prefill_exponent={**self.prefill_exponent, key: prefill_exponent},
        )

    @classmethod
    def fit_static(cls, records: list[dict[str, Any]]) -> TimingModel:
        """Prefill and decode coefficients from the records that time single steps: static
        batches, and served runs of one request at a time (one prefill of one sequence,
        then decode steps of the compiled batch)."""
        prefill_rows, decode_rows = [], []
        steps = step_records(records)
        for shape, record, n_prefill, n_decode in steps:
            measured = target(record)
            if measured.get("ttft_s"):
                cols = _prefill_columns(shape, n_prefill, record["input_tokens"])
                ttft = measured["ttft_s"]
                prefill_rows.append(
                    (cols, ttft, error_scale(ttft, rounding_step(record, "ttft_s")))
                )
            if measured.get("itl_ms"):
                itl = measured["itl_ms"] / 1e3
                step = rounding_step(record, "itl_ms") / 1e3
                decode_rows.append((_decode_columns(shape, n_decode), itl, error_scale(itl, step)))
        if not prefill_rows or not decode_rows:
            raise ValueError("the calibration holds no static-batch records with TTFT and ITL")
        coef = {**_solve(prefill_rows), **_solve(decode_rows)}
        model = cls(coef=coef, coverage=coverage_of(records))
        for level in ("generation", "family"):
            factors = {**model.family_factor, **_factors(model, steps, level)}
            model = replace(model, family_factor=factors)
        return model


OWN = "calibration"
"""The key of the multipliers fitted on one's own records (``--calibration``) on top of
the published fit: they describe one's host and stack, so they apply to every shape."""


def with_own_records(model: TimingModel, records: list[dict[str, Any]]) -> TimingModel:
    """The model with multipliers that fit one's own measured records on top of it (shrunk
    towards 1 like a family's). Without them ten own points among the published hundreds
    moved a prediction by 5 % for a host twice as slow; with them, most of the way."""
    factors = _factors(model, step_records(records), OWN)
    return replace(model, family_factor={**model.family_factor, **factors})


EXCLUDED_FAMILIES = ("qwen3-30b-a3b-moe",)
"""inf2-published.md: the MoE rows "look inconsistent" (14 s synchronous TTFT at batch 4);
kept out of the fit, still predicted."""


def step_records(
    records: list[dict[str, Any]],
) -> list[tuple[Shape, dict[str, Any], int, int]]:
    """(shape, record, sequences per prefill, decode batch) of the records that time steps."""
    out = []
    for record in records:
        if str(record.get("model_family", "")).lower() in EXCLUDED_FAMILIES or cpu_sampling(
            record
        ):  # CPU-sampling steps are fitted apart (TimingModel.cpu_sampling_factor)
            continue
        load = load_of(record)
        shape = Shape.of_record(record)
        if load.kind == "static":
            out.append((shape, record, int(load.value), int(load.value)))
        elif load.kind == "synchronous" or (load.kind == "concurrency" and load.value == 1):
            out.append((shape, record, 1, shape.batch_size))
    return out


def _factors(
    model: TimingModel, steps: list[tuple[Shape, dict[str, Any], int, int]], level: str
) -> dict[str, tuple[float, float, float, float]]:
    """Per generation (or family|generation): the two prefill and two decode multipliers
    that best fit its records on top of the model so far (relative least squares, >= 0);
    a part its records cannot see (e.g. batch-1 models only) keeps 1."""
    groups: dict[str, list[tuple[Shape, dict[str, Any], int, int]]] = {}
    for step in steps:
        shape = step[0]
        if level == "family" and shape.family is None:
            continue
        if level == OWN:
            key = OWN
        elif level == "generation":
            key = shape.generation
        else:
            key = f"{shape.family}|{shape.generation}"
        groups.setdefault(key, []).append(step)
    out = {}
    for key, members in groups.items():
        pre_rows, dec_rows = [], []
        for shape, record, n_prefill, n_decode in members:
            measured = target(record)
            f = model._factors(shape)
            if measured.get("ttft_s"):
                fixed, per_seq = model.prefill_parts(shape, n_prefill, record["input_tokens"])
                ttft = measured["ttft_s"]
                scale = error_scale(ttft, rounding_step(record, "ttft_s"))
                pre_rows.append(((fixed * f[0], per_seq * f[1]), ttft, scale))
            if measured.get("itl_ms"):
                fixed, per_batch = model.decode_parts(shape, n_decode)
                itl = measured["itl_ms"] / 1e3
                scale = error_scale(itl, rounding_step(record, "itl_ms") / 1e3)
                dec_rows.append(((fixed * f[2], per_batch * f[3]), itl, scale))
        out[key] = (*_multipliers(pre_rows), *_multipliers(dec_rows))
    return out


SHRINK_RECORDS = 4
"""Pseudo-records of "like the rest" that a generation's or family's own multipliers are
weighed against (``_multipliers``)."""


def _multipliers(rows: list[tuple[tuple[float, float], float, float]]) -> tuple[float, float]:
    if not rows:
        return 1.0, 1.0
    a = np.array([[x / s for x in cols] for cols, _, s in rows])
    b = np.array([y / s for _, y, s in rows])
    seen = a.sum(axis=0) > 0
    if not seen.any():
        return 1.0, 1.0
    # a part only seen in proportion to the other (all rows alike) cannot be told apart
    x = np.ones(2)
    x[seen] = nnls(a[:, seen], b)
    if (x[seen] <= 0).any():  # the fit dropped a part: keep the global model's shape
        ratio = float(np.exp(np.median(np.log(b / a.sum(axis=1)))))
        x = np.array([ratio, ratio])
    # shrinkage: a multiplier seen in n records moves n / (n + SHRINK_RECORDS) of the way
    # (in log space) from 1 to its fit, so two records cannot make a stack 10x slower
    n = (a > 0).sum(axis=0)
    x = np.exp(np.log(x) * n / (n + SHRINK_RECORDS))
    return float(x[0]), float(x[1])


def coverage_of(records: list[dict[str, Any]]) -> Coverage:
    shapes = [Shape.of_record(r) for r in records]
    inputs = [int(r["input_tokens"]) for r in records]
    sdks = [v for r in records if (v := sdk_tuple(str(r.get("sdk_version", "")))) is not None]
    return Coverage(
        params_b=(min(s.params_b for s in shapes), max(s.params_b for s in shapes)),
        tp=frozenset(s.tp for s in shapes),
        batch_size=(min(s.batch_size for s in shapes), max(s.batch_size for s in shapes)),
        input_tokens=(min(inputs), max(inputs)),
        sequence_length=(
            min(s.sequence_length for s in shapes),
            max(s.sequence_length for s in shapes),
        ),
        generations=frozenset(s.generation for s in shapes),
        sdk_max=max(sdks) if sdks else (),
        sdk_min=min(sdks) if sdks else (),
    )


def model_to_json(model: TimingModel) -> dict[str, Any]:
    c = model.coverage
    return {
        "coef": model.coef,
        "family_factor": {k: list(v) for k, v in model.family_factor.items()},
        "per_active_s": model.per_active_s,
        "overhead_s": model.overhead_s,
        "router_ratios": model.router_ratios,
        "join_stall_s": model.join_stall_s,
        "prefill_exponent": model.prefill_exponent,
        "cpu_sampling_factor": model.cpu_sampling_factor,
        "guidellm_output_fraction": model.guidellm_output_fraction,
        "coverage": {
            "params_b": list(c.params_b),
            "tp": sorted(c.tp),
            "batch_size": list(c.batch_size),
            "input_tokens": list(c.input_tokens),
            "sequence_length": list(c.sequence_length),
            "generations": sorted(c.generations),
            "sdk_max": list(c.sdk_max),
            "sdk_min": list(c.sdk_min),
        },
    }


def model_from_json(data: dict[str, Any]) -> TimingModel:
    c = data["coverage"]
    return TimingModel(
        coef={k: float(v) for k, v in data["coef"].items()},
        family_factor={
            k: (float(v[0]), float(v[1]), float(v[2]), float(v[3]))
            for k, v in data["family_factor"].items()
        },
        per_active_s={k: float(v) for k, v in data["per_active_s"].items()},
        overhead_s={k: float(v) for k, v in data["overhead_s"].items()},
        router_ratios={
            k: None if v is None else float(v) for k, v in data.get("router_ratios", {}).items()
        },
        join_stall_s={k: float(v) for k, v in data.get("join_stall_s", {}).items()},
        prefill_exponent={k: float(v) for k, v in data.get("prefill_exponent", {}).items()},
        cpu_sampling_factor=float(data.get("cpu_sampling_factor", 1.0)),
        guidellm_output_fraction=float(data.get("guidellm_output_fraction", 1.0)),
        coverage=Coverage(
            params_b=(float(c["params_b"][0]), float(c["params_b"][1])),
            tp=frozenset(int(t) for t in c["tp"]),
            batch_size=(int(c["batch_size"][0]), int(c["batch_size"][1])),
            input_tokens=(int(c["input_tokens"][0]), int(c["input_tokens"][1])),
            sequence_length=(int(c["sequence_length"][0]), int(c["sequence_length"][1])),
            generations=frozenset(c["generations"]),
            sdk_max=tuple(int(v) for v in c["sdk_max"]),
            sdk_min=tuple(int(v) for v in c.get("sdk_min", ())),
        ),
    )


@dataclass(frozen=True)
class SimulatorTiming:
    """The simulator's timing hook (``supervisor.simulator.engine.StepTiming``) from a model."""

    model: TimingModel
    shape: Shape
    engine: str = "tgi"

    def prefill(self, tokens: int, sequences: int = 1) -> float:
        sequences = max(1, sequences)
        return self.model.prefill_s(self.shape, sequences, max(1, tokens // sequences))

    def decode(self, running: int) -> float:
        return self.model.decode_s(self.shape, running, self.engine)
