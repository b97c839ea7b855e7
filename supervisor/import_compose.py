"""docker compose + .env for ``neuron-fleet import``: the TGI replica services, their
environment and devices, the load balancer's published port -> fleet.toml.

The usual recipe (one TGI Neuron container per replica, each given whole ``/dev/neuronN``
devices and its own published port, an nginx container balancing them, a ``.env`` holding
MODEL_ID and the batch limits) maps onto one fleet.toml:

    compose replica services   -> [fleet] replicas, cores_per_replica (HF_NUM_CORES, or the
                                  devices: device N holds cores N*C .. N*C+C-1), base_port
                                  (the published ports), core_groups when they are not the
                                  default layout; [launcher.docker] image, data_dir (the
                                  ``$PWD:/data`` bind mount), extra ``-e`` / ``-v`` / flags
    their environment + .env   -> [model] (after ``${VAR}`` substitution, as compose does)
    the nginx service + conf   -> [balancer] listen (its published port)

Services of optimum-neuron's vLLM image, configured by SM_ON_* variables (its own
data-parallel benchmarks are written so), become an ``engine = "vllm"`` fleet: each SM_ON_*
variable is read as its TGI equivalent (SM_ON_AS_TGI).

What has no equivalent, or behaves differently, is printed -- never silently dropped.
Secret values (HF_TOKEN and anything named like a token, key or password) are never
written to fleet.toml and never printed: only their names are, with where to put them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.config import (
    DEFAULT_IMAGE,
    DEFAULT_VLLM_IMAGE,
    ConfigError,
    FleetSettings,
    parse_env_file,
)
from supervisor.import_common import (
    HF_TOKEN_NAMES,
    SERVICE_ENV_FILE,
    ImportProblem,
    ImportResult,
    Notes,
    is_secret,
    written_header,
)
from supervisor.import_nginx import NginxInfo, analyse_nginx, balancer_values, nginx_notes
from supervisor.import_toml import TomlWriter
from supervisor.neuron import DEFAULT_CORES_PER_DEVICE, format_core_range, format_devices
from supervisor.vllm import VLLM_IMAGE_PORT

TGI_DEFAULT_PORT = 80
"""PORT inside the TGI image when the compose file does not set it."""

# TGI environment variable -> [model] key (MAX_INPUT_LENGTH is TGI's older name).
MODEL_ENV = {
    "MODEL_ID": "id",
    "REVISION": "revision",
    "MAX_BATCH_SIZE": "batch_size",
    "MAX_INPUT_TOKENS": "max_input_tokens",
    "MAX_INPUT_LENGTH": "max_input_tokens",
    "MAX_TOTAL_TOKENS": "max_total_tokens",
    "MAX_BATCH_PREFILL_TOKENS": "max_batch_prefill_tokens",
    "HF_AUTO_CAST_TYPE": "auto_cast_type",
    "MAX_CONCURRENT_REQUESTS": "max_concurrent_requests",
    "SERVED_MODEL_NAME": "served_model_name",  # SM_ON_SERVED_MODEL_NAME (vLLM image)
}
INT_MODEL_KEYS = frozenset(
    {
        "batch_size",
        "max_input_tokens",
        "max_total_tokens",
        "max_batch_prefill_tokens",
        "max_concurrent_requests",
    }
)
MODEL_COMMENTS = {
    "batch_size": "MAX_BATCH_SIZE: static batch slots per replica",
    "max_input_tokens": "MAX_INPUT_TOKENS",
    "max_total_tokens": "MAX_TOTAL_TOKENS: prompt + generation",
    "max_batch_prefill_tokens": "MAX_BATCH_PREFILL_TOKENS",
    "auto_cast_type": "HF_AUTO_CAST_TYPE",
    "max_concurrent_requests": "MAX_CONCURRENT_REQUESTS per replica (queued + running)",
    "revision": "REVISION",
    "served_model_name": "what clients sent as model (SM_ON_SERVED_MODEL_NAME, else SM_ON_MODEL)",
}
# Set per replica by neuron-fleet's docker launcher.
LAUNCHER_ENV = frozenset({"PORT", "PROMETHEUS_PORT", "HF_NUM_CORES"})
# optimum-neuron's vLLM image reads SM_ON_NAME=value as `optimum-cli neuron serve --name value`
# (0.4.5, docker/vllm/Dockerfile, entrypoint.sh), as its own compose benchmarks use it
# (benchmark/vllm/data-parallel/*/docker-compose*.yaml): each is read as TGI's equivalent.
SM_ON_AS_TGI = {
    "SM_ON_MODEL": "MODEL_ID",
    "SM_ON_BATCH_SIZE": "MAX_BATCH_SIZE",
    "SM_ON_SEQUENCE_LENGTH": "MAX_TOTAL_TOKENS",
    "SM_ON_TENSOR_PARALLEL_SIZE": "HF_NUM_CORES",
    "SM_ON_DTYPE": "HF_AUTO_CAST_TYPE",
    "SM_ON_PORT": "PORT",
    "SM_ON_SERVED_MODEL_NAME": "SERVED_MODEL_NAME",
}
# Service keys with a docker run flag of the same meaning: carried into extra_args.
DOCKER_FLAGS = {"shm_size": "--shm-size", "ipc": "--ipc", "user": "--user"}
SERVICE_NOTES = {
    "depends_on": "the balancer starts first and answers 503 (no ready replica) until "
    "[fleet] min_ready replicas pass /health; requests wait in its queue meanwhile",
    "restart": "the supervisor restarts a replica that exits, with backoff "
    "(restart_backoff_initial_s .. restart_backoff_max_s), and marks it failed after "
    "crash_loop_max_exits exits within crash_loop_window_s",
    "container_name": "containers are named neuron-fleet-replica-N",
    "healthcheck": "the supervisor and the balancer check /health themselves "
    "([balancer] health_*, [fleet] startup_timeout_s and unhealthy_restart_after_s)",
    "command": "the docker launcher runs the image's own entry point with TGI's environment; "
    'for another command use launcher = "command" with [launcher.command] template',
    "entrypoint": "the docker launcher runs the image's own entry point; "
    'for another command use launcher = "command" with [launcher.command] template',
}


# -- small data types ---------------------------------------------------------------------


@dataclass(frozen=True)
class PortMapping:
    host_ip: str | None
    published: int | None
    target: int


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    mode: str = ""
    bind: bool = True
    """False for a named volume."""

    def docker_arg(self) -> str:
        return ":".join(p for p in (self.source, self.target, self.mode) if p)


@dataclass
class ReplicaService:
    """One TGI service of the compose file."""

    name: str
    image: str | None
    env: dict[str, str]
    device_indices: list[int]
    ports: list[PortMapping]
    mounts: list[Mount]
    flags: list[str] = field(default_factory=list)
    """``docker run`` flags from keys like shm_size, ipc, cap_add."""
    engine: str = "tgi"
    """``vllm`` for a service configured by the vLLM image's SM_ON_* variables."""
    from_variables: set[str] = field(default_factory=set)
    """Environment keys whose value was a ``${VAR}`` reference (not written in the file)."""
    port: PortMapping | None = None


# -- ${VAR} substitution, as docker compose does it --------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Interpolator:
    """Compose's ``$VAR`` / ``${VAR}`` / ``${VAR:-default}`` ... substitution.

    Values come from the env file, then ``PWD`` = the compose file's folder (where the
    blog ran ``docker compose``), then the environment given.
    """

    def __init__(self, env_file: Mapping[str, str], pwd: str, environ: Mapping[str, str]):
        self.env_file = env_file
        self.pwd = pwd
        self.environ = environ
        self.used: set[str] = set()
        self.from_environ: set[str] = set()
        self.missing: set[str] = set()
        self.pwd_used = False
        self.errors: list[str] = []

    def lookup(self, name: str) -> str | None:
        self.used.add(name)
        if name in self.env_file:
            return self.env_file[name]
        if name == "PWD":
            self.pwd_used = True
            return self.pwd
        if name in self.environ:
            self.from_environ.add(name)
            return self.environ[name]
        return None

    def __call__(self, text: str) -> str:
        out: list[str] = []
        i = 0
        while i < len(text):
            ch = text[i]
            if ch != "$":
                out.append(ch)
                i += 1
                continue
            nxt = text[i + 1 : i + 2]
            if nxt == "$":
                out.append("$")
                i += 2
            elif nxt == "{":
                end = _closing_brace(text, i + 2)
                if end < 0:
                    out.append(text[i:])
                    break
                out.append(self._braced(text[i + 2 : end]))
                i = end + 1
            else:
                match = _NAME.match(text, i + 1)
                if not match:
                    out.append("$")
                    i += 1
                    continue
                value = self.lookup(match.group())
                if value is None:
                    self.missing.add(match.group())
                out.append(value or "")
                i = match.end()
        return "".join(out)

    def _braced(self, body: str) -> str:
        match = _NAME.match(body)
        if not match:
            self.errors.append(f"invalid interpolation ${{{body}}}")
            return ""
        name, rest = match.group(), body[match.end() :]
        value = self.lookup(name)
        if not rest:
            if value is None:
                self.missing.add(name)
            return value or ""
        for op in (":-", "-", ":?", "?", ":+", "+"):
            if rest.startswith(op):
                arg = rest[len(op) :]
                unset_or_empty = not value if op.startswith(":") else value is None
                if op.endswith("-"):
                    return self(arg) if unset_or_empty else str(value)
                if op.endswith("?"):
                    if unset_or_empty:
                        self.errors.append(f"${{{name}}} is required: {arg or 'not set'}")
                        return ""
                    return str(value)
                return "" if unset_or_empty else self(arg)
        self.errors.append(f"invalid interpolation ${{{body}}}")
        return ""

    def walk(self, node: Any) -> Any:
        if isinstance(node, str):
            return self(node)
        if isinstance(node, list):
            return [self.walk(v) for v in node]
        if isinstance(node, dict):
            return {k: self.walk(v) for k, v in node.items()}
        return node


def _closing_brace(text: str, start: int) -> int:
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


# -- compose fields -----------------------------------------------------------------------


def _environment(
    svc: Mapping[str, Any], base: str, environ: Mapping[str, str], notes: list[str], name: str
) -> dict[str, str]:
    """A service's environment: its env_file(s), then ``environment`` (list or mapping)."""
    env: dict[str, str] = {}
    files = svc.get("env_file") or []
    for entry in files if isinstance(files, list) else [files]:
        path = entry.get("path") if isinstance(entry, dict) else entry
        if not isinstance(path, str):
            continue
        full = os.path.join(base, os.path.expanduser(path))
        try:
            env.update(parse_env_file(full))
        except ConfigError as exc:
            notes.append(f"{name}: env_file {path} not read: {'; '.join(exc.errors)}")
    raw = svc.get("environment") or {}
    items: list[tuple[str, Any]] = []
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        for item in raw:
            key, sep, value = str(item).partition("=")
            items.append((key.strip(), value if sep else None))
    for key, value in items:
        if value is None:  # "KEY" alone: compose passes the shell's value through
            if key in environ:
                env[key] = environ[key]
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[key] = str(value)
    return env


def _variable_keys(svc: Mapping[str, Any]) -> set[str]:
    """Environment keys whose value (before substitution) refers to a variable."""
    raw = svc.get("environment") or {}
    if isinstance(raw, dict):
        return {k for k, v in raw.items() if "$" in str(v)}
    keys = set()
    for item in raw if isinstance(raw, list) else []:
        key, sep, value = str(item).partition("=")
        if not sep or "$" in value:
            keys.add(key.strip())
    return keys


def _neuron_devices(svc: Mapping[str, Any], name: str, notes: list[str]) -> list[int]:
    indices = []
    for entry in svc.get("devices") or []:
        host = str(entry.get("source", "") if isinstance(entry, dict) else entry).split(":")[0]
        match = re.fullmatch(r"/dev/neuron(\d+)", host.strip())
        if match:
            indices.append(int(match.group(1)))
        else:
            notes.append(
                f"{name}: device {host!r} is not a Neuron device: not carried over (add "
                f'"--device={host}" to [launcher.docker] extra_args if the replicas need it)'
            )
    return sorted(set(indices))


def _port_range(text: str) -> list[int]:
    lo, sep, hi = text.partition("-")
    first = int(lo)
    return list(range(first, int(hi) + 1)) if sep else [first]


def parse_ports(entries: Any) -> list[PortMapping]:
    """Compose ``ports`` (short ``[IP:][HOST:]CONTAINER[/proto]`` or long syntax), TCP only.

    Raises ImportProblem for an entry it cannot read.
    """
    out: list[PortMapping] = []
    for entry in entries or []:
        try:
            out += _parse_port(entry)
        except (ValueError, KeyError, TypeError):
            raise ImportProblem([f"ports entry {entry!r} is not understood"]) from None
    return out


def _parse_port(entry: Any) -> list[PortMapping]:
    if isinstance(entry, dict):
        if str(entry.get("protocol", "tcp")).lower() != "tcp":
            return []
        targets = _port_range(str(entry["target"]))
        published = entry.get("published")
        hosts = _port_range(str(published)) if published not in (None, "") else []
        host_ip = entry.get("host_ip") or None
    else:
        text, _, proto = str(entry).strip().partition("/")
        if proto and proto.lower() != "tcp":
            return []
        host_ip = None
        if text.startswith("["):  # [::1]:8080:80
            end = text.index("]")
            host_ip, text = text[1:end], text[end + 2 :]
        parts = text.split(":")
        if len(parts) == 3:
            host_ip, host_part, target_part = parts
        elif len(parts) == 2:
            host_part, target_part = parts
        else:
            host_part, target_part = "", parts[0]
        targets = _port_range(target_part)
        hosts = _port_range(host_part) if host_part else []
        host_ip = host_ip or None
    if hosts and len(hosts) == len(targets):
        return [PortMapping(host_ip, h, t) for h, t in zip(hosts, targets, strict=True)]
    if len(hosts) == 1:
        return [PortMapping(host_ip, hosts[0], t) for t in targets]
    return [PortMapping(host_ip, None, t) for t in targets]


def parse_mounts(entries: Any, base: str) -> list[Mount]:
    """Compose ``volumes`` of a service; relative host paths are taken from ``base``."""
    out = []
    for entry in entries or []:
        if isinstance(entry, dict):
            source = str(entry.get("source") or "")
            target = str(entry.get("target") or "")
            mode = "ro" if entry.get("read_only") else ""
            bind = entry.get("type", "bind" if source.startswith((".", "/", "~")) else "volume")
            bind = bind == "bind"
        else:
            parts = str(entry).split(":")
            if len(parts) == 1:
                out.append(Mount("", parts[0], "", bind=False))  # anonymous volume
                continue
            source, target = parts[0], parts[1]
            mode = ":".join(parts[2:])
            bind = source.startswith((".", "/", "~")) or source == ""
        if bind and source:
            source = os.path.normpath(os.path.join(base, os.path.expanduser(source)))
        out.append(Mount(source, target, mode, bind=bind))
    return out


# -- the import ---------------------------------------------------------------------------


def _load_yaml(path: str) -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with transformers
        raise ImportProblem(
            ["PyYAML is needed to read compose files: pip install pyyaml"]
        ) from None
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except OSError as exc:
        raise ImportProblem([f"cannot read {path}: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        # Only the position: the offending line could hold a secret.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ImportProblem([f"{path} is not valid YAML: {problem}{where}"]) from None


def _kind(svc: Mapping[str, Any]) -> str:
    image = str(svc.get("image") or "").lower()
    volumes = " ".join(str(v) for v in svc.get("volumes") or [])
    if "nginx" in image or "nginx.conf" in volumes or "/etc/nginx" in volumes:
        return "nginx"
    if any(word in image for word in ("haproxy", "traefik", "envoy", "caddy")):
        return "balancer"
    env = svc.get("environment") or {}
    env_names = list(env) if isinstance(env, dict) else [str(e).split("=")[0] for e in env or []]
    devices = " ".join(str(d) for d in svc.get("devices") or [])
    if (
        "text-generation-inference" in image
        or "vllm-inference-neuronx" in image
        or "MODEL_ID" in env_names
        or "SM_ON_MODEL" in env_names
        or "/dev/neuron" in devices
    ):
        return "replica"
    return "other"


def import_deployment(
    compose_path: str,
    nginx_path: str | None = None,
    env_file: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cores_per_device: int = DEFAULT_CORES_PER_DEVICE,
    sources: str | None = None,
) -> ImportResult:
    """Turn the deployment into fleet.toml text plus notes; raises ImportProblem."""
    environ = os.environ if environ is None else environ
    base = os.path.dirname(os.path.abspath(compose_path))
    notes = Notes()
    env_values: dict[str, str] = {}
    if env_file is not None:
        try:
            env_values = parse_env_file(env_file)
        except ConfigError as exc:
            raise ImportProblem(exc.errors) from None
    document = _load_yaml(compose_path)
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        raise ImportProblem([f"{compose_path} has no services: mapping"])

    interpolate = _Interpolator(env_values, base, environ)
    referenced = {
        name: _variable_keys(svc)
        for name, svc in document["services"].items()
        if isinstance(svc, dict)
    }
    services: dict[str, Any] = interpolate.walk(document["services"])
    if interpolate.errors:
        raise ImportProblem([f"{compose_path}: {e}" for e in interpolate.errors])
    for key in document:
        if key in ("networks", "volumes", "secrets", "configs"):
            notes.add(
                f"top-level {key}: not carried over (docker run per replica, no compose project)"
            )

    replicas: list[ReplicaService] = []
    balancers: list[tuple[str, dict[str, Any], str]] = []
    for name, svc in services.items():
        if not isinstance(svc, dict):
            raise ImportProblem([f"{compose_path}: service {name!r} is not a mapping"])
        kind = _kind(svc)
        if kind == "replica":
            replica = _replica(name, svc, base, environ, notes)
            replica.from_variables = referenced.get(name, set())
            replicas.append(replica)
        elif kind in ("nginx", "balancer"):
            balancers.append((name, svc, kind))
        else:
            notes.add("not a TGI replica or a load balancer: not carried over", name)
    if not replicas:
        raise ImportProblem(
            [
                f"{compose_path}: no TGI replica service found (one with a text-generation-"
                "inference image, MODEL_ID in its environment or /dev/neuron devices)"
            ]
        )

    for name in sorted(interpolate.missing):
        notes.add(
            f"${{{name}}} is not set (neither in the env file nor in the environment): "
            "docker compose would have used an empty string"
        )
    for name in sorted(interpolate.from_environ):
        notes.add(f"${{{name}}} was taken from this shell's environment (not in the env file)")
    for name in sorted(env_values):
        if name in HF_TOKEN_NAMES or is_secret(name):
            notes.add(
                f"{name} is set in {env_file}: not copied into fleet.toml; keep it in the "
                f"service's env file {SERVICE_ENV_FILE} (mode 0600)"
            )

    # -- the balancer ----------------------------------------------------------------
    nginx: NginxInfo | None = None
    lb_name, lb_svc = (balancers[0][0], balancers[0][1]) if balancers else (None, {})
    for name, _svc, kind in balancers[1:]:
        notes.add(f"a second load balancer ({kind}): ignored, {lb_name} is used", name)
    if lb_name and balancers[0][2] == "balancer":
        notes.add(
            "this load balancer's own configuration is not read; neuron-fleet's [balancer] "
            "replaces it",
            lb_name,
        )
    if nginx_path is None and lb_name:
        for mount in parse_mounts(lb_svc.get("volumes"), base):
            if mount.bind and mount.target.endswith("nginx.conf") and os.path.isfile(mount.source):
                nginx_path = mount.source
                notes.add(f"read {mount.source} (mounted into the nginx container)", lb_name)
    if nginx_path is not None:
        try:
            nginx = analyse_nginx(nginx_path)
        except OSError as exc:
            raise ImportProblem([f"cannot read {nginx_path}: {exc.strerror or exc}"]) from None
        except ValueError as exc:
            raise ImportProblem([f"{nginx_path} is not valid nginx syntax: {exc}"]) from None

    listen = _listen(lb_name, lb_svc, nginx, notes)
    if lb_name:
        for key in lb_svc:
            if key == "deploy":
                notes.add(f"{_deploy_text(lb_svc[key])}; neuron-fleet runs on this host", lb_name)
            elif key == "depends_on":
                notes.add(f"depends_on: {SERVICE_NOTES['depends_on']}", lb_name)
            elif key not in ("image", "ports", "volumes"):
                notes.add(f"{key}: not carried over", lb_name)
        image = lb_svc.get("image") or "load balancer"
        notes.add(
            f"the {image} container is gone: neuron-fleet's balancer runs in the service process",
            lb_name,
        )
    else:
        notes.add(
            "no load balancer service found: [balancer] listen = "
            f'"{listen}" (the default); change it if clients expect another address'
        )

    return _build(compose_path, replicas, nginx, listen, notes, cores_per_device, base, sources)


def _replica(
    name: str, svc: dict[str, Any], base: str, environ: Mapping[str, str], notes: Notes
) -> ReplicaService:
    own: list[str] = []
    env = _environment(svc, base, environ, own, name)
    engine = "vllm" if any(key.startswith("SM_ON_") for key in env) else "tgi"
    if engine == "vllm":
        env = {SM_ON_AS_TGI.get(key, key): value for key, value in env.items()}
    replica = ReplicaService(
        name=name,
        image=str(svc["image"]) if svc.get("image") else None,
        env=env,
        device_indices=_neuron_devices(svc, name, own),
        ports=parse_ports(svc.get("ports")),
        mounts=parse_mounts(svc.get("volumes"), base),
        flags=_flag_args(svc),
        engine=engine,
    )
    notes.extend(own)
    default_port = VLLM_IMAGE_PORT if engine == "vllm" else TGI_DEFAULT_PORT
    container_port = env.get("PORT", str(default_port))
    target = int(container_port) if container_port.isdigit() else default_port
    matching = [p for p in replica.ports if p.target == target and p.published]
    if matching:
        replica.port = matching[0]
    elif len(replica.ports) == 1 and replica.ports[0].published:
        replica.port = replica.ports[0]
        notes.add(
            f"publishes {replica.port.published}->{replica.port.target} but TGI listens on "
            f"{target} (PORT): the published port is used as the replica's port",
            name,
        )
    for key, value in svc.items():
        if key in _CARRIED_KEYS or key.startswith("x-"):
            continue
        if key in ("tty", "stdin_open"):
            if value:
                notes.add(
                    f"{key} (docker run -ti): dropped: replicas run without a terminal and "
                    "their output goes to the service's log, prefixed [replica-N]",
                    name,
                )
        elif key == "deploy":
            notes.add(
                f"{_deploy_text(value)}; neuron-fleet pins each replica to its own NeuronCores",
                name,
            )
        elif key in SERVICE_NOTES:
            notes.add(f"{key}: {SERVICE_NOTES[key]}", name)
        else:
            notes.add(
                f"{key}: not carried over (add the matching `docker run` flags to "
                "[launcher.docker] extra_args if the replicas need it)",
                name,
            )
    return replica


def _deploy_text(deploy: Any) -> str:
    parts = sorted(deploy) if isinstance(deploy, dict) else []
    placement = deploy.get("placement") if isinstance(deploy, dict) else None
    constraints = placement.get("constraints") if isinstance(placement, dict) else None
    shown = ", ".join(f"deploy.{p}" for p in parts) or "deploy"
    if constraints:
        shown += f" (constraints: {', '.join(map(str, constraints))})"
    return f"{shown} is for docker swarm (`docker compose up` ignores placement): not carried over"


_CARRIED_KEYS = frozenset(
    {"image", "ports", "volumes", "environment", "env_file", "devices", "cap_add", "privileged"}
    | set(DOCKER_FLAGS)
)


def _flag_args(svc: Mapping[str, Any]) -> list[str]:
    """``docker run`` flags for the service keys that have one."""
    args: list[str] = []
    for key, flag in DOCKER_FLAGS.items():
        if svc.get(key) not in (None, ""):
            args += [flag, str(svc[key])]
    for cap in svc.get("cap_add") or []:
        args += ["--cap-add", str(cap)]
    if svc.get("privileged") is True:
        args.append("--privileged")
    return args


def _listen(
    lb_name: str | None, lb_svc: Mapping[str, Any], nginx: NginxInfo | None, notes: Notes
) -> str:
    port, host = 8080, "127.0.0.1"
    if lb_name:
        ports = parse_ports(lb_svc.get("ports"))
        wanted = set(nginx.listen_ports) if nginx else set()
        chosen = next((p for p in ports if p.target in wanted and p.published), None)
        if chosen is None:
            chosen = next((p for p in ports if p.published), None)
            if chosen and wanted:
                notes.add(
                    f"publishes {chosen.published}->{chosen.target} but nginx listens on "
                    f"{', '.join(map(str, sorted(wanted)))}",
                    lb_name,
                )
        if chosen is not None and chosen.published is not None:
            port = chosen.published
            host = chosen.host_ip or "0.0.0.0"
            if chosen.host_ip is None:
                notes.add(
                    f'listen = "0.0.0.0:{port}": the compose file published {port} on every '
                    f'interface, and so does neuron-fleet; use "127.0.0.1:{port}" if only '
                    "local clients (a benchmark on localhost) need it; on 0.0.0.0 `serve` "
                    "refuses to start without NEURON_FLEET_API_KEYS (or [balancer] "
                    "allow_public_without_api_keys = true)",
                    lb_name,
                )
        else:
            notes.add(f'publishes no port: [balancer] listen = "{host}:{port}"', lb_name)
    elif nginx and nginx.listen_ports:
        port = nginx.listen_ports[0]
    if nginx is not None:
        nginx_notes(nginx, notes)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _data_mount(replica: ReplicaService, model_id: str) -> Mount | None:
    """The bind mount that holds the model (else the one at /data, TGI's cache folder)."""
    binds = [m for m in replica.mounts if m.bind and m.source]
    for mount in sorted(binds, key=lambda m: -len(m.target)):
        prefix = mount.target.rstrip("/") + "/"
        if model_id.startswith(prefix) or model_id == mount.target:
            return mount
    return next((m for m in binds if m.target.rstrip("/") == "/data"), None)


def _build(
    compose_path: str,
    replicas: list[ReplicaService],
    nginx: NginxInfo | None,
    listen: str,
    notes: Notes,
    per_device: int,
    base: str,
    sources: str | None,
) -> ImportResult:
    compose_name = os.path.basename(compose_path)
    # Replica order: by published port (replica k listens on base_port + k).
    if all(r.port is not None and r.port.published for r in replicas):
        replicas = sorted(replicas, key=lambda r: r.port.published)  # type: ignore[union-attr,return-value]
    if nginx is not None:
        _check_upstream(replicas, nginx, compose_name, notes)
    engines = sorted({r.engine for r in replicas})
    engine = "vllm" if "vllm" in engines else "tgi"
    if len(engines) > 1:
        notes.add(
            "some replicas are TGI, some vLLM (SM_ON_* variables): every replica runs the same "
            'engine in neuron-fleet; using engine = "vllm"'
        )
    if engine == "vllm":
        notes.add(
            'SM_ON_* variables of optimum-neuron\'s vLLM image: engine = "vllm"; SM_ON_MODEL, '
            "SM_ON_BATCH_SIZE, SM_ON_SEQUENCE_LENGTH, SM_ON_TENSOR_PARALLEL_SIZE, SM_ON_DTYPE "
            "-> [model] and cores_per_replica; SM_ON_PORT is set by neuron-fleet (the "
            "container's 8080); other SM_ON_* are carried as they were"
        )
    model = _model_values(replicas, notes)
    cores_per_replica, groups = _core_layout(replicas, per_device, notes)
    default_groups = (
        [format_core_range(range(k * c, (k + 1) * c)) for k in range(len(replicas))]
        if (c := cores_per_replica)
        else []
    )
    base_port, metrics_base = _port_layout(replicas, listen, notes)
    container_model_id = str(model.get("id", ""))
    image, data_mount, extra_args = _docker_settings(replicas, model, compose_name, base, notes)
    if (
        engine == "vllm"
        and "served_model_name" not in model
        and container_model_id
        and model.get("id") != container_model_id
    ):
        # optimum-cli serves --model under its own name when no --served_model_name is given
        # (optimum-neuron serve.py: model_id = served_model_name or model): clients sent the
        # path inside the container, and vLLM answers 404 to any other name.
        model["served_model_name"] = container_model_id
    if model.get("id"):
        notes.add(
            "[model] source is not set: set it to the Hub model you compiled into [model] id "
            "(the blog: meta-llama/Meta-Llama-3.1-8B-Instruct), so `neuron-fleet export` can "
            "compile it again inside the same image (same optimum-cli) for a new shape"
        )
    toml = _render(
        sources or compose_name,
        model=model,
        container_model_id=container_model_id,
        engine=engine,
        n_replicas=len(replicas),
        services=[r.name for r in replicas],
        cores_per_replica=cores_per_replica,
        core_groups=groups if groups != default_groups else [],
        default_groups=groups if groups == default_groups else [],
        per_device=per_device,
        base_port=base_port,
        metrics_base=metrics_base,
        image=image,
        data_mount=data_mount,
        extra_args=extra_args,
        listen=listen,
        balancer=balancer_values(nginx),
        nginx_method=nginx.method if nginx else None,
        nginx_name=os.path.basename(nginx.path) if nginx else "nginx",
    )
    return ImportResult(
        toml=toml, notes=notes.render(), services=[r.name for r in replicas], listen=listen
    )


def _check_upstream(
    replicas: list[ReplicaService], nginx: NginxInfo, compose_name: str, notes: Notes
) -> None:
    """nginx's upstream servers against the compose replicas."""
    if not nginx.servers:
        return
    in_upstream = {host for host, _, _ in nginx.servers}
    for r in replicas:
        if r.name not in in_upstream:
            notes.add(
                f"not in nginx's upstream {nginx.upstream}: nginx never sent it traffic; "
                "neuron-fleet will",
                r.name,
            )
    names = {r.name for r in replicas}
    for host, port, _ in nginx.servers:
        if host not in names:
            notes.add(
                f"upstream server {host}:{port} is not a replica of {compose_name}: "
                "neuron-fleet balances only the replicas it starts (`neuron-fleet balance "
                "--upstream URL` balances servers run elsewhere)"
            )


def _model_values(replicas: list[ReplicaService], notes: Notes) -> dict[str, Any]:
    """[model] from the replicas' TGI environment: one value for all of them."""
    first = replicas[0]
    model: dict[str, Any] = {}
    for env_name, key in MODEL_ENV.items():
        values = {r.name: r.env[env_name] for r in replicas if env_name in r.env}
        if not values or key in model:
            continue
        chosen = values.get(first.name, next(iter(values.values())))
        distinct = sorted(set(values.values()))
        if len(distinct) > 1:
            notes.add(
                f"{env_name} differs between replicas ({', '.join(distinct)}): every replica "
                f"gets the same settings in neuron-fleet; using {chosen}"
            )
        elif len(values) < len(replicas):
            notes.add(f"{env_name} is set for some replicas only: using {chosen} for all")
        if key in INT_MODEL_KEYS:
            try:
                model[key] = int(chosen)
            except ValueError:
                notes.add(f"{env_name} = {chosen!r} is not a number: left out of fleet.toml")
        elif chosen:
            model[key] = chosen
    return model


def _core_layout(
    replicas: list[ReplicaService], per_device: int, notes: Notes
) -> tuple[int | None, list[str]]:
    """(cores per replica, each replica's core range from its devices, or [] if unusable).

    Cores per replica: HF_NUM_CORES, else what the devices hold (device N: cores N*C ..).
    """
    first = replicas[0]
    device_cores = {
        r.name: [c for d in r.device_indices for c in range(d * per_device, (d + 1) * per_device)]
        for r in replicas
    }
    cores_per_replica: int | None = None
    num_cores = sorted({r.env["HF_NUM_CORES"] for r in replicas if "HF_NUM_CORES" in r.env})
    if num_cores:
        if len(num_cores) > 1:
            notes.add(f"HF_NUM_CORES differs between replicas ({', '.join(num_cores)})")
        chosen = first.env.get("HF_NUM_CORES", num_cores[0])
        if chosen.isdigit():
            cores_per_replica = int(chosen)
        else:
            notes.add(f"HF_NUM_CORES = {chosen!r} is not a number: left out")
    sizes = sorted({len(c) for c in device_cores.values() if c})
    if cores_per_replica is None and len(sizes) == 1:
        cores_per_replica = sizes[0]
    elif cores_per_replica is not None and sizes and sizes != [cores_per_replica]:
        notes.add(
            f"HF_NUM_CORES = {cores_per_replica} but the replicas were given devices holding "
            f"{'/'.join(map(str, sizes))} NeuronCores: neuron-fleet gives each replica the "
            f"devices of its {cores_per_replica} cores"
        )
    if cores_per_replica and cores_per_replica % per_device:
        notes.add(
            f"{cores_per_replica} cores per replica is not a whole number of {per_device}-core "
            'devices: the docker launcher needs whole devices (launcher = "native" does not)'
        )
    groups: list[str] = []
    for r in replicas:
        cores = device_cores[r.name]
        if not cores:
            notes.add("no /dev/neuron devices: the planner chooses its NeuronCores", r.name)
            return cores_per_replica, []
        if cores != list(range(cores[0], cores[-1] + 1)):
            shown = format_devices([f"/dev/neuron{d}" for d in r.device_indices])
            notes.add(
                f"devices {shown} are not contiguous (a replica's NeuronCores must be one "
                "range): the planner chooses the NeuronCores",
                r.name,
            )
            return cores_per_replica, []
        if len(cores) != cores_per_replica:
            return cores_per_replica, []
        groups.append(format_core_range(cores))
    return cores_per_replica, groups


def _port_layout(replicas: list[ReplicaService], listen: str, notes: Notes) -> tuple[int, int]:
    """(base_port, metrics_base_port) from the replicas' published ports."""
    ports = [r.port.published for r in replicas if r.port is not None and r.port.published]
    base_port = FleetSettings.base_port
    if len(ports) == len(replicas):
        base_port = ports[0]
        if ports != list(range(base_port, base_port + len(ports))):
            planned = ", ".join(str(base_port + k) for k in range(len(ports)))
            notes.add(
                f"the replicas' ports {', '.join(map(str, ports))} are not contiguous: replica "
                f"k listens on base_port + k ({planned})"
            )
    else:
        notes.add(
            f"not every replica publishes its port: base_port = {base_port} (replica k on "
            "base_port + k)"
        )
    if any(r.port is None or r.port.host_ip not in ("127.0.0.1", "::1") for r in replicas):
        notes.add(
            "the replicas' ports were published on every interface, around nginx; "
            'neuron-fleet binds them to [fleet] host = "127.0.0.1": clients go through the '
            "balancer"
        )
    for r in replicas:
        if "PORT" in r.env:
            notes.add("PORT: set per replica by neuron-fleet (base_port + k)", r.name)
        if "PROMETHEUS_PORT" in r.env:
            notes.add("PROMETHEUS_PORT: set per replica (metrics_base_port + k)", r.name)
    taken = {*range(base_port, base_port + len(replicas)), int(listen.rsplit(":", 1)[1])}
    metrics_base = FleetSettings.metrics_base_port
    while any(p in taken for p in range(metrics_base, metrics_base + len(replicas))):
        metrics_base += 1000
    return base_port, metrics_base


def _docker_settings(
    replicas: list[ReplicaService],
    model: dict[str, Any],
    compose_name: str,
    base: str,
    notes: Notes,
) -> tuple[str, Mount | None, list[str]]:
    """(image, the data mount, extra_args); maps [model] id to the host folder."""
    first = replicas[0]
    images = sorted({r.image for r in replicas if r.image})
    image = first.image or (DEFAULT_VLLM_IMAGE if first.engine == "vllm" else DEFAULT_IMAGE)
    if len(images) > 1:
        notes.add(f"the replicas use different images ({', '.join(images)}): using {image}")
    if re.search(r":latest[^:/]*$", image) or ":" not in image.rsplit("/", 1)[-1]:
        # Kept (the export was compiled by that image's optimum-neuron), but named: a moving
        # tag can change the optimum-neuron under a running fleet (runtime_versions.py).
        default = DEFAULT_VLLM_IMAGE if first.engine == "vllm" else DEFAULT_IMAGE
        notes.add(
            f"image {image} is a moving tag, kept as the compose file had it: pin it (the "
            f"default is {default}) and export with the same image's optimum-cli"
        )
    model_id = str(model.get("id", ""))
    data_mount = _data_mount(first, model_id)
    for r in replicas[1:]:
        if _data_mount(r, model_id) != data_mount:
            notes.add(f"mounts another data folder than {first.name}: using {first.name}'s", r.name)
    if data_mount and model_id.startswith(data_mount.target.rstrip("/") + "/"):
        relative = model_id[len(data_mount.target.rstrip("/")) + 1 :]
        model["id"] = os.path.join(data_mount.source, relative)
    elif model_id.startswith("/"):
        notes.add(
            f"MODEL_ID {model_id} is a path that no volume provides: set [model] id to the "
            "host folder of the exported model"
        )
    host_model = str(model.get("id", ""))
    if host_model.startswith(("/home/", "/root/")):
        notes.add(
            f"the model ({host_model}) is under /home or /root, which the systemd unit hides "
            "(ProtectHome=yes in deploy/neuron-fleet.service): move the export under "
            "/var/lib/neuron-fleet/models and update [model] id and data_dir, or add "
            "ProtectHome=read-only in a drop-in"
        )
    if data_mount and data_mount.source == base:
        notes.add(
            f"$PWD is taken as the compose file's folder ({base}), where `docker compose` "
            "was run; change [launcher.docker] data_dir if it was run elsewhere"
        )

    extra_args: list[str] = []
    carried: list[str] = []
    for mount in first.mounts:
        if mount == data_mount:
            continue
        if not mount.source:
            notes.add(f"anonymous volume {mount.target}: not carried over", first.name)
            continue
        extra_args += ["-v", mount.docker_arg()]
        carried.append(f"-v {mount.docker_arg()}")
        if not mount.bind:
            notes.add(
                f"named volume {mount.source}: docker compose prefixed it with the project "
                f"name; `docker run -v {mount.source}:...` uses a volume named {mount.source}"
            )
    for key in sorted({k for r in replicas for k in r.env}):
        if key in MODEL_ENV or key in LAUNCHER_ENV:
            continue
        if key in HF_TOKEN_NAMES:
            hard_coded = any(key in r.env and key not in r.from_variables for r in replicas)
            how = "hard-coded" if hard_coded else "taken from a variable"
            notes.add(
                f"{key} is {how} in {compose_name}: not copied into fleet.toml; put "
                f"{key}=<your token> in the service's env file {SERVICE_ENV_FILE} (mode 0600, "
                "or pass --env-file)"
                + (" and remove it from the compose file" if hard_coded else "")
                + "; neuron-fleet hands it to docker by name only, never on a command line"
            )
            continue
        if is_secret(key):
            extra_args += ["-e", key]
            carried.append(f"-e {key}")
            notes.add(
                f"{key} looks like a secret: not copied; passed to the replicas by name "
                f"(extra_args -e {key}): put {key}=... in {SERVICE_ENV_FILE}"
            )
            continue
        if len({r.env.get(key) for r in replicas}) > 1:
            notes.add(
                f"{key} differs between replicas (or is missing on some): using {first.name}'s"
            )
        if key in first.env:
            extra_args += ["-e", f"{key}={first.env[key]}"]
            carried.append(f"-e {key}")
    if first.flags:
        extra_args += first.flags
        carried.append(" ".join(first.flags))
    if carried:
        notes.add("carried into [launcher.docker] extra_args: " + ", ".join(carried))
    return image, data_mount, extra_args


# -- writing TOML ---------------------------------------------------------------------------


def _render(
    source: str,
    *,
    model: dict[str, Any],
    container_model_id: str,
    engine: str,
    n_replicas: int,
    services: list[str],
    cores_per_replica: int | None,
    core_groups: list[str],
    default_groups: list[str],
    per_device: int,
    base_port: int,
    metrics_base: int,
    image: str,
    data_mount: Mount | None,
    extra_args: list[str],
    listen: str,
    balancer: dict[str, Any],
    nginx_method: str | None,
    nginx_name: str,
) -> str:
    w = TomlWriter(written_header(source))
    w.table("model")
    model_id = model.get("id")
    if model_id:
        comment = (
            f"MODEL_ID {container_model_id} in the containers"
            if container_model_id and container_model_id != model_id
            else "MODEL_ID"
        )
        w.key("id", model_id, comment)
    w.commented_key("source", "org/model", "the Hub id compiled into id (neuron-fleet export)")
    for key in (
        "served_model_name",
        "revision",
        "batch_size",
        "max_input_tokens",
        "max_total_tokens",
        "max_batch_prefill_tokens",
        "auto_cast_type",
        "max_concurrent_requests",
    ):
        if key in model:
            w.key(key, model[key], MODEL_COMMENTS[key])
    w.table("fleet")
    if engine != "tgi":
        w.key("engine", engine, "the services ran optimum-neuron's vLLM image (SM_ON_*)")
    w.key("launcher", "docker", "one `docker run` per replica, as compose did")
    w.key("replicas", n_replicas, "from " + ", ".join(services))
    if cores_per_replica:
        where = "SM_ON_TENSOR_PARALLEL_SIZE" if engine == "vllm" else "HF_NUM_CORES"
        w.key("cores_per_replica", cores_per_replica, f"{where} (tensor parallel)")
    if core_groups:
        w.key("core_groups", core_groups, "the compose file's devices")
    elif default_groups:
        w.commented_key("core_groups", default_groups, "= the compose file's devices (default)")
    if per_device != DEFAULT_CORES_PER_DEVICE:
        w.key("cores_per_device", per_device, "NeuronCores per /dev/neuronN")
    w.key("host", "127.0.0.1", "replicas on loopback; clients use the balancer")
    w.key("base_port", base_port, "replica k listens on base_port + k")
    w.key("metrics_base_port", metrics_base, "replica k's Prometheus port")
    w.table("launcher.docker")
    w.key("image", image)
    if data_mount is not None:
        w.key("data_dir", data_mount.source, f"the compose file's volume at {data_mount.target}")
        w.key("data_mount", data_mount.target)
    if extra_args:
        w.key("extra_args", extra_args, "carried over from the compose file")
    w.table("balancer")
    w.key("listen", listen, "the load balancer's published port")
    w.key("policy", "least-outstanding", f"nginx was {nginx_method}" if nginx_method else "")
    w.comment("max_inflight_per_replica = batch_size by default: one request per static batch slot")
    for key, value in balancer.items():
        w.key(key, value, f"from {nginx_name}")
    return w.text()
