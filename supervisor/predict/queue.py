"""A host of Neuron replicas under load, in virtual time (discrete events, no sleeping).

Serving under load is a queue, not a formula: TTFT is mostly waiting, and on TGI Neuron
every admission pauses the decoding of the whole batch (``supervisor/simulator/engine.py``).
This module runs the same scheduling as the simulator's ``NeuronBatcher``, with step
durations from a ``TimingModel``:

* ``tgi`` (TGI Neuron): between steps, queued requests that fit in free slots are
  admitted together in one prefill step (one sequence after the other), which pauses
  decoding; while a batch runs, TGI's router may hold them back (``_tgi_admits``).
* ``vllm`` (vLLM, ``max-num-seqs`` = batch size): one request is prefilled per step and
  the running batch decodes one step between two prefills, so streams keep flowing.

Decode steps are advanced many at a time (until the next request finishes or the next
arrival), so a sweep of hundreds of configurations runs in seconds.

Routing of arrivals over the replicas:
``fleet`` (neuron-fleet's balancer: one host queue, a request goes to a replica with a free
slot, ``max_inflight_per_replica`` = batch size), ``least-outstanding`` and
``round-robin`` (per-replica queues, nginx's default).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .timing import Shape, TimingModel

POLICIES = ("fleet", "least-outstanding", "round-robin")
MAX_WAITING_TOKENS = 20
"""TGI router's ``--max-waiting-tokens`` default (text-generation-inference router, clap
``default_value = "20"``)."""
ENGINES = ("tgi", "vllm")


@dataclass(eq=False)
class Request:
    arrival: float
    input_tokens: int
    output_tokens: int
    client: int = -1
    first_token_at: float | None = None
    finished_at: float | None = None
    generated: int = 0


@dataclass
class Workload:
    """Token lengths (mean and standard deviation) and the load."""

    input_tokens: int
    output_tokens: int
    input_stddev: float = 0.0
    output_stddev: float = 0.0
    rate: float | None = None
    """Poisson arrivals per second (open loop), else closed loop with ``concurrency``."""
    constant: bool = False
    """Arrivals evenly spaced at ``rate`` instead of Poisson (guidellm's constant rate type)."""
    concurrency: int = 1
    max_requests: int | None = None
    waves: bool = False
    """Closed loop in waves: the next ``concurrency`` requests start only once the whole
    previous wave has finished (llmperf before its 2024-12-09 fix, ``replay.LLMPERF_WAVES``)."""
    duration_s: float = 120.0
    seed: int = 0

    def with_load(self, **load: Any) -> Workload:
        """The same token lengths and seed under another load (``rate``, ``concurrency``,
        ``max_requests``, ``waves``, ``duration_s``; those not given at their defaults)."""
        return Workload(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            input_stddev=self.input_stddev,
            output_stddev=self.output_stddev,
            seed=self.seed,
            **load,
        )


@dataclass
class Result:
    requests: list[Request]
    duration_s: float

    @property
    def completed(self) -> list[Request]:
        return [r for r in self.requests if r.finished_at is not None]

    def ttft_s(self) -> list[float]:
        return sorted(r.first_token_at - r.arrival for r in self.completed)  # type: ignore[operator]

    def itl_ms(self) -> list[float]:
        out = []
        for r in self.completed:
            if r.output_tokens > 1:
                out.append((r.finished_at - r.first_token_at) / (r.output_tokens - 1) * 1e3)  # type: ignore[operator]
        return sorted(out)

    def llmperf_itl_ms(self) -> list[float]:
        """llmperf's "inter-token latency": the whole request (TTFT included) over its
        output tokens. ray-project/llmperf ``openai_chat_completions_client.py`` sums every
        gap from the request's start (``INTER_TOKEN_LAT = sum(time_to_next_token)``, the
        first gap being the TTFT) and ``token_benchmark_ray.py`` divides it by the number
        of output tokens; under load the queueing before the first token dominates it."""
        out = []
        for r in self.completed:
            out.append((r.finished_at - r.arrival) / max(r.output_tokens, 1) * 1e3)  # type: ignore[operator]
        return sorted(out)

    def output_tok_per_s(self) -> float:
        tokens = sum(r.output_tokens for r in self.completed)
        return tokens / self.duration_s if self.duration_s > 0 else 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank on sorted values (nan when empty)."""
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@dataclass(eq=False)
class _Replica:
    index: int
    shape: Shape
    model: TimingModel
    engine: str
    running: list[Request] = field(default_factory=list)
    queue: deque[Request] = field(default_factory=deque)
    busy: bool = False
    version: int = 0
    step_start: float = 0.0
    step_kind: str = ""
    step_len: float = 0.0
    steps_planned: int = 0
    admitted: list[Request] = field(default_factory=list)
    last_was_prefill: bool = False
    overhead_s: float = 0.0
    router_ratio: float | None = None
    join_stall_s: float = 0.0
    step_stall: float = 0.0
    waiting_steps: int = 0

    def __post_init__(self) -> None:
        self.overhead_s = self.model.serving_overhead_s(self.shape, self.engine)
        self.join_stall_s = self.model.join_stall(self.shape, self.engine)
        if self.engine == "tgi":
            self.router_ratio = self.model.router_ratio(self.shape, self.engine)

    @property
    def outstanding(self) -> int:
        return len(self.running) + len(self.queue)

    @property
    def free(self) -> int:
        return self.shape.batch_size - len(self.running)


class HostSimulation:
    """Replicas + routing + clients on one event heap."""

    def __init__(
        self,
        model: TimingModel,
        shape: Shape,
        replicas: int,
        *,
        engine: str = "tgi",
        policy: str = "fleet",
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: use one of {', '.join(ENGINES)}")
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: use one of {', '.join(POLICIES)}")
        self.model = model
        self.policy = policy
        self.replicas = [_Replica(i, shape, model, engine) for i in range(replicas)]
        self.host_queue: deque[Request] = deque()
        self._heap: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self._rr = 0
        self.now = 0.0

    # -- events ------------------------------------------------------------------------

    def _push(self, at: float, kind: str, payload: object) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), kind, payload))

    def run(self, workload: Workload) -> Result:
        rng = random.Random(workload.seed)

        def draw(mu: int, sd: float) -> int:
            return max(1, round(rng.gauss(mu, sd))) if sd > 0 else max(1, mu)

        limit = workload.max_requests
        requests: list[Request] = []

        def new_request(at: float, client: int) -> None:
            if limit is not None and len(requests) >= limit:
                return
            if at >= workload.duration_s:
                return
            request = Request(
                arrival=at,
                input_tokens=draw(workload.input_tokens, workload.input_stddev),
                output_tokens=draw(workload.output_tokens, workload.output_stddev),
                client=client,
            )
            requests.append(request)
            self._push(at, "arrive", request)

        if workload.rate is not None:
            t = 0.0
            while t < workload.duration_s and (limit is None or len(requests) < limit):
                t += 1 / workload.rate if workload.constant else rng.expovariate(workload.rate)
                new_request(t, -1)
        else:
            for client in range(workload.concurrency):
                new_request(0.0, client)

        end = workload.duration_s
        in_wave = len(requests)
        while self._heap:
            at, _, kind, payload = heapq.heappop(self._heap)
            self.now = at
            if kind == "arrive":
                self._route(payload)  # type: ignore[arg-type]
            elif kind == "wake":
                if not payload.busy:  # type: ignore[attr-defined]
                    self._plan(payload)  # type: ignore[arg-type]
            else:
                replica, version = payload  # type: ignore[misc]
                if version != replica.version:
                    continue
                for done in self._end_step(replica):
                    if done.client < 0:
                        continue
                    if not workload.waves:
                        new_request(self.now, done.client)
                        continue
                    in_wave -= 1
                    if in_wave == 0:  # the whole wave is back: the next one starts
                        before = len(requests)
                        for client in range(workload.concurrency):
                            new_request(self.now, client)
                        in_wave = len(requests) - before
                self._plan(replica)
        finished = [r.finished_at for r in requests if r.finished_at is not None]
        if math.isinf(workload.duration_s):
            # a fixed number of requests (llmperf, guidellm synchronous, an SLO search's
            # Poisson run): until the last ends, every request counted
            return Result(requests, max(finished, default=0.0))
        for r in requests:  # a timed run (guidellm) counts what completed within it
            if r.finished_at is not None and r.finished_at > end:
                r.finished_at = None
        return Result(requests, end)

    # -- routing -----------------------------------------------------------------------

    def _route(self, request: Request) -> None:
        replicas = self.replicas
        if self.policy == "round-robin":
            target = replicas[self._rr % len(replicas)]
            self._rr += 1
        elif self.policy == "least-outstanding":
            target = min(
                replicas, key=lambda r: (r.outstanding, (r.index - self._rr) % len(replicas))
            )
            self._rr += 1
        else:
            free = [r for r in replicas if r.free - len(r.queue) > 0]
            if not free:
                self.host_queue.append(request)
                return
            target = min(free, key=lambda r: (r.outstanding, r.index))
        target.queue.append(request)
        self._wake(target)

    def _wake(self, replica: _Replica) -> None:
        """A request waits on this replica: plan if idle, else stop a decode run early.
        An idle replica plans after every arrival of this instant is routed (an event at
        the same time, queued behind them): requests that arrive together are admitted
        together, as TGI's router takes all that is queued when its loop next runs (an
        llmperf wave of 8 clients on 3 idle replicas got its first tokens in one prefill's
        time, 0.31 s against 0.29 s alone)."""
        if not replica.busy:
            self._push(self.now, "wake", replica)
            return
        if replica.step_kind != "decode" or replica.free <= 0 or replica.steps_planned <= 1:
            return
        done = max(1, math.ceil((self.now - replica.step_start) / replica.step_len - 1e-9))
        if done < replica.steps_planned:
            replica.steps_planned = done
            replica.version += 1
            self._push(
                replica.step_start + done * replica.step_len, "step", (replica, replica.version)
            )

    # -- steps -------------------------------------------------------------------------

    def _pull(self, replica: _Replica) -> None:
        while self.host_queue and replica.free - len(replica.queue) > 0:
            replica.queue.append(self.host_queue.popleft())

    def _plan(self, replica: _Replica) -> None:
        self._pull(replica)
        shape, model = replica.shape, replica.model
        admit = 0
        if replica.queue and replica.free > 0:
            if replica.engine == "vllm":
                admit = 0 if (replica.last_was_prefill and replica.running) else 1
            else:
                admit = _tgi_admits(replica)
        if admit:
            batch = [replica.queue.popleft() for _ in range(min(admit, len(replica.queue)))]
            # joining a running batch also pauses it (TimingModel.join_stall_s)
            replica.step_stall = replica.join_stall_s if replica.running else 0.0
            replica.admitted = batch
            replica.running.extend(batch)
            longest = max(r.input_tokens for r in batch)
            prefill = model.served_prefill_s(shape, len(batch), longest, replica.engine)
            duration = prefill + replica.step_stall
            self._start(replica, "prefill", duration, 1)
            replica.last_was_prefill = True
            replica.waiting_steps = 1
            return
        replica.last_was_prefill = False
        if not replica.running:
            replica.busy = False
            return
        step = model.decode_s(shape, len(replica.running), replica.engine)
        steps = min(r.output_tokens - r.generated for r in replica.running)
        if replica.free > 0 and (replica.queue or self.host_queue):
            if replica.engine == "vllm" or replica.router_ratio is None:
                steps = 1  # vLLM: decode once between two prefills
            else:  # TGI's router: until enough wait, or max_waiting_tokens steps passed
                steps = min(steps, max(1, MAX_WAITING_TOKENS - replica.waiting_steps))
        self._start(replica, "decode", step, max(1, steps))

    def _start(self, replica: _Replica, kind: str, step: float, steps: int) -> None:
        replica.busy = True
        replica.step_kind = kind
        replica.step_start = self.now
        replica.step_len = max(step, 1e-9)
        replica.steps_planned = steps
        replica.version += 1
        self._push(self.now + replica.step_len * steps, "step", (replica, replica.version))

    def _end_step(self, replica: _Replica) -> list[Request]:
        finished = []
        if replica.step_kind == "prefill":
            for r in replica.admitted:
                r.generated = 1
                r.first_token_at = self.now - replica.step_stall + replica.overhead_s
            replica.admitted = []
        else:
            replica.waiting_steps += replica.steps_planned
            for r in replica.running:
                r.generated += replica.steps_planned
        keep = []
        for r in replica.running:
            if r.generated >= r.output_tokens:
                r.finished_at = self.now + replica.overhead_s
                finished.append(r)
            else:
                keep.append(r)
        replica.running = keep
        return finished


def _tgi_admits(replica: _Replica) -> int:
    """How many waiting requests TGI's router adds to a running batch now.

    text-generation-inference ``backends/v2/src/backend.rs`` ``batching_task``: an idle
    replica takes what waits at once; while a batch runs, a new batch joins only when at
    least ``floor(running * waiting_served_ratio)`` requests can join, or once
    ``max_waiting_tokens`` decode steps passed since the last admission.
    """
    take = min(len(replica.queue), replica.free)
    ratio = replica.router_ratio
    if not replica.running or ratio is None or replica.waiting_steps >= MAX_WAITING_TOKENS:
        return take
    return take if take >= math.floor(len(replica.running) * ratio) else 0
