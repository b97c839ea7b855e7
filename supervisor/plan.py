"""The plan: which replica owns which NeuronCores, devices and ports.

Decided once, before anything starts, from the config and the host's inventory:
N replicas x C cores as contiguous inclusive ranges ("0-7", "8-15", "16-23"), because
NEURON_RT_VISIBLE_CORES only takes a range and docker can only hand out whole devices.
Groups sit on C-aligned slots; a slot any of whose devices is held by another process
is never used (the runtime would refuse it anyway, much later and less clearly).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from supervisor.neuron import (
    Inventory,
    NeuronDevice,
    NeuronProcess,
    format_core_range,
    inventory_from_count,
    parse_core_range,
)
from supervisor.schema import ConfigError, FleetSettings, launcher_whole_devices


@dataclass(frozen=True)
class ReplicaPlan:
    """Everything needed to start one replica, decided before anything starts."""

    index: int
    name: str
    """``replica-0``, ``replica-1``, ... (stable: used in metrics labels and the admin API)."""
    cores: str
    """Inclusive NeuronCore range for NEURON_RT_VISIBLE_CORES, e.g. ``"0-7"``."""
    core_ids: tuple[int, ...]
    devices: tuple[str, ...]
    """``/dev/neuron0`` ... the devices that hold those cores (docker ``--device``)."""
    host: str
    port: int
    metrics_port: int
    """The replica's own Prometheus port (TGI's --prometheus-port; a busy one panics it)."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class Plan:
    """All replicas, plus what the plan was made from (shown by ``neuron-fleet plan``)."""

    replicas: tuple[ReplicaPlan, ...]
    inventory: dict[str, Any] = field(default_factory=dict)
    """``Inventory.summary()``: source, devices, cores, processes holding cores."""
    notes: tuple[str, ...] = ()

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(r.port for r in self.replicas)

    def to_dict(self) -> dict[str, Any]:
        return {
            "replicas": [asdict(r) | {"url": r.url} for r in self.replicas],
            "inventory": self.inventory,
            "notes": list(self.notes),
        }


Busy = dict[int, tuple[NeuronProcess, ...]]


def _holders(busy: Busy, cores: tuple[int, ...]) -> str:
    seen: dict[int, str] = {}
    for core in cores:
        for proc in busy.get(core, ()):
            seen.setdefault(proc.pid, proc.command)
    return ", ".join(f"PID {pid} ({cmd})" for pid, cmd in seen.items())


def _cores_text(cores: list[int]) -> str:
    contiguous = cores == list(range(cores[0], cores[0] + len(cores)))
    return format_core_range(cores) if contiguous else ", ".join(map(str, cores))


def plan_replicas(
    fleet: FleetSettings, inventory: Inventory, *, whole_devices: bool
) -> tuple[Plan | None, list[str]]:
    """Compute the plan; returns (plan or None, every problem found) -- never raises.

    ``whole_devices``: the launcher exposes devices, not cores (docker), so each group must
    start and end on a device boundary.
    """
    errors: list[str] = []
    notes: list[str] = list(inventory.notes)
    size = fleet.cores_per_replica
    if size is None or size < 1:
        return None, [
            "[fleet] cores_per_replica is not set: set it to the model's tensor-parallel degree"
        ]

    if inventory.assumed:
        inventory = _assumed_inventory(fleet, inventory, size)
    if not inventory.devices:
        return None, [
            f"no Neuron devices found ({inventory.source}): on an inf2/trn1 host install the "
            "Neuron driver and aws-neuronx-tools (neuron-ls); elsewhere set [fleet] devices = N "
            'or launcher = "simulated"'
        ]

    device_of = inventory.device_of_core()
    busy: Busy = {} if inventory.assumed else inventory.busy_cores()
    per_device = inventory.cores_per_device
    if whole_devices and size % per_device:
        errors.append(
            f"[fleet] cores_per_replica = {size} is not a multiple of the {per_device} cores of a "
            f"device; the docker launcher can only hand out whole devices: use a multiple of "
            f'{per_device}, or launcher = "native" (NEURON_RT_VISIBLE_CORES takes any range)'
        )

    if fleet.core_groups:
        groups, group_errors = _explicit_groups(
            fleet, size, device_of, busy, per_device, whole_devices
        )
        errors.extend(group_errors)
    else:
        groups, group_errors, group_notes = _slot_groups(fleet, size, inventory, device_of, busy)
        errors.extend(group_errors)
        notes.extend(group_notes)

    if errors:
        return None, errors
    replicas = []
    for i, cores in enumerate(groups):
        devices = sorted({device_of[c].index for c in cores})
        replicas.append(
            ReplicaPlan(
                index=i,
                name=f"replica-{i}",
                cores=format_core_range(cores),
                core_ids=tuple(cores),
                devices=tuple(f"/dev/neuron{d}" for d in devices),
                host=fleet.host,
                port=fleet.base_port + i,
                metrics_port=fleet.metrics_base_port + i,
            )
        )
    return Plan(replicas=tuple(replicas), inventory=inventory.summary(), notes=tuple(notes)), []


def _assumed_inventory(fleet: FleetSettings, inventory: Inventory, size: int) -> Inventory:
    """Nothing was looked at (simulated fleet, no host checks): just enough devices."""
    wanted = len(fleet.core_groups) if fleet.core_groups else (fleet.replicas or 1)
    top = 0
    for group in fleet.core_groups:
        try:
            top = max(top, max(parse_core_range(group)) + 1)
        except ValueError:
            pass  # reported by _explicit_groups
    per_device = inventory.cores_per_device
    return inventory_from_count(
        -(-max(wanted * size, top) // per_device),
        cores_per_device=per_device,
        source=inventory.source,
        assumed=True,
    )


def _slot_groups(
    fleet: FleetSettings,
    size: int,
    inventory: Inventory,
    device_of: dict[int, NeuronDevice],
    busy: Busy,
) -> tuple[list[tuple[int, ...]], list[str], list[str]]:
    """C-aligned groups from core 0, skipping any a process holds: (groups, errors, notes)."""
    total = inventory.total_cores
    per_device = inventory.cores_per_device
    # Slots whose cores all exist (/dev can show gaps: neuron0, neuron1, neuron3).
    span = max(device_of) + 1
    slots = [tuple(range(k * size, (k + 1) * size)) for k in range(span // size)]
    slots = [s for s in slots if all(c in device_of for c in s)]
    free = [s for s in slots if not any(c in busy for c in s)]
    taken = [s for s in slots if any(c in busy for c in s)]
    want = fleet.replicas
    if want is None:
        if not slots:
            return (
                [],
                [
                    f"this host has {total} NeuronCores ({len(inventory.devices)} devices x "
                    f"{per_device}), fewer than one replica's cores_per_replica = {size}: "
                    "use a larger instance or a model compiled for fewer cores"
                ],
                [],
            )
        if not free:
            return (
                [],
                [
                    f"no free group of {size} NeuronCores on this host ({total} cores; held by "
                    f"{_holders(busy, tuple(busy))}): stop those processes or lower "
                    "[fleet] cores_per_replica"
                ],
                [],
            )
        return (
            free,
            [],
            [f"replicas not set: {len(free)} x {size} cores fit in {total} NeuronCores"],
        )
    if want * size > total:
        fix = (
            f"set [fleet] replicas = {total // size} or lower cores_per_replica"
            if total >= size
            else f"not even one replica fits: use a larger instance or a model compiled for "
            f"at most {total} cores (--num-cores)"
        )
        return (
            [],
            [
                f"the fleet needs {want * size} NeuronCores ({want} replicas x {size}) but this "
                f"host has {total} ({len(inventory.devices)} devices x {per_device}): {fix}"
            ],
            [],
        )
    if want > len(free) and not taken:
        return (
            [],
            [
                f"only {len(free)} groups of {size} contiguous NeuronCores exist on this host "
                f"({inventory.source}): lower [fleet] replicas to {len(free)}"
            ],
            [],
        )
    if want > len(free):
        held = tuple(c for s in taken for c in s)
        return (
            [],
            [
                f"only {len(free)} of the {want} requested {size}-core groups are free: "
                f"NeuronCores {', '.join(format_core_range(s) for s in taken)} are held by "
                f"{_holders(busy, held)}; the runtime keeps cores reserved until their process "
                "exits: stop it (an orphaned replica?) or lower [fleet] replicas"
            ],
            [],
        )
    groups = free[:want]
    used = want * size
    notes = [f"{total - used} of {total} NeuronCores left unused"] if used < total else []
    return groups, [], notes


def _explicit_groups(
    fleet: FleetSettings,
    size: int,
    device_of: dict[int, NeuronDevice],
    busy: Busy,
    per_device: int,
    whole_devices: bool,
) -> tuple[list[tuple[int, ...]], list[str]]:
    errors = []
    groups: list[tuple[int, ...]] = []
    owner: dict[int, str] = {}
    if fleet.replicas is not None and fleet.replicas != len(fleet.core_groups):
        errors.append(
            f"[fleet] replicas = {fleet.replicas} but core_groups lists {len(fleet.core_groups)} "
            "groups: remove replicas (the groups decide) or make them agree"
        )
    for text in fleet.core_groups:
        try:
            cores = parse_core_range(text)
        except ValueError as exc:
            errors.append(f"[fleet] core_groups: {exc}")
            continue
        if len(cores) != size:
            errors.append(
                f"[fleet] core_groups: {text!r} has {len(cores)} cores but cores_per_replica is "
                f"{size}: every replica runs the same compiled model"
            )
        if any(c not in device_of for c in cores):
            errors.append(
                f"[fleet] core_groups: {text!r} needs NeuronCores up to {max(cores)} but this host "
                f"has {len(device_of)} (0-{len(device_of) - 1})"
            )
        overlap = sorted({owner[c] for c in cores if c in owner})
        if overlap:
            errors.append(
                f"[fleet] core_groups: {text!r} overlaps {', '.join(repr(o) for o in overlap)}: "
                "a NeuronCore can belong to one replica only"
            )
        held = [c for c in cores if c in busy]
        if held:
            errors.append(
                f"[fleet] core_groups: NeuronCores {_cores_text(held)} "
                f"of {text!r} are held by {_holders(busy, tuple(held))}: stop it first"
            )
        if whole_devices and (cores[0] % per_device or len(cores) % per_device):
            errors.append(
                f"[fleet] core_groups: {text!r} does not start and end on a device boundary "
                f"({per_device} cores per device), which the docker launcher needs"
            )
        for c in cores:
            owner.setdefault(c, text)
        groups.append(cores)
    return groups, errors


def compute_plan(fleet: FleetSettings, inventory: Inventory) -> Plan:
    """The plan for ``fleet`` on ``inventory``; raises ConfigError listing every problem."""
    plan, errors = plan_replicas(
        fleet, inventory, whole_devices=launcher_whole_devices(fleet.launcher)
    )
    if errors or plan is None:
        raise ConfigError(errors or ["no plan"])
    return plan
