"""``neuron-fleet simulate-replica``: one simulated TGI Neuron replica.

Flags win; when a flag is absent the TGI Neuron image's environment is read (``PORT``,
``MODEL_ID``, ``MAX_BATCH_SIZE``, ``MAX_INPUT_TOKENS``, ``MAX_TOTAL_TOKENS``,
``MAX_CONCURRENT_REQUESTS``) so the simulator can stand in for ``text-generation-launcher``.
Secrets such as ``HF_TOKEN`` are never read nor logged.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from .engine import FaultConfig, NeuronTiming, SimConfig, StepTiming

DEFAULT_PORT = 8080
DEFAULT_MAX_INPUT_TOKENS = SimConfig.max_input_tokens
DEFAULT_MAX_TOTAL_TOKENS = SimConfig.max_total_tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    add(
        "--engine",
        choices=("tgi", "vllm"),
        default="tgi",
        help="wire format: TGI 3.3.7's (default) or vLLM 0.11's OpenAI server",
    )
    add("--max-num-seqs", type=int, help="vLLM's name for --batch-size")
    add("--max-model-len", type=int, help="vLLM's name for --max-total-tokens")
    add("--port", type=int, help=f"port to bind (env PORT, default {DEFAULT_PORT}; 0 = any)")
    add("--model-id", help="model name reported by /info (env MODEL_ID)")
    add("--batch-size", type=int, help="static batch slots (env MAX_BATCH_SIZE, default 8)")
    add(
        "--max-concurrent-requests",
        type=int,
        help="queued + running cap before 429 (env MAX_CONCURRENT_REQUESTS, default 128)",
    )
    add("--max-input-tokens", type=int, help="env MAX_INPUT_TOKENS (default 16000)")
    add("--max-total-tokens", type=int, help="env MAX_TOTAL_TOKENS (default 16512)")
    add(
        "--default-max-new-tokens",
        type=int,
        default=SimConfig.default_max_new_tokens,
        help="cap on max_total_tokens - input when a request gives no max_new_tokens",
    )
    add("--speed", type=float, default=1.0, help="divides every simulated duration")
    add("--tokenizer", help="local tokenizer folder (default: MODEL_ID if it is a folder)")
    add("--startup-delay", type=float, default=0.0, help="seconds before the port opens")
    add("--seed", type=int, default=0, help="seed of the generated pseudo-words")
    add("--eos-probability", type=float, default=0.0, help="per-token chance of an EOS")
    add("--keepalive-interval", type=float, default=15.0, help="SSE ':' keep-alive (s)")
    timing = parser.add_argument_group("timing model (speed 1)")
    base = NeuronTiming()
    timing.add_argument(
        "--prefill-ms-per-token", type=float, default=base.prefill_s_per_token * 1e3
    )
    timing.add_argument("--prefill-base-ms", type=float, default=base.prefill_base_s * 1e3)
    timing.add_argument("--decode-base-ms", type=float, default=base.decode_base_s * 1e3)
    timing.add_argument("--decode-ms-per-slot", type=float, default=base.decode_s_per_slot * 1e3)
    fitted = parser.add_argument_group(
        "fitted timing (neuron-fleet predict's model; replaces the four flags above)"
    )
    fitted.add_argument(
        "--model-size", type=float, help="parameters in billions: time steps like that model"
    )
    fitted.add_argument("--tp", type=int, default=8, help="NeuronCores per replica (default 8)")
    fitted.add_argument("--model-family", help="e.g. llama-3.1-8b (its own correction)")
    fitted.add_argument("--sdk", default="2.24.0", help="Neuron SDK version (default 2.24.0)")
    faults = parser.add_argument_group("fault injection")
    faults.add_argument(
        "--crash-after-tokens", type=int, metavar="N", help="os._exit(1) after N tokens in total"
    )
    faults.add_argument(
        "--hang-after-tokens", type=int, metavar="N", help="each response goes silent after N"
    )
    faults.add_argument(
        "--drop-after-tokens", type=int, metavar="N", help="each response's connection closes"
    )
    faults.add_argument(
        "--fail-generation-every",
        type=int,
        metavar="N",
        help="the prefill admitting request #N, #2N, ... fails the batch with 424",
    )
    faults.add_argument(
        "--fail-generation-probability",
        type=float,
        default=0.0,
        metavar="P",
        help="per admitted request, seeded by --seed",
    )
    faults.add_argument(
        "--poison-prompt",
        metavar="TEXT",
        help="the prefill admitting a prompt that contains TEXT fails the batch with 424",
    )
    faults.add_argument(
        "--crash-mid-event-probability",
        type=float,
        default=0.0,
        metavar="P",
        help="per token event: write half of it and os._exit(1); seeded by --seed",
    )
    faults.add_argument("--health-fail", action="store_true", help="/health answers 503")
    add("--log-level", default="INFO", help="logging level (default INFO)")


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"simulate-replica: {name}={value!r} is not an integer") from None


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> SimConfig:
    """Flags, then TGI's environment variables, then defaults."""
    env = os.environ if env is None else env

    def pick(flag: int | None, name: str) -> int | None:
        return flag if flag is not None else _env_int(env, name)

    max_input = pick(args.max_input_tokens, "MAX_INPUT_TOKENS")
    max_total = pick(args.max_total_tokens, "MAX_TOTAL_TOKENS")
    if args.max_model_len is not None:
        max_total = args.max_model_len
        max_input = max_input if max_input is not None else max_total - 1
    if args.max_num_seqs is not None:
        args.batch_size = args.max_num_seqs
    if max_input is None and max_total is None:
        max_input, max_total = DEFAULT_MAX_INPUT_TOKENS, DEFAULT_MAX_TOTAL_TOKENS
    elif max_input is None:
        assert max_total is not None
        max_input = max_total // 2  # the Neuron entry point's default
    elif max_total is None:
        max_total = max(DEFAULT_MAX_TOTAL_TOKENS, max_input + 1)

    model_id = args.model_id or env.get("MODEL_ID") or SimConfig.model_id
    tokenizer = args.tokenizer
    if tokenizer is None and (Path(model_id) / "tokenizer.json").is_file():
        tokenizer = model_id
    port = pick(args.port, "PORT")
    batch_size = pick(args.batch_size, "MAX_BATCH_SIZE")
    max_concurrent = pick(args.max_concurrent_requests, "MAX_CONCURRENT_REQUESTS")
    try:
        return SimConfig(
            model_id=model_id,
            host=args.host,
            port=DEFAULT_PORT if port is None else port,
            batch_size=SimConfig.batch_size if batch_size is None else batch_size,
            max_concurrent_requests=(
                SimConfig.max_concurrent_requests if max_concurrent is None else max_concurrent
            ),
            max_input_tokens=max_input,
            max_total_tokens=max_total,
            default_max_new_tokens=args.default_max_new_tokens,
            speed=args.speed,
            tokenizer=tokenizer,
            startup_delay=args.startup_delay,
            seed=args.seed,
            eos_probability=args.eos_probability,
            api_key=env.get("API_KEY") or None,
            keepalive_interval=args.keepalive_interval,
            engine=args.engine,
            timing=_timing(args, batch_size or SimConfig.batch_size, max_total),
            faults=FaultConfig(
                crash_after_tokens=args.crash_after_tokens,
                hang_after_tokens=args.hang_after_tokens,
                drop_after_tokens=args.drop_after_tokens,
                fail_generation_every=args.fail_generation_every,
                fail_generation_probability=args.fail_generation_probability,
                poison_prompt=args.poison_prompt,
                crash_mid_event_probability=args.crash_mid_event_probability,
                health_fail=args.health_fail,
            ),
        )
    except ValueError as exc:
        raise SystemExit(f"simulate-replica: {exc}") from None


def _timing(args: argparse.Namespace, batch_size: int, max_total: int) -> StepTiming:
    """The blog's calibration (flags) unless ``--model-size`` asks for the fitted model."""
    if getattr(args, "model_size", None) is None:
        return NeuronTiming(
            prefill_base_s=args.prefill_base_ms / 1e3,
            prefill_s_per_token=args.prefill_ms_per_token / 1e3,
            decode_base_s=args.decode_base_ms / 1e3,
            decode_s_per_slot=args.decode_ms_per_slot / 1e3,
        )
    from supervisor.predict.records import generation, heads, kv_bytes_per_token
    from supervisor.predict.replay import packaged_model
    from supervisor.predict.timing import Shape, SimulatorTiming

    shape = Shape(
        params_b=args.model_size,
        tp=args.tp,
        batch_size=batch_size,
        sequence_length=max_total,
        kv_bytes=kv_bytes_per_token(args.model_family, args.model_size),
        generation=generation("optimum-neuron", args.sdk),
        family=args.model_family.lower() if args.model_family else None,
        heads=heads(args.model_family),
    )
    from supervisor.predict.plan import Layout

    layout = Layout(1, shape)
    if not layout.fits():  # simulated anyway: a what-if; the real export would not load
        logging.getLogger(__name__).warning(
            "a %gB model at tp %d, batch %d, %d tokens needs %.1f GB per NeuronCore: it "
            "would not load on inf2 (simulated anyway)",
            args.model_size, args.tp, batch_size, max_total, layout.memory_per_core_gb(),
        )  # fmt: skip
    return SimulatorTiming(packaged_model(), shape)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=getattr(logging, str(args.log_level).upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    from .server import run as run_server  # aiohttp/uvloop only when actually serving

    return run_server(config)
