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
from supervisor.runtime_versions import (
    VersionQueryError,
    image_versions,
    mismatch,
    native_versions,
    python_versions,
)
from supervisor.schema import FleetSettings, LauncherConfig, ModelConfig


def check_launcher_host(fleet: FleetSettings, launcher: LauncherConfig) -> list[str]:
    """The chosen launcher's binary is on PATH and its folders exist."""
    errors = []
    vllm_native = fleet.launcher == "native" and fleet.engine == "vllm"
    binary = {"docker": launcher.docker.binary, "native": launcher.native.binary}.get(
        fleet.launcher
    )
    if vllm_native:
        binary = launcher.native.python
    if binary and shutil.which(binary) is None:
        if fleet.launcher == "docker":
            hint = "install docker, or set [launcher.docker] binary"
        elif vllm_native:
            hint = (
                "set [launcher.native] python to the Python where optimum-neuron[vllm] is "
                'installed, or use launcher = "docker"'
            )
        else:
            hint = (
                "install TGI's Neuron backend, set [launcher.native] binary, "
                'or use launcher = "docker"'
            )
        errors.append(f"{binary!r} is not on PATH (launcher = {fleet.launcher!r}): {hint}")
    if (
        fleet.launcher == "native"
        and not vllm_native
        and not os.path.isdir(launcher.native.shard_uds_dir)
    ):
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


def uses_metrics_port(launcher: str, template: str = "", engine: str = "tgi") -> bool:
    """Replicas that open a second port of their own: TGI's native --prometheus-port
    (two on the same port panic); docker keeps it inside the container's namespace. vLLM
    serves /metrics on its API port (vllm 0.11.0, entrypoints/openai/api_server.py)."""
    if launcher == "native":
        return engine == "tgi"
    return launcher == "command" and "{metrics_port}" in template


def check_ports(
    fleet: FleetSettings,
    launcher: LauncherConfig,
    plan: Plan,
    listen: tuple[str, int],
    check_host: bool,
) -> list[str]:
    errors = []
    metrics = uses_metrics_port(fleet.launcher, launcher.command.template, fleet.engine)
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
        return discover_inventory(
            cores_per_device=fleet.cores_per_device, neuron_ls=fleet.neuron_ls
        ), []
    except (NeuronLsError, OSError) as exc:
        return None, [f"cannot list Neuron devices: {exc}"]


def check_export_versions(
    model: ModelConfig, fleet: FleetSettings, launcher: LauncherConfig
) -> tuple[list[str], list[str]]:
    """(errors, warnings): the export's optimum-neuron / neuronx-cc against the runtime's."""
    info = model.neuron
    if info is None or not (info.optimum_neuron_version or info.neuronxcc_version):
        return [], []
    try:
        if fleet.launcher == "docker":
            runtime = image_versions(launcher.docker.binary, launcher.docker.image)
        elif fleet.launcher == "native" and fleet.engine == "vllm":
            runtime = python_versions(launcher.native.python)
        elif fleet.launcher == "native":
            runtime = native_versions()
        else:
            return [], []
    except VersionQueryError as exc:
        hint = (
            f" (`docker pull {launcher.docker.image}`; `neuron-fleet export` pulls it too)"
            if fleet.launcher == "docker"
            else ""
        )
        return [], [
            f"cannot check the export's optimum-neuron {info.optimum_neuron_version} / "
            f"neuronx-cc {info.neuronxcc_version} against the replicas': {exc}{hint}"
        ]
    problem = mismatch(info, runtime)
    return ([problem] if problem else []), []
