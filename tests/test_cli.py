"""The `neuron-fleet` entry point itself (the installed wheel: scripts/check-wheel.sh)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from balancer.cli import add_arguments, config_from_args
from balancer.config import BalancerConfig, UpstreamSpec
from balancer.secrets_env import SECRET_VARS
from supervisor import cli


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["--version"])
    assert excinfo.value.code == 0
    assert capsys.readouterr().out.strip() == f"neuron-fleet {cli.version()}"


def test_every_option_of_every_subcommand_says_what_it_does() -> None:
    """`neuron-fleet COMMAND --help`: a description for each option, and its default."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    missing = []
    for name, sub in subparsers.choices.items():
        if name == "simulate-replica":  # the simulator's own options: supervisor/simulator/
            continue
        for action in sub._actions:
            if action.dest == "help" or not action.option_strings:
                continue
            flag = f"{name} {action.option_strings[-1]}"
            if not action.help:
                missing.append(f"{flag}: no help")
                continue
            shows_default = "%(default)" in action.help or "default" in action.help
            if action.default not in (None, False) and not shows_default:
                missing.append(f"{flag}: default {action.default!r} not shown")
    assert missing == []


def test_every_balance_option_defaults_to_the_balancer_config_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the required --upstream given: the resulting config is BalancerConfig() itself,
    so no option's default can drift from the dataclass."""
    for name in SECRET_VARS:  # read from the environment, not options
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--upstream", "http://127.0.0.1:9"])
    config = config_from_args(args)
    assert config == dataclasses.replace(
        BalancerConfig(), upstreams=(UpstreamSpec(url="http://127.0.0.1:9"),)
    )
    # and every option reaches the config: its value, given, changes the result
    defaults = vars(args)
    not_config = {"upstream", "drain_timeout", "log_level", "log_stream"}
    for action in parser._actions:
        if action.dest in ("help", *not_config):
            continue
        changed = argparse.Namespace(**{**defaults, action.dest: _other(action)})
        assert config_from_args(changed) != config, action.option_strings


def _other(action: argparse.Action) -> object:
    """A valid value different from ``action``'s default."""
    default = action.default
    if action.choices:
        return next(c for c in action.choices if c != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, list):
        return [*default, "10.0.0.0/8"]
    if action.dest == "listen":
        return ("127.0.0.2", 8081)
    if default is None:
        return "x" if action.type is None else action.type("3")
    return default + 0.5 if isinstance(default, float) else default + 1
