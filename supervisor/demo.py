"""``neuron-fleet demo``: simulated replicas + the balancer on 127.0.0.1:8080, no hardware.

Runs exactly what ``serve`` runs, from the config below (kept identical to
``deploy/fleet-demo.toml`` by a test, embedded so the demo works from an installed package),
then prints how to talk to it. Ctrl-C stops everything.
"""

# ruff: noqa: E501  (DEMO_TOML mirrors deploy/fleet-demo.toml line for line)
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from balancer.config import ENGINES
from balancer.logs import add_logging_arguments, configure_logging
from supervisor.serve import FleetService, load, serve

DEMO_TOML = """\
# neuron-fleet demo: three simulated TGI Neuron replicas behind the balancer.
#
# What `neuron-fleet demo` runs. No Neuron hardware, docker or model download needed:
# each replica is `python -m supervisor.simulator`, shaped like the blog's deployment
# (inf2.48xlarge = 12 devices x 2 NeuronCores, 3 replicas x 8 cores, batch 8).
#
#   neuron-fleet plan --config deploy/fleet-demo.toml      # what would run
#   neuron-fleet demo                                       # run it on 127.0.0.1:8080

[model]
id = "neuron-fleet/simulated-llama-3.1-8b"  # any name: echoed by /info and /v1/models
batch_size = 8                 # static batch slots per replica (MAX_BATCH_SIZE)
max_input_tokens = 16000       # MAX_INPUT_TOKENS, as in the blog's .env
max_total_tokens = 16512       # MAX_TOTAL_TOKENS (the compiled sequence length)
max_concurrent_requests = 512  # queued + running per replica before a 429
# tokenizer = "/path/to/model"  # a folder with tokenizer.json to count tokens exactly

[fleet]
launcher = "simulated"   # no hardware: python -m supervisor.simulator per replica
devices = 12             # pretend inf2.48xlarge: 12 devices x 2 cores (neuron-ls not run)
replicas = 3
cores_per_replica = 8    # replica k gets NeuronCores 8k..8k+7 (NEURON_RT_VISIBLE_CORES)
host = "127.0.0.1"       # replicas listen on loopback only
base_port = 8081         # replica k listens on 8081 + k, like the compose file
metrics_base_port = 9081 # unused by the simulator (it serves /metrics on its own port)
min_ready = 1            # open the balancer once one replica answers /health
startup_timeout_s = 60   # a simulated replica starts in well under a second

[launcher.simulated]
speed = 1.0              # 1.0 = inf2 timings from the blog (1.6 s for a 16k prefill); 10 = 10x faster
startup_delay_s = 0      # pretend model loading takes this long
seed = 42                # replica k uses seed 42 + k: reproducible streams

[balancer]
listen = "127.0.0.1:8080"     # where clients connect (the blog's localhost:8080)
policy = "least-outstanding"  # least-outstanding | round-robin | least-work
# max_inflight_per_replica defaults to [model] batch_size: one request per static slot,
# the rest wait in the balancer's queue for the first slot that frees.
max_queue = 1024
queue_timeout_s = 120
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="balancer address (default %(default)s)",
    )
    add("--replicas", type=int, default=3, metavar="N", help="simulated replicas (default 3)")
    add(
        "--engine",
        choices=ENGINES,
        default="tgi",
        help="what the simulated replicas are: TGI Neuron (default) or vLLM 0.11 on Neuron "
        "(optimum-neuron's `optimum-cli neuron serve`)",
    )
    add(
        "--speed",
        type=float,
        metavar="X",
        help="simulation speed: 1 = inf2 timings, 10 = ten times faster (default 1)",
    )
    add(
        "--model-size",
        type=float,
        metavar="B",
        help="time the replicas like a B-billion-parameter model at tp8 (neuron-fleet "
        "predict's fitted model; default: the blog's Llama-3.1-8B calibration)",
    )
    add_logging_arguments(parser)


def demo_toml(model_size: float | None = None, engine: str = "tgi") -> str:
    """The demo's config; with a model size the simulated replicas use the fitted timing,
    with engine vllm they speak vLLM 0.11's wire and the balancer answers in its shape."""
    toml = DEMO_TOML
    if engine != "tgi":
        toml = toml.replace("\n[fleet]\n", f'\n[fleet]\nengine = "{engine}"\n', 1)
    if model_size is not None:
        extra = f'extra_args = ["--model-size", "{model_size:g}", "--tp", "8"]\n\n'
        toml = toml.replace("\n[balancer]\n", f"\n{extra}[balancer]\n", 1)
    return toml


def curl_line(url: str, model: str = "tgi") -> str:
    """TGI takes any model name ("tgi" by convention); vLLM only the one it serves."""
    body = (
        f'{{"model":"{model}","messages":[{{"role":"user","content":"Hello"}}],'
        '"stream":true,"max_tokens":32}'
    )
    return f"curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"


def own_command(argv0: str | None = None) -> str:
    """How to run neuron-fleet again from any shell: the bare name when that is what PATH
    finds, else the full path we were started by (``scripts/demo.sh`` runs
    ``.venv/bin/neuron-fleet``, which is not on the user's PATH)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if os.path.basename(argv0) != "neuron-fleet":
        return "neuron-fleet"  # python -m supervisor, tests
    on_path = shutil.which("neuron-fleet")
    if on_path and os.path.realpath(on_path) == os.path.realpath(argv0):
        return "neuron-fleet"
    return os.path.abspath(argv0)


def _announce(service: FleetService) -> None:
    url = service.url
    n = len(service.registry)
    vllm = service.config.balancer.engine == "vllm"
    kind = "vLLM 0.11" if vllm else "TGI Neuron"
    model = service.config.model.id if vllm else "tgi"
    print(
        f"\nneuron-fleet demo: {n} simulated {kind} replica(s) behind {url}\n"
        f"  try it:   {curl_line(url, model)}\n"
        f"  metrics:  {url}/metrics\n"
        f"  status:   {own_command()} status --url {url}   ({url}/fleet/status with the admin\n"
        "            token that `neuron-fleet status` finds by itself; see docs/admin-api.md)\n"
        "Ctrl-C to stop.\n",
        flush=True,
    )


def run(args: argparse.Namespace) -> int:
    from supervisor.config import split_listen

    configure_logging(args.log_level, args.log_stream)
    try:
        _, port = split_listen(args.listen)
    except ValueError as exc:
        print(f"neuron-fleet demo: {exc}", file=sys.stderr)
        return 2
    fd, path = tempfile.mkstemp(prefix="neuron-fleet-demo-", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(demo_toml(args.model_size, args.engine))
        # Replicas right after the balancer's port (8080 -> 8081..), like the compose file,
        # so a demo on another port does not collide with one on 8080.
        args.config = path
        args.base_port = port + 1
        config = load(args, env={})  # the demo ignores MODEL_ID & co. in the environment
    finally:
        os.unlink(path)
    if isinstance(config, int):
        return config
    return serve(config, on_ready=_announce)
