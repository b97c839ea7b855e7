"""One frozen FleetConfig from a TOML file, an env file, the environment and the CLI.

``load_config`` is the one entry point. The jobs behind it live in their own modules:

- ``schema.py``: the sections' dataclasses, ConfigError, checks on values alone;
- ``layering.py``: TOML, env file, environment and CLI values layered and typed;
- ``model_resolve.py``: the model folder, its neuron_config.json, the TGI limits;
- ``host_checks.py``: ports, binaries, folders and Neuron devices of this machine;
- ``plan.py``: which replica gets which NeuronCores and ports.

Everything is checked before anything starts and every problem is reported at once in
one ConfigError: a fleet that takes 20 minutes to load should not fail on the third
replica for a typo that was visible at second zero.

Secrets (HF_TOKEN, admin_token, api_keys) never appear in repr(), str() or
``to_public_dict()``; put them in the environment or the env file, not the TOML.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from balancer.admission import QUEUE_ORDERS
from balancer.client_address import parse_networks
from balancer.config import BalancerConfig, UpstreamSpec
from balancer.quotas import BODY_COST
from supervisor.host_checks import (
    check_export_versions,
    check_launcher_host,
    check_ports,
    host_inventory,
    port_in_use,
    port_problem,
    uses_metrics_port,
)
from supervisor.layering import (
    ENV_VARS,
    SECRET_KEYS,
    SECTIONS,
    Layers,
    nest,
    parse_env_file,
    read_env_file,
    typed_section,
)
from supervisor.model_resolve import resolve_model
from supervisor.neuron import Inventory
from supervisor.plan import Plan, plan_replicas
from supervisor.schema import (
    COMMAND_PLACEHOLDERS,
    DEFAULT_IMAGE,
    DEFAULT_VLLM_IMAGE,
    ENGINES,
    LAUNCHERS,
    POLICIES,
    REDACTED,
    SIMULATED_MODEL_ID,
    CommandLauncherConfig,
    ConfigError,
    DockerLauncherConfig,
    FleetSettings,
    LauncherConfig,
    ModelConfig,
    NativeLauncherConfig,
    SimulatedLauncherConfig,
    check_command_template,
    check_fleet_values,
    docker_image,
    is_public,
    launcher_whole_devices,
    not_one_of,
    split_listen,
    stop_grace_seconds,
)

# Names other modules and tests import from here (the loader's public face).
__all__ = [
    "COMMAND_PLACEHOLDERS",
    "DEFAULT_IMAGE",
    "DEFAULT_VLLM_IMAGE",
    "ENGINES",
    "ENV_VARS",
    "LAUNCHERS",
    "POLICIES",
    "SECRET_KEYS",
    "SIMULATED_MODEL_ID",
    "CommandLauncherConfig",
    "ConfigError",
    "DockerLauncherConfig",
    "FleetConfig",
    "FleetSettings",
    "LauncherConfig",
    "ModelConfig",
    "NativeLauncherConfig",
    "SimulatedLauncherConfig",
    "check_command_template",
    "load_config",
    "parse_env_file",
    "port_in_use",
    "port_problem",
    "split_listen",
    "stop_grace_seconds",
    "uses_metrics_port",
]


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
        data["balancer"]["replica_api_key"] = REDACTED if self.balancer.replica_api_key else None
        return data

    redacted = to_public_dict


def load_config(
    path: str | None,
    *,
    env: Mapping[str, str] | None = None,
    env_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    inventory: Inventory | None = None,
    check_host: bool = True,
    read_model: bool = True,
    require_model: bool = True,
) -> FleetConfig:
    """Read, merge, resolve and validate; raise ConfigError listing every problem.

    ``env``: the environment to read (default ``os.environ``). ``overrides``: CLI values,
    nested (``{"fleet": {"replicas": 3}}``) or dotted (``{"fleet.replicas": 3}``); None
    values are ignored. ``inventory``: the host's devices (default: config ``devices``,
    else neuron-ls, else /dev). ``check_host=False`` skips what looks at this machine
    (neuron-ls, ports in use, binaries on PATH, model folder present) -- for ``export``
    and for tests. ``read_model=False`` ignores what the model folder says (``export``,
    which is about to replace it). ``require_model=False`` (``plan``): a model not set or
    not exported yet is a warning, not an error.
    """
    layers = Layers()
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
        env_values, env_errors = read_env_file(env_file)
        layers.errors += env_errors
        layers.add_env(env_values, f"env file {env_file}", warn_unknown=True)
    layers.add_env(os.environ if env is None else env, "environment", warn_unknown=False)
    if overrides:
        layers.add_tree(nest(overrides), "command line")

    errors = list(layers.errors)
    warnings = list(layers.warnings)
    raw = {section: typed_section(layers, section, errors) for section in SECTIONS}
    try:
        fleet = FleetSettings(**raw["fleet"])
        docker = DockerLauncherConfig(**raw["launcher.docker"])
        launcher = LauncherConfig(
            docker=dataclasses.replace(docker, image=docker_image(fleet, docker)),
            native=NativeLauncherConfig(**raw["launcher.native"]),
            command=CommandLauncherConfig(**raw["launcher.command"]),
            simulated=SimulatedLauncherConfig(**raw["launcher.simulated"]),
        )
        model = ModelConfig(**raw["model"])
    except TypeError as exc:  # pragma: no cover - keys are checked above
        raise ConfigError(str(exc)) from None
    balancer_raw = raw["balancer"]

    errors += check_fleet_values(fleet, launcher)
    if check_host:
        errors += check_launcher_host(fleet, launcher)
    if is_public(fleet.host):
        warnings.append(
            f"[fleet] host = {fleet.host!r}: replicas are reachable from other hosts, around "
            'the balancer; "127.0.0.1" keeps them private'
        )
    model, fleet, model_errors, model_warnings = resolve_model(
        model, fleet, launcher, check_host, read_model, require_model
    )
    errors += model_errors
    warnings += model_warnings
    if check_host and read_model:
        version_errors, version_warnings = check_export_versions(model, fleet, launcher)
        errors += version_errors
        warnings += version_warnings

    listen = ("127.0.0.1", 8080)
    if "listen" in balancer_raw:
        try:
            listen = split_listen(balancer_raw.pop("listen"))
        except ValueError as exc:
            errors.append(f"[balancer] {exc}")
    if balancer_raw.get("metrics_listen"):
        try:
            metrics_at = split_listen(str(balancer_raw["metrics_listen"]))
            if metrics_at[1] and metrics_at[1] == listen[1]:
                errors.append(
                    f"[balancer] metrics_listen port {metrics_at[1]} is the listen port: give "
                    "/metrics a port of its own (one the front load balancer does not forward)"
                )
        except ValueError as exc:
            errors.append(f"[balancer] metrics_{exc}")
    if balancer_raw.get("policy", "least-outstanding") not in POLICIES:
        errors.append(not_one_of("[balancer] policy", balancer_raw["policy"], POLICIES))
    try:
        parse_networks(balancer_raw.get("trusted_proxies", ()))
    except ValueError as exc:
        errors.append(f"[balancer] {exc}")
    if balancer_raw.get("queue_order", "fifo") not in QUEUE_ORDERS:
        errors.append(
            not_one_of("[balancer] queue_order", balancer_raw["queue_order"], QUEUE_ORDERS)
        )
    slo = balancer_raw.get("ttft_slo_s")
    if slo is not None and not 0 < slo < float("inf"):
        errors.append(f"[balancer] ttft_slo_s = {slo!r}: expected a positive number of seconds")
    after = balancer_raw.get("quarantine_after", 0)
    if after < 0:
        errors.append(
            f"[balancer] quarantine_after = {after!r}: expected a whole number >= 0 (0: off)"
        )
    ttl = balancer_raw.get("quarantine_ttl_s", 1.0)
    if not 0 < ttl < float("inf"):
        errors.append(
            f"[balancer] quarantine_ttl_s = {ttl!r}: expected a positive number of seconds"
        )
    window = balancer_raw.get("confirm_window_s", 1.0)
    if not 0 < window <= 60:
        errors.append(f"[balancer] confirm_window_s = {window!r}: expected seconds, > 0 and <= 60")
    share = balancer_raw.get("queue_long_share", 0.0)
    if not 0 <= share < 1:
        errors.append(f"[balancer] queue_long_share = {share!r}: expected 0 <= share < 1")
    errors += check_body_limits(balancer_raw)

    plan = None
    if fleet.cores_per_replica is not None and fleet.cores_per_replica >= 1:
        inv, inv_errors = host_inventory(fleet, inventory, check_host)
        errors += inv_errors
        if inv is not None:
            plan, plan_errors = plan_replicas(
                fleet, inv, whole_devices=launcher_whole_devices(fleet.launcher)
            )
            errors += plan_errors
    if plan is not None:
        warnings += list(plan.notes)
        errors += check_ports(fleet, launcher, plan, listen, check_host)
        if fleet.min_ready > len(plan.replicas):
            errors.append(
                f"[fleet] min_ready = {fleet.min_ready} but only {len(plan.replicas)} replicas are "
                f"planned: lower min_ready to at most {len(plan.replicas)}"
            )

    if errors:
        raise ConfigError(errors)
    assert plan is not None
    balancer = _balancer(balancer_raw, listen, model, plan, fleet.engine)
    return FleetConfig(
        model=model,
        fleet=fleet,
        launcher=launcher,
        balancer=balancer,
        plan=plan,
        config_path=os.path.abspath(path) if path else None,
        warnings=tuple(warnings),
    )


def check_body_limits(raw: Mapping[str, Any]) -> list[str]:
    """The body deadline, the per-client body share and the per-client connection cap."""
    errors = []
    body_timeout = raw.get("body_timeout_s", 1.0)
    if not 0 < body_timeout < float("inf"):
        errors.append(
            f"[balancer] body_timeout_s = {body_timeout!r}: expected a positive number of seconds"
        )
    for key in ("max_connections_per_client", "max_buffered_body_bytes_per_client"):
        if raw.get(key, 0) < 0:
            errors.append(f"[balancer] {key} = {raw[key]!r}: expected a whole number >= 0 (0: off)")
    share = raw.get("max_buffered_body_bytes_per_client", 0)
    largest = BODY_COST * raw.get("max_body_bytes", BalancerConfig.max_body_bytes)
    if 0 < share < largest:
        errors.append(
            f"[balancer] max_buffered_body_bytes_per_client = {share}: below one body of "
            f"max_body_bytes (counted twice: {largest}), so such a request could never be "
            f"served; raise it to at least {largest} or set 0"
        )
    return errors


def _balancer(
    raw: dict[str, Any], listen: tuple[str, int], model: ModelConfig, plan: Plan, engine: str
) -> BalancerConfig:
    values = dict(raw)
    values["engine"] = engine  # the error shapes the balancer answers in: [fleet] engine
    values.setdefault(
        "max_inflight_per_replica", model.batch_size or BalancerConfig.max_inflight_per_replica
    )
    values.setdefault("max_input_tokens", model.max_input_tokens)
    values["max_total_tokens"] = model.max_total_tokens
    values.setdefault("tokenizer_path", model.tokenizer)
    upstreams = tuple(UpstreamSpec(url=r.url, name=r.name, cores=r.cores) for r in plan.replicas)
    return BalancerConfig(host=listen[0], port=listen[1], upstreams=upstreams, **values)
