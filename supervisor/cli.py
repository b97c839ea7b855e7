"""The ``neuron-fleet`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so
``neuron-fleet --help`` stays fast and optional extras (optimum-neuron) stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("supervisor.demo", "run simulated replicas + the balancer on 127.0.0.1:8080"),
    "serve": ("supervisor.serve", "run the replicas of a fleet.toml and the balancer"),
    "balance": ("balancer.cli", "run only the balancer in front of existing replicas"),
    "simulate-replica": ("supervisor.simulator.cli", "run one simulated TGI Neuron replica"),
    "predict": (
        "supervisor.predict.cli",
        "predict TTFT, ITL, throughput of a layout (virtual time)",
    ),
    "plan": ("supervisor.plan_cli", "print the NeuronCore plan without starting anything"),
    "status": ("supervisor.status_cli", "print the fleet status from a running service"),
    "export": ("supervisor.export_cli", "compile the model with optimum-neuron"),
    "import": (
        "supervisor.importer",
        "write a fleet.toml from docker-compose + nginx + .env, or an optimum-cli neuron serve",
    ),
    "install-service": ("supervisor.install", "install the systemd unit, config and env file"),
}


def _available() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, help_text)
    return found


def version() -> str:
    """The installed distribution's version (a source tree without metadata says so)."""
    try:
        return importlib.metadata.version("neuron-fleet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuron-fleet",
        description="Data-parallel TGI Neuron replicas behind one streaming balancer.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in _available().items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(_available()[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
