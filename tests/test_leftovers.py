"""Replica containers a crashed supervisor left behind are removed at start, by label."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from supervisor import serve
from supervisor.config import ENV_VARS, FleetConfig
from supervisor.leftovers import REPLICA_LABEL, clean_up_leftovers
from tests.conftest import free_port, free_ports

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FAKEBIN = TESTS / "fakebin"


@pytest.fixture
def fake_docker_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setenv("PATH", f"{FAKEBIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKEBIN_LOG_DIR", str(logs))
    monkeypatch.setenv("FAKEBIN_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return logs


def start_leftover(port: int) -> subprocess.Popen:
    """What a SIGKILLed supervisor leaves: a labelled replica container still serving."""
    argv = [str(FAKEBIN / "docker"), "run", "--rm", "--name", "neuron-fleet-replica-0"]
    argv += ["--label", f"{REPLICA_LABEL}=replica-0", "-p", f"127.0.0.1:{port}:{port}", "img"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the leftover replica did not start")


def test_serve_removes_leftover_containers_before_planning(
    tmp_path: Path, fake_docker_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    leftover_port = free_port()
    leftover = start_leftover(leftover_port)
    try:
        model = tmp_path / "data" / "exportedmodel"
        model.mkdir(parents=True)
        (model / "neuron_config.json").write_text(
            json.dumps({"batch_size": 4, "sequence_length": 4096, "tp_degree": 8})
        )
        ports = free_ports(3)
        config_path = tmp_path / "fleet.toml"
        config_path.write_text(
            f'[model]\nid = "{model}"\n[fleet]\nlauncher = "docker"\nreplicas = 1\n'
            f"devices = 12\nbase_port = {ports[1]}\nmetrics_base_port = {ports[2]}\n"
            f'[balancer]\nlisten = "127.0.0.1:{ports[0]}"\n'
        )
        args = argparse.Namespace(config=str(config_path), env_file=None, neuron_ls=None)
        with caplog.at_level(logging.WARNING, logger="neuron_fleet.leftovers"):
            config = serve.load(args, env={})
        assert isinstance(config, FleetConfig)
        assert leftover.wait(timeout=15) is not None  # the container's process is gone
        removed = [m for m in caplog.messages if "left by an earlier run" in m]
        assert len(removed) == 1 and "neuron-fleet-replica-0" in removed[0]
        calls = [json.loads(line) for line in (fake_docker_env / "calls.jsonl").open()]
        assert ["ps", "-a", "--filter", f"label={REPLICA_LABEL}"] == calls[1]["argv"][1:5]
        assert calls[2]["argv"][1:] == ["rm", "-f", "neuron-fleet-replica-0"]
    finally:
        if leftover.poll() is None:  # only the process this test started
            leftover.kill()
            leftover.wait(timeout=5)


def test_nothing_left_over_means_nothing_removed(fake_docker_env: Path) -> None:
    assert clean_up_leftovers(str(FAKEBIN / "docker")) == []
    calls = [json.loads(line)["argv"][1] for line in (fake_docker_env / "calls.jsonl").open()]
    assert calls == ["ps"]  # no `rm` without a leftover


def test_docker_failure_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    def broken(argv, **kwargs):
        return subprocess.CompletedProcess(argv, 1, "", "Cannot connect to the Docker daemon")

    with caplog.at_level(logging.WARNING, logger="neuron_fleet.leftovers"):
        assert clean_up_leftovers("docker", runner=broken) == []
    (record,) = caplog.records
    assert "Cannot connect to the Docker daemon" in record.getMessage()
