"""Where configuration values come from, and their types.

Precedence, highest first (like docker compose, where the shell beats ``.env``):

    1. CLI overrides (``--replicas 3``)
    2. environment variables (MODEL_ID, MAX_BATCH_SIZE, ... see ENV_VARS)
    3. the ``--env-file`` (the blog's ``.env``: KEY=VALUE, quotes, comments, no expansion)
    4. the TOML file (``deploy/fleet.toml`` documents every key)
    5. defaults (``schema.py``), then values read from the exported model

Each layer records where a value came from, so an error can name the file or variable.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shlex
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from balancer.config import BalancerConfig
from balancer.secrets_env import ADMIN_TOKEN_VAR, SECRET_VARS, parse_secret
from supervisor.schema import (
    LAUNCHERS,
    CommandLauncherConfig,
    ConfigError,
    DockerLauncherConfig,
    FleetSettings,
    ModelConfig,
    NativeLauncherConfig,
    SimulatedLauncherConfig,
    unknown_key,
)

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
    "NEURON_FLEET_ENGINE": ("fleet", "engine"),
    "NEURON_FLEET_DEVICES": ("fleet", "devices"),
    "NEURON_FLEET_LISTEN": ("balancer", "listen"),
    # The balancer's secrets: names and parsing shared with `neuron-fleet balance`.
    **{name: ("balancer", key) for name, key in SECRET_VARS.items()},
}

SECRET_KEYS = {("model", "hf_token")} | {("balancer", key) for key in SECRET_VARS.values()}

_DERIVED = {"model": {"path", "neuron"}}
_BALANCER_DERIVED = {"host", "port", "upstreams", "max_total_tokens", "engine"}
"""``engine`` comes from [fleet] engine: one setting for the replicas and the balancer."""

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "fleet": FleetSettings,
    "launcher.docker": DockerLauncherConfig,
    "launcher.native": NativeLauncherConfig,
    "launcher.command": CommandLauncherConfig,
    "launcher.simulated": SimulatedLauncherConfig,
    "balancer": BalancerConfig,
}


def settable(section: str) -> dict[str, Any]:
    """key -> type for the keys a user may set in ``section``."""
    cls = SECTIONS[section]
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
    """From an environment string (needs parsing) rather than a typed value (TOML, or a
    secret already parsed by balancer/secrets_env.py)."""


class Layers:
    """section -> key -> value, later layers overriding earlier ones."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, _Value]] = {s: {} for s in SECTIONS}
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def set(self, section: str, key: str, value: Any, source: str, *, text: bool) -> None:
        allowed = settable(section)
        if key not in allowed:
            self.errors.append(unknown_key(f"[{section}]", key, allowed, source))
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
                    if section not in SECTIONS:
                        self.errors.append(unknown_key("[launcher]", kind, LAUNCHERS, source))
                    elif not isinstance(sub, Mapping):
                        self.errors.append(f"[{section}] must be a table ({source})")
                    else:
                        self._add_section(section, sub, source)
            elif name in SECTIONS:
                if not isinstance(body, Mapping):
                    self.errors.append(
                        f"[{name}] must be a table, got {type(body).__name__} ({source})"
                    )
                else:
                    self._add_section(name, body, source)
            else:
                self.errors.append(
                    unknown_key(
                        "top level:", name, ["model", "fleet", "launcher", "balancer"], source
                    )
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
                    f"environment or the env file (HF_TOKEN, {ADMIN_TOKEN_VAR}, ...)"
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
            if name in SECRET_VARS:
                # Parsed as `balance` parses it; blank (e.g. only spaces) counts as unset.
                secret = parse_secret(name, raw)
                if secret:
                    self.set(*target, secret, f"{source} {name}", text=False)
                continue
            self.set(*target, raw, f"{source} {name}", text=True)


# -- the .env file -------------------------------------------------------------------------

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def parse_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines as docker compose reads them, without variable expansion.

    ``# comments``, blank lines, ``export KEY=...``, 'single' (literal) and "double"
    (\\n \\t \\\\ \\" escapes) quotes, and `` #`` inline comments after unquoted values.
    Raises ConfigError listing every bad line.
    """
    values, errors = read_env_file(path)
    if errors:
        raise ConfigError(errors)
    return values


def read_env_file(path: str) -> tuple[dict[str, str], list[str]]:
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


def typed_section(layers: Layers, section: str, errors: list[str]) -> dict[str, Any]:
    allowed = settable(section)
    out = {}
    for key, item in layers.values[section].items():
        try:
            out[key] = _coerce(section, key, allowed[key], item)
        except ValueError as exc:
            errors.append(f"[{section}] {key}: {exc} (from {item.source})")
    return out


def nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
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
