"""[fleet] engine = "vllm": the native and docker launchers run what optimum-neuron runs,
[model] keys become vLLM's flags and are checked against the export before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import DEFAULT_IMAGE, DEFAULT_VLLM_IMAGE, ConfigError, load_config
from supervisor.launchers import launch_spec
from tests.conftest import free_port
from tests.test_launchers import (
    INF2_48,
    SECRET,
    SIMULATOR_READY,
    assert_no_secret,
    child_env,
    clean_environ,  # noqa: F401 - autouse fixture: no ENV_VARS from the outer environment
    flag,
    make_config,
    running,
    stop,
    wait_health,
)

FAKEBIN = Path(__file__).resolve().parent / "fakebin"


def vllm_config(tmp_path: Path, launcher: str, extra: str = "", **kwargs):
    overrides = kwargs.pop("overrides", {})
    fleet = {"engine": "vllm", **overrides.pop("fleet", {})}
    return make_config(tmp_path, launcher, extra, overrides={"fleet": fleet, **overrides}, **kwargs)


def export_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "exportedmodel"


def test_native_vllm_is_optimum_neurons_per_replica_command(tmp_path: Path) -> None:
    config = vllm_config(tmp_path, "native")
    spec = launch_spec(config.plan.replicas[1], config)
    model = str(export_dir(tmp_path))
    # optimum-neuron main, optimum/neuron/vllm/server_manager.py VLLMServerManager.start and
    # optimum/commands/neuron/serve.py (the flags), with our host, port and cores.
    assert spec.argv == (
        "python3",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        "127.0.0.1",
        "--port",
        "8082",
        "--model",
        model,
        "--served-model-name",
        model,
        "--task",
        "generate",
        "--tensor-parallel-size",
        "8",
        "--max-num-seqs",
        "8",
        "--max-model-len",
        "16512",
        "--dtype",
        "bfloat16",
    )
    assert spec.env["NEURON_RT_VISIBLE_CORES"] == "8-15"
    assert spec.env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert spec.env["HF_TOKEN"] == SECRET
    assert "HF_HUB_OFFLINE" not in spec.env  # no weights in the export: it fetches them
    assert spec.stop_argv is None
    assert spec.display.startswith(
        "NEURON_RT_VISIBLE_CORES=8-15 VLLM_WORKER_MULTIPROC_METHOD=spawn python3 -m vllm."
    )
    assert_no_secret(spec)


def test_replica_key_reaches_vllm_as_vllm_api_key_never_argv(tmp_path: Path) -> None:
    import dataclasses

    config = vllm_config(tmp_path, "native")
    key = "replica-key-0123456789"
    config = dataclasses.replace(
        config, balancer=dataclasses.replace(config.balancer, replica_api_key=key)
    )
    for launcher in ("native", "docker"):
        config = dataclasses.replace(
            config, fleet=dataclasses.replace(config.fleet, launcher=launcher)
        )
        spec = launch_spec(config.plan.replicas[0], config)
        assert spec.env["VLLM_API_KEY"] == key
        assert "API_KEY" not in spec.env  # TGI's name means nothing to vLLM
        assert key not in " ".join(spec.argv) and key not in spec.display


def test_export_with_weights_starts_offline(tmp_path: Path) -> None:
    model = export_dir(tmp_path)
    model.mkdir(parents=True)
    (model / "checkpoint").mkdir()
    config = vllm_config(tmp_path, "native")
    spec = launch_spec(config.plan.replicas[0], config)
    assert spec.env["HF_HUB_OFFLINE"] == "1"
    docker = launch_spec(config.plan.replicas[0], vllm_config(tmp_path, "docker"))
    assert "HF_HUB_OFFLINE=1" in docker.argv


def test_docker_vllm_runs_the_pinned_image_through_its_entrypoint(tmp_path: Path) -> None:
    config = vllm_config(tmp_path, "docker")
    spec = launch_spec(config.plan.replicas[1], config)
    argv = spec.argv
    assert argv[-1] == DEFAULT_VLLM_IMAGE
    assert "huggingface-vllm-inference-neuronx:0.11.0-optimum0.4.4" in DEFAULT_VLLM_IMAGE
    # The entry point always passes --port 8080 (docker/vllm/Dockerfile).
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-p"] == ["127.0.0.1:8082:8080"]
    assert [a for a in argv if a.startswith("--device=")] == [
        f"--device=/dev/neuron{i}" for i in range(4, 8)
    ]
    envs = [argv[i + 1] for i, a in enumerate(argv) if a == "-e"]
    for expected in (
        "SM_ON_MODEL=/data/exportedmodel",
        "SM_ON_SERVED_MODEL_NAME=" + str(export_dir(tmp_path)),
        "SM_ON_TENSOR_PARALLEL_SIZE=8",
        "SM_ON_BATCH_SIZE=8",
        "SM_ON_SEQUENCE_LENGTH=16512",
        "SM_ON_DTYPE=bfloat16",
        "HF_HUB_CACHE=/hf-cache",
    ):
        assert expected in envs
    assert not any(e.startswith(("PORT=", "MODEL_ID=", "MAX_BATCH_SIZE=")) for e in envs)
    assert "HF_TOKEN" in envs and spec.env == {"HF_TOKEN": SECRET}
    assert spec.stop_argv == ("docker", "stop", "-t", "30", "neuron-fleet-replica-1")
    assert_no_secret(spec)


def test_each_engine_gets_its_own_default_image_and_a_set_one_is_kept(tmp_path: Path) -> None:
    assert make_config(tmp_path, "docker").launcher.docker.image == DEFAULT_IMAGE
    assert vllm_config(tmp_path, "docker").launcher.docker.image == DEFAULT_VLLM_IMAGE
    mine = vllm_config(tmp_path, "docker", extra='image = "my/vllm:1"\n')
    assert launch_spec(mine.plan.replicas[0], mine).argv[-1] == "my/vllm:1"


def test_model_keys_become_vllm_flags(tmp_path: Path) -> None:
    model = export_dir(tmp_path)
    model.mkdir(parents=True)
    (model / "neuron_config.json").write_text(
        json.dumps(
            {"batch_size": 4, "sequence_length": 4096, "tp_degree": 2, "auto_cast_type": "fp16"}
        )
    )
    path = tmp_path / "fleet.toml"
    path.write_text(
        f'[model]\nid = "{model}"\nserved_model_name = "llama"\nbatch_size = 4\n'
        'max_total_tokens = 4096\nauto_cast_type = "fp16"\nrevision = "abc123"\n'
        '[fleet]\nlauncher = "native"\nengine = "vllm"\ncores_per_replica = 2\nreplicas = 2\n'
    )
    config = load_config(str(path), env={}, inventory=INF2_48, check_host=False)
    argv = launch_spec(config.plan.replicas[1], config).argv
    assert flag(argv, "--max-num-seqs") == "4"
    assert flag(argv, "--max-model-len") == "4096"
    assert flag(argv, "--tensor-parallel-size") == "2"
    assert flag(argv, "--dtype") == "float16"
    assert flag(argv, "--served-model-name") == "llama"
    assert flag(argv, "--revision") == "abc123"
    assert launch_spec(config.plan.replicas[1], config).env["NEURON_RT_VISIBLE_CORES"] == "2-3"
    # vLLM admits prompts up to max-model-len - 1 (serving_engine.py _validate_input).
    assert config.model.max_input_tokens == 4095
    assert config.balancer.max_input_tokens == 4095


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("batch_size", 4, ["batch_size (vLLM --max-num-seqs) = 4 differs", "set it to 8"]),
        (
            "max_total_tokens",
            8192,
            ["max_total_tokens (vLLM --max-model-len) = 8192 differs", "16512"],
        ),
        ("auto_cast_type", "fp16", ["auto_cast_type (vLLM --dtype) = 'fp16'", "'bf16'"]),
    ],
)
def test_vllm_refuses_what_optimum_cli_serve_refuses(
    tmp_path: Path, key: str, value: object, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        vllm_config(tmp_path, "native", overrides={"model": {key: value}})
    message = str(caught.value)
    for word in words:
        assert word in message
    assert "neuron_config.json" in message


def test_tgi_still_takes_a_smaller_batch_and_sequence(tmp_path: Path) -> None:
    smaller = {"model": {"batch_size": 4, "max_total_tokens": 8192, "max_input_tokens": 4096}}
    config = make_config(tmp_path, "native", overrides=smaller)
    assert (config.model.batch_size, config.model.max_total_tokens) == (4, 8192)
    with pytest.raises(ConfigError, match="--max-num-seqs"):
        vllm_config(tmp_path, "native", overrides=smaller)


def test_engine_is_validated_and_read_from_the_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[fleet\] engine = 'vlm' is not known: did you "):
        make_config(tmp_path, "native", overrides={"fleet": {"engine": "vlm"}})
    config = make_config(tmp_path, "native", env={"NEURON_FLEET_ENGINE": "vllm"})
    assert config.fleet.engine == "vllm"
    assert config.balancer.engine == "vllm"  # the balancer answers in vLLM's error shape
    assert make_config(tmp_path, "native").balancer.engine == "tgi"
    with pytest.raises(ConfigError, match=r"\[balancer\] unknown key 'engine'"):
        make_config(tmp_path, "native", extra="[balancer]\nengine = 'vllm'\n")


def test_native_vllm_python_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(FAKEBIN))
    with pytest.raises(ConfigError, match=r"'no-such-python' is not on PATH.*\[launcher.native\]"):
        vllm_config(
            tmp_path,
            "native",
            extra='[launcher.native]\npython = "no-such-python"\n',
            check_host=True,
            overrides={"fleet": {"devices": 12}},
        )


def test_simulated_vllm_replica_is_asked_for_the_vllm_wire(tmp_path: Path) -> None:
    config = vllm_config(tmp_path, "simulated")
    assert flag(launch_spec(config.plan.replicas[0], config).argv, "--engine") == "vllm"
    tgi = make_config(tmp_path, "simulated")
    assert "--engine" not in launch_spec(tgi.plan.replicas[0], tgi).argv


@pytest.mark.skipif(not SIMULATOR_READY, reason="supervisor/simulator/__main__.py not written yet")
@pytest.mark.parametrize("kind", ["native", "docker"])
def test_vllm_replica_runs_and_stops_end_to_end(tmp_path: Path, kind: str) -> None:
    port = free_port()
    config = vllm_config(
        tmp_path,
        kind,
        extra=f'[launcher.native]\npython = "{FAKEBIN / "vllm-python"}"\n',
        overrides={"fleet": {"replicas": 1, "base_port": port, "stop_grace_s": 5}},
    )
    spec = launch_spec(config.plan.replicas[0], config)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = child_env(spec, logs)
    with running(spec, env) as proc:
        wait_health(port, proc)  # answers on the planned host port, also from the image's 8080
        call = json.loads((logs / "calls.jsonl").read_text().splitlines()[0])
        assert SECRET not in json.dumps(call["argv"])
        if kind == "native":
            assert call["env"] == {
                "NEURON_RT_VISIBLE_CORES": "0-7",
                "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
            }
            assert (logs / f"vllm-{port}.HF_TOKEN").read_text() == SECRET
        else:
            assert call["image"] == DEFAULT_VLLM_IMAGE and call["hf_token_in_container"]
        stop(spec, env, proc)


def test_fake_vllm_python_refuses_unknown_flags(tmp_path: Path) -> None:
    """The fake is strict, so a flag vLLM 0.11 lacks fails the end-to-end test above."""
    done = subprocess.run(
        [str(FAKEBIN / "vllm-python"), "-m", "vllm.entrypoints.openai.api_server", "--nope", "1"],
        env={**os.environ, "FAKEBIN_LOG_DIR": str(tmp_path), "FAKEBIN_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and "unrecognized arguments: --nope" in done.stderr


def test_a_hub_id_under_vllm_is_told_to_export_once(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[model]\nid = "unsloth/Llama-3.2-1B-Instruct"\n'
        '[fleet]\nlauncher = "native"\nengine = "vllm"\ncores_per_replica = 2\n'
    )
    config = load_config(str(path), env={}, inventory=INF2_48, check_host=False)
    assert any("is a Hub id: every vLLM replica exports it" in w for w in config.warnings)
    tgi = path.read_text().replace('engine = "vllm"', 'engine = "tgi"')
    path.write_text(tgi)
    config = load_config(str(path), env={}, inventory=INF2_48, check_host=False)
    assert not any("Hub id" in w for w in config.warnings)


@pytest.mark.parametrize(
    ("launcher", "extra_args", "shown"),
    [
        ("native", '["--api-key", "sk-in-argv", "--max-num-batched-tokens", "4096"]', "--api-key"),
        ("native", '["--hf-token=hf_in_argv"]', "--hf-token"),
        ("docker", '["-e", "SM_ON_API_KEY=sk-in-argv"]', "-e SM_ON_API_KEY=..."),
        ("docker", '["--env=HF_TOKEN=hf_in_argv"]', "-e HF_TOKEN=..."),
    ],
)
def test_a_secret_in_extra_args_is_refused(
    tmp_path: Path, launcher: str, extra_args: str, shown: str
) -> None:
    """A vLLM command copied with its --api-key into extra_args would put the key in `ps` and
    `plan`, and (vllm 0.11.0 api_server.py: ``args.api_key or [envs.VLLM_API_KEY]``) override
    the replica key the balancer sends, so every request would get 401: refused at load."""
    table = "[launcher.native]\n" if launcher == "native" else ""  # docker's is open
    with pytest.raises(ConfigError) as raised:
        vllm_config(tmp_path, launcher, f"{table}extra_args = {extra_args}\n")
    message = str(raised.value)
    assert f"[launcher.{launcher}] extra_args: {shown} carries a secret" in message
    assert "in_argv" not in message and "in-argv" not in message
    # Named without a value, docker reads it from its own environment: fine.
    config = vllm_config(tmp_path, "docker", 'extra_args = ["-e", "HF_TOKEN"]\n')
    assert "HF_TOKEN" in launch_spec(config.plan.replicas[0], config).argv


def test_vllm_flags_named_with_token_are_no_secret(tmp_path: Path) -> None:
    extra = '["--long-prefill-token-threshold", "512", "--return-tokens-as-token-ids"]'
    config = vllm_config(tmp_path, "native", f"[launcher.native]\nextra_args = {extra}\n")
    assert launch_spec(config.plan.replicas[0], config).argv[-3:] == (
        "--long-prefill-token-threshold",
        "512",
        "--return-tokens-as-token-ids",
    )
