"""Launchers turn a replica plan into a command line and an environment.

One function per way of running TGI; each returns a LaunchSpec and starts nothing, so
``neuron-fleet plan`` can print exactly what ``serve`` would run. Secrets travel in
``LaunchSpec.env`` only: a command line is readable by every user through ``ps`` and
``/proc/PID/cmdline``.

- docker: the blog's compose service, one container per replica. ``-e HF_TOKEN`` (name
  only) makes the docker CLI copy the value from its own environment, which we set.
  ``--init`` because the image's entry point is a bash script that runs a Python
  pre-flight (minutes when it compiles) before exec'ing text-generation-launcher: as PID 1
  bash ignores SIGTERM, so ``docker stop`` would always wait out the grace period and
  SIGKILL; docker's tini forwards the signal, and reaps the shard processes TGI leaves.
- native: text-generation-launcher on the host, pinned with NEURON_RT_VISIBLE_CORES, with
  its own Prometheus port and shard socket (two launchers sharing either one panic).
- simulated: ``python -m supervisor.simulator`` (no Neuron hardware).

With ``[fleet] engine = "vllm"`` (vllm.py builds the arguments):

- native: the per-replica command of ``optimum-cli neuron serve --data-parallel-size N``,
  ``python -m vllm.entrypoints.openai.api_server`` with NEURON_RT_VISIBLE_CORES and
  VLLM_WORKER_MULTIPROC_METHOD=spawn, on the local export.
- docker: optimum-neuron's vLLM image, configured through its entry point's SM_ON_*
  variables, API on the container's port 8080.
- command: any command from a template with {port} {cores} {devices} {model}
  {metrics_port} {name} {host}.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from supervisor.config import FleetConfig
from supervisor.leftovers import REPLICA_LABEL
from supervisor.plan import ReplicaPlan
from supervisor.schema import (
    ConfigError,
    DockerLauncherConfig,
    check_command_template,
    stop_grace_seconds,
)
from supervisor.vllm import (
    VLLM_API_SERVER,
    VLLM_IMAGE_PORT,
    hub_offline_env,
    vllm_image_env,
    vllm_server_args,
)


@dataclass(frozen=True)
class LaunchSpec:
    """How to start (and stop) one replica process."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict, repr=False)
    """Variables added to the child's environment; secrets go here, never on argv."""
    stop_argv: tuple[str, ...] | None = None
    """A command that stops the replica (``docker stop -t N name``); None: SIGTERM the group."""
    display: str = ""
    """The command line for humans (plan table, logs) with secrets redacted."""
    cleanup_argv: tuple[str, ...] | None = None
    """Run (and ignore failures of) before starting: removes what a crashed previous run
    left behind (``docker rm -f name``: a leftover container keeps its name and its cores)."""


SECRET_ENV = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "API_KEY", "VLLM_API_KEY"})


def container_name(plan: ReplicaPlan) -> str:
    return f"neuron-fleet-{plan.name}"


def launch_spec(plan: ReplicaPlan, config: FleetConfig) -> LaunchSpec:
    """The LaunchSpec of ``plan`` for the configured launcher kind."""
    builders: dict[str, Callable[[ReplicaPlan, FleetConfig], LaunchSpec]] = {
        "docker": docker_spec,
        "native": native_spec,
        "simulated": simulated_spec,
        "command": command_spec,
    }
    try:
        builder = builders[config.fleet.launcher]
    except KeyError:
        raise ValueError(
            f"unknown launcher {config.fleet.launcher!r}: one of {', '.join(builders)}"
        ) from None
    return builder(plan, config)


def tgi_env(config: FleetConfig) -> dict[str, str]:
    """The TGI Neuron environment every replica shares (no secrets, no per-replica ports)."""
    model = config.model
    values = {
        "MAX_BATCH_SIZE": model.batch_size,
        "MAX_INPUT_TOKENS": model.max_input_tokens,
        "MAX_TOTAL_TOKENS": model.max_total_tokens,
        "MAX_BATCH_PREFILL_TOKENS": model.max_batch_prefill_tokens,
        "MAX_CONCURRENT_REQUESTS": model.max_concurrent_requests,
        "HF_NUM_CORES": config.fleet.cores_per_replica,
        "HF_AUTO_CAST_TYPE": model.auto_cast_type,
        "REVISION": model.revision,
    }
    return {key: str(value) for key, value in values.items() if value is not None}


def _secret_env(config: FleetConfig) -> dict[str, str]:
    """Secrets for the child's environment: the Hub token and the replica key."""
    env = {"HF_TOKEN": config.model.hf_token} if config.model.hf_token else {}
    return {**env, **_replica_key_env(config)}


def _replica_key_env(config: FleetConfig) -> dict[str, str]:
    """The replica key, for the replica to demand from its callers.

    TGI's launcher reads ``API_KEY`` (``#[clap(long, env)] api_key``, launcher/src/main.rs)
    and passes it to the router, which then answers the generation routes and /tokenize
    only to ``Authorization: Bearer <key>`` (router/src/server.rs, ``base_routes``; /health,
    /info, /metrics stay open). TGI v3.3.6, both files.
    """
    key = config.balancer.replica_api_key
    return {"API_KEY": key} if key else {}


def _display(argv: tuple[str, ...], env: dict[str, str] | None = None) -> str:
    shown = [f"{k}={v}" for k, v in (env or {}).items() if k not in SECRET_ENV]
    return shlex.join([*shown, *argv])


def _native_model_id(config: FleetConfig) -> str:
    return config.model.path or config.model.id


def _host_model_folder(config: FleetConfig) -> str | None:
    """The model's folder on the host, also when it is not exported yet (``plan``)."""
    mount = config.launcher.docker.data_mount.rstrip("/") or "/data"
    model_id = config.model.id
    if config.model.path is None and os.path.isabs(model_id):
        if not model_id.startswith(mount + "/"):  # not the blog's container path
            return model_id
    return config.model.path


def docker_mounts(config: FleetConfig) -> tuple[list[str], str]:
    """(``-v`` arguments, MODEL_ID as the container sees it)."""
    docker = config.launcher.docker
    mount = docker.data_mount.rstrip("/") or "/data"
    path = _host_model_folder(config)
    model_id = config.model.id
    data_dir = docker.data_dir or (os.path.dirname(path) if path else None)
    volumes = [f"{os.path.abspath(data_dir)}:{mount}"] if data_dir else []
    if path is None or data_dir is None:
        return volumes, model_id
    relative = os.path.relpath(path, os.path.abspath(data_dir))
    if relative.startswith(os.pardir):
        # The model lives outside data_dir: give it a mount of its own.
        volumes.append(f"{path}:/model")
        return volumes, "/model"
    return volumes, f"{mount}/{relative}" if relative != "." else mount


HUB_CACHE_MOUNT = "/hf-cache"


def hub_cache_host(docker: DockerLauncherConfig, model_folder: str | None) -> str | None:
    """The host folder behind HF_HUB_CACHE in the containers (None: nowhere to put it).

    The image sets HUGGINGFACE_HUB_CACHE=/tmp (TGI Dockerfile.neuron), inside a ``--rm``
    container: whatever a replica fetches is lost at every stop. huggingface_hub reads
    HF_HUB_CACHE before HUGGINGFACE_HUB_CACHE (huggingface_hub 0.36.2, constants.py).
    """
    if docker.hub_cache:
        return os.path.abspath(os.path.expanduser(docker.hub_cache))
    base = docker.data_dir or (os.path.dirname(model_folder) if model_folder else None)
    return os.path.join(os.path.abspath(base), "hf-cache") if base else None


def docker_spec(plan: ReplicaPlan, config: FleetConfig) -> LaunchSpec:
    docker = config.launcher.docker
    name = container_name(plan)
    volumes, model_id = docker_mounts(config)
    argv = [docker.binary, "run", "--rm", "--name", name]
    if docker.init:
        argv.append("--init")
    argv += ["--label", f"{REPLICA_LABEL}={plan.name}"]  # removed at start if left over
    # Only the API port: TGI serves /metrics there (router/src/server.rs routes "/metrics").
    # Its --prometheus-port listener is built but never served (server.rs drops the
    # exporter future returned by PrometheusBuilder::build()), and inside its own network
    # namespace a container cannot collide with another on it.
    vllm = config.fleet.engine == "vllm"
    inside_port = VLLM_IMAGE_PORT if vllm else plan.port
    argv += ["-p", f"{plan.host}:{plan.port}:{inside_port}"]
    argv += [f"--device={device}" for device in plan.devices]
    cache = hub_cache_host(docker, _host_model_folder(config))
    if cache:
        volumes = [*volumes, f"{cache}:{HUB_CACHE_MOUNT}"]
    for volume in volumes:
        argv += ["-v", volume]
    if vllm:
        env_pairs = {**vllm_image_env(config, model_id), **hub_offline_env(config)}
    else:
        env_pairs = {"PORT": str(plan.port), "MODEL_ID": model_id, **tgi_env(config)}
    if cache:
        env_pairs["HF_HUB_CACHE"] = HUB_CACHE_MOUNT
    for key, value in env_pairs.items():
        argv += ["-e", f"{key}={value}"]
    secrets = _vllm_secret_env(config) if vllm else _secret_env(config)
    for key in secrets:
        argv += ["-e", key]  # name only: docker reads the value from its own environment
    argv += [*docker.extra_args, docker.image]
    final = tuple(argv)
    return LaunchSpec(
        argv=final,
        env=secrets,
        stop_argv=(docker.binary, "stop", "-t", str(stop_grace_seconds(config.fleet)), name),
        display=_display(final),
        cleanup_argv=(docker.binary, "rm", "-f", name),
    )


def native_spec(plan: ReplicaPlan, config: FleetConfig) -> LaunchSpec:
    if config.fleet.engine == "vllm":
        return native_vllm_spec(plan, config)
    native = config.launcher.native
    uds = os.path.join(native.shard_uds_dir, f"neuron-fleet-{plan.name}-server")
    argv = (
        native.binary,
        "--hostname",
        plan.host,
        "--port",
        str(plan.port),
        "--prometheus-port",
        str(plan.metrics_port),
        "--shard-uds-path",
        uds,
        "--model-id",
        _native_model_id(config),
        *native.extra_args,
    )
    env = {"NEURON_RT_VISIBLE_CORES": plan.cores, **tgi_env(config)}
    return LaunchSpec(
        argv=argv, env={**env, **_secret_env(config)}, stop_argv=None, display=_display(argv, env)
    )


def _vllm_secret_env(config: FleetConfig) -> dict[str, str]:
    """HF_TOKEN, and the replica key as VLLM_API_KEY: vLLM's server demands it on /v1 when
    ``--api-key`` is not given (vllm 0.11.0, entrypoints/openai/api_server.py: ``args.api_key
    or [envs.VLLM_API_KEY]``); never ``--api-key``, which ``ps`` would show."""
    env = {"HF_TOKEN": config.model.hf_token} if config.model.hf_token else {}
    key = config.balancer.replica_api_key
    return {**env, **({"VLLM_API_KEY": key} if key else {})}


def native_vllm_spec(plan: ReplicaPlan, config: FleetConfig) -> LaunchSpec:
    """One replica as optimum-neuron's data-parallel serve starts each of its servers:
    ``sys.executable -m vllm.entrypoints.openai.api_server --port P --host 127.0.0.1`` +
    the serve flags, with NEURON_RT_VISIBLE_CORES = the replica's range and
    VLLM_WORKER_MULTIPROC_METHOD=spawn (optimum-neuron main,
    optimum/neuron/vllm/server_manager.py ``VLLMServerManager.start``)."""
    native = config.launcher.native
    argv = (
        native.python,
        "-m",
        VLLM_API_SERVER,
        "--host",
        plan.host,
        "--port",
        str(plan.port),
        *vllm_server_args(config, _native_model_id(config)),
        *native.extra_args,
    )
    env = {
        "NEURON_RT_VISIBLE_CORES": plan.cores,
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        **hub_offline_env(config),
    }
    return LaunchSpec(
        argv=argv,
        env={**env, **_vllm_secret_env(config)},
        stop_argv=None,
        display=_display(argv, env),
    )


def simulated_spec(plan: ReplicaPlan, config: FleetConfig) -> LaunchSpec:
    sim = config.launcher.simulated
    model = config.model
    argv = [
        sys.executable,
        "-m",
        "supervisor.simulator",
        "--host",
        plan.host,
        "--port",
        str(plan.port),
    ]
    options = {
        "--batch-size": model.batch_size,
        "--max-concurrent-requests": model.max_concurrent_requests,
        "--max-input-tokens": model.max_input_tokens,
        "--max-total-tokens": model.max_total_tokens,
        "--speed": sim.speed,
        "--model-id": model.id,
        "--tokenizer": model.tokenizer,
        "--startup-delay": sim.startup_delay_s or None,
        "--seed": None if sim.seed is None else sim.seed + plan.index,
    }
    for flag, value in options.items():
        if value is not None:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if config.fleet.engine != "tgi":
        # The simulator speaks vLLM 0.11's wire (supervisor/simulator/vllm_server.py).
        argv += ["--engine", config.fleet.engine]
    final = (*argv, *sim.extra_args)
    env = {"NEURON_RT_VISIBLE_CORES": plan.cores}
    return LaunchSpec(
        argv=final,
        env={**env, **_replica_key_env(config)},
        stop_argv=None,
        display=_display(final, env),
    )


def command_values(plan: ReplicaPlan, config: FleetConfig) -> dict[str, str]:
    return {
        "port": str(plan.port),
        "cores": plan.cores,
        "devices": ",".join(plan.devices),
        "model": _native_model_id(config),
        "metrics_port": str(plan.metrics_port),
        "name": plan.name,
        "host": plan.host,
    }


def command_spec(plan: ReplicaPlan, config: FleetConfig) -> LaunchSpec:
    """Placeholders are filled per word after shlex splitting, so a model path with spaces
    stays one argument and nothing is ever interpreted by a shell."""
    template = config.launcher.command.template
    problems = check_command_template(template)
    if problems:
        raise ConfigError(problems)
    values = command_values(plan, config)
    argv = tuple(word.format(**values) for word in shlex.split(template))
    env = {"NEURON_RT_VISIBLE_CORES": plan.cores, "PORT": str(plan.port), **tgi_env(config)}
    secrets = _secret_env(config)
    if "API_KEY" in secrets:
        # vLLM's OpenAI server reads VLLM_API_KEY when --api-key is not given
        # (vllm/entrypoints/openai/api_server.py: ``args.api_key or envs.VLLM_API_KEY``).
        secrets["VLLM_API_KEY"] = secrets["API_KEY"]
    return LaunchSpec(
        argv=argv, env={**env, **secrets}, stop_argv=None, display=_display(argv, env)
    )
