"""``neuron-fleet plan``: show which replica gets which cores, devices, ports and command.

Starts nothing. It runs the same loading and validation as ``serve``, so an exit status
of 0 means ``serve`` would get past its checks; 2 means the config is invalid and every
problem is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from supervisor.config import (
    ENGINES,
    LAUNCHERS,
    ConfigError,
    FleetConfig,
    load_config,
    uses_metrics_port,
)
from supervisor.launchers import launch_spec
from supervisor.neuron import NeuronLsError, format_devices, read_neuron_ls_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=os.environ.get("NEURON_FLEET_CONFIG"),
        help="fleet TOML file (default: $NEURON_FLEET_CONFIG; none = defaults + environment)",
    )
    parser.add_argument("--env-file", metavar="FILE", help="KEY=VALUE file, e.g. the blog's .env")
    parser.add_argument("--replicas", type=int, metavar="N", help="number of replicas")
    parser.add_argument(
        "--cores-per-replica", type=int, metavar="C", help="NeuronCores per replica"
    )
    parser.add_argument("--launcher", choices=LAUNCHERS, help="override [fleet] launcher")
    parser.add_argument("--engine", choices=ENGINES, help="override [fleet] engine")
    parser.add_argument(
        "--neuron-ls",
        metavar="FILE",
        help="read `neuron-ls -j` JSON from FILE instead of running it",
    )
    parser.add_argument(
        "--no-host-checks",
        action="store_true",
        help="skip what looks at this machine (ports in use, binaries, model folder, "
        "neuron-ls, the image's optimum-neuron version)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "fleet": {
            "replicas": getattr(args, "replicas", None),
            "cores_per_replica": getattr(args, "cores_per_replica", None),
            "launcher": getattr(args, "launcher", None),
            "engine": getattr(args, "engine", None),
        }
    }


def run(args: argparse.Namespace) -> int:
    try:
        inventory = read_neuron_ls_file(args.neuron_ls) if args.neuron_ls else None
        config = load_config(
            args.config,
            env_file=args.env_file,
            overrides=overrides_from_args(args),
            inventory=inventory,
            check_host=not args.no_host_checks,
            require_model=False,  # a plan of cores and ports needs no export
        )
    except ConfigError as exc:
        print(f"neuron-fleet plan: {exc}", file=sys.stderr)
        return 2
    except (OSError, NeuronLsError) as exc:
        print(f"neuron-fleet plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan_document(config), indent=2))
    else:
        print(format_plan(config))
    return 0


def plan_document(config: FleetConfig) -> dict[str, Any]:
    replicas = []
    for replica in config.plan.replicas:
        spec = launch_spec(replica, config)
        replicas.append(
            {
                "name": replica.name,
                "cores": replica.cores,
                "devices": list(replica.devices),
                "url": replica.url,
                "port": replica.port,
                "metrics_port": replica.metrics_port,
                "command": spec.display,
                "argv": list(spec.argv),
                "env": {k: ("***" if k == "HF_TOKEN" else v) for k, v in spec.env.items()},
                "stop_argv": list(spec.stop_argv) if spec.stop_argv else None,
            }
        )
    return {
        "launcher": config.fleet.launcher,
        "engine": config.fleet.engine,
        "inventory": config.plan.inventory,
        "replicas": replicas,
        "balancer": {"listen": f"{config.balancer.host}:{config.balancer.port}"},
        "warnings": list(config.warnings),
        "config": config.to_public_dict(),
    }


def _known(value: int | None) -> str:
    """A limit the config does not set is the export's (TGI reads neuron_config.json)."""
    return "from the export" if value is None else str(value)


def format_plan(config: FleetConfig) -> str:
    inv = config.plan.inventory
    model = config.model
    lines = [
        f"inventory: {inv['devices']} devices x {inv['cores_per_device']} cores = "
        f"{inv['total_cores']} NeuronCores ({inv['source']}"
        + (f", {inv['instance_type']}" if inv.get("instance_type") else "")
        + ")",
        f"model:     {model.path or model.id or '(not set)'}"
        + (f"  [{model.neuron.describe()}]" if model.neuron else ""),
        f"limits:    batch {_known(model.batch_size)}, max_input_tokens "
        f"{_known(model.max_input_tokens)}, max_total_tokens {_known(model.max_total_tokens)}, "
        f"max_concurrent_requests {model.max_concurrent_requests}",
        f"launcher:  {config.fleet.launcher} (engine {config.fleet.engine})",
        f"balancer:  {config.balancer.host}:{config.balancer.port} ({config.balancer.policy}, "
        f"{config.balancer.max_inflight_per_replica} in flight per replica)",
        "",
    ]
    header = ("REPLICA", "CORES", "DEVICES", "PORT", "METRICS", "COMMAND")
    rows = [header]
    metrics = uses_metrics_port(
        config.fleet.launcher, config.launcher.command.template, config.fleet.engine
    )
    for replica in config.plan.replicas:
        spec = launch_spec(replica, config)
        rows.append(
            (
                replica.name,
                replica.cores,
                format_devices(replica.devices),
                str(replica.port),
                str(replica.metrics_port) if metrics else "-",
                spec.display,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]))
    for warning in config.warnings:
        lines.append(f"note: {warning}")
    return "\n".join(lines)
