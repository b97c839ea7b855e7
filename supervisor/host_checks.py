"""Checks that look at this machine: ports free, launcher binaries on PATH, folders
present, and which Neuron devices exist (neuron-ls, else /dev/neuron*).

``load_config(check_host=False)`` skips all of them (``export``, tests, ``plan`` for
another host).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket

from supervisor.neuron import (
    Inventory,
    NeuronLsError,
    discover_inventory,
    inventory_from_count,
)
from supervisor.plan import Plan
from supervisor.schema import FleetSettings, LauncherConfig


def check_launcher_host(fleet: FleetSettings, launcher: LauncherConfig) -> list[str]:
    """The chosen launcher's binary is on PATH and its folders exist."""
    errors = []
    binary = {"docker": launcher.docker.binary, "native": launcher.native.binary}.get(
        fleet.launcher
    )
    if binary and shutil.which(binary) is None:
        hint = (
            "install docker, or set [launcher.docker] binary"
            if fleet.launcher == "docker"
            else "install TGI's Neuron backend, set [launcher.native] binary, "
            'or use launcher = "docker"'
        )
        errors.append(f"{binary!r} is not on PATH (launcher = {fleet.launcher!r}): {hint}")
    if fleet.launcher == "native" and not os.path.isdir(launcher.native.shard_uds_dir):
        errors.append(
            f"[launcher.native] shard_uds_dir {launcher.native.shard_uds_dir!r} is not a directory"
        )
    if (
        fleet.launcher == "docker"
        and launcher.docker.data_dir
        and not os.path.isdir(launcher.docker.data_dir)
    ):
        errors.append(f"[launcher.docker] data_dir {launcher.docker.data_dir!r} is not a directory")
    return errors


def port_problem(host: str, port: int) -> str | None:
    """Why a server could not bind host:port (None: it could). Binds with SO_REUSEADDR,
    as aiohttp and TGI do, so sockets in TIME_WAIT are not reported."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"host {host!r} does not resolve ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "is already in use"
            return f"cannot be bound ({exc.strerror})"
    return None


def port_in_use(host: str, port: int) -> bool:
    return port_problem(host, port) == "is already in use"


def uses_metrics_port(launcher: str, template: str = "") -> bool:
    return launcher in ("docker", "native") or (
        launcher == "command" and "{metrics_port}" in template
    )


def check_ports(
    fleet: FleetSettings,
    launcher: LauncherConfig,
    plan: Plan,
    listen: tuple[str, int],
    check_host: bool,
) -> list[str]:
    errors = []
    metrics = uses_metrics_port(fleet.launcher, launcher.command.template)
    wanted: list[tuple[str, int, str]] = [
        (listen[0], listen[1], "the balancer ([balancer] listen)")
    ]
    for r in plan.replicas:
        wanted.append((r.host, r.port, f"{r.name} (base_port + {r.index})"))
        if metrics:
            wanted.append(
                (r.host, r.metrics_port, f"{r.name} metrics (metrics_base_port + {r.index})")
            )
    owners: dict[int, list[str]] = {}
    for _, port, who in wanted:
        owners.setdefault(port, []).append(who)
        if not 1 <= port <= 65535:
            errors.append(
                f"port {port} of {who} is outside 1-65535: lower base_port / metrics_base_port"
            )
    for port, who in owners.items():
        if len(who) > 1:
            errors.append(
                f"port {port} is planned for both {' and '.join(who)}: move [fleet] base_port, "
                "metrics_base_port or [balancer] listen apart"
            )
    if check_host:
        for host, port, who in wanted:
            if not 1 <= port <= 65535 or len(owners[port]) > 1:
                continue
            problem = port_problem(host, port)
            if problem == "is already in use":
                errors.append(
                    f"port {port} on {host} (for {who}) is already in use: stop what holds it "
                    f"(ss -ltnp 'sport = :{port}') or choose another port"
                )
            elif problem:
                errors.append(f"port {port} on {host} (for {who}) {problem}: check the host")
    return errors


def host_inventory(
    fleet: FleetSettings, given: Inventory | None, check_host: bool
) -> tuple[Inventory | None, list[str]]:
    if given is not None:
        return given, []
    if fleet.devices is not None:
        return inventory_from_count(
            fleet.devices, cores_per_device=fleet.cores_per_device, source="config devices"
        ), []
    if fleet.launcher == "simulated" or not check_host:
        reason = (
            "simulated (no hardware needed)" if fleet.launcher == "simulated" else "not checked"
        )
        return inventory_from_count(
            0, cores_per_device=fleet.cores_per_device, source=reason, assumed=True
        ), []
    try:
        return discover_inventory(cores_per_device=fleet.cores_per_device), []
    except (NeuronLsError, OSError) as exc:
        return None, [f"cannot list Neuron devices: {exc}"]
