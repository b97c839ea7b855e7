"""What a fleet configuration may say: one frozen dataclass per TOML section, the names
of launchers and policies, and the checks a value can fail on its own (no host needed).

``config.load_config`` layers values into these classes (``layering.py``), resolves the
model (``model_resolve.py``) and checks the host (``host_checks.py``). Nothing here reads
files or looks at the machine, so the plan, the launchers and the importer can use these
types without importing the loader.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import shlex
import string
from collections.abc import Iterable
from dataclasses import dataclass, field

from balancer.config import ENGINES
from supervisor.import_common import SERVICE_ENV_FILE, names_a_secret
from supervisor.model import NeuronModelInfo
from supervisor.neuron import DEFAULT_CORES_PER_DEVICE

LAUNCHERS = ("docker", "native", "simulated", "command")
# ENGINES (balancer/config.py): what the replicas run: TGI's Neuron server, or vLLM with
# optimum-neuron's plugin.
WHOLE_DEVICE_LAUNCHERS = frozenset({"docker"})
"""Launchers that hand a replica whole /dev/neuronN devices rather than a core range."""
POLICIES = ("least-outstanding", "round-robin", "least-work")
COMMAND_PLACEHOLDERS = ("port", "cores", "devices", "model", "metrics_port", "name", "host")
DEFAULT_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.5-neuron"
"""TGI's Neuron image, pinned as TGI's own docs pin it (text-generation-inference v3.3.7,
docs/source/backends/neuron.md: ``ghcr.io/huggingface/text-generation-inference:3.3.5-neuron``;
its Dockerfile.neuron installs optimum-neuron v0.3.0, neuronx-cc 2.19.8089.0). Never
``latest-neuron``: an export loads only under the optimum-neuron that made it
(runtime_versions.py), and a moving tag changes that under a running fleet. The same tag as
deploy/ (fleet.toml, Dockerfile, ec2 TgiImage; docs/scale-out.md, "Versions read and pinned")."""
DEFAULT_VLLM_IMAGE = (
    "763104351884.dkr.ecr.us-west-2.amazonaws.com/huggingface-vllm-inference-neuronx:"
    "0.11.0-optimum0.4.4-neuronx-py310-sdk2.26.1-ubuntu22.04"
)
"""optimum-neuron's vLLM image (optimum-neuron main, docs/source/containers.mdx: vLLM 0.11.0,
optimum-neuron 0.4.4, Neuron SDK 2.26.1); other regions: the same tag under their account."""
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
    served_model_name: str | None = None
    """vLLM ``--served-model-name``: the name clients send as ``model`` (vLLM answers 404 to
    any other); default: ``id`` as written, as ``optimum-cli neuron serve`` does with
    ``--model``. TGI ignores it."""
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
    engine: str = "tgi"
    """``tgi``: TGI's Neuron server; ``vllm``: vLLM with optimum-neuron's plugin (the command
    and image of ``optimum-cli neuron serve``)."""
    host: str = "127.0.0.1"
    base_port: int = 8081
    metrics_base_port: int = 9081
    devices: int | None = None
    """Pretend this many devices exist (no neuron-ls); for simulated fleets and tests."""
    cores_per_device: int = DEFAULT_CORES_PER_DEVICE
    """Only used without neuron-ls (device count from config or /dev/neuron*)."""
    neuron_ls: str = ""
    """neuron-ls to run; default: on PATH, else /opt/aws/neuron/bin/neuron-ls (where
    aws-neuronx-tools installs it, outside systemd's default PATH)."""
    min_ready: int = 1
    """Replicas that must be ready before the balancer starts taking traffic."""
    replica_auth: bool = True
    """Give the replicas a key made for this run (env ``API_KEY``, TGI's ``--api-key``;
    also ``VLLM_API_KEY`` for the command launcher) and send it from the balancer, so their
    ports answer generation requests from the balancer only. false: no key."""
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
    image: str = ""
    """Empty: the engine's image (DEFAULT_IMAGE for tgi, DEFAULT_VLLM_IMAGE for vllm)."""
    data_dir: str | None = None
    """Host folder mounted at /data (the compose file's ``$PWD:/data``); default: the
    parent of a local model folder."""
    data_mount: str = "/data"
    hub_cache: str | None = None
    """Host folder mounted into every replica (and the export) as HF_HUB_CACHE, so what is
    fetched from the Hub survives ``--rm`` and restarts; default: hf-cache in data_dir."""
    init: bool = True
    """``docker run --init``: a real PID 1 that forwards SIGTERM and reaps the shards."""
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class NativeLauncherConfig:
    binary: str = "text-generation-launcher"
    """TGI's launcher (engine tgi)."""
    shard_uds_dir: str = "/tmp"
    python: str = "python3"
    """The Python that runs vLLM (engine vllm): the one optimum-neuron[vllm] is installed in,
    e.g. ``/opt/aws_neuronx_venv_pytorch_2_7/bin/python`` on the Hugging Face Neuron AMI."""
    extra_args: tuple[str, ...] = ()
    """More arguments for the engine's server (TGI's launcher, or vLLM's api_server)."""


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


# -- checks on values alone ----------------------------------------------------------------


def not_one_of(where: str, value: str, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(allowed)}"
    return f"{where} = {value!r} is not known: {hint}"


def unknown_key(where: str, key: str, allowed: Iterable[str], source: str) -> str:
    allowed = list(allowed)
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    hint = (
        f": did you mean {close[0]!r}?"
        if close
        else f": known keys are {', '.join(sorted(allowed))}"
    )
    return f"{where} unknown key {key!r} ({source}){hint}"


def launcher_whole_devices(kind: str) -> bool:
    """docker exposes /dev/neuronN devices, so a replica gets whole devices, not cores."""
    return kind in WHOLE_DEVICE_LAUNCHERS


def stop_grace_seconds(fleet: FleetSettings) -> int:
    """``docker stop -t`` takes whole seconds."""
    return max(0, math.ceil(fleet.stop_grace_s))


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


def is_public(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host not in ("localhost", "ip6-localhost")


def check_fleet_values(fleet: FleetSettings, launcher: LauncherConfig) -> list[str]:
    """What is wrong with [fleet] and the chosen [launcher.KIND], on the values alone."""
    errors = []
    if fleet.launcher not in LAUNCHERS:
        errors.append(not_one_of("[fleet] launcher", fleet.launcher, LAUNCHERS))
    if fleet.engine not in ENGINES:
        errors.append(not_one_of("[fleet] engine", fleet.engine, ENGINES))
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
    if fleet.launcher in ("native", "docker"):
        extra = getattr(launcher, fleet.launcher).extra_args
        for name in secret_arguments(extra):
            errors.append(
                f"[launcher.{fleet.launcher}] extra_args: {name} carries a secret, which `ps` "
                "and `neuron-fleet plan` would show (and a replica --api-key would refuse the "
                "balancer's own key): remove it; clients' keys go in NEURON_FLEET_API_KEYS, "
                f"HF_TOKEN in the environment or {SERVICE_ENV_FILE}, and the replicas get a "
                "key of their own per run ([fleet] replica_auth)"
            )
    if fleet.launcher == "docker":
        try:
            ipaddress.ip_address(fleet.host)
        except ValueError:
            errors.append(
                f"[fleet] host = {fleet.host!r}: docker publishes ports on an IP address, "
                'not a name: use "127.0.0.1"'
            )
    return errors


def secret_arguments(args: Iterable[str]) -> list[str]:
    """The secrets written into a command line: ``--api-key K`` / ``--hf-token=T`` (a flag
    named like a secret) and docker's ``-e NAME=value`` with a secret NAME. ``-e NAME``
    alone is fine: docker reads the value from its own environment."""
    found: list[str] = []
    words = list(args)
    for i, word in enumerate(words):
        if word.startswith("--env="):
            word = "-e" + word[len("--env=") :]
        if word.startswith("--") and word not in ("--env", "--env-file"):
            name = word[2:].partition("=")[0]
            if names_a_secret(name):
                found.append("--" + name)
            continue
        if word in ("-e", "--env") and i + 1 < len(words):
            assignment = words[i + 1]
        elif word.startswith("-e") and len(word) > 2:
            assignment = word[2:]
        else:
            continue
        name, eq, _ = assignment.partition("=")
        if eq and names_a_secret(name):
            found.append(f"-e {name}=...")
    return found


def docker_image(fleet: FleetSettings, docker: DockerLauncherConfig) -> str:
    """The image the docker launcher runs: the one configured, else the engine's."""
    if docker.image:
        return docker.image
    return DEFAULT_VLLM_IMAGE if fleet.engine == "vllm" else DEFAULT_IMAGE


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
                not_one_of("[launcher.command] template placeholder", "{" + name + "}", allowed)
            )
    try:
        shlex.split(template)
    except ValueError as exc:
        errors.append(f"[launcher.command] template cannot be split like a shell line: {exc}")
    return errors
