"""Timing model of one TGI Neuron replica, on an injectable clock.

Pure asyncio + stdlib (no HTTP): ``server.py`` maps routes onto this module.

The model (what a Neuron replica does, as in TGI's Neuron backend)
-----------------------------------------------------------------
* ``batch_size`` static slots, compiled into the model. Requests that find no free slot wait
  in a FIFO queue; queued + running are capped by ``max_concurrent_requests`` (beyond: 429).
* The batch advances in *steps*. Admission happens only between steps: when slots are free
  and requests are queued, the next step is a **prefill** of all newly admitted requests,
  which lasts ``prefill_base_s + prefill_s_per_token * sum(input tokens)`` and **pauses the
  decoding of every running slot** (the blog's ~1.6 s p99 inter-token latency). A prefill
  yields the first token of each admitted request.
* Otherwise the step is a **decode** step of ``decode_base_s + decode_s_per_slot * running``
  that yields one token for every running slot.
* A request leaves its slot after the step that produced its last token (``max_new_tokens``,
  an EOS drawn with ``eos_probability``, or a stop sequence). A request whose client left is
  dropped at the next step (running) or at once (queued).
* ``speed`` divides every duration (``speed=1000`` makes tests fast). The startup delay is
  wall-clock seconds and is NOT divided by ``speed``.
* Input tokens are counted with a local tokenizer folder (``transformers.AutoTokenizer``,
  loaded lazily in a thread) when one is configured, else estimated as ``ceil(chars / 4)``.
  Without ``max_new_tokens`` the budget is ``max_total_tokens - input_length`` as in TGI,
  capped at ``default_max_new_tokens`` (1024) so a demo request cannot run for minutes.

Constants (``NeuronTiming`` defaults), calibrated on the blog's Llama-3.1-8B, tp 8, batch 8
on inf2.48xlarge (``/work/shared/reference/seed-guidellm-results.json``):

================================  ===========  ===============================================
prefill_s_per_token               0.0997 ms    15,900-token prompt -> TTFT 1.585 s (blog 1.585)
prefill_base_s                    0            not identifiable from the blog
decode_base_s                     28.5 ms      1 running slot -> ITL 29.8 ms (blog 29.8)
decode_s_per_slot                 1.3 ms       8 running slots -> ITL 38.9 ms (blog p50 39.1)
================================  ===========  ===============================================

With these, 3 saturated replicas (prompts 15,900 +/- 100, outputs 450 +/- 50) complete
0.80 req/s in steady state (blog: 0.85); their ITL is 38.9 ms at p50 (blog 39.1), 64 ms on
average (blog 65) and 1.62 s at p99, one prefill pause (blog 1.60 s): see
``tests/test_simulator_engine.py``.

Any ``StepTiming`` can replace these constants: ``simulate-replica --model-size B --tp T``
times the steps with ``neuron-fleet predict``'s model fitted to published inf2 figures
(``supervisor/predict/timing.py``); without it the blog's calibration above stays.

Faults (``FaultConfig``) are decided here, deterministically (per request ordinal and token
counts), and carried out by the server (crash, hang, drop) or the engine (424 generation).
"""

from __future__ import annotations

import asyncio
import enum
import math
import os
import random
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "Clock",
    "Engine",
    "FakeClock",
    "FaultAction",
    "FaultConfig",
    "FaultInjector",
    "GenerateParams",
    "Generation",
    "GenerationError",
    "GenerationSpec",
    "InvalidRequest",
    "Job",
    "MonotonicClock",
    "NeuronBatcher",
    "NeuronTiming",
    "OverloadedError",
    "SimConfig",
    "SimError",
    "Step",
    "StepTiming",
    "Token",
    "TokenCounter",
    "TokenEvent",
    "ValidationError",
    "validate",
]

# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class NeuronTiming:
    """Step durations at ``speed == 1`` (seconds); see the module docstring."""

    prefill_base_s: float = 0.0
    prefill_s_per_token: float = 0.0997e-3
    decode_base_s: float = 0.0285
    decode_s_per_slot: float = 0.0013

    def prefill(self, tokens: int, sequences: int = 1) -> float:
        return self.prefill_base_s + self.prefill_s_per_token * tokens

    def decode(self, running: int) -> float:
        return self.decode_base_s + self.decode_s_per_slot * running


class StepTiming(Protocol):
    """Where step durations come from: ``NeuronTiming`` (the blog's calibration) or a model
    fitted to published figures (``supervisor.predict.timing.SimulatorTiming``)."""

    def prefill(self, tokens: int, sequences: int = 1) -> float: ...

    def decode(self, running: int) -> float: ...


@dataclass(frozen=True)
class FaultConfig:
    """Injected failures. Token counts are 1-based; ``None`` disables a fault.

    crash_after_tokens: the process exits (``os._exit(1)``) once that many tokens were sent,
        counted over all responses.
    hang_after_tokens / drop_after_tokens: each response stops after its Nth token; a hang
        keeps the connection open and silent, a drop closes it without the chunked terminator.
    fail_generation_every: the prefill that admits request #N, #2N, ... fails and takes the
        whole running batch down with 424, as a Neuron backend exception does.
    fail_generation_probability: same, drawn per admitted request from ``SimConfig.seed``.
    poison_prompt: the prefill admitting a request whose prompt contains this text fails (the
        whole batch, as above) on every replica: a request that fails wherever it goes.
    crash_mid_event_probability: per token event, the chance that the process writes half
        of it and exits (a replica dying mid-event); drawn from ``SimConfig.seed``, so
        replicas with different seeds die at different times.
    health_fail: ``/health`` answers 503 (also switchable at runtime).
    """

    crash_after_tokens: int | None = None
    hang_after_tokens: int | None = None
    drop_after_tokens: int | None = None
    fail_generation_every: int | None = None
    fail_generation_probability: float = 0.0
    poison_prompt: str | None = None
    crash_mid_event_probability: float = 0.0
    health_fail: bool = False

    def __post_init__(self) -> None:
        for name in (
            "crash_after_tokens",
            "hang_after_tokens",
            "drop_after_tokens",
            "fail_generation_every",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("fail_generation_probability", "crash_mid_event_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")


@dataclass(frozen=True)
class SimConfig:
    """Everything one simulated replica needs; the CLI and tests build one of these."""

    model_id: str = "simulated/Meta-Llama-3.1-8B-Instruct-neuron"
    host: str = "127.0.0.1"
    port: int = 8080
    batch_size: int = 8
    max_concurrent_requests: int = 128
    max_input_tokens: int = 16000
    max_total_tokens: int = 16512
    default_max_new_tokens: int = 1024
    max_stop_sequences: int = 4
    max_client_batch_size: int = 4
    speed: float = 1.0
    tokenizer: str | None = None
    startup_delay: float = 0.0
    seed: int = 0
    eos_probability: float = 0.0
    keepalive_interval: float = 15.0
    shutdown_timeout: float = 5.0
    timing: StepTiming = NeuronTiming()
    faults: FaultConfig = FaultConfig()
    api_key: str | None = field(default=None, repr=False)
    """TGI's ``--api-key`` / ``API_KEY``: the generation routes and /tokenize need
    ``Authorization: Bearer <key>`` (case-insensitive, as TGI compares), else 401."""
    engine: str = "tgi"
    """The wire it speaks: ``tgi`` (server.py) or ``vllm`` (vllm_server.py). With ``vllm``,
    ``batch_size`` is ``--max-num-seqs``, ``max_total_tokens`` ``--max-model-len``, and a
    device failure kills the engine (every request fails, the server exits)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be >= 1")
        if not 0 < self.max_input_tokens < self.max_total_tokens:
            raise ValueError("need 0 < max_input_tokens < max_total_tokens")
        if self.default_max_new_tokens < 1:
            raise ValueError("default_max_new_tokens must be >= 1")
        if self.speed <= 0:
            raise ValueError("speed must be > 0")
        if self.startup_delay < 0:
            raise ValueError("startup_delay must be >= 0")
        if not 0.0 <= self.eos_probability <= 1.0:
            raise ValueError("eos_probability must be within [0, 1]")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be within [0, 65535]")
        if self.engine not in ("tgi", "vllm"):
            raise ValueError(f"engine must be tgi or vllm, got {self.engine!r}")


# --------------------------------------------------------------------------- errors


class SimError(Exception):
    """An error TGI reports as ``{"error": message, "error_type": error_type}``."""

    status = 500
    error_type = "incomplete_generation"

    def __init__(self, message: str, *, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if error_type is not None:
            self.error_type = error_type


class InvalidRequest(SimError):
    """A body that does not deserialize (axum's rejection, TGI-shaped here): 422."""

    status = 422
    error_type = "validation"


class ValidationError(SimError):
    status = 422
    error_type = "validation"

    def __init__(self, detail: str, *, error_type: str | None = None) -> None:
        super().__init__(f"Input validation error: {detail}", error_type=error_type)


class OverloadedError(SimError):
    status = 429
    error_type = "overloaded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")


class GenerationError(SimError):
    status = 424
    error_type = "generation"

    def __init__(self, detail: str) -> None:
        super().__init__(f"Request failed during generation: {detail}")


# --------------------------------------------------------------------------- clocks


class Clock(Protocol):
    """What the engine needs from time; tests inject ``FakeClock``."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


class FakeClock:
    """Virtual time for a single engine: ``sleep`` jumps ahead at once.

    Exact as long as the engine loop is the only sleeper (one engine per clock).
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        self._now += max(seconds, 0.0)
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- tokens

_WORDS = (
    "the neuron core streams tokens across a static batch while every slot waits for "
    "prefill to finish and decoding resumes with one step per token on inferentia with "
    "tensor parallel shards compiled ahead of time for a fixed sequence length so the "
    "replica serves requests from its queue in order and the balancer keeps each slot busy "
    "model latency throughput cache memory device graph kernel compiler runtime scheduler"
).split()
_WORD_ID_BASE = 1000
DEFAULT_GENERATION_LENGTH = 1024
"""text-generation-inference v3.3.7 router/src/validation.rs: the first chunk of a request's
tokens, the part its total length is checked with."""
EOS_TOKEN_ID = 2
EOS_TOKEN_TEXT = "</s>"


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    text: str
    logprob: float = 0.0
    special: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special}


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token as delivered to a consumer; ``final`` marks the last one."""

    token: Token
    index: int
    at: float
    final: bool


class TokenCounter:
    """Counts input tokens with a local tokenizer folder, else estimates ~4 chars/token.

    The tokenizer (``transformers`` import + load) and every encode run in a worker thread
    so a 16k-token prompt never blocks the event loop. Never touches the Hub.
    """

    CHARS_PER_TOKEN = 4

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._tokenizer: Any = None
        self._lock = asyncio.Lock()

    async def tokenizer(self) -> Any:
        if self.path is None:
            return None
        if self._tokenizer is None:
            async with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = await asyncio.to_thread(_load_tokenizer, self.path)
        return self._tokenizer

    async def count(self, text: str) -> int:
        tok = await self.tokenizer()
        if tok is None:
            return math.ceil(len(text) / self.CHARS_PER_TOKEN)
        ids = await asyncio.to_thread(tok.encode, text, add_special_tokens=True)
        return len(ids)

    async def tokenize(self, text: str) -> list[dict[str, Any]]:
        """TGI's ``/tokenize`` answer: ``[{id, text, start, stop}]`` (char offsets)."""
        tok = await self.tokenizer()
        if tok is None:
            step = self.CHARS_PER_TOKEN
            return [
                {
                    "id": zlib.crc32(text[i : i + step].encode()) % 32000,
                    "text": text[i : i + step],
                    "start": i,
                    "stop": min(i + step, len(text)),
                }
                for i in range(0, len(text), step)
            ]
        enc = await asyncio.to_thread(
            tok, text, add_special_tokens=True, return_offsets_mapping=True
        )
        return [
            {"id": int(i), "text": text[a:b], "start": int(a), "stop": int(b)}
            for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]

    async def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt the model would see: the tokenizer's chat template when it has one
        (and jinja2 is installed), else a plain ``<|role|>`` layout."""
        tok = await self.tokenizer()
        if tok is not None and getattr(tok, "chat_template", None):
            try:
                return await asyncio.to_thread(
                    tok.apply_chat_template, messages, tokenize=False, add_generation_prompt=True
                )
            except ImportError:  # transformers needs jinja2 for templates: count without it
                pass
            except Exception as exc:  # a broken template is the client's 422 in TGI
                raise InvalidRequest(str(exc), error_type="template_error") from exc
        parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
        return "".join(parts) + "<|assistant|>\n"


def _load_tokenizer(path: str) -> Any:
    # Tokenizer-only install: silence the "None of PyTorch, TensorFlow..." advice.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer  # heavy import: only when a tokenizer is used

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class GenerateParams:
    """TGI's ``parameters`` object (the subset that changes what the simulator does)."""

    max_new_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    truncate: int | None = None
    best_of: int | None = None
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False

    @classmethod
    def from_json(cls, raw: Any) -> GenerateParams:
        """Parse like serde would; type errors become TGI-shaped 422s."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise _deserialize_error("parameters", "a map")
        stop = raw.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise _deserialize_error("parameters.stop", "a sequence of strings")
        return cls(
            max_new_tokens=_opt_int(raw, "max_new_tokens", min_value=0),
            seed=_opt_int(raw, "seed", min_value=0),
            stop=tuple(stop),
            temperature=_opt_float(raw, "temperature"),
            top_p=_opt_float(raw, "top_p"),
            top_k=_opt_int(raw, "top_k"),
            repetition_penalty=_opt_float(raw, "repetition_penalty"),
            truncate=_opt_int(raw, "truncate", min_value=0),
            best_of=_opt_int(raw, "best_of", min_value=0),
            details=bool(raw.get("details") or False),
            decoder_input_details=bool(raw.get("decoder_input_details") or False),
            return_full_text=bool(raw.get("return_full_text") or False),
        )


def _deserialize_error(path: str, expected: str) -> InvalidRequest:
    return InvalidRequest(
        f"Failed to deserialize the JSON body into the target type: {path}: expected {expected}"
    )


def _opt_int(raw: Mapping[str, Any], key: str, *, min_value: int | None = None) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _deserialize_error(f"parameters.{key}", "an integer")
    if min_value is not None and value < min_value:
        raise _deserialize_error(f"parameters.{key}", f"an integer >= {min_value}")
    return value


def _opt_float(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _deserialize_error(f"parameters.{key}", "a number")
    return float(value)


@dataclass(frozen=True)
class GenerationSpec:
    """A validated request, ready for the batcher."""

    input_length: int
    max_new_tokens: int
    seed: int | None = None
    stop: tuple[str, ...] = ()
    poisoned: bool = False
    """The prompt contains ``FaultConfig.poison_prompt``: its prefill fails."""


def validate(
    config: SimConfig,
    params: GenerateParams,
    inputs: str,
    input_length: int,
    *,
    stream: bool = False,
) -> GenerationSpec:
    """TGI's router validation (messages as in ``router/src/validation.rs``)."""
    if params.best_of is not None and params.best_of > 1 and stream:
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    if stream and params.decoder_input_details:
        raise ValidationError(
            "`decoder_input_details` == true is not supported when streaming tokens"
        )
    if params.temperature is not None and params.temperature <= 0:
        raise ValidationError("`temperature` must be strictly positive")
    if params.repetition_penalty is not None and params.repetition_penalty <= 0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    if params.top_p is not None and not 0.0 < params.top_p < 1.0:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0")
    if params.top_k is not None and params.top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    if params.max_new_tokens == 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(params.stop) > config.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {config.max_stop_sequences} stop sequences. "
            f"Given: {len(params.stop)}"
        )
    if params.truncate is not None:
        if not 0 < params.truncate <= config.max_input_tokens:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than "
                f"{config.max_input_tokens}. Given: {params.truncate}"
            )
        input_length = min(input_length, params.truncate)
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    if input_length > config.max_input_tokens:
        raise ValidationError(
            f"`inputs` must have less than {config.max_input_tokens} tokens. Given: {input_length}"
        )
    max_new_tokens = params.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = min(config.max_total_tokens - input_length, config.default_max_new_tokens)
    # TGI >= 3.1.1 (v3.3.7 router/src/validation.rs): the check uses the first chunk,
    # min(max_new_tokens, DEFAULT_GENERATION_LENGTH = 1024), so a larger max_new_tokens is
    # accepted; generation still ends at the model's max_total_tokens.
    chunk = min(max_new_tokens, DEFAULT_GENERATION_LENGTH)
    if input_length + chunk > config.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {config.max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {chunk} `max_new_tokens`"
        )
    poison = config.faults.poison_prompt
    return GenerationSpec(
        input_length=input_length,
        max_new_tokens=min(max_new_tokens, config.max_total_tokens - input_length),
        seed=params.seed,
        stop=params.stop,
        poisoned=bool(poison) and poison in inputs,
    )


# --------------------------------------------------------------------------- batching core


@dataclass(eq=False)
class Job:
    """One request inside the batcher: plain state, no I/O."""

    ordinal: int
    input_length: int
    max_new_tokens: int
    rng: random.Random
    stop: tuple[str, ...] = ()
    poisoned: bool = False
    eos_probability: float = 0.0
    queued_at: float = 0.0
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    generated: int = 0
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    failed: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.failed

    def produce(self, now: float) -> TokenEvent:
        """Generate the next token (deterministic from ``rng``); decide whether it is the last."""
        self.generated += 1
        if self.eos_probability and self.rng.random() < self.eos_probability:
            token = Token(EOS_TOKEN_ID, EOS_TOKEN_TEXT, special=True)
            self.finish_reason = "eos_token"
        else:
            word = self.rng.randrange(len(_WORDS))
            token = Token(_WORD_ID_BASE + word, " " + _WORDS[word])
            self.text += token.text
            if any(self.text.endswith(s) for s in self.stop if s):
                self.finish_reason = "stop_sequence"
            elif self.generated >= self.max_new_tokens:
                self.finish_reason = "length"
        if self.first_token_at is None:
            self.first_token_at = now
        if self.finish_reason is not None:
            self.finished_at = now
        return TokenEvent(token, self.generated, now, self.finish_reason is not None)


@dataclass(frozen=True)
class Step:
    """What the device does next, and for how long (already divided by ``speed``)."""

    kind: Literal["prefill", "decode"]
    duration: float
    jobs: tuple[Job, ...]


class NeuronBatcher:
    """Static slots + FIFO queue + step planning: the whole Neuron scheduling model.

    Synchronous and clock-free so it can be driven by the async ``Engine`` or by a
    discrete-event loop (the calibration tests run three of these for 10 virtual minutes).
    """

    def __init__(
        self,
        *,
        batch_size: int,
        max_concurrent_requests: int,
        timing: StepTiming = NeuronTiming(),
        speed: float = 1.0,
    ) -> None:
        self.batch_size = batch_size
        self.max_concurrent_requests = max_concurrent_requests
        self.timing = timing
        self.speed = speed
        self.queue: deque[Job] = deque()
        self.running: list[Job] = []

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def active(self) -> int:
        return len(self.running)

    @property
    def current_max_tokens(self) -> int:
        return sum(j.input_length + j.max_new_tokens for j in self.running)

    def add(self, job: Job) -> None:
        if len(self.queue) + len(self.running) >= self.max_concurrent_requests:
            raise OverloadedError()
        self.queue.append(job)

    def cancel(self, job: Job) -> None:
        """The client left: drop it from the queue now, or from its slot at the next token."""
        job.cancelled = True
        try:
            self.queue.remove(job)
        except ValueError:
            pass

    def admit(self, now: float) -> list[Job]:
        """Move queued requests (skipping cancelled ones) into free slots; return them."""
        admitted: list[Job] = []
        while self.queue and len(self.running) < self.batch_size:
            job = self.queue.popleft()
            if job.cancelled:
                continue
            job.started_at = now
            admitted.append(job)
            self.running.append(job)
        return admitted

    def plan(self, now: float) -> Step | None:
        """Admit queued requests into free slots (-> prefill), else decode, else idle."""
        admitted = self.admit(now)
        if admitted:
            tokens = sum(j.input_length for j in admitted)
            duration = self.timing.prefill(tokens, len(admitted)) / self.speed
            return Step("prefill", duration, tuple(admitted))
        if self.running:
            duration = self.timing.decode(len(self.running)) / self.speed
            return Step("decode", duration, tuple(self.running))
        return None

    def complete(self, step: Step, now: float) -> list[tuple[Job, TokenEvent]]:
        """End a step: one token per member; finished or cancelled members free their slot."""
        events = []
        for job in step.jobs:
            if job.done:
                continue
            if job.cancelled:
                self._release(job)
                continue
            events.append((job, job.produce(now)))
            if job.done:
                self._release(job)
        return events

    def fail_all(self, now: float) -> list[Job]:
        """A device error: every running request fails (TGI answers them all with 424)."""
        failed, self.running = self.running, []
        for job in failed:
            job.failed = True
            job.finished_at = now
        return failed

    def _release(self, job: Job) -> None:
        try:
            self.running.remove(job)
        except ValueError:
            pass


# --------------------------------------------------------------------------- faults


class FaultAction(enum.Enum):
    NONE = "none"
    HANG = "hang"
    DROP = "drop"
    CRASH = "crash"


class FaultInjector:
    """Runtime state of the configured faults; decisions only, the caller acts."""

    def __init__(self, faults: FaultConfig, seed: int = 0) -> None:
        self.config = faults
        self.health_fail = faults.health_fail
        self.tokens_sent = 0
        self._rng = random.Random(seed ^ 0x5EED)

    def after_token_sent(self, response_tokens: int) -> FaultAction:
        """Call after each token leaves for a client; ``response_tokens`` counts this response."""
        self.tokens_sent += 1
        c = self.config
        if c.crash_after_tokens is not None and self.tokens_sent >= c.crash_after_tokens:
            return FaultAction.CRASH
        if c.drop_after_tokens is not None and response_tokens >= c.drop_after_tokens:
            return FaultAction.DROP
        if c.hang_after_tokens is not None and response_tokens >= c.hang_after_tokens:
            return FaultAction.HANG
        return FaultAction.NONE

    def tears_next_event(self) -> bool:
        """Die in the middle of the next event (``crash_mid_event_probability``)."""
        p = self.config.crash_mid_event_probability
        return bool(p) and self._rng.random() < p

    def prefill_fails(self, jobs: Iterable[Job]) -> bool:
        c = self.config
        for job in jobs:
            if job.poisoned:
                return True
            if c.fail_generation_every is not None and job.ordinal % c.fail_generation_every == 0:
                return True
            if c.fail_generation_probability and self._rng.random() < c.fail_generation_probability:
                return True
        return False


# --------------------------------------------------------------------------- async engine


class Generation:
    """A consumer's handle on one request: iterate tokens, or ``cancel()`` when the client left.

    Iteration raises ``GenerationError`` if the batch failed.
    """

    def __init__(self, engine: Engine, job: Job) -> None:
        self.job = job
        self._engine = engine
        self._events: asyncio.Queue[TokenEvent | SimError] = asyncio.Queue()
        self._ended = False

    @property
    def input_length(self) -> int:
        return self.job.input_length

    async def next(self, max_wait: float | None = None) -> TokenEvent | None:
        """The next token, or ``None`` if ``max_wait`` seconds pass first (SSE keep-alive)."""
        try:
            item = await asyncio.wait_for(self._events.get(), max_wait)
        except TimeoutError:
            return None
        if isinstance(item, SimError):
            self._ended = True
            raise item
        if item.final:
            self._ended = True
        return item

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenEvent]:
        while not self._ended:
            event = await self.next()
            assert event is not None
            yield event

    def cancel(self) -> None:
        """Free the slot at the next token (no-op once finished)."""
        if not self.job.done:
            self._engine.batcher.cancel(self.job)
            self._engine._generations.pop(self.job.ordinal, None)

    def _push(self, item: TokenEvent | SimError) -> None:
        self._events.put_nowait(item)


class Engine:
    """Drives a ``NeuronBatcher`` on a clock and hands tokens to ``Generation`` handles."""

    def __init__(
        self,
        config: SimConfig,
        *,
        clock: Clock | None = None,
        batcher: type[NeuronBatcher] | None = None,
    ) -> None:
        """``batcher``: the scheduling policy (default TGI Neuron's ``NeuronBatcher``; vLLM's
        is ``vllm_scheduler.ContinuousBatcher``)."""
        self.config = config
        self.clock: Clock = clock or MonotonicClock()
        self.batcher = (batcher or NeuronBatcher)(
            batch_size=config.batch_size,
            max_concurrent_requests=config.max_concurrent_requests,
            timing=config.timing,
            speed=config.speed,
        )
        self.tokens = TokenCounter(config.tokenizer)
        self.faults = FaultInjector(config.faults, config.seed)
        self.steps: dict[str, int] = {"prefill": 0, "decode": 0}
        self._generations: dict[int, Generation] = {}
        self._ordinal = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> int:
        return self.batcher.active

    @property
    def queued(self) -> int:
        return self.batcher.queued

    def submit(self, spec: GenerationSpec) -> Generation:
        """Queue a validated request (raises ``OverloadedError`` past the concurrency cap)."""
        self._ordinal += 1
        seed = spec.seed if spec.seed is not None else self.config.seed * 1_000_003 + self._ordinal
        job = Job(
            ordinal=self._ordinal,
            input_length=spec.input_length,
            max_new_tokens=spec.max_new_tokens,
            rng=random.Random(seed),
            stop=spec.stop,
            poisoned=spec.poisoned,
            eos_probability=self.config.eos_probability,
            queued_at=self.clock.now(),
        )
        self.batcher.add(job)
        generation = Generation(self, job)
        self._generations[job.ordinal] = generation
        self._ensure_running()
        self._wake.set()
        return generation

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for job in self.batcher.fail_all(self.clock.now()):
            gen = self._generations.pop(job.ordinal, None)
            if gen is not None:
                gen._push(GenerationError("server shutting down"))

    def die(self, error: SimError) -> None:
        """The engine is gone for good (vLLM's EngineCore died): stop stepping, and every
        request, running or waiting, gets ``error``."""
        if self._task is not None:
            self._task.cancel()
        now = self.clock.now()
        self.batcher.fail_all(now)
        for job in self.batcher.queue:
            job.failed = True
        self.batcher.queue.clear()
        generations, self._generations = self._generations, {}
        for gen in generations.values():
            gen._push(error)

    async def _run(self) -> None:
        while True:
            step = self.batcher.plan(self.clock.now())
            if step is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.steps[step.kind] += 1
            await self.clock.sleep(step.duration)
            now = self.clock.now()
            if step.kind == "prefill" and self.faults.prefill_fails(step.jobs):
                error = GenerationError("simulated Neuron device failure (fault injection)")
                for job in self.batcher.fail_all(now):
                    gen = self._generations.pop(job.ordinal, None)
                    if gen is not None:
                        gen._push(error)
                continue
            for job, event in self.batcher.complete(step, now):
                gen = self._generations.get(job.ordinal)
                if gen is None:
                    continue
                gen._push(event)
                if event.final:
                    del self._generations[job.ordinal]
            for job in step.jobs:  # cancelled members left their slot: forget them
                if job.cancelled:
                    self._generations.pop(job.ordinal, None)
