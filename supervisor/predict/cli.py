"""``neuron-fleet predict``: simulate a layout in virtual time before renting the host.

    neuron-fleet predict --config fleet.toml --input-tokens 1500 --output-tokens 250 \\
        --rate 2 --ttft-slo 2
    neuron-fleet predict --model-size 8 --input-tokens 15900 --output-tokens 450 --sweep \\
        --ttft-slo 5 --plot sweep.png
    neuron-fleet predict --records FILE --json

Warnings about extrapolation go to stderr; the JSON on stdout keeps its schema.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import tomllib
import unicodedata
from pathlib import Path
from typing import Any

from .plan import Layout, at_rate, capacity, layouts, max_rate_within_slo, plot, simulate, sweep
from .queue import ENGINES, POLICIES, Workload
from .records import (
    KV_BYTES_PER_TOKEN,
    generation,
    heads,
    kv_bytes_per_token,
    load_records,
    sdk_tuple,
)
from .replay import fit, packaged_model, predict_record, record_warnings
from .timing import OWN, Shape, TimingModel

INF2_48XLARGE_CORES = 24


def _positive(kind: type, most: float = 1e9) -> Any:
    """An argparse type: a number of ``kind`` above 0 (0 tokens, a rate of 0 or a negative
    tp have no meaning and would divide by zero or hang the simulation)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:g}, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _spread(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1e6:
        raise argparse.ArgumentTypeError(f"must be 0 to 1e6 tokens, got {text}")
    return value


def _sdk(text: str) -> str:
    if sdk_tuple(text) is None:
        raise argparse.ArgumentTypeError(f"expected a Neuron SDK version like 2.24.0, got {text!r}")
    return text


DEFAULT_SEQUENCE_LENGTH = 4096
MAX_CORES = 4096
"""A bound on --cores: 24 is an inf2.48xlarge, 64 a trn2.48xlarge; 10^5 cores took minutes
of simulation for a question no host asks."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", help="fleet.toml: replicas, cores_per_replica, batch_size, max_total_tokens")
    add("--records", help="JSON list of records (inf2-published.json schema) to predict")
    add("--json", action="store_true", help="print JSON")
    add(
        "--calibration",
        help="your own measured records (same schema): added to the packaged ones, then refit",
    )
    add(
        "--calibration-only",
        action="store_true",
        help="fit on --calibration alone, without the packaged records",
    )
    shape = parser.add_argument_group("layout (flags win over --config)")
    shape.add_argument("--model-size", type=_positive(float), help="parameters, in billions")
    shape.add_argument("--model-family", help="e.g. llama-3.1-8b: uses that family's fit")
    shape.add_argument(
        "--replicas", type=_positive(int), help="replicas on the host (default: fill --cores)"
    )
    shape.add_argument("--tp", type=_positive(int), help="NeuronCores per replica (default 8)")
    shape.add_argument(
        "--batch-size", type=_positive(int), help="compiled batch (max-num-seqs; default 8)"
    )
    shape.add_argument(
        "--sequence-length",
        type=_positive(int),
        help=f"compiled max total tokens (default {DEFAULT_SEQUENCE_LENGTH}, or the config's "
        "max_total_tokens)",
    )
    shape.add_argument(
        "--engine", choices=ENGINES, default="tgi", help="tgi (TGI Neuron) or vllm (default tgi)"
    )
    shape.add_argument(
        "--sdk",
        type=_sdk,
        default="2.24.0",
        help="Neuron SDK version (default 2.24.0; < 2.21: transformers-neuronx)",
    )
    shape.add_argument(
        "--policy",
        choices=POLICIES,
        default="fleet",
        help="routing: fleet (neuron-fleet's balancer, default), least-outstanding, round-robin",
    )
    shape.add_argument(
        "--cores",
        type=_positive(int, most=MAX_CORES),
        default=INF2_48XLARGE_CORES,
        help="host NeuronCores (default 24 = inf2.48xlarge)",
    )
    load = parser.add_argument_group("workload")
    load.add_argument("--input-tokens", type=_positive(int), help="prompt length (mean), tokens")
    load.add_argument("--output-tokens", type=_positive(int), help="answer length (mean), tokens")
    load.add_argument("--input-stddev", type=_spread, default=0.0, help="prompt length spread")
    load.add_argument("--output-stddev", type=_spread, default=0.0, help="answer length spread")
    load.add_argument(
        "--rate", type=_positive(float), help="Poisson arrivals per second (default: 1)"
    )
    load.add_argument("--concurrency", type=_positive(int), help="closed-loop clients")
    load.add_argument("--ttft-slo", type=_positive(float), help="p99 TTFT target, seconds")
    load.add_argument("--sweep", action="store_true", help="rank every layout that fits")
    load.add_argument("--plot", help="--sweep: write TTFT p99 curves to this PNG")
    load.add_argument("--seed", type=int, default=0, help="seed of arrivals and lengths")


def _fail(message: str) -> int:
    print(f"predict: {message}", file=sys.stderr)
    return 2


FEW_RECORDS = 20


def _model(args: argparse.Namespace) -> TimingModel:
    if args.calibration_only and not args.calibration:
        raise ValueError("--calibration-only needs --calibration FILE")
    if not args.calibration:
        return packaged_model()
    mine = load_records(args.calibration)
    records = mine if args.calibration_only else load_records() + mine
    what = "alone" if args.calibration_only else "with the packaged ones"
    print(
        f"predict: fitting on {len(mine)} records of {args.calibration} {what} "
        f"({len(records)} in all) ...",
        file=sys.stderr,
    )
    if len(records) < FEW_RECORDS:
        print(
            f"predict: warning: a fit on {len(records)} records knows little beyond them; "
            "drop --calibration-only to fit them with the published ones",
            file=sys.stderr,
        )
    if args.calibration_only:
        return fit(records)
    model = fit(records, own=mine)
    own = model.family_factor.get(OWN)
    if own is None:
        print(
            "predict: none of your records times a step (a static batch, or a run of one "
            "request at a time): the published step times stand",
            file=sys.stderr,
        )
    else:
        print(
            f"predict: your records against the published fit: prefill x{own[0]:.2f} fixed, "
            f"x{own[1]:.2f} per sequence; decode x{own[2]:.2f} per step, x{own[3]:.2f} per "
            "slot (shrunk towards 1 by how few they are)",
            file=sys.stderr,
        )
    return model


def _from_config(path: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text("utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not TOML: {exc}") from None
    model, fleet = data.get("model", {}), data.get("fleet", {})
    if not isinstance(model, dict) or not isinstance(fleet, dict):
        raise ValueError(f"{path}: [model] and [fleet] must be tables")
    out: dict[str, Any] = {}
    for key, table, name in (
        ("replicas", "fleet", "replicas"),
        ("tp", "fleet", "cores_per_replica"),
        ("batch_size", "model", "batch_size"),
        ("sequence_length", "model", "max_total_tokens"),
    ):
        value = (fleet if table == "fleet" else model).get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{path}: [{table}] {name} must be a whole number above 0, not {value!r}"
            )
        out[key] = value
    if isinstance(model.get("id"), str):
        out["model_id"] = model["id"]
    return out


def _size_from_name(name: str) -> float | None:
    match = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", name)
    return float(match.group(1)) if match else None


def build_layout(args: argparse.Namespace) -> Layout:
    cfg = _from_config(args.config) if args.config else {}
    size = args.model_size
    if size is None and cfg.get("model_id"):
        size = _size_from_name(str(cfg["model_id"]))
    if size is None:
        raise ValueError("give --model-size (billions of parameters), e.g. --model-size 8")
    tp = int(args.tp or cfg.get("tp") or 8)
    batch = args.batch_size or cfg.get("batch_size") or 8
    seq = args.sequence_length or cfg.get("sequence_length") or DEFAULT_SEQUENCE_LENGTH
    replicas = int(args.replicas or cfg.get("replicas") or max(1, args.cores // tp))
    if replicas * tp > args.cores and not args.sweep:
        raise ValueError(
            f"{replicas} x tp{tp} needs {replicas * tp} NeuronCores; the host has {args.cores} "
            "(--cores; an inf2.48xlarge has 24)"
        )
    engine_name = "vllm" if args.engine == "vllm" else "optimum-neuron"
    shape = Shape(
        params_b=size,
        tp=int(tp),
        batch_size=int(batch),
        sequence_length=int(seq),
        kv_bytes=kv_bytes_per_token(args.model_family, size),
        generation=generation(engine_name, args.sdk),
        family=args.model_family.lower() if args.model_family else None,
        heads=heads(args.model_family),
    )
    return Layout(int(replicas), shape, args.engine, args.policy)


def _records(args: argparse.Namespace, model: TimingModel) -> int:
    records = load_records(args.records)
    out = []
    seen: set[str] = set()
    for record in records:
        name = _printable(str(record["id"]))
        if name in seen:
            print(f"predict: {name}: a second record with this id", file=sys.stderr)
        seen.add(name)
        warnings = record_warnings(model, record)
        for warning in warnings:
            print(f"predict: {name}: extrapolating: {warning}", file=sys.stderr)
        predicted = predict_record(model, record)
        row: dict[str, Any] = {
            "id": record["id"],
            "predicted": {k: _num(predicted[k]) for k in ("ttft_s", "itl_ms", "output_tok_per_s")},
        }
        if warnings:  # the issue's {"id", "predicted"} as is when the calibration covers it
            row["extrapolating"] = warnings
        out.append(row)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for row in out:
            p = row["predicted"]
            print(
                f"{_printable(str(row['id']))}: TTFT {p['ttft_s']} s, ITL {p['itl_ms']} ms, "
                f"{p['output_tok_per_s']} tok/s"
            )
    return 0


def _printable(text: str) -> str:
    """An id as the terminal should show it: control and bidirectional characters escaped
    (a record id is somebody's text; ``\x1b[31m`` or U+202E would act on the terminal)."""
    return "".join(
        c if c.isprintable() and unicodedata.category(c) != "Cf" else ascii(c)[1:-1] for c in text
    )


def _num(value: float) -> float | None:
    """A figure for JSON: no NaN or Infinity (not JSON), None instead."""
    return None if value is None or not math.isfinite(value) else round(value, 4)


def run(args: argparse.Namespace) -> int:
    if args.records:
        given = [f for f, v in (("--sweep", args.sweep), ("--plot", args.plot),
                                ("--rate", args.rate), ("--concurrency", args.concurrency),
                                ("--ttft-slo", args.ttft_slo)) if v]  # fmt: skip
        if given:
            return _fail(f"--records predicts each record's own layout and load: drop {given[0]}")
    elif args.plot and not args.sweep:
        return _fail("--plot draws the curves of a --sweep: add --sweep")
    try:
        model = _model(args)
        if args.records:
            return _records(args, model)
        if args.input_tokens is None or args.output_tokens is None:
            return _fail("give --input-tokens and --output-tokens (or --records FILE)")
        layout = build_layout(args)
    except ValueError as exc:
        return _fail(str(exc))
    needed = args.input_tokens + args.output_tokens
    if needed > layout.shape.sequence_length:
        return _fail(
            f"{args.input_tokens} prompt + {args.output_tokens} answer tokens do not fit the "
            f"compiled sequence length {layout.shape.sequence_length}: the server would refuse "
            f"them. Give --sequence-length {needed} or more (or [model] max_total_tokens in "
            "--config)"
        )
    warnings = model.coverage.warnings(layout.shape, args.input_tokens, args.sdk)
    if args.model_family and args.model_family.lower() not in KV_BYTES_PER_TOKEN:
        known = ", ".join(sorted(KV_BYTES_PER_TOKEN))
        warnings.insert(
            0,
            f"model family {args.model_family!r} is not in the calibration ({known}): "
            "its size's fit with Llama-3-like heads is used",
        )
    for warning in warnings:
        print(f"predict: extrapolating: {warning}", file=sys.stderr)
    base = Workload(
        input_tokens=args.input_tokens,
        output_tokens=args.output_tokens,
        input_stddev=args.input_stddev,
        output_stddev=args.output_stddev,
        seed=args.seed,
    )
    if args.sweep:
        return _sweep(args, model, layout, base, warnings)
    return _one(args, model, layout, base, warnings)


def _one(args, model, layout: Layout, base: Workload, warnings: list[str]) -> int:
    if args.rate is not None and args.concurrency is not None:
        return _fail("give --rate or --concurrency, not both")
    if args.concurrency is not None:
        workload = base.with_load(
            concurrency=args.concurrency,
            max_requests=max(8 * args.concurrency, 100),
            duration_s=math.inf,
        )
        figs = simulate(model, layout, workload)
        load = f"{args.concurrency} concurrent clients"
    else:
        rate = args.rate if args.rate is not None else 1.0
        figs = at_rate(model, layout, base, rate)
        load = f"{rate:g} req/s (Poisson)"
    result: dict[str, Any] = {
        "layout": layout.label(),
        "engine": layout.engine,
        "policy": layout.policy,
        "sequence_length": layout.shape.sequence_length,
        "load": load,
        "ttft_p50_s": _num(figs.ttft_p50_s),
        "ttft_p99_s": _num(figs.ttft_p99_s),
        "itl_p50_ms": _num(figs.itl_p50_ms),
        "itl_mean_ms": _num(figs.itl_mean_ms),
        "output_tok_per_s": _num(figs.output_tok_per_s),
        "req_per_s": _num(figs.req_per_s),
        "extrapolating": warnings,
    }
    if args.rate is not None:
        most = capacity(model, layout, base)
        if args.rate > 0.98 * most:
            result["overloaded"] = (
                f"{args.rate:g} req/s is more than this layout serves (~{most:.3g} req/s): "
                "the queue grows for the whole run, so its TTFT is the run's length, not a "
                "steady state"
            )
    if args.ttft_slo is not None:
        found = max_rate_within_slo(model, layout, base, args.ttft_slo)
        result["ttft_slo_s"] = args.ttft_slo
        result["max_rate_within_slo"] = math.floor(found.rate * 1000) / 1000
    if not layout.fits():
        result["warning"] = (
            f"{layout.memory_per_core_gb():.1f} GB per NeuronCore (weights + KV cache) "
            "exceeds what a core holds: this layout would not load"
        )
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(
        f"{result['layout']} ({layout.engine}, compiled for {layout.shape.sequence_length} "
        f"tokens, {layout.policy} routing), {load}, "
        f"{base.input_tokens} in / {base.output_tokens} out tokens"
    )
    print(f"  TTFT p50 {result['ttft_p50_s']} s, p99 {result['ttft_p99_s']} s")
    print(f"  ITL p50 {result['itl_p50_ms']} ms, mean {result['itl_mean_ms']} ms")
    print(f"  throughput {result['output_tok_per_s']} output tok/s, {result['req_per_s']} req/s")
    if "max_rate_within_slo" in result:
        print(
            f"  highest rate with TTFT p99 <= {args.ttft_slo:g} s: "
            f"{result['max_rate_within_slo']} req/s"
        )
    if "warning" in result:
        print(f"  WARNING: {result['warning']}")
    if "overloaded" in result:
        print(f"  OVERLOADED: {result['overloaded']}")
    return 0


def _sweep(args, model, layout: Layout, base: Workload, warnings: list[str]) -> int:
    if args.ttft_slo is None:
        return _fail("--sweep needs --ttft-slo SECONDS")
    started = time.monotonic()
    candidates = layouts(layout.shape, args.cores, engine=layout.engine, policy=layout.policy)
    if not candidates:
        return _fail(f"no layout of a {layout.shape.params_b:g}B model fits {args.cores} cores")
    rows = sweep(model, candidates, base, args.ttft_slo)
    elapsed = time.monotonic() - started
    table = []
    for rank, row in enumerate(rows, 1):
        at = row.at_max
        table.append(
            {
                "rank": rank,
                "replicas": row.layout.replicas,
                "tp": row.layout.shape.tp,
                "batch_size": row.layout.shape.batch_size,
                "max_rate_within_slo": round(row.max_rate, 3),
                "output_tok_per_s": _num(at.output_tok_per_s) if at else None,
                "ttft_p99_s": _num(at.ttft_p99_s) if at else None,
                "itl_p50_ms": _num(at.itl_p50_ms) if at else None,
                "extrapolating": model.coverage.warnings(
                    row.layout.shape, base.input_tokens, args.sdk
                ),
            }
        )
    plot_note = None
    if args.plot:
        try:
            plot(rows, args.plot, args.ttft_slo)
            plot_note = f"plot written to {args.plot}"
        except ImportError:
            plot_note = "no plot: matplotlib is missing (pip install 'neuron-fleet[plot]')"
    if args.json:
        if plot_note and not plot_note.startswith("plot written"):
            print(f"predict: {plot_note}", file=sys.stderr)
        print(
            json.dumps({"ttft_slo_s": args.ttft_slo, "layouts": table, "plot": plot_note}, indent=1)
        )
        return 0
    print(
        f"{len(rows)} layouts on {args.cores} NeuronCores, {base.input_tokens} in / "
        f"{base.output_tokens} out tokens, TTFT p99 <= {args.ttft_slo:g} s "
        f"({elapsed:.1f} s of simulation)"
    )
    print(
        f"{'rank':>4}  {'layout':<24} {'max req/s':>9} {'tok/s':>8} {'TTFT p99':>9} {'ITL p50':>8}"
    )
    for row in table:
        label = f"{row['replicas']} x tp{row['tp']} x batch {row['batch_size']}"
        mark = " *" if row["extrapolating"] else ""
        print(
            f"{row['rank']:>4}  {label:<24} {row['max_rate_within_slo']:>9} "
            f"{row['output_tok_per_s'] or '-':>8} {row['ttft_p99_s'] or '-':>9} "
            f"{row['itl_p50_ms'] or '-':>8}{mark}"
        )
    if any(row["extrapolating"] for row in table):
        print("* extrapolating (outside the calibrated tp, batch, sizes or lengths)")
    if plot_note:
        print(plot_note)
    elif not args.plot:
        print("add --plot sweep.png for the TTFT curves (needs: pip install 'neuron-fleet[plot]')")
    return 0
