"""``neuron-fleet import``: write a fleet.toml from the deployment neuron-fleet replaces.

Two sources, one module each; this one is the command:

- ``--compose``: docker compose + nginx + .env, one TGI Neuron container per replica
  (import_compose.py, import_nginx.py);
- ``--optimum-serve``: an ``optimum-cli neuron serve ... [--data-parallel-size N]`` command
  line, with the SM_ON_* variables of optimum-neuron's vLLM image from ``--env-file``
  (import_optimum.py).

What has no equivalent, or behaves differently, is printed -- never silently dropped.
Secret values (HF_TOKEN and anything named like a token, key or password) are never
written to fleet.toml and never printed: only their names are, with where to put them.
The TOML is written by tomli-w (import_toml.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from supervisor.config import ConfigError, FleetConfig, load_config, parse_env_file

# The parts, under the names the tests and other modules have always imported from here.
from supervisor.import_common import (
    DEFAULT_OUTPUT,
    SERVICE_ENV_FILE,
    ImportProblem,
    ImportResult,
)
from supervisor.import_compose import (
    PortMapping,
    _Interpolator,
    import_deployment,
    parse_ports,
)
from supervisor.import_nginx import analyse_nginx, parse_nginx
from supervisor.import_optimum import import_serve, parse_serve
from supervisor.import_toml import toml_string
from supervisor.neuron import DEFAULT_CORES_PER_DEVICE, format_devices

__all__ = [
    "DEFAULT_OUTPUT",
    "SERVICE_ENV_FILE",
    "ImportProblem",
    "ImportResult",
    "PortMapping",
    "_Interpolator",
    "analyse_nginx",
    "import_deployment",
    "import_serve",
    "parse_nginx",
    "parse_ports",
    "parse_serve",
    "toml_string",
]


# -- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--compose", metavar="FILE", help="the docker-compose.yaml to convert")
    source.add_argument(
        "--optimum-serve",
        metavar="COMMAND",
        help='an optimum-cli neuron serve command line, quoted as one argument (e.g. "optimum-cli '
        'neuron serve --model /models/llama --data-parallel-size 3"), or - to read it from '
        "standard input (a command with --api-key then stays out of `ps`); SM_ON_* variables "
        "of optimum-neuron's vLLM image come from --env-file",
    )
    add(
        "--nginx",
        metavar="FILE",
        help="the nginx.conf of the load balancer (default: the one the compose file mounts)",
    )
    add(
        "--env-file",
        metavar="FILE",
        help="values for ${VAR} in the compose file (default: .env beside it, as compose does); "
        "with --optimum-serve: the image's SM_ON_* variables",
    )
    add(
        "--output",
        "-o",
        default=DEFAULT_OUTPUT,
        metavar="FILE",
        help=f"where to write the fleet config (default {DEFAULT_OUTPUT}; - for stdout)",
    )
    add("--force", action="store_true", help="overwrite --output if it exists")
    add(
        "--cores-per-device",
        type=int,
        default=DEFAULT_CORES_PER_DEVICE,
        metavar="C",
        help=f"NeuronCores per /dev/neuronN (default {DEFAULT_CORES_PER_DEVICE}: inf2, trn1)",
    )


def check(toml_text: str) -> tuple[FleetConfig | None, list[str]]:
    """Load the generated text as ``serve`` would, without looking at this host."""
    with tempfile.TemporaryDirectory(prefix="neuron-fleet-import-") as folder:
        path = os.path.join(folder, "fleet.toml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(toml_text)
        try:
            return load_config(path, env={}, check_host=False), []
        except ConfigError as exc:
            return None, list(exc.errors)


def _summary(config: FleetConfig, services: list[str], replaces: str) -> list[str]:
    rows = [(replaces, "REPLICA", "CORES", "DEVICES", "PORT")]
    for name, replica in zip(services, config.plan.replicas, strict=False):
        rows.append(
            (name, replica.name, replica.cores, format_devices(replica.devices), str(replica.port))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _import_optimum(command_line: str, env_file: str | None, on_argv: bool) -> ImportResult:
    sm_env: dict[str, str] = {}
    if env_file is not None:
        try:
            sm_env = parse_env_file(env_file)
        except ConfigError as exc:
            raise ImportProblem(exc.errors) from None
    sources = "an optimum-cli neuron serve command" + (
        f" and the SM_ON_* variables of {os.path.basename(env_file)}" if env_file else ""
    )
    return import_serve(
        command_line, sm_env, sources=sources, env_source=str(env_file), on_argv=on_argv
    )


def run(args: argparse.Namespace) -> int:
    err = sys.stderr
    env_file = args.env_file
    if env_file is None and args.compose:
        beside = os.path.join(os.path.dirname(os.path.abspath(args.compose)), ".env")
        if os.path.isfile(beside):
            env_file = beside
    to_stdout = args.output == "-"
    if not to_stdout and os.path.exists(args.output) and not args.force:
        print(f"neuron-fleet import: {args.output} exists: pass --force to replace it", file=err)
        return 2
    if args.cores_per_device < 1:
        print("neuron-fleet import: --cores-per-device must be at least 1", file=err)
        return 2
    if args.optimum_serve is not None and args.nginx:
        print("neuron-fleet import: --nginx goes with --compose, not --optimum-serve", file=err)
        return 2
    try:
        if args.optimum_serve is not None:
            on_argv = args.optimum_serve != "-"
            command_line = args.optimum_serve if on_argv else sys.stdin.read()
            result = _import_optimum(command_line, env_file, on_argv)
        else:
            inputs = [os.path.basename(args.compose)]
            if args.nginx:
                inputs.append(os.path.basename(args.nginx))
            if env_file:
                inputs.append(os.path.basename(env_file))
            result = import_deployment(
                args.compose,
                args.nginx,
                env_file,
                cores_per_device=args.cores_per_device,
                sources=", ".join(inputs),
            )
    except ImportProblem as exc:
        for problem in exc.errors:
            print(f"neuron-fleet import: {problem}", file=err)
        return 2
    config, problems = check(result.toml)
    out = err if to_stdout else sys.stdout
    if to_stdout:
        sys.stdout.write(result.toml)
    else:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(result.toml)
        print(f"wrote {args.output}", file=out)
    if args.compose and env_file and env_file != args.env_file:
        print(f"read {env_file} for ${{VAR}} values, as docker compose does", file=out)
    if config is not None:
        print(
            f"{len(config.plan.replicas)} replicas x {config.fleet.cores_per_replica} NeuronCores, "
            f"launcher {config.fleet.launcher}, balancer on {result.listen} "
            f"({config.balancer.policy}, {config.balancer.max_inflight_per_replica} in flight "
            "per replica):",
            file=out,
        )
        for line in _summary(config, result.services, result.replaces):
            print(line, file=out)
    if result.notes:
        print("\nNot carried over, or done differently (review before serving):", file=out)
        for note in result.notes:
            print(f"  - {note}", file=out)
    if problems:
        print("\nThe written file does not load yet; fix these first:", file=err)
        for problem in problems:
            print(f"  - {problem}", file=err)
        return 1
    target = "fleet.toml" if to_stdout else args.output
    print(f"\nNext: neuron-fleet plan --config {target}", file=out)
    return 0
