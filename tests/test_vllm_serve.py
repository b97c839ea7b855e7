"""``neuron-fleet serve`` with ``engine = "vllm"`` and the native launcher, end to end: the
replicas are started with optimum-neuron's per-server command (a fake vLLM Python that logs
it and runs a simulated replica), and one killed replica is restarted while the other serves
-- where optimum-cli's --data-parallel-size would stop the whole service."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from supervisor.procutil import pid_alive
from tests.conftest import free_ports
from tests.test_serve import CHAT, fleet_status, get, post_json, start_serve, stop, wait_for

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[1]
FAKE_PYTHON = ROOT / "tests" / "fakebin" / "vllm-python"


def calls(logs: Path) -> list[dict]:
    path = logs / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_vllm_fleet_serves_and_restarts_the_replica_that_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "llama"
    model.mkdir()
    (model / "neuron_config.json").write_text(
        json.dumps({"batch_size": 4, "sequence_length": 1024, "tp_degree": 2, "dtype": "bf16"})
    )
    listen, base_port, _ = free_ports(3)
    logs = tmp_path / "logs"
    logs.mkdir()
    config = tmp_path / "fleet.toml"
    config.write_text(
        f'[model]\nid = "{model}"\nserved_model_name = "llama"\n'
        '[fleet]\nlauncher = "native"\nengine = "vllm"\ndevices = 2\ncores_per_replica = 2\n'
        f"replicas = 2\nbase_port = {base_port}\nrestart_backoff_initial_s = 0.05\n"
        "stop_grace_s = 5\n"
        f'[launcher.native]\npython = "{FAKE_PYTHON}"\n'
    )
    monkeypatch.setenv("FAKEBIN_LOG_DIR", str(logs))
    monkeypatch.setenv("FAKEBIN_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    proc = start_serve(config, listen)
    base = f"http://127.0.0.1:{listen}"
    try:
        wait_for(lambda: fleet_ready(base) == 2, seconds=30, what="2 vLLM replicas ready")
        started = calls(logs)
        assert sorted(c["env"]["NEURON_RT_VISIBLE_CORES"] for c in started) == ["0-1", "2-3"]
        for call in started:
            argv = call["argv"]
            assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
            assert argv[argv.index("--max-num-seqs") + 1] == "4"
            assert argv[argv.index("--max-model-len") + 1] == "1024"
            assert argv[argv.index("--served-model-name") + 1] == "llama"
            assert call["env"]["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
            assert "VLLM_API_KEY" in call["secrets_in_env"]  # the replica key, by env
            port = argv[argv.index("--port") + 1]
            key = (logs / f"vllm-{port}.VLLM_API_KEY").read_text()
            assert len(key) >= 32 and key not in json.dumps(argv)

        code, text = post_json(f"{base}/v1/chat/completions", {**CHAT, "model": "llama"})
        assert code == 200 and text.rstrip().endswith("data:[DONE]"), text[-300:]

        victim = next(r for r in fleet_status(base)["replicas"] if r["name"] == "replica-1")
        os.kill(victim["pid"], signal.SIGKILL)  # a child of the service this test started
        wait_for(lambda: not pid_alive(victim["pid"]), what="replica-1 gone")
        # A killed process is a zombie while its other threads still hold its sockets open
        # for a moment: a request sent then is accepted and cut, as if it had killed it. Wait
        # for the supervisor to have seen the exit, as any later request would.
        wait_for(lambda: replica_pid(base, "replica-1") != victim["pid"], what="exit seen")
        # The service stays up on replica-0 while replica-1 comes back.
        status, _ = get(f"{base}/health")
        assert status == 200
        code, text = post_json(f"{base}/v1/chat/completions", {**CHAT, "model": "llama"})
        assert code == 200 and text.rstrip().endswith("data:[DONE]")
        wait_for(lambda: len(calls(logs)) == 3, seconds=30, what="replica-1 restarted")
        again = calls(logs)[-1]
        assert again["env"]["NEURON_RT_VISIBLE_CORES"] == "2-3"  # same cores, same command
        assert again["argv"] == next(
            c["argv"] for c in started if c["env"]["NEURON_RT_VISIBLE_CORES"] == "2-3"
        )
        wait_for(lambda: fleet_ready(base) == 2, seconds=30, what="2 replicas ready again")

        returncode, err = stop(proc)
        assert returncode == 0, err[-3000:]
        for call in calls(logs):
            assert not pid_alive(call["pid"]), f"replica pid {call['pid']} left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def replica_pid(base: str, name: str) -> int | None:
    return next(r["pid"] for r in fleet_status(base)["replicas"] if r["name"] == name)


def fleet_ready(base: str) -> int:
    try:
        return fleet_status(base)["ready_replicas"]
    except (OSError, AssertionError, FileNotFoundError):
        return -1
