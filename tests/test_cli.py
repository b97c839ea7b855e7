"""The `neuron-fleet` entry point itself (the installed wheel: scripts/check-wheel.sh)."""

from __future__ import annotations

import pytest

from supervisor import cli


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["--version"])
    assert excinfo.value.code == 0
    assert capsys.readouterr().out.strip() == f"neuron-fleet {cli.version()}"
