"""The `neuron-fleet` entry point itself (the installed wheel: scripts/check-wheel.sh)."""

from __future__ import annotations

import pytest

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
