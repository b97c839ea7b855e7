"""What NeuronCores this host has, and who is already holding them.

Sources, best first: ``neuron-ls`` JSON (run with a timeout, or read from a file), a count
of ``/dev/neuron*`` device nodes, or a device count from the config. neuron-ls is the only
one that knows which processes hold cores; the runtime reserves cores until the owning
process exits, so an orphaned replica would make the next start fail deep in TGI's logs.
We look first and name the PID instead.

neuron-ls is run with ``--json-output`` / ``-j``, the only JSON flag of the released tools
(Neuron LS User Guide, awsdocs-neuron "latest" and v2.28.0: options -w, -a, -t, -j). AWS
announced (16 Oct 2026, "end of support for the neuron-ls JSON output format starting with
Neuron 2.34") that 2.34 replaces it with ``--output-format json``, an object with
top-level instance fields around the device list; that flag is tried only when ``-j`` is
refused, and since its shape is not documented the parser takes any object holding a list
of device objects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CORES_PER_DEVICE = 2
"""inf2 and trn1 devices hold 2 NeuronCores each (trn2: 8 physical, 4 logical by default)."""

NEURON_LS_TIMEOUT_S = 10.0
NEURON_TOOLS_BIN = "/opt/aws/neuron/bin"
"""Where aws-neuronx-tools installs neuron-ls (not on systemd's default PATH)."""

_DEVICE_LIST_KEYS = ("neuron_devices", "devices", "neuron_device_list", "device_list")
_INSTANCE_TYPE_KEYS = ("instance_type", "instance-type", "instanceType")
_DEV_NODE = re.compile(r"^neuron(\d+)$")


class NeuronLsError(ValueError):
    """neuron-ls output we cannot make sense of."""


@dataclass(frozen=True)
class NeuronProcess:
    pid: int
    command: str


@dataclass(frozen=True)
class NeuronDevice:
    index: int
    core_ids: tuple[int, ...]
    bdf: str | None = None
    connected_to: tuple[int, ...] = ()
    memory_size: int | None = None
    processes: tuple[NeuronProcess, ...] = ()

    @property
    def path(self) -> str:
        return f"/dev/neuron{self.index}"


@dataclass(frozen=True)
class Inventory:
    """The devices of this host (empty when none were found)."""

    devices: tuple[NeuronDevice, ...]
    source: str
    """Where this came from: ``neuron-ls``, ``neuron-ls file X``, ``/dev``, ``config``..."""
    instance_type: str | None = None
    assumed: bool = False
    """True when nothing was looked at (simulated fleets, ``check_host=False``): no core checks."""
    notes: tuple[str, ...] = field(default=())

    @property
    def total_cores(self) -> int:
        return sum(len(d.core_ids) for d in self.devices)

    @property
    def cores_per_device(self) -> int:
        return len(self.devices[0].core_ids) if self.devices else DEFAULT_CORES_PER_DEVICE

    def device_of_core(self) -> dict[int, NeuronDevice]:
        return {core: dev for dev in self.devices for core in dev.core_ids}

    def busy_cores(self) -> dict[int, tuple[NeuronProcess, ...]]:
        """Cores of every device some process holds (neuron-ls reports per device)."""
        return {c: d.processes for d in self.devices if d.processes for c in d.core_ids}

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "instance_type": self.instance_type,
            "devices": len(self.devices),
            "cores_per_device": self.cores_per_device,
            "total_cores": self.total_cores,
            "assumed": self.assumed,
            "processes": [
                {"device": d.index, "pid": p.pid, "command": p.command}
                for d in self.devices
                for p in d.processes
            ],
            "notes": list(self.notes),
        }


def inventory_from_count(
    count: int,
    *,
    cores_per_device: int = DEFAULT_CORES_PER_DEVICE,
    source: str = "config",
    assumed: bool = False,
) -> Inventory:
    """``count`` devices numbered 0..count-1; device N holds cores N*c .. N*c+c-1."""
    devices = tuple(
        NeuronDevice(
            index=i, core_ids=tuple(range(i * cores_per_device, (i + 1) * cores_per_device))
        )
        for i in range(max(count, 0))
    )
    return Inventory(devices=devices, source=source, assumed=assumed)


def parse_neuron_ls(data: str | bytes | Sequence[Any] | Mapping[str, Any]) -> Inventory:
    """Parse either neuron-ls JSON shape (text or already-decoded)."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise NeuronLsError(f"neuron-ls output is not JSON: {exc}") from None
    instance_type = None
    if isinstance(data, Mapping):
        instance_type = _find_instance_type(data)
        entries = _find_device_list(data)
        if entries is None:
            raise NeuronLsError(
                "neuron-ls JSON object holds no list of devices "
                f"(looked for {', '.join(_DEVICE_LIST_KEYS)} or any list of objects)"
            )
    elif isinstance(data, Sequence):
        entries = list(data)
    else:
        raise NeuronLsError(
            f"neuron-ls JSON must be an array or an object, not {type(data).__name__}"
        )

    devices = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise NeuronLsError(f"neuron-ls device #{position} is not an object: {entry!r}")
        devices.append(_parse_device(entry, position))
    devices.sort(key=lambda d: d.index)
    return Inventory(devices=tuple(devices), source="neuron-ls", instance_type=instance_type)


def _find_instance_type(data: Mapping[str, Any]) -> str | None:
    for key in _INSTANCE_TYPE_KEYS:
        if isinstance(data.get(key), str):
            return data[key]
    for value in data.values():  # e.g. {"instance": {"instance_type": ...}}
        if isinstance(value, Mapping):
            found = _find_instance_type(value)
            if found:
                return found
    return None


def _find_device_list(data: Mapping[str, Any]) -> list[Any] | None:
    for key in _DEVICE_LIST_KEYS:
        if isinstance(data.get(key), list):
            return data[key]
    for value in data.values():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            if any(
                _first(v, "neuron_device", "nc_count", "device_id", "bdf") is not None
                for v in value
            ):
                return value
        if isinstance(value, Mapping):
            found = _find_device_list(value)
            if found is not None:
                return found
    return None


def _first(entry: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if entry.get(key) is not None:
            return entry[key]
    return None


def _parse_device(entry: Mapping[str, Any], position: int) -> NeuronDevice:
    index = _first(entry, "neuron_device", "device_id", "device", "index", "id")
    index = position if index is None else _as_int(index, "neuron_device")
    core_ids = _first(entry, "neuroncore_ids", "nc_ids", "core_ids")
    if core_ids is not None:
        cores = tuple(_as_int(c, "neuroncore_ids") for c in core_ids)
    else:
        count = _first(entry, "nc_count", "neuroncore_count", "core_count", "neuron_cores")
        count = DEFAULT_CORES_PER_DEVICE if count is None else _as_int(count, "nc_count")
        # Cores are numbered device by device: device N of a 2-core part holds 2N, 2N+1.
        cores = tuple(range(index * count, (index + 1) * count))
    procs = []
    for proc in _first(entry, "neuron_processes", "processes") or ():
        if isinstance(proc, Mapping) and proc.get("pid") is not None:
            command = _first(proc, "command", "cmd", "name") or "?"
            procs.append(NeuronProcess(pid=_as_int(proc["pid"], "pid"), command=str(command)))
    connected = tuple(_as_int(c, "connected_to") for c in entry.get("connected_to") or ())
    memory = entry.get("memory_size")
    return NeuronDevice(
        index=index,
        core_ids=cores,
        bdf=str(entry["bdf"]) if entry.get("bdf") is not None else None,
        connected_to=connected,
        memory_size=memory if isinstance(memory, int) else None,
        processes=tuple(procs),
    )


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise NeuronLsError(f"neuron-ls field {what} is not an integer: {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise NeuronLsError(f"neuron-ls field {what} is not an integer: {value!r}") from None


Runner = Callable[..., subprocess.CompletedProcess]


def run_neuron_ls(
    binary: str = "neuron-ls",
    *,
    timeout_s: float = NEURON_LS_TIMEOUT_S,
    runner: Runner = subprocess.run,
) -> Inventory | None:
    """Run ``neuron-ls -j`` (then the announced ``--output-format json``); None if absent.

    Raises NeuronLsError when it exists but fails or times out: that host is broken, and
    silently falling back to /dev would hide it.
    """
    problems = []
    for flags in (("-j",), ("--output-format", "json")):
        try:
            done = runner(
                [binary, *flags], capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except FileNotFoundError:
            return None
        except subprocess.TimeoutExpired:
            raise NeuronLsError(
                f"{binary} {' '.join(flags)} did not answer within {timeout_s:g} s: "
                "is the Neuron driver loaded (lsmod | grep neuron)?"
            ) from None
        if done.returncode == 0 and done.stdout.strip():
            inventory = parse_neuron_ls(done.stdout)
            return Inventory(
                devices=inventory.devices,
                source=f"{binary} {' '.join(flags)}",
                instance_type=inventory.instance_type,
            )
        problems.append(
            f"`{binary} {' '.join(flags)}` exited {done.returncode}: {done.stderr.strip()[:200]}"
        )
    raise NeuronLsError("; ".join(problems))


def inventory_from_dev(
    dev_dir: str = "/dev", *, cores_per_device: int = DEFAULT_CORES_PER_DEVICE
) -> Inventory:
    """Count ``/dev/neuronN`` nodes (no process information: nobody is reported busy)."""
    try:
        names = os.listdir(dev_dir)
    except OSError:
        names = []
    indexes = sorted(int(m.group(1)) for n in names if (m := _DEV_NODE.match(n)))
    devices = tuple(
        NeuronDevice(
            index=i, core_ids=tuple(range(i * cores_per_device, (i + 1) * cores_per_device))
        )
        for i in indexes
    )
    return Inventory(devices=devices, source=f"{dev_dir}/neuron*")


def read_neuron_ls_file(path: str) -> Inventory:
    with open(path, encoding="utf-8") as handle:
        inventory = parse_neuron_ls(handle.read())
    return Inventory(
        devices=inventory.devices,
        source=f"neuron-ls file {path}",
        instance_type=inventory.instance_type,
    )


def discover_inventory(
    *,
    devices: int | None = None,
    neuron_ls_file: str | None = None,
    dev_dir: str = "/dev",
    neuron_ls: str = "",
    cores_per_device: int = DEFAULT_CORES_PER_DEVICE,
    timeout_s: float = NEURON_LS_TIMEOUT_S,
    runner: Runner = subprocess.run,
) -> Inventory:
    """The first source that answers: file, config count, neuron-ls, then /dev.

    A config count wins over probing (it is how a simulated fleet or a test says "pretend").
    ``neuron_ls``: the configured command; empty: PATH, then /opt/aws/neuron/bin. A
    configured one that does not run is an error, not a silent fallback.
    """
    if neuron_ls_file:
        return read_neuron_ls_file(neuron_ls_file)
    if devices is not None:
        return inventory_from_count(
            devices, cores_per_device=cores_per_device, source="config devices"
        )
    binary = neuron_ls or find_neuron_ls()
    found = run_neuron_ls(binary, timeout_s=timeout_s, runner=runner) if binary else None
    if found is not None:
        return found
    if neuron_ls:
        raise NeuronLsError(
            f"[fleet] neuron_ls = {neuron_ls!r} is not found: install aws-neuronx-tools or "
            "fix the path"
        )
    found = inventory_from_dev(dev_dir, cores_per_device=cores_per_device)
    note = (
        f"neuron-ls not found (PATH, {NEURON_TOOLS_BIN}): counted {found.source} only, so "
        "NeuronCores held by another process cannot be seen; install aws-neuronx-tools or "
        "set [fleet] neuron_ls"
    )
    return Inventory(
        devices=found.devices,
        source=f"{found.source}, neuron-ls not installed",
        notes=(note,) if found.devices else (),
    )


def find_neuron_ls(path: str | None = None) -> str | None:
    """neuron-ls on PATH, else in /opt/aws/neuron/bin (systemd's PATH lacks it)."""
    found = shutil.which("neuron-ls", path=path)
    if found:
        return found
    candidate = os.path.join(NEURON_TOOLS_BIN, "neuron-ls")
    return candidate if os.access(candidate, os.X_OK) else None


# -- core ranges ---------------------------------------------------------------------------


def format_core_range(cores: Iterable[int]) -> str:
    """``(0..7)`` -> ``"0-7"``, one core -> ``"3"`` (NEURON_RT_VISIBLE_CORES syntax)."""
    ordered = sorted(cores)
    if not ordered:
        raise ValueError("empty core group")
    if ordered != list(range(ordered[0], ordered[-1] + 1)):
        raise ValueError(
            f"cores {ordered} are not contiguous; NEURON_RT_VISIBLE_CORES needs a range"
        )
    return str(ordered[0]) if len(ordered) == 1 else f"{ordered[0]}-{ordered[-1]}"


def parse_core_range(text: str) -> tuple[int, ...]:
    """``"8-15"`` -> (8, ..., 15); ``"3"`` -> (3,). Raises ValueError with the accepted forms."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match:
        raise ValueError(
            f"{text!r} is not a core range: write 'FIRST-LAST' (e.g. '0-7') or one index"
        )
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if last < first:
        raise ValueError(f"core range {text!r} ends before it starts")
    return tuple(range(first, last + 1))


def format_devices(devices: Sequence[str]) -> str:
    """``/dev/neuron0 .. /dev/neuron3`` -> ``neuron0-3`` for tables."""
    indexes = [int(m.group(1)) for d in devices if (m := re.search(r"neuron(\d+)$", d))]
    if not indexes:
        return ",".join(devices)
    if indexes == list(range(indexes[0], indexes[-1] + 1)):
        return f"neuron{indexes[0]}" if len(indexes) == 1 else f"neuron{indexes[0]}-{indexes[-1]}"
    return ",".join(f"neuron{i}" for i in indexes)
