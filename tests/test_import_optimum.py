"""``neuron-fleet import --optimum-serve``: an ``optimum-cli neuron serve [--data-parallel-size
N]`` deployment (command line, or the vLLM image's SM_ON_* variables) -> an equivalent
fleet.toml with engine = "vllm"."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from supervisor.cli import main
from supervisor.config import DEFAULT_VLLM_IMAGE, load_config
from supervisor.import_optimum import parse_serve, sm_on_arguments
from supervisor.import_toml import TomlWriter
from supervisor.launchers import launch_spec
from tests.test_launchers import (
    INF2_48,
    clean_environ,  # noqa: F401 - autouse fixture: no ENV_VARS from the outer environment
    flag,
)

API_KEY = "sk-optimum-secret-42"
TOKEN = "hf_SmOnSecret"


@pytest.fixture
def export(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "llama"
    folder.mkdir(parents=True)
    (folder / "neuron_config.json").write_text(
        json.dumps(
            {"batch_size": 8, "sequence_length": 4096, "tp_degree": 8, "auto_cast_type": "bf16"}
        )
    )
    return folder


def run_import(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["import", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_data_parallel_serve_becomes_the_same_fleet(
    export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "fleet.toml"
    command = (
        f"optimum-cli neuron serve --model {export} --served_model_name llama "
        "--tensor_parallel_size 8 --batch_size 8 --sequence_length 4096 "
        f"--data-parallel-size 3 --port 8000 --enable-auto-tool-choice --api-key {API_KEY}"
    )
    code, out, err = run_import(capsys, "--optimum-serve", command, "-o", str(output))
    assert code == 0, err
    text = output.read_text()
    assert API_KEY not in text + out + err  # the secret is named, never copied
    assert "--api-key is a secret" in out

    config = load_config(str(output), env={}, inventory=INF2_48, check_host=False)
    assert (config.fleet.engine, config.fleet.launcher) == ("vllm", "native")
    assert config.balancer.engine == "vllm"
    assert [r.cores for r in config.plan.replicas] == ["0-7", "8-15", "16-23"]
    # optimum-cli's servers: 127.0.0.1 on --port + 1 + rank (serve.py _allocate_internal_ports)
    assert [r.port for r in config.plan.replicas] == [8001, 8002, 8003]
    assert (config.balancer.host, config.balancer.port) == ("0.0.0.0", 8000)
    assert config.model.served_model_name == "llama"
    assert (config.model.batch_size, config.model.max_total_tokens) == (8, 4096)
    assert config.balancer.max_inflight_per_replica == 8

    # Replica 1 runs what VLLMServerManager.start runs for rank 1 (server_manager.py).
    spec = launch_spec(config.plan.replicas[1], config)
    assert spec.argv[1:7] == (
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        "127.0.0.1",
        "--port",
        "8002",
    )
    assert spec.argv[-1] == "--enable-auto-tool-choice"  # carried over, after ours
    assert spec.env["NEURON_RT_VISIBLE_CORES"] == "8-15"
    assert spec.env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert "rank 2          replica-2  16-23" in out
    assert "restarts none" in out and "round-robin" in out


def test_visible_cores_are_split_per_rank_as_optimum_does(export: Path) -> None:
    from supervisor.import_optimum import import_serve

    result = import_serve(
        f"NEURON_RT_VISIBLE_CORES=8-23 optimum-cli neuron serve -m {export} "
        "--tensor-parallel-size 8 --data-parallel-size 2"
    )
    document = tomllib.loads(result.toml)
    assert document["fleet"]["core_groups"] == ["8-15", "16-23"]
    assert document["fleet"]["replicas"] == 2
    default = import_serve(
        f"NEURON_RT_VISIBLE_CORES=0-15 optimum-cli neuron serve -m {export} "
        "--tensor-parallel-size 8 --data-parallel-size 2"
    )
    assert "core_groups" not in tomllib.loads(default.toml)["fleet"]


def test_sm_on_variables_become_a_docker_fleet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env_file = tmp_path / "sm.env"
    env_file.write_text(
        "SM_ON_MODEL=/data/llama\nSM_ON_BATCH_SIZE=4\nSM_ON_SEQUENCE_LENGTH=4096\n"
        f"SM_ON_TENSOR_PARALLEL_SIZE=8\nSM_ON_SERVED_MODEL_NAME=llama\nHF_TOKEN={TOKEN}\n"
    )
    output = tmp_path / "fleet.toml"
    # The container's own arguments come after SM_ON_*'s (entrypoint.sh): they win.
    code, out, err = run_import(
        capsys, "--optimum-serve", "--batch_size 8", "--env-file", str(env_file), "-o", str(output)
    )
    assert code == 0, err
    assert TOKEN not in output.read_text() + out + err
    assert "HF_TOKEN is set in" in out
    document = tomllib.loads(output.read_text())
    assert document["fleet"]["launcher"] == "docker"
    assert document["model"] == {
        "id": "/data/llama",
        "served_model_name": "llama",
        "batch_size": 8,
        "max_total_tokens": 4096,
    }
    assert document["balancer"]["listen"] == "0.0.0.0:8080"  # the entry point's --port 8080
    assert "is a path inside the container" in out

    config = load_config(str(output), env={}, inventory=INF2_48, check_host=False)
    argv = launch_spec(config.plan.replicas[0], config).argv
    assert argv[-1] == DEFAULT_VLLM_IMAGE
    assert "SM_ON_BATCH_SIZE=8" in argv and "SM_ON_MODEL=/data/llama" in argv


def test_sm_on_arguments_as_the_entrypoint_builds_them() -> None:
    env = {"SM_ON_MODEL": "/m", "PATH": "/bin", "SM_ON_ALLOW_NON_CACHED_MODEL": ""}
    assert sm_on_arguments(env) == ["--model", "/m", "--allow_non_cached_model"]
    command = parse_serve("", env)
    assert command.model == "/m" and command.allow_non_cached_model and command.from_image
    assert command.port == 8080


def test_hub_model_is_noted_for_a_one_time_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "fleet.toml"
    code, out, _ = run_import(
        capsys,
        "--optimum-serve",
        "optimum-cli neuron serve --model unsloth/Llama-3.2-1B-Instruct --batch_size 4 "
        "--tensor_parallel_size 2",
        "-o",
        str(output),
    )
    assert code == 0
    assert "is a Hub id" in out and "neuron-fleet export" in out
    assert '# source = "unsloth/Llama-3.2-1B-Instruct"' in output.read_text()


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("docker run image", "not an `optimum-cli neuron serve` command line"),
        ("optimum-cli neuron serve --batch_size 4", "no --model"),
        ("optimum-cli neuron serve --model m --data-parallel-size 0", "must be at least 1"),
        ("optimum-cli neuron serve --model 'm", "cannot be split"),
        # was written with a note, as a fleet starting vLLM with --task generate on it
        ("optimum-cli neuron serve --model m --task embed", "--task embed: neuron-fleet"),
    ],
)
def test_bad_serve_commands_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, message: str
) -> None:
    output = tmp_path / "fleet.toml"
    code, _, err = run_import(capsys, "--optimum-serve", command, "-o", str(output))
    assert code == 2 and message in err
    assert not output.exists()


def test_toml_writer_round_trips_awkward_values() -> None:
    writer = TomlWriter(["header"])
    writer.table("model")
    awkward = 'a "quoted" # not a comment \\ \n\t\x01 é'
    writer.key("id", awkward, "a comment")
    writer.key("extra_args", ["--x", "y z", awkward], "list")
    writer.key("long", ["--" + "x" * 40] * 4, "too long for one line")
    writer.commented_key("source", "org/model", "left to the reader")
    document = tomllib.loads(writer.text())
    assert document["model"]["id"] == awkward
    assert document["model"]["extra_args"] == ["--x", "y z", awkward]
    assert document["model"]["long"] == ["--" + "x" * 40] * 4
    assert "source" not in document["model"]


VLLM_COMPOSE = """
services:
{services}
  loadbalancer:
    image: nginx:alpine
    ports:
      - "8080:80"
    depends_on: [{names}]
"""
VLLM_SERVICE = """
  vllm-{k}:
    image: optimum-neuron-vllm:latest
    ports:
      - "{port}:{port}"
    environment:
      - SM_ON_PORT={port}
      - SM_ON_MODEL=${{MODEL_ID}}
      - SM_ON_TENSOR_PARALLEL_SIZE=8
      - SM_ON_BATCH_SIZE=${{MAX_BATCH_SIZE}}
      - SM_ON_SEQUENCE_LENGTH=${{MAX_TOTAL_TOKENS}}
      - SM_ON_MAX_NUM_BATCHED_TOKENS=8192
      - SM_ON_LONG_PREFILL_TOKEN_THRESHOLD=512
      - SM_ON_API_KEY=sk-in-compose
      - HF_TOKEN=${{HF_TOKEN}}
    devices:
{devices}
"""


def test_compose_of_vllm_image_services_becomes_a_vllm_fleet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shape of optimum-neuron's own data-parallel benchmark (benchmark/vllm/
    data-parallel/llama3.1-8b/docker-compose-dp3.yaml): SM_ON_* per service, nginx in front."""
    services = "".join(
        VLLM_SERVICE.format(
            k=k + 1,
            port=8081 + k,
            devices="\n".join(f'      - "/dev/neuron{d}"' for d in range(4 * k, 4 * k + 4)),
        )
        for k in range(3)
    )
    compose = tmp_path / "docker-compose.yaml"
    compose.write_text(VLLM_COMPOSE.format(services=services, names="vllm-1, vllm-2, vllm-3"))
    (tmp_path / ".env").write_text(
        "MODEL_ID='meta-llama/Meta-Llama-3.1-8B-Instruct'\nMAX_BATCH_SIZE=32\n"
        f"MAX_TOTAL_TOKENS=4096\nHF_TOKEN={TOKEN}\n"
    )
    output = tmp_path / "fleet.toml"
    code, out, err = run_import(capsys, "--compose", str(compose), "-o", str(output))
    assert code == 0, err
    assert TOKEN not in output.read_text() + out + err
    config = load_config(str(output), env={}, inventory=INF2_48, check_host=False)
    assert (config.fleet.engine, config.fleet.launcher) == ("vllm", "docker")
    assert (config.model.batch_size, config.model.max_total_tokens) == (32, 4096)
    assert config.model.id == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert [r.port for r in config.plan.replicas] == [8081, 8082, 8083]
    assert config.launcher.docker.image == "optimum-neuron-vllm:latest"
    argv = launch_spec(config.plan.replicas[2], config).argv
    assert "127.0.0.1:8083:8080" in argv  # the image's port, not the compose's SM_ON_PORT
    assert not any(a.startswith("SM_ON_PORT") for a in argv)
    assert "SM_ON_MAX_NUM_BATCHED_TOKENS=8192" in argv  # carried as it was
    # a vLLM flag with "token" in its name is no secret (it was carried by name only)
    assert "SM_ON_LONG_PREFILL_TOKEN_THRESHOLD=512" in argv
    assert "sk-in-compose" not in output.read_text() + out + " ".join(argv)
    assert "SM_ON_BATCH_SIZE=32" in argv and "SM_ON_TENSOR_PARALLEL_SIZE=8" in argv
    assert "vllm-3           replica-2  16-23" in out


def test_visible_cores_without_tensor_parallel_size_are_kept(export: Path) -> None:
    """optimum-cli takes tp from the export's neuron_config.json and splits
    NEURON_RT_VISIBLE_CORES by it (serve.py ``run``, server_manager.py ``_core_range``):
    the import does the same, and never drops the variable silently (the replicas would
    start on cores from 0, which another service may hold)."""
    from supervisor.import_optimum import import_serve

    result = import_serve(
        f"NEURON_RT_VISIBLE_CORES=8-23 optimum-cli neuron serve --model {export} "
        "--data-parallel-size 2"
    )
    fleet = tomllib.loads(result.toml)["fleet"]
    assert fleet["core_groups"] == ["8-15", "16-23"]  # the export's tp_degree is 8
    assert "cores_per_replica" not in fleet  # still read from the export when it loads
    hub = import_serve(
        "NEURON_RT_VISIBLE_CORES=8-23 optimum-cli neuron serve --model org/llama "
        "--data-parallel-size 2"
    )
    assert "core_groups" not in tomllib.loads(hub.toml)["fleet"]
    assert any("NEURON_RT_VISIBLE_CORES=8-23 is not applied" in n for n in hub.notes)


DOCS_COMMAND = """NEURON_RT_VISIBLE_CORES=8-23 optimum-cli neuron serve \\
    --model="{model}" \\
    --batch_size=8 \\
    --sequence_length=4096 \\
    --tensor_parallel_size=8 \\
    --data-parallel-size 2 --api-key {key} \\
"""
"""optimum-neuron's docs/source/guides/vllm_plugin.mdx prints the serve command over several
lines with backslash continuations (and a trailing one)."""


def test_the_docs_multiline_command_from_stdin(
    export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """Pasted as the docs print it, the command is one command, as the shell runs it: no
    newline words carried to vLLM (which would refuse them: every replica would fail to
    start); given on stdin (--optimum-serve -), its --api-key stays out of `ps`."""
    import io

    command = DOCS_COMMAND.format(model=export, key=API_KEY)
    monkeypatch.setattr("sys.stdin", io.StringIO(command))
    output = tmp_path / "fleet.toml"
    code, out, err = run_import(capsys, "--optimum-serve", "-", "-o", str(output))
    assert code == 0, err
    text = output.read_text()
    assert API_KEY not in text + out + err
    assert "the command line held a secret" not in out  # it came on stdin, not in `ps`
    document = tomllib.loads(text)
    assert "launcher" not in document or "extra_args" not in document["launcher"]["native"]
    assert document["fleet"]["core_groups"] == ["8-15", "16-23"]
    config = load_config(str(output), env={}, inventory=INF2_48, check_host=False)
    spec = launch_spec(config.plan.replicas[0], config)
    assert all(word.strip() == word and word for word in spec.argv), spec.argv
    assert spec.argv[-4:] == ("--max-model-len", "4096", "--dtype", "bfloat16")


def test_a_relative_model_is_written_absolute(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """optimum-cli resolved ``--model ./llama`` in the directory it ran in; the service runs
    from / (systemd): the fleet.toml must still load there, and clients keep the name."""
    from supervisor.import_optimum import import_serve

    monkeypatch.chdir(export.parent)
    result = import_serve("optimum-cli neuron serve --model ./llama --data-parallel-size 2")
    path = tmp_path / "fleet.toml"
    path.write_text(result.toml)
    monkeypatch.chdir("/")
    config = load_config(str(path), env={}, inventory=INF2_48, check_host=False)
    assert config.model.id == str(export)
    assert config.fleet.cores_per_replica == 8  # read from the export, found from /
    spec = launch_spec(config.plan.replicas[0], config)
    assert flag(spec.argv, "--served-model-name") == "./llama"
    assert flag(spec.argv, "--model") == str(export)


def test_variables_before_the_command_are_named_never_copied(export: Path) -> None:
    from supervisor.import_optimum import import_serve

    result = import_serve(
        f"HF_TOKEN={TOKEN} NEURON_CC_FLAGS=-O1 optimum-cli neuron serve --model {export}"
    )
    notes = "\n".join(result.notes)
    assert TOKEN not in result.toml + notes
    assert "HF_TOKEN is set in the command line" in notes
    assert "NEURON_CC_FLAGS set before the command: not carried over" in notes


def test_sm_on_vllm_arguments_stay_sm_on_for_the_image(
    export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The image takes vLLM arguments only as SM_ON_* (entrypoint.sh): an SM_ON_ENABLE_PREFIX_
    CACHING= of the env file is carried as ``-e SM_ON_ENABLE_PREFIX_CACHING=`` on each
    replica's docker run, not dropped, and not as a native flag the docker launcher ignores."""
    env = tmp_path / "sm.env"
    env.write_text(
        f"SM_ON_MODEL=/data/llama\nSM_ON_TENSOR_PARALLEL_SIZE=8\nSM_ON_API_KEY={API_KEY}\n"
        "SM_ON_ENABLE_PREFIX_CACHING=\nSM_ON_MAX_NUM_BATCHED_TOKENS=256\n"
    )
    output = tmp_path / "fleet.toml"
    code, out, err = run_import(
        capsys, "--optimum-serve", "", "--env-file", str(env), "-o", str(output)
    )
    assert code == 0, err
    text = output.read_text()
    assert API_KEY not in text + out
    assert "[launcher.native]" not in out and "the command line held a secret" not in out
    extra = tomllib.loads(text)["launcher"]["docker"]["extra_args"]
    assert extra == [
        "-e",
        "SM_ON_ENABLE_PREFIX_CACHING=",
        "-e",
        "SM_ON_MAX_NUM_BATCHED_TOKENS=256",
    ]


def test_a_local_checkpoint_is_noted_for_a_one_time_export(tmp_path: Path) -> None:
    """optimum-cli compiles a plain checkpoint folder at every start of every server: the
    import says so, as it does for a Hub id."""
    from supervisor.import_optimum import import_serve

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    result = import_serve(
        f"optimum-cli neuron serve --model {plain} --tensor_parallel_size 2 --data-parallel-size 2"
    )
    assert any("is a checkpoint, not a Neuron export" in note for note in result.notes)


def test_vllm_flags_named_with_token_are_carried_not_taken_for_secrets(export: Path) -> None:
    """vLLM 0.11 has --long-prefill-token-threshold, --return-tokens-as-token-ids and
    --allow-credentials (engine/arg_utils.py, entrypoints/openai/cli_args.py): arguments, not
    secrets. They were dropped as secrets; --api-key and --hf-token still are."""
    from supervisor.import_optimum import import_serve

    result = import_serve(
        f"optimum-cli neuron serve --model {export} --long-prefill-token-threshold 512 "
        f"--return-tokens-as-token-ids --allow-credentials --hf-token {TOKEN} --api-key {API_KEY}"
    )
    carried = tomllib.loads(result.toml)["launcher"]["native"]["extra_args"]
    assert carried == [
        "--long-prefill-token-threshold",
        "512",
        "--return-tokens-as-token-ids",
        "--allow-credentials",
    ]
    assert TOKEN not in result.toml and API_KEY not in result.toml
    notes = "\n".join(result.notes)
    assert "--hf-token is a secret" in notes and "--api-key is a secret" in notes


@pytest.mark.parametrize(
    "prefix",
    [
        "env NEURON_RT_VISIBLE_CORES=8-23 optimum-cli",
        "NEURON_RT_VISIBLE_CORES=8-23 exec /opt/aws_neuronx_venv_pytorch_2_7/bin/optimum-cli",
        "sudo env NEURON_RT_VISIBLE_CORES=8-23 optimum-cli",
    ],
)
def test_serve_commands_as_systemd_units_and_scripts_write_them(export: Path, prefix: str) -> None:
    """`env VAR=value optimum-cli ...`, `exec` (the image's entrypoint.sh), a full path to
    optimum-cli: the same command. They were refused as "not an optimum-cli command line"."""
    command = parse_serve(f"{prefix} neuron serve --model {export} --data-parallel-size 2")
    assert (command.model, command.visible_cores) == (str(export), "8-23")
    assert command.data_parallel_size == 2


def test_a_local_export_in_the_image_keeps_the_name_clients_sent(
    export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """optimum-cli serves --model under its own name (serve.py: model_id =
    served_model_name or model): clients of the image sent model="/data/llama". The fleet's
    [model] id becomes the host folder; the replicas must still answer to "/data/llama" (vLLM
    answers 404 to any other name)."""
    compose = tmp_path / "docker-compose.yaml"
    service = """
  vllm-{k}:
    image: optimum-neuron-vllm:latest
    ports: ["{port}:8080"]
    volumes: ["{models}:/data"]
    environment:
      - SM_ON_MODEL=/data/llama
      - SM_ON_TENSOR_PARALLEL_SIZE=8
    devices: ["/dev/neuron{d0}", "/dev/neuron{d1}", "/dev/neuron{d2}", "/dev/neuron{d3}"]
"""
    services = "".join(
        service.format(
            k=k,
            port=8081 + k,
            models=export.parent,
            d0=4 * k,
            d1=4 * k + 1,
            d2=4 * k + 2,
            d3=4 * k + 3,
        )
        for k in range(2)
    )
    compose.write_text(VLLM_COMPOSE.format(services=services, names="vllm-0, vllm-1"))
    output = tmp_path / "fleet.toml"
    code, _, err = run_import(capsys, "--compose", str(compose), "-o", str(output))
    assert code == 0, err
    config = load_config(str(output), env={}, inventory=INF2_48, check_host=False)
    assert config.model.id == str(export)
    argv = launch_spec(config.plan.replicas[0], config).argv
    assert "SM_ON_SERVED_MODEL_NAME=/data/llama" in argv, argv
