"""One frozen FleetConfig from a TOML file, an env file, the environment and the CLI.

Precedence, highest first (like docker compose, where the shell beats ``.env``):

    1. CLI overrides (``--replicas 3``)
    2. environment variables (MODEL_ID, MAX_BATCH_SIZE, ... see ENV_VARS)
    3. the ``--env-file`` (the blog's ``.env``: KEY=VALUE, quotes, comments, no expansion)
    4. the TOML file (``deploy/fleet.toml`` documents every key)
    5. defaults, then values read from the exported model (``neuron_config.json``)

Everything is checked before anything starts -- types, unknown keys, the model's compiled
shape, NeuronCores present and free, ports free -- and every problem is reported at once
in one ConfigError: a fleet that takes 20 minutes to load should not fail on the third
replica for a typo that was visible at second zero.

Secrets (HF_TOKEN, admin_token, api_keys) never appear in repr(), str() or
``to_public_dict()``; put them in the environment or the env file, not the TOML.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import ipaddress
import math
import os
import re
import shlex
import shutil
import socket
import string
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from balancer.admission import QUEUE_ORDERS
from balancer.config import BalancerConfig, UpstreamSpec
from supervisor.model import (
    ModelInfoError,
    NeuronModelInfo,
    check_model,
    has_tokenizer,
    read_model_info,
)
from supervisor.neuron import (
    DEFAULT_CORES_PER_DEVICE,
    Inventory,
    NeuronLsError,
    discover_inventory,
    inventory_from_count,
)
from supervisor.plan import Plan, plan_replicas

LAUNCHERS = ("docker", "native", "simulated", "command")
POLICIES = ("least-outstanding", "round-robin", "least-work")
COMMAND_PLACEHOLDERS = ("port", "cores", "devices", "model", "metrics_port", "name", "host")
DEFAULT_IMAGE = "ghcr.io/huggingface/text-generation-inference:latest-neuron"
SIMULATED_MODEL_ID = "neuron-fleet/simulated"
REDACTED = "***"


class ConfigError(ValueError):
    """Every problem found in a configuration, each saying what to change."""

    def __init__(self, errors: list[str] | tuple[str, ...] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return f"invalid configuration: {self.errors[0]}"
        lines = "\n".join(f"  - {e}" for e in self.errors)
        return f"invalid configuration ({len(self.errors)} problems):\n{lines}"


# -- the dataclasses -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The model every replica serves, and the TGI limits it is served with."""

    id: str = ""
    """MODEL_ID: a local exported folder (host path) or a Hugging Face Hub id."""
    revision: str | None = None
    batch_size: int | None = None
    """MAX_BATCH_SIZE; default: the compiled batch size."""
    max_input_tokens: int | None = None
    """MAX_INPUT_TOKENS; default: sequence_length // 2 (as TGI's entry point does)."""
    max_total_tokens: int | None = None
    """MAX_TOTAL_TOKENS; default: the compiled sequence length."""
    max_batch_prefill_tokens: int | None = None
    """MAX_BATCH_PREFILL_TOKENS; default: batch_size x max_input_tokens (entry point's)."""
    num_cores: int | None = None
    """HF_NUM_CORES = tensor-parallel degree = NeuronCores per replica."""
    auto_cast_type: str | None = None
    """HF_AUTO_CAST_TYPE (bf16, fp16, fp32); default: the compiled type."""
    max_concurrent_requests: int = 128
    """MAX_CONCURRENT_REQUESTS per replica (queued + running; beyond it TGI answers 429)."""
    tokenizer: str | None = None
    """Folder the balancer counts prompt tokens with; default: the model folder if it has one."""
    source: str | None = None
    """The Hub id ``neuron-fleet export`` compiles into ``id``."""
    hf_token: str | None = field(default=None, repr=False)
    """HF_TOKEN, for gated models. Never on a command line; never logged."""

    path: str | None = None
    """Resolved: the local (host) model folder, when there is one."""
    neuron: NeuronModelInfo | None = None
    """Resolved: what the folder's neuron_config.json says."""


@dataclass(frozen=True)
class FleetSettings:
    """How many replicas, on which cores and ports, and how they are looked after."""

    replicas: int | None = None
    """None: as many as fit in the free NeuronCores."""
    cores_per_replica: int | None = None
    """Default: HF_NUM_CORES, else the model's compiled tp_degree."""
    core_groups: tuple[str, ...] = ()
    """Explicit ranges ("0-7", "8-15"); empty: contiguous C-aligned groups from core 0."""
    launcher: str = "docker"
    host: str = "127.0.0.1"
    base_port: int = 8081
    metrics_base_port: int = 9081
    devices: int | None = None
    """Pretend this many devices exist (no neuron-ls); for simulated fleets and tests."""
    cores_per_device: int = DEFAULT_CORES_PER_DEVICE
    """Only used without neuron-ls (device count from config or /dev/neuron*)."""
    min_ready: int = 1
    """Replicas that must be ready before the balancer starts taking traffic."""
    startup_timeout_s: float = 1800.0
    drain_timeout_s: float = 300.0
    stop_grace_s: float = 30.0
    restart_backoff_initial_s: float = 1.0
    restart_backoff_max_s: float = 60.0
    crash_loop_max_exits: int = 5
    crash_loop_window_s: float = 600.0
    unhealthy_restart_after_s: float = 300.0
    """Restart a replica whose /health fails this long; 0: never."""


@dataclass(frozen=True)
class DockerLauncherConfig:
    binary: str = "docker"
    image: str = DEFAULT_IMAGE
    data_dir: str | None = None
    """Host folder mounted at /data (the compose file's ``$PWD:/data``); default: the
    parent of a local model folder."""
    data_mount: str = "/data"
    init: bool = True
    """``docker run --init``: a real PID 1 that forwards SIGTERM and reaps the shards."""
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class NativeLauncherConfig:
    binary: str = "text-generation-launcher"
    shard_uds_dir: str = "/tmp"
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class CommandLauncherConfig:
    template: str = ""
    """e.g. ``my-server --port {port} --cores {cores}``; placeholders: COMMAND_PLACEHOLDERS."""


@dataclass(frozen=True)
class SimulatedLauncherConfig:
    speed: float = 1.0
    startup_delay_s: float = 0.0
    seed: int | None = None
    """Replica i gets seed + i (same load, different but reproducible streams)."""
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class LauncherConfig:
    docker: DockerLauncherConfig = field(default_factory=DockerLauncherConfig)
    native: NativeLauncherConfig = field(default_factory=NativeLauncherConfig)
    command: CommandLauncherConfig = field(default_factory=CommandLauncherConfig)
    simulated: SimulatedLauncherConfig = field(default_factory=SimulatedLauncherConfig)


@dataclass(frozen=True)
class FleetConfig:
    model: ModelConfig
    fleet: FleetSettings
    launcher: LauncherConfig
    balancer: BalancerConfig
    plan: Plan
    """The validated plan (replicas, cores, ports) this config was checked against."""
    config_path: str | None = None
    warnings: tuple[str, ...] = ()
    """Not fatal, worth showing (ignored env-file keys, unused cores...)."""

    @property
    def model_dir(self) -> str | None:
        """The local model folder (None for a Hub id)."""
        return self.model.path

    @property
    def tokenizer_path(self) -> str | None:
        return self.balancer.tokenizer_path

    def to_public_dict(self) -> dict[str, Any]:
        """Everything, for display and JSON, with secrets replaced by ``***``."""
        data = {
            "config_path": self.config_path,
            "model": dataclasses.asdict(self.model),
            "fleet": dataclasses.asdict(self.fleet),
            "launcher": dataclasses.asdict(self.launcher),
            "balancer": dataclasses.asdict(self.balancer),
            "plan": self.plan.to_dict(),
            "warnings": list(self.warnings),
        }
        data["model"]["hf_token"] = REDACTED if self.model.hf_token else None
        data["balancer"]["admin_token"] = REDACTED if self.balancer.admin_token else None
        data["balancer"]["api_keys"] = [REDACTED] * len(self.balancer.api_keys)
        return data

    redacted = to_public_dict


# -- where values come from ----------------------------------------------------------------

# Environment variable -> (section, key). The first block is the TGI image's own names,
# so the blog's .env works unchanged.
ENV_VARS: dict[str, tuple[str, str]] = {
    "MODEL_ID": ("model", "id"),
    "REVISION": ("model", "revision"),
    "MAX_BATCH_SIZE": ("model", "batch_size"),
    "MAX_INPUT_TOKENS": ("model", "max_input_tokens"),
    "MAX_INPUT_LENGTH": ("model", "max_input_tokens"),
    "MAX_TOTAL_TOKENS": ("model", "max_total_tokens"),
    "MAX_BATCH_PREFILL_TOKENS": ("model", "max_batch_prefill_tokens"),
    "HF_NUM_CORES": ("model", "num_cores"),
    "HF_AUTO_CAST_TYPE": ("model", "auto_cast_type"),
    "MAX_CONCURRENT_REQUESTS": ("model", "max_concurrent_requests"),
    "HF_TOKEN": ("model", "hf_token"),
    "NEURON_FLEET_REPLICAS": ("fleet", "replicas"),
    "NEURON_FLEET_CORES_PER_REPLICA": ("fleet", "cores_per_replica"),
    "NEURON_FLEET_LAUNCHER": ("fleet", "launcher"),
    "NEURON_FLEET_DEVICES": ("fleet", "devices"),
    "NEURON_FLEET_LISTEN": ("balancer", "listen"),
    "NEURON_FLEET_ADMIN_TOKEN": ("balancer", "admin_token"),
    "NEURON_FLEET_API_KEYS": ("balancer", "api_keys"),
}

SECRET_KEYS = {("model", "hf_token"), ("balancer", "admin_token"), ("balancer", "api_keys")}

_DERIVED = {"model": {"path", "neuron"}}
_BALANCER_DERIVED = {"host", "port", "upstreams"}

_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "fleet": FleetSettings,
    "launcher.docker": DockerLauncherConfig,
    "launcher.native": NativeLauncherConfig,
    "launcher.command": CommandLauncherConfig,
    "launcher.simulated": SimulatedLauncherConfig,
    "balancer": BalancerConfig,
}


def _settable(section: str) -> dict[str, Any]:
    """key -> type for the keys a user may set in ``section``."""
    cls = _SECTIONS[section]
    hints = typing.get_type_hints(cls)
    keys = {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if f.name not in _DERIVED.get(section, ())
    }
    if section == "balancer":
        for name in _BALANCER_DERIVED:
            keys.pop(name, None)
        keys["listen"] = str
    return keys


@dataclass
class _Value:
    value: Any
    source: str
    text: bool
    """From an environment string (needs parsing) rather than a typed TOML value."""


class _Layers:
    """section -> key -> value, later layers overriding earlier ones."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, _Value]] = {s: {} for s in _SECTIONS}
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def set(self, section: str, key: str, value: Any, source: str, *, text: bool) -> None:
        allowed = _settable(section)
        if key not in allowed:
            self.errors.append(_unknown(f"[{section}]", key, allowed, source))
            return
        self.values[section][key] = _Value(value, source, text)

    def add_tree(self, tree: Mapping[str, Any], source: str) -> None:
        """A TOML document or nested overrides."""
        for name, body in tree.items():
            if name == "launcher":
                if not isinstance(body, Mapping):
                    self.errors.append(
                        f"[launcher] must be a table of [launcher.KIND] tables ({source})"
                    )
                    continue
                for kind, sub in body.items():
                    section = f"launcher.{kind}"
                    if section not in _SECTIONS:
                        self.errors.append(_unknown("[launcher]", kind, LAUNCHERS, source))
                    elif not isinstance(sub, Mapping):
                        self.errors.append(f"[{section}] must be a table ({source})")
                    else:
                        self._add_section(section, sub, source)
            elif name in _SECTIONS:
                if not isinstance(body, Mapping):
                    self.errors.append(
                        f"[{name}] must be a table, got {type(body).__name__} ({source})"
                    )
                else:
                    self._add_section(name, body, source)
            else:
                self.errors.append(
                    _unknown("top level:", name, ["model", "fleet", "launcher", "balancer"], source)
                )

    def _add_section(self, section: str, body: Mapping[str, Any], source: str) -> None:
        for key, value in body.items():
            if value is None:  # overrides from argparse: None means "not given"
                continue
            if section == "balancer" and key in ("host", "port"):
                self.errors.append(
                    f'[balancer] {key}: write listen = "HOST:PORT" instead '
                    f'(e.g. "127.0.0.1:8080") ({source})'
                )
                continue
            if (section, key) in SECRET_KEYS and source != "command line":
                self.warnings.append(
                    f"{source}: [{section}] {key} is a secret in a config file: prefer the "
                    "environment or the env file (HF_TOKEN, NEURON_FLEET_ADMIN_TOKEN, ...)"
                )
            self.set(section, key, value, source, text=False)

    def add_env(self, env: Mapping[str, str], source: str, *, warn_unknown: bool) -> None:
        for name, raw in env.items():
            target = ENV_VARS.get(name)
            if target is None:
                if warn_unknown:
                    close = difflib.get_close_matches(name, ENV_VARS, n=1, cutoff=0.75)
                    hint = f" (did you mean {close[0]}?)" if close else ""
                    self.warnings.append(
                        f"{source}: ignored {name}, not a neuron-fleet setting{hint}"
                    )
                continue
            if raw == "":
                continue
            if "${" in raw or raw.startswith("$"):
                self.warnings.append(
                    f"{source}: {name} contains '$', which neuron-fleet does not expand: "
                    "write the value itself"
                )
            self.set(*target, raw, f"{source} {name}", text=True)


def _not_one_of(where: str, value: str, allowed: Any) -> str:
    close = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(allowed)}"
    return f"{where} = {value!r} is not known: {hint}"


def _unknown(where: str, key: str, allowed: Any, source: str) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
    hint = (
        f": did you mean {close[0]!r}?"
        if close
        else f": known keys are {', '.join(sorted(allowed))}"
    )
    return f"{where} unknown key {key!r} ({source}){hint}"


# -- the .env file -------------------------------------------------------------------------

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def parse_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines as docker compose reads them, without variable expansion.

    ``# comments``, blank lines, ``export KEY=...``, 'single' (literal) and "double"
    (\\n \\t \\\\ \\" escapes) quotes, and `` #`` inline comments after unquoted values.
    Raises ConfigError listing every bad line.
    """
    values, errors = _read_env_file(path)
    if errors:
        raise ConfigError(errors)
    return values


def _read_env_file(path: str) -> tuple[dict[str, str], list[str]]:
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        return {}, [f"cannot read env file {path}: {exc.strerror or exc}"]
    values: dict[str, str] = {}
    errors = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, rest = line.partition("=")
        key = key.strip()
        if not sep or not _ENV_KEY.fullmatch(key):
            # The line is not echoed: it may be a mistyped secret.
            errors.append(f"{path}:{number}: expected KEY=VALUE (a letter or _, then =)")
            continue
        try:
            values[key] = _env_value(rest.strip())
        except ValueError as exc:
            errors.append(f"{path}:{number}: {key}: {exc}")
    return values, errors


def _env_value(text: str) -> str:
    if not text or text[0] not in "'\"":
        for marker in (" #", "\t#"):
            if marker in text:
                text = text[: text.index(marker)]
        return text.rstrip()
    quote = text[0]
    out = []
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == quote:
            tail = text[i + 1 :].strip()
            if tail and not tail.startswith("#"):
                raise ValueError("unexpected text after the closing quote")
            return "".join(out)
        if ch == "\\" and quote == '"' and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "t": "\t", "\\": "\\", '"': '"'}.get(nxt, "\\" + nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    raise ValueError(f"unterminated {quote} quote (values cannot span lines)")


# -- typing values -------------------------------------------------------------------------


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _coerce(section: str, key: str, tp: Any, item: _Value) -> Any:
    """The value as ``tp``; raises ValueError with the message to show."""
    base, optional = tp, False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base, optional = args[0], True
    value = item.value
    secret = (section, key) in SECRET_KEYS
    shown = "a secret value" if secret else repr(value)
    if optional and isinstance(value, str) and value.strip().lower() == "auto" and base is int:
        return None
    if typing.get_origin(base) is tuple:
        if item.text:
            if key == "extra_args":
                return tuple(shlex.split(value))
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, str) and key == "extra_args":
            return tuple(shlex.split(value))
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(f"expected a list of strings, got {shown}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if item.text and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"expected true or false, got {shown}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if item.text:
            try:
                return int(value.strip())
            except ValueError:
                pass
        hint = ' (or "auto")' if optional else ""
        raise ValueError(f"expected an integer{hint}, got {shown}")
    if base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if item.text:
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {shown}")
    if base is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {shown}")
    raise ValueError(f"unsupported setting type {tp!r}")  # pragma: no cover - a bug here


def _typed(layers: _Layers, section: str, errors: list[str]) -> dict[str, Any]:
    allowed = _settable(section)
    out = {}
    for key, item in layers.values[section].items():
        try:
            out[key] = _coerce(section, key, allowed[key], item)
        except ValueError as exc:
            errors.append(f"[{section}] {key}: {exc} (from {item.source})")
    return out


# -- ports ---------------------------------------------------------------------------------


def split_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"``, ``"localhost:8080"``, ``"[::1]:8080"``, ``"8080"`` -> (host, port)."""
    text = text.strip()
    match = re.fullmatch(r"(?:\[([^\]]+)\]|([^:\[\]]*)):(\d+)", text) or re.fullmatch(
        r"()()(\d+)", text
    )
    if not match:
        raise ValueError(f'listen = {text!r} is not HOST:PORT (e.g. "127.0.0.1:8080")')
    host = match.group(1) or match.group(2) or "127.0.0.1"
    return host, int(match.group(3))


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


def _check_ports(
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


# -- loading -------------------------------------------------------------------------------


def load_config(
    path: str | None,
    *,
    env: Mapping[str, str] | None = None,
    env_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    inventory: Inventory | None = None,
    check_host: bool = True,
    read_model: bool = True,
) -> FleetConfig:
    """Read, merge, resolve and validate; raise ConfigError listing every problem.

    ``env``: the environment to read (default ``os.environ``). ``overrides``: CLI values,
    nested (``{"fleet": {"replicas": 3}}``) or dotted (``{"fleet.replicas": 3}``); None
    values are ignored. ``inventory``: the host's devices (default: config ``devices``,
    else neuron-ls, else /dev). ``check_host=False`` skips what looks at this machine
    (neuron-ls, ports in use, binaries on PATH, model folder present) -- for ``export``
    and for tests. ``read_model=False`` ignores what the model folder says (``export``,
    which is about to replace it).
    """
    layers = _Layers()
    if path is not None:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        layers.add_tree(document, path)
    if env_file is not None:
        env_values, env_errors = _read_env_file(env_file)
        layers.errors += env_errors
        layers.add_env(env_values, f"env file {env_file}", warn_unknown=True)
    layers.add_env(os.environ if env is None else env, "environment", warn_unknown=False)
    if overrides:
        layers.add_tree(_nest(overrides), "command line")

    errors = list(layers.errors)
    warnings = list(layers.warnings)
    raw = {section: _typed(layers, section, errors) for section in _SECTIONS}
    try:
        fleet = FleetSettings(**raw["fleet"])
        launcher = LauncherConfig(
            docker=DockerLauncherConfig(**raw["launcher.docker"]),
            native=NativeLauncherConfig(**raw["launcher.native"]),
            command=CommandLauncherConfig(**raw["launcher.command"]),
            simulated=SimulatedLauncherConfig(**raw["launcher.simulated"]),
        )
        model = ModelConfig(**raw["model"])
    except TypeError as exc:  # pragma: no cover - keys are checked above
        raise ConfigError(str(exc)) from None
    balancer_raw = raw["balancer"]

    errors += _check_fleet(fleet, launcher, check_host)
    if _is_public(fleet.host):
        warnings.append(
            f"[fleet] host = {fleet.host!r}: replicas are reachable from other hosts, around "
            'the balancer; "127.0.0.1" keeps them private'
        )
    model, fleet, model_errors, model_warnings = _resolve_model(
        model, fleet, launcher, check_host, read_model
    )
    errors += model_errors
    warnings += model_warnings

    listen = ("127.0.0.1", 8080)
    if "listen" in balancer_raw:
        try:
            listen = split_listen(balancer_raw.pop("listen"))
        except ValueError as exc:
            errors.append(f"[balancer] {exc}")
    if balancer_raw.get("policy", "least-outstanding") not in POLICIES:
        errors.append(_not_one_of("[balancer] policy", balancer_raw["policy"], POLICIES))
    if balancer_raw.get("queue_order", "fifo") not in QUEUE_ORDERS:
        errors.append(
            _not_one_of("[balancer] queue_order", balancer_raw["queue_order"], QUEUE_ORDERS)
        )

    plan = None
    if fleet.cores_per_replica is not None and fleet.cores_per_replica >= 1:
        inv, inv_errors = _inventory(fleet, inventory, check_host)
        errors += inv_errors
        if inv is not None:
            from supervisor.launchers import launcher_whole_devices

            plan, plan_errors = plan_replicas(
                fleet, inv, whole_devices=launcher_whole_devices(fleet.launcher)
            )
            errors += plan_errors
    if plan is not None:
        warnings += list(plan.notes)
        errors += _check_ports(fleet, launcher, plan, listen, check_host)
        if fleet.min_ready > len(plan.replicas):
            errors.append(
                f"[fleet] min_ready = {fleet.min_ready} but only {len(plan.replicas)} replicas are "
                f"planned: lower min_ready to at most {len(plan.replicas)}"
            )

    if errors:
        raise ConfigError(errors)
    assert plan is not None
    balancer = _balancer(balancer_raw, listen, model, plan)
    return FleetConfig(
        model=model,
        fleet=fleet,
        launcher=launcher,
        balancer=balancer,
        plan=plan,
        config_path=os.path.abspath(path) if path else None,
        warnings=tuple(warnings),
    )


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"fleet.replicas": 3}`` and ``{"fleet": {"replicas": 3}}`` -> the nested form."""
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            node = tree
            for part in key.split("."):
                node = node.setdefault(part, {})
            node.update({k: v for k, v in value.items()})
            continue
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _is_public(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host not in ("localhost", "ip6-localhost")


def _check_fleet(fleet: FleetSettings, launcher: LauncherConfig, check_host: bool) -> list[str]:
    errors = []
    if fleet.launcher not in LAUNCHERS:
        errors.append(_not_one_of("[fleet] launcher", fleet.launcher, LAUNCHERS))
    positive = {
        "replicas": fleet.replicas,
        "cores_per_replica": fleet.cores_per_replica,
        "devices": fleet.devices,
        "cores_per_device": fleet.cores_per_device,
        "min_ready": fleet.min_ready,
        "crash_loop_max_exits": fleet.crash_loop_max_exits,
        "startup_timeout_s": fleet.startup_timeout_s,
        "restart_backoff_initial_s": fleet.restart_backoff_initial_s,
        "restart_backoff_max_s": fleet.restart_backoff_max_s,
        "crash_loop_window_s": fleet.crash_loop_window_s,
    }
    for key, value in positive.items():
        if value is not None and value <= 0:
            errors.append(f"[fleet] {key} = {value} must be greater than 0")
    for key in ("drain_timeout_s", "stop_grace_s", "unhealthy_restart_after_s"):
        if getattr(fleet, key) < 0:
            errors.append(f"[fleet] {key} = {getattr(fleet, key)} must be 0 or more")
    if fleet.restart_backoff_initial_s > fleet.restart_backoff_max_s:
        errors.append(
            f"[fleet] restart_backoff_initial_s = {fleet.restart_backoff_initial_s} exceeds "
            f"restart_backoff_max_s = {fleet.restart_backoff_max_s}"
        )
    if fleet.launcher == "command":
        errors += check_command_template(launcher.command.template)
    if fleet.launcher == "simulated" and launcher.simulated.speed <= 0:
        errors.append(
            f"[launcher.simulated] speed = {launcher.simulated.speed} must be greater than 0"
        )
    if fleet.launcher == "docker":
        try:
            ipaddress.ip_address(fleet.host)
        except ValueError:
            errors.append(
                f"[fleet] host = {fleet.host!r}: docker publishes ports on an IP address, "
                'not a name: use "127.0.0.1"'
            )
    if fleet.launcher == "docker" and not launcher.docker.image:
        errors.append("[launcher.docker] image is empty: set it (e.g. " + DEFAULT_IMAGE + ")")
    if check_host:
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
                f"[launcher.native] shard_uds_dir {launcher.native.shard_uds_dir!r} "
                "is not a directory"
            )
        if (
            fleet.launcher == "docker"
            and launcher.docker.data_dir
            and not os.path.isdir(launcher.docker.data_dir)
        ):
            errors.append(
                f"[launcher.docker] data_dir {launcher.docker.data_dir!r} is not a directory"
            )
    return errors


def check_command_template(template: str) -> list[str]:
    if not template.strip():
        return ['[launcher.command] template is empty: e.g. template = "my-server --port {port}"']
    errors = []
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return [f"[launcher.command] template: {exc} (write {{{{ and }}}} for literal braces)"]
    for name in fields:
        if name not in COMMAND_PLACEHOLDERS:
            allowed = ["{" + p + "}" for p in COMMAND_PLACEHOLDERS]
            errors.append(
                _not_one_of("[launcher.command] template placeholder", "{" + name + "}", allowed)
            )
    try:
        shlex.split(template)
    except ValueError as exc:
        errors.append(f"[launcher.command] template cannot be split like a shell line: {exc}")
    return errors


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~"))


def _resolve_model(
    model: ModelConfig,
    fleet: FleetSettings,
    launcher: LauncherConfig,
    check_host: bool,
    read_model: bool = True,
) -> tuple[ModelConfig, FleetSettings, list[str], list[str]]:
    """Find the local folder, read its neuron_config.json, fill defaults, check limits."""
    errors: list[str] = []
    warnings: list[str] = []
    if not model.id:
        if fleet.launcher == "simulated":
            model = dataclasses.replace(model, id=SIMULATED_MODEL_ID)
        else:
            errors.append(
                "[model] id is not set: set MODEL_ID (env or --env-file) or [model] id to an "
                "exported model folder or a Hub id"
            )
    path = _local_model_path(model.id, fleet.launcher, launcher.docker) if model.id else None
    hardware = fleet.launcher in ("docker", "native")
    needs_folder = hardware and check_host and read_model
    if model.id and path is None and _looks_like_path(model.id) and needs_folder:
        docker = launcher.docker
        if (
            fleet.launcher == "docker"
            and model.id.startswith(docker.data_mount + "/")
            and not docker.data_dir
        ):
            errors.append(
                f"MODEL_ID {model.id!r} is a path inside the container: set [launcher.docker] "
                f"data_dir to the host folder mounted at {docker.data_mount} "
                "(the compose file's $PWD)"
            )
        else:
            errors.append(
                f"[model] id {model.id!r} is not a folder on this host: run `neuron-fleet export` "
                "first, or fix MODEL_ID"
            )

    info = None
    if path is not None and read_model:
        try:
            info = read_model_info(path)
        except ModelInfoError as exc:
            errors.append(str(exc))
        if info is None and hardware and not errors:
            warnings.append(
                f"{path} has no neuron_config.json: TGI will compile it at every start (slow); "
                "run `neuron-fleet export` once"
            )

    # cores per replica: [fleet] > HF_NUM_CORES > compiled tp_degree
    cores = fleet.cores_per_replica
    if cores is not None and model.num_cores is not None and cores != model.num_cores:
        errors.append(
            f"[fleet] cores_per_replica = {cores} but HF_NUM_CORES / [model] num_cores = "
            f"{model.num_cores}: TGI shards the model over HF_NUM_CORES cores; make them equal"
        )
    if cores is None:
        cores = model.num_cores or (info.tp_degree if info else None)
    if cores is None:
        errors.append(
            "[fleet] cores_per_replica is not set and cannot be read from the model: set it "
            "(or HF_NUM_CORES) to the tensor-parallel degree the model was compiled for"
        )

    if info is not None:
        errors += check_model(
            info,
            cores_per_replica=cores,
            batch_size=model.batch_size,
            max_total_tokens=model.max_total_tokens,
            max_input_tokens=model.max_input_tokens,
            auto_cast_type=model.auto_cast_type,
        )
    batch = model.batch_size or (info.batch_size if info else None)
    total = model.max_total_tokens or (info.sequence_length if info else None)
    max_input = model.max_input_tokens or (info.default_max_input_tokens if info else None)
    dtype = model.auto_cast_type or (info.dtype if info else None)
    prefill = model.max_batch_prefill_tokens
    if prefill is None and batch and max_input:
        prefill = batch * max_input

    for key, value in (
        ("batch_size", batch),
        ("max_input_tokens", max_input),
        ("max_total_tokens", total),
        ("max_batch_prefill_tokens", prefill),
        ("max_concurrent_requests", model.max_concurrent_requests),
    ):
        if value is not None and value < 1:
            errors.append(f"[model] {key} = {value} must be at least 1")
    if max_input and total and max_input >= total:
        errors.append(
            f"[model] max_input_tokens = {max_input} must be below max_total_tokens = {total} "
            "(TGI needs room for at least one generated token)"
        )
    if prefill and max_input and prefill < max_input:
        errors.append(
            f"[model] max_batch_prefill_tokens = {prefill} is below "
            f"max_input_tokens = {max_input}: "
            "TGI's router refuses that"
        )
    if batch and model.max_concurrent_requests < batch:
        errors.append(
            f"[model] max_concurrent_requests = {model.max_concurrent_requests} is below the batch "
            f"size {batch}: the batch could never fill"
        )

    tokenizer = model.tokenizer
    if tokenizer is not None and check_host and not os.path.isdir(tokenizer):
        errors.append(f"[model] tokenizer {tokenizer!r} is not a folder")
    if tokenizer is None and path is not None and has_tokenizer(path):
        tokenizer = path

    model = dataclasses.replace(
        model,
        batch_size=batch,
        max_total_tokens=total,
        max_input_tokens=max_input,
        max_batch_prefill_tokens=prefill,
        auto_cast_type=dtype,
        num_cores=cores,
        tokenizer=tokenizer,
        path=path,
        neuron=info,
    )
    fleet = dataclasses.replace(fleet, cores_per_replica=cores)
    return model, fleet, errors, warnings


def _local_model_path(model_id: str, kind: str, docker: DockerLauncherConfig) -> str | None:
    expanded = os.path.expanduser(model_id)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    # The blog's .env names the folder as the container sees it (/data/exportedmodel).
    prefix = docker.data_mount.rstrip("/") + "/"
    if kind == "docker" and docker.data_dir and model_id.startswith(prefix):
        candidate = os.path.join(docker.data_dir, model_id[len(prefix) :])
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    return None


def _inventory(
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


def _balancer(
    raw: dict[str, Any], listen: tuple[str, int], model: ModelConfig, plan: Plan
) -> BalancerConfig:
    values = dict(raw)
    values.setdefault(
        "max_inflight_per_replica", model.batch_size or BalancerConfig.max_inflight_per_replica
    )
    values.setdefault("max_input_tokens", model.max_input_tokens)
    values.setdefault("tokenizer_path", model.tokenizer)
    upstreams = tuple(UpstreamSpec(url=r.url, name=r.name, cores=r.cores) for r in plan.replicas)
    return BalancerConfig(host=listen[0], port=listen[1], upstreams=upstreams, **values)


def stop_grace_seconds(fleet: FleetSettings) -> int:
    """``docker stop -t`` takes whole seconds."""
    return max(0, math.ceil(fleet.stop_grace_s))
