"""supervisor.launchers: argv/env per launcher kind, and docker/native end to end on fakes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from supervisor.config import ENV_VARS, ConfigError, FleetConfig, load_config
from supervisor.launchers import LaunchSpec, launch_spec
from supervisor.neuron import read_neuron_ls_file
from tests.conftest import free_port

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FAKEBIN = TESTS / "fakebin"
INF2_48 = read_neuron_ls_file(str(TESTS / "fixtures" / "neuron-ls" / "inf2.48xlarge.json"))
SECRET = "hf_LauncherSecret456"
SIMULATOR_READY = (REPO / "supervisor" / "simulator" / "__main__.py").is_file()


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def make_config(tmp_path: Path, launcher: str, extra: str = "", **kwargs) -> FleetConfig:
    model_dir = tmp_path / "data" / "exportedmodel"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "neuron_config.json").write_text(
        json.dumps(
            {"batch_size": 8, "sequence_length": 16512, "tp_degree": 8, "torch_dtype": "bfloat16"}
        )
    )
    text = f"""
[model]
id = "{model_dir}"
max_input_tokens = 16000
max_concurrent_requests = 512
[fleet]
launcher = "{launcher}"
replicas = 3
[launcher.docker]
data_dir = "{tmp_path / "data"}"
{extra}
"""
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    kwargs.setdefault("env", {"HF_TOKEN": SECRET})
    kwargs.setdefault("inventory", INF2_48)
    kwargs.setdefault("check_host", False)
    return load_config(str(path), **kwargs)


def flag(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


def assert_no_secret(spec: LaunchSpec) -> None:
    assert SECRET not in " ".join(spec.argv)
    assert SECRET not in spec.display
    assert SECRET not in repr(spec)
    assert SECRET not in " ".join(spec.stop_argv or ())


# -- argv and env ------------------------------------------------------------------------


def test_docker_spec_is_the_compose_service(tmp_path: Path) -> None:
    config = make_config(tmp_path, "docker")
    spec = launch_spec(config.plan.replicas[1], config)
    argv = spec.argv
    assert argv[:4] == ("docker", "run", "--rm", "--name")
    assert flag(argv, "--name") == "neuron-fleet-replica-1"
    assert "--init" in argv
    assert [a for a in argv if a.startswith("--device=")] == [
        f"--device=/dev/neuron{i}" for i in range(4, 8)
    ]
    # Only the API port: TGI serves /metrics on it; its prometheus port serves nothing.
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-p"] == ["127.0.0.1:8082:8082"]
    assert not any("PROMETHEUS_PORT" in a or "9082" in a for a in argv)
    volumes = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
    assert volumes == [f"{tmp_path / 'data'}:/data", f"{tmp_path / 'data' / 'hf-cache'}:/hf-cache"]
    envs = [argv[i + 1] for i, a in enumerate(argv) if a == "-e"]
    for expected in (
        "PORT=8082",
        "HF_HUB_CACHE=/hf-cache",  # Hub downloads outlive the --rm container
        "MODEL_ID=/data/exportedmodel",
        "HF_NUM_CORES=8",
        "MAX_BATCH_SIZE=8",
        "MAX_INPUT_TOKENS=16000",
        "MAX_TOTAL_TOKENS=16512",
        "MAX_CONCURRENT_REQUESTS=512",
        "HF_AUTO_CAST_TYPE=bf16",
    ):
        assert expected in envs
    assert "HF_TOKEN" in envs  # name only: docker takes the value from its environment
    assert argv[-1] == "ghcr.io/huggingface/text-generation-inference:3.3.5-neuron"
    assert spec.env == {"HF_TOKEN": SECRET}
    assert spec.stop_argv == ("docker", "stop", "-t", "30", "neuron-fleet-replica-1")
    assert spec.cleanup_argv == ("docker", "rm", "-f", "neuron-fleet-replica-1")
    assert_no_secret(spec)


def test_docker_without_token_passes_no_hf_token(tmp_path: Path) -> None:
    config = make_config(tmp_path, "docker", env={})
    spec = launch_spec(config.plan.replicas[0], config)
    assert "HF_TOKEN" not in spec.argv and spec.env == {}


def test_docker_model_outside_data_dir_gets_its_own_mount(tmp_path: Path) -> None:
    config = make_config(tmp_path, "docker")
    moved = tmp_path / "models" / "llama"
    moved.parent.mkdir()
    os.rename(tmp_path / "data" / "exportedmodel", moved)
    config = replace(config, model=replace(config.model, path=str(moved), id=str(moved)))
    argv = launch_spec(config.plan.replicas[0], config).argv
    volumes = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
    assert volumes == [
        f"{tmp_path / 'data'}:/data",
        f"{moved}:/model",
        f"{tmp_path / 'data' / 'hf-cache'}:/hf-cache",
    ]
    assert "MODEL_ID=/model" in argv


def test_native_spec_pins_cores_and_separates_ports(tmp_path: Path) -> None:
    config = make_config(tmp_path, "native")
    specs = [launch_spec(r, config) for r in config.plan.replicas]
    first = specs[2]
    assert first.argv[0] == "text-generation-launcher"
    assert flag(first.argv, "--port") == "8083" and flag(first.argv, "--prometheus-port") == "9083"
    assert flag(first.argv, "--hostname") == "127.0.0.1"
    assert flag(first.argv, "--model-id") == str(tmp_path / "data" / "exportedmodel")
    assert first.env["NEURON_RT_VISIBLE_CORES"] == "16-23"
    assert first.env["MAX_BATCH_SIZE"] == "8" and first.env["HF_NUM_CORES"] == "8"
    assert first.env["HF_TOKEN"] == SECRET
    assert first.stop_argv is None
    assert first.display.startswith("NEURON_RT_VISIBLE_CORES=16-23 ")
    uds = {flag(s.argv, "--shard-uds-path") for s in specs}
    assert len(uds) == 3
    for spec in specs:
        assert_no_secret(spec)


def test_simulated_spec(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, "simulated", extra="[launcher.simulated]\nspeed = 20\nseed = 7\n"
    )
    spec = launch_spec(config.plan.replicas[1], config)
    assert spec.argv[:3] == (sys.executable, "-m", "supervisor.simulator")
    assert flag(spec.argv, "--port") == "8082"
    assert flag(spec.argv, "--batch-size") == "8"
    assert flag(spec.argv, "--max-concurrent-requests") == "512"
    assert flag(spec.argv, "--max-total-tokens") == "16512"
    assert flag(spec.argv, "--speed") == "20"
    assert flag(spec.argv, "--seed") == "8"  # seed + index
    assert spec.env == {"NEURON_RT_VISIBLE_CORES": "8-15"}
    assert_no_secret(spec)


def test_command_spec_fills_placeholders_per_word(tmp_path: Path) -> None:
    template = (
        "my-server --port {port} --cores {cores} --devices {devices} --model {model} "
        '--name "{name}-x"'
    )
    config = make_config(
        tmp_path, "command", extra=f"[launcher.command]\ntemplate = '{template}'\n"
    )
    spec = launch_spec(config.plan.replicas[0], config)
    assert spec.argv == (
        "my-server",
        "--port",
        "8081",
        "--cores",
        "0-7",
        "--devices",
        "/dev/neuron0,/dev/neuron1,/dev/neuron2,/dev/neuron3",
        "--model",
        str(tmp_path / "data" / "exportedmodel"),
        "--name",
        "replica-0-x",
    )
    assert spec.env["NEURON_RT_VISIBLE_CORES"] == "0-7" and spec.env["HF_TOKEN"] == SECRET
    assert_no_secret(spec)


def test_command_spec_unknown_placeholder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\{gpu\}"):
        make_config(tmp_path, "command", extra="[launcher.command]\ntemplate = 'srv --gpu {gpu}'\n")


# -- end to end on the fake executables --------------------------------------------------


def wait_health(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"replica exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no /health 200 on port {port} within {timeout} s")


def child_env(spec: LaunchSpec, logs: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(spec.env)
    env["PATH"] = f"{FAKEBIN}{os.pathsep}{env.get('PATH', '')}"
    env["FAKEBIN_LOG_DIR"] = str(logs)
    env["FAKEBIN_PYTHON"] = sys.executable
    env["PYTHONPATH"] = str(REPO)
    return env


@contextlib.contextmanager
def running(spec: LaunchSpec, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``spec``'s command in a session of its own, as the supervisor starts it; killed on
    the way out if the test left it running (only the process this test started)."""
    proc = subprocess.Popen(
        spec.argv,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()


def stop(spec: LaunchSpec, env: dict[str, str], proc: subprocess.Popen[bytes]) -> None:
    """Stop it as the supervisor does (the spec's stop command, else SIGTERM to its
    session); it must be gone within 15 s."""
    if spec.stop_argv:
        stopped = subprocess.run(
            spec.stop_argv, env=env, capture_output=True, text=True, timeout=30
        )
        assert stopped.returncode == 0, stopped.stderr
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=15) is not None


@pytest.mark.skipif(not SIMULATOR_READY, reason="supervisor/simulator/__main__.py not written yet")
@pytest.mark.parametrize("kind", ["docker", "native"])
def test_launch_spec_runs_and_stops_end_to_end(tmp_path: Path, kind: str) -> None:
    port, metrics = free_port(), free_port()
    config = make_config(
        tmp_path,
        kind,
        overrides={
            "fleet": {
                "replicas": 1,
                "base_port": port,
                "metrics_base_port": metrics,
                "stop_grace_s": 5,
            }
        },
    )
    spec = launch_spec(config.plan.replicas[0], config)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = child_env(spec, logs)
    if spec.cleanup_argv:  # nothing left from a previous run: must succeed all the same
        assert subprocess.run(spec.cleanup_argv, env=env, timeout=30).returncode == 0
    with running(spec, env) as proc:
        wait_health(port, proc)
        call = json.loads((logs / "calls.jsonl").read_text().splitlines()[0])
        assert SECRET not in json.dumps(call["argv"])
        token_files = list(logs.glob("*.hf_token"))
        assert len(token_files) == 1 and token_files[0].read_text() == SECRET
        if kind == "native":
            assert call["env"]["NEURON_RT_VISIBLE_CORES"] == "0-7"
            assert call["env"]["MAX_BATCH_SIZE"] == "8"

        stop(spec, env, proc)
        if spec.stop_argv:  # the container is gone: a second stop fails like docker's
            again = subprocess.run(spec.stop_argv, env=env, capture_output=True, text=True)
            assert again.returncode != 0 and "No such container" in again.stderr
