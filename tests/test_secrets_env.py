"""``serve`` and ``balance`` read the balancer's secret variables alike
(balancer/secrets_env.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from balancer import secrets_env
from balancer.cli import add_arguments, config_from_args
from balancer.config import BalancerConfig
from supervisor.config import ENV_VARS, load_config
from supervisor.procutil import child_env
from tests.test_config import SIMULATED

SECRET_FIELDS = ("admin_token", "api_keys", "replica_api_key")

ENVIRONMENTS = [
    pytest.param({}, id="unset"),
    pytest.param(
        {
            "NEURON_FLEET_API_KEYS": " k-1 , k-2,, ,k-3",
            "NEURON_FLEET_ADMIN_TOKEN": "  adm-1  ",
            "NEURON_FLEET_REPLICA_API_KEY": "\trk-1 ",
        },
        id="spaces-and-empty-items",
    ),
    pytest.param(
        {
            "NEURON_FLEET_API_KEYS": " , ,",
            "NEURON_FLEET_ADMIN_TOKEN": "   ",
            "NEURON_FLEET_REPLICA_API_KEY": "",
        },
        id="blank",
    ),
    pytest.param({"NEURON_FLEET_API_KEYS": "only-one"}, id="one-key"),
]


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _balance_secrets(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> dict:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--upstream", "http://127.0.0.1:9"]))
    return {name: getattr(config, name) for name in SECRET_FIELDS}


def _serve_secrets(tmp_path: Path, **kwargs) -> dict:
    toml = tmp_path / "fleet.toml"
    toml.write_text(SIMULATED)
    config = load_config(str(toml), check_host=False, **kwargs)
    return {name: getattr(config.balancer, name) for name in SECRET_FIELDS}


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_serve_and_balance_read_the_secret_variables_alike(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    balance = _balance_secrets(monkeypatch, env)
    assert _serve_secrets(tmp_path, env=env) == balance
    # The env file (systemd's EnvironmentFile for `serve`) the same way; single quotes keep
    # the spaces, as docker compose does.
    env_file = tmp_path / "fleet.env"
    env_file.write_text("".join(f"{name}='{value}'\n" for name, value in env.items()))
    assert _serve_secrets(tmp_path, env={}, env_file=str(env_file)) == balance


def test_the_parsed_values() -> None:
    env = {
        "NEURON_FLEET_API_KEYS": " k-1 , k-2,, ,k-3",
        "NEURON_FLEET_ADMIN_TOKEN": "  adm-1  ",
        "NEURON_FLEET_REPLICA_API_KEY": "\trk-1 ",
    }
    assert secrets_env.secrets_from_env(env) == {
        "api_keys": ("k-1", "k-2", "k-3"),
        "admin_token": "adm-1",
        "replica_api_key": "rk-1",
    }
    blank = {"NEURON_FLEET_API_KEYS": " , ", "NEURON_FLEET_ADMIN_TOKEN": " "}
    assert secrets_env.secrets_from_env(blank) == {}
    with pytest.raises(KeyError):
        secrets_env.parse_secret("HF_TOKEN", "x")


def test_blank_environment_does_not_turn_off_the_env_files_api_keys(tmp_path: Path) -> None:
    """Blank counts as unset in either layer, so the environment cannot silently switch API
    keys off (the balancer would then serve anyone on a loopback listen address)."""
    env_file = tmp_path / "fleet.env"
    env_file.write_text("NEURON_FLEET_API_KEYS=k-1,k-2\n")
    secrets = _serve_secrets(tmp_path, env={"NEURON_FLEET_API_KEYS": "  "}, env_file=str(env_file))
    assert secrets["api_keys"] == ("k-1", "k-2")


def test_every_secret_variable_is_a_serve_setting_and_kept_from_replicas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, field_name in secrets_env.SECRET_VARS.items():
        assert ENV_VARS[name] == ("balancer", field_name)
        assert field_name in {f.name for f in dataclasses.fields(BalancerConfig)}
        monkeypatch.setenv(name, "s3cret")
    assert not set(secrets_env.SECRET_VARS) & set(child_env({}))
