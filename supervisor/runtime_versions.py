"""Which optimum-neuron and neuronx-cc the replicas run, and whether an export fits them.

optimum-neuron refuses, at load time, an export made by any other version of itself or of
the compiler: ``NeuronConfig.from_dict`` compares the ``optimum_neuron_version`` and
``neuronxcc_version`` saved in neuron_config.json with ``optimum.neuron.version.__version__``
and ``neuronxcc.__version__`` and raises (optimum-neuron 0.4.5 and 0.3.0,
optimum/neuron/configuration_utils.py; the compiler's version from
optimum/neuron/utils/version_utils.py ``get_neuronxcc_version``). TGI's Neuron image pins
its own pair (TGI 3.3.x Dockerfile.neuron: optimum-neuron v0.3.0, neuronx-cc
2.19.8089.0+8ab9f450), so a replica would crash-loop minutes into every start. Asking the
runtime the same two attributes before anything starts turns that into one clear error.

The image is asked once per image id (``docker run --rm --entrypoint python IMAGE -c``)
and the answer cached on disk; the native launcher's answer comes from the Python that
runs TGI's ``text-generation-server``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.model import NeuronModelInfo

QUERY_TIMEOUT_S = 180.0
"""Importing optimum.neuron patches transformers: tens of seconds on a cold image."""
QUERY_MARKER = "# neuron-fleet: runtime versions"
VERSIONS_CODE = f"""{QUERY_MARKER}
import json
import neuronxcc
from optimum.neuron.version import __version__
print(json.dumps({{"optimum_neuron": __version__, "neuronxcc": neuronxcc.__version__}}))
"""
CACHE_FILE = "image-versions.json"

Runner = Callable[..., subprocess.CompletedProcess]


class VersionQueryError(RuntimeError):
    """The runtime could not be asked (image not pulled, docker down, no TGI server)."""


@dataclass(frozen=True)
class RuntimeVersions:
    optimum_neuron: str
    neuronxcc: str
    where: str
    """What was asked: ``image ghcr.io/...:latest-neuron`` or ``/usr/bin/python3``."""


def cache_dir() -> str:
    """systemd's CacheDirectory= ($CACHE_DIRECTORY), else XDG, else ~/.cache."""
    base = os.environ.get("CACHE_DIRECTORY") or os.environ.get("XDG_CACHE_HOME")
    return os.path.join(base or os.path.expanduser("~/.cache"), "neuron-fleet")


def image_versions(
    binary: str,
    image: str,
    *,
    runner: Runner = subprocess.run,
    cache: str | None = None,
) -> RuntimeVersions:
    """What ``image`` runs; never pulls (``docker image inspect`` first)."""
    inspected = _run(
        [binary, "image", "inspect", "--format", "{{.Id}}", image], runner, timeout_s=60
    )
    image_id = inspected.strip()
    if not image_id:
        raise VersionQueryError(f"`docker image inspect {image}` printed no image id")
    path = os.path.join(cache or cache_dir(), CACHE_FILE)
    cached = _read_cache(path).get(image_id)
    if cached:
        return RuntimeVersions(cached["optimum_neuron"], cached["neuronxcc"], f"image {image}")
    query = [binary, "run", "--rm", "--network", "none", "--entrypoint", "python", image]
    out = _run([*query, "-c", VERSIONS_CODE], runner)
    versions = _parse(out, f"image {image}")
    _write_cache(
        path,
        image_id,
        {"optimum_neuron": versions.optimum_neuron, "neuronxcc": versions.neuronxcc},
    )
    return versions


def native_versions(
    server: str = "text-generation-server", *, runner: Runner = subprocess.run
) -> RuntimeVersions:
    """What the Python running TGI's Neuron server imports (its script's ``#!`` line)."""
    found = shutil.which(server)
    if found is None:
        raise VersionQueryError(f"{server!r} is not on PATH")
    with open(found, "rb") as handle:
        first = handle.readline().decode("utf-8", "replace").strip()
    python = first[2:].strip().split()[0] if first.startswith("#!") else ""
    if not python or not os.path.isabs(python):
        raise VersionQueryError(f"cannot tell which Python runs {found} (first line {first!r})")
    return _parse(_run([python, "-c", VERSIONS_CODE], runner), python)


def python_versions(python: str, *, runner: Runner = subprocess.run) -> RuntimeVersions:
    """What ``python`` imports: vLLM's Python for the native launcher with engine vllm."""
    found = shutil.which(python)
    if found is None:
        raise VersionQueryError(f"{python!r} is not on PATH")
    return _parse(_run([found, "-c", VERSIONS_CODE], runner), found)


def mismatch(info: NeuronModelInfo, runtime: RuntimeVersions) -> str | None:
    """Why the replicas would refuse this export (None: they load it)."""
    differs = []
    if info.optimum_neuron_version and info.optimum_neuron_version != runtime.optimum_neuron:
        differs.append(
            f"optimum-neuron {info.optimum_neuron_version} (the {runtime.where} runs "
            f"{runtime.optimum_neuron})"
        )
    if info.neuronxcc_version and info.neuronxcc_version != runtime.neuronxcc:
        differs.append(
            f"neuronx-cc {info.neuronxcc_version} (the {runtime.where} runs {runtime.neuronxcc})"
        )
    if not differs:
        return None
    return (
        f"{info.path} was exported with {' and '.join(differs)}: optimum-neuron refuses an "
        "export made by another version, so every replica would fail to load it. Re-export "
        "with the replicas' own versions: `neuron-fleet export --force` (with the docker "
        "launcher it compiles inside the serving image)"
    )


def _run(argv: list[str], runner: Runner, timeout_s: float = QUERY_TIMEOUT_S) -> str:
    try:
        done = runner(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise VersionQueryError(f"{argv[0]!r} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise VersionQueryError(f"`{' '.join(argv[:4])}` took over {timeout_s:g} s") from None
    if done.returncode:
        tail = (done.stderr or "").strip().splitlines()[-1:] or [""]
        raise VersionQueryError(f"`{' '.join(argv[:4])}` exited {done.returncode}: {tail[0]}")
    return done.stdout


def _parse(out: str, where: str) -> RuntimeVersions:
    for line in reversed(out.strip().splitlines()):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and data.get("optimum_neuron") and data.get("neuronxcc"):
            return RuntimeVersions(str(data["optimum_neuron"]), str(data["neuronxcc"]), where)
    raise VersionQueryError(f"{where} did not print its optimum-neuron / neuronx-cc versions")


def _read_cache(path: str) -> dict[str, dict[str, str]]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: str, image_id: str, versions: dict[str, str]) -> None:
    """Best effort: an unwritable cache only means asking again next time."""
    data = _read_cache(path)
    data[image_id] = versions
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass
