"""Step durations of one Neuron replica, fitted to published inf2 figures.

Two steps, as in TGI Neuron and vLLM on Neuron (see ``supervisor/simulator/engine.py``):

* **prefill** of ``n`` admitted sequences. optimum-neuron prefills one sequence at a time,
  padded to the compiled length (``inf2-published.md``: TTFT ~linear in batch and flat in
  input length); the AWS transformers-neuronx samples pad to a power-of-two bucket::

      prefill = a0[g] + n * (a1[g] * w * Lp + a2 * w * Lp**2)       w = params / tp

* **decode**: one token for every slot of the compiled batch ``B`` (static Neuron graphs run
  the whole batch), weights and the KV cache of the compiled sequence length ``S`` read
  once per step::

      decode(B) = d0[g] + d1[g] * w + d2[g] * B * w + d3[g] * B * S * kv / tp

  A server adds ``per_active_s`` per running request to every step (the router and the
  Python server handle each slot's token: the blog's ITL goes from 29.8 ms with one
  request to 39.1 ms with eight), fitted on the served records.

``g`` is the software generation (``records.generation``). The fit minimises *relative*
squared error with non-negative coefficients (each term is a cost), on the static-batch
records; the served records fit ``per_active_s`` and a per-request serving overhead through
the virtual-time simulator (``replay.fit``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .records import generation, kv_bytes_per_token, load_of, sdk_tuple, target

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

    def padded_input(self, input_tokens: int) -> int:
        if self.generation == "tnx":
            return max(128, 1 << max(0, math.ceil(math.log2(max(input_tokens, 1)))))
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


def _prefill_columns(shape: Shape, sequences: int, input_tokens: int) -> dict[str, float]:
    w = shape.params_b / shape.tp
    lp = shape.padded_input(input_tokens)
    g = shape.generation
    return {
        f"a0:{g}": 1.0,
        f"a1:{g}": w * lp / 1e3,
        f"a3:{g}": (sequences - 1) * w * lp / 1e3,
        "a2": sequences * w * lp * lp / 1e6,
    }


def _decode_columns(shape: Shape, batch: int) -> dict[str, float]:
    w = shape.params_b / shape.tp
    g = shape.generation
    return {
        f"d0:{g}": 1.0,
        f"d1:{g}": w,
        f"d2:{g}": batch * w,
        f"d3:{g}": batch * shape.sequence_length * shape.kv_bytes / shape.tp / 1e9,
    }


def _solve(rows: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    names = sorted({k for cols, _ in rows for k in cols})
    a = np.array([[cols.get(n, 0.0) / y for n in names] for cols, y in rows])
    x = nnls(a, np.ones(len(rows)))
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
        return out


@dataclass(frozen=True)
class TimingModel:
    """Fitted coefficients (seconds) plus the serving parameters and the coverage."""

    coef: dict[str, float] = field(default_factory=dict)
    family_factor: dict[str, tuple[float, float]] = field(default_factory=dict)
    """``family|generation`` -> (prefill, decode) multipliers: what a size-only model misses
    of that family (GQA, vocabulary, kernels), the geometric mean of measured / fitted."""
    per_active_s: dict[str, float] = field(default_factory=dict)
    """Serving engine (``tgi``, ``vllm``) -> seconds per running request per decode step."""
    overhead_s: dict[str, float] = field(default_factory=dict)
    """Serving engine -> seconds per request added to TTFT (HTTP, tokenization, routing)."""
    coverage: Coverage = Coverage()

    def _eval(self, cols: dict[str, float]) -> float:
        return sum(self.coef.get(k, 0.0) * v for k, v in cols.items())

    def _factor(self, shape: Shape, which: int) -> float:
        factors = self.family_factor.get(f"{shape.family}|{shape.generation}")
        return factors[which] if factors else 1.0

    def prefill_s(self, shape: Shape, sequences: int, input_tokens: int) -> float:
        if sequences <= 0:
            return 0.0
        base = self._eval(_prefill_columns(shape, sequences, input_tokens))
        return base * self._factor(shape, 0)

    def full_decode_s(self, shape: Shape, batch: int) -> float:
        return self._eval(_decode_columns(shape, batch)) * self._factor(shape, 1)

    def decode_s(self, shape: Shape, active: int, engine: str = "tgi") -> float:
        """One served decode step of the compiled batch with ``active`` requests running."""
        per_active = self.per_active_s.get(engine, 0.0)
        return self.full_decode_s(shape, shape.batch_size) + per_active * active

    def with_serving(self, engine: str, per_active_s: float, overhead_s: float) -> TimingModel:
        return replace(
            self,
            per_active_s={**self.per_active_s, engine: per_active_s},
            overhead_s={**self.overhead_s, engine: overhead_s},
        )

    @classmethod
    def fit_static(cls, records: list[dict[str, Any]]) -> TimingModel:
        """Prefill and decode coefficients from the static-batch records."""
        prefill_rows, decode_rows = [], []
        shapes = []
        for record in records:
            if record.get("benchmark_kind") != "static_batch":
                continue
            shape = Shape.of_record(record)
            shapes.append((shape, record))
            measured = target(record)
            n = int(load_of(record).value)
            if measured.get("ttft_s"):
                prefill_rows.append(
                    (_prefill_columns(shape, n, record["input_tokens"]), measured["ttft_s"])
                )
            if measured.get("itl_ms"):
                decode_rows.append((_decode_columns(shape, n), measured["itl_ms"] / 1e3))
        if not prefill_rows or not decode_rows:
            raise ValueError("the calibration holds no static-batch records with TTFT and ITL")
        coef = {**_solve(prefill_rows), **_solve(decode_rows)}
        model = cls(coef=coef, coverage=coverage_of(records))
        logs: dict[str, tuple[list[float], list[float]]] = {}
        for shape, record in shapes:
            if shape.family is None:
                continue
            measured = target(record)
            n = int(load_of(record).value)
            pre, dec = logs.setdefault(f"{shape.family}|{shape.generation}", ([], []))
            if measured.get("ttft_s"):
                fitted = model.prefill_s(shape, n, record["input_tokens"])
                pre.append(math.log(measured["ttft_s"] / fitted))
            if measured.get("itl_ms"):
                dec.append(math.log(measured["itl_ms"] / 1e3 / model.full_decode_s(shape, n)))
        factors = {
            key: (
                math.exp(float(np.median(pre))) if pre else 1.0,
                math.exp(float(np.median(dec))) if dec else 1.0,
            )
            for key, (pre, dec) in logs.items()
        }
        return replace(model, family_factor=factors)


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
    )


def model_to_json(model: TimingModel) -> dict[str, Any]:
    c = model.coverage
    return {
        "coef": model.coef,
        "family_factor": {k: list(v) for k, v in model.family_factor.items()},
        "per_active_s": model.per_active_s,
        "overhead_s": model.overhead_s,
        "coverage": {
            "params_b": list(c.params_b),
            "tp": sorted(c.tp),
            "batch_size": list(c.batch_size),
            "input_tokens": list(c.input_tokens),
            "sequence_length": list(c.sequence_length),
            "generations": sorted(c.generations),
            "sdk_max": list(c.sdk_max),
        },
    }


def model_from_json(data: dict[str, Any]) -> TimingModel:
    c = data["coverage"]
    return TimingModel(
        coef={k: float(v) for k, v in data["coef"].items()},
        family_factor={k: (float(v[0]), float(v[1])) for k, v in data["family_factor"].items()},
        per_active_s={k: float(v) for k, v in data["per_active_s"].items()},
        overhead_s={k: float(v) for k, v in data["overhead_s"].items()},
        coverage=Coverage(
            params_b=(float(c["params_b"][0]), float(c["params_b"][1])),
            tp=frozenset(int(t) for t in c["tp"]),
            batch_size=(int(c["batch_size"][0]), int(c["batch_size"][1])),
            input_tokens=(int(c["input_tokens"][0]), int(c["input_tokens"][1])),
            sequence_length=(int(c["sequence_length"][0]), int(c["sequence_length"][1])),
            generations=frozenset(c["generations"]),
            sdk_max=tuple(int(v) for v in c["sdk_max"]),
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
