"""supervisor.config: TOML + env + env file + CLI -> one validated FleetConfig."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from supervisor.config import (
    ENV_VARS,
    ConfigError,
    FleetConfig,
    load_config,
    parse_env_file,
    split_listen,
)
from supervisor.neuron import read_neuron_ls_file
from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "neuron-ls"
SECRET = "hf_SuperSecretToken123"

BLOG_ENV = """MODEL_ID='/data/exportedmodel'
MAX_BATCH_SIZE=8
MAX_INPUT_TOKENS=16000
MAX_TOTAL_TOKENS=16512
"""

SIMULATED = """
[model]
id = "sim"
batch_size = 4
max_input_tokens = 1000
max_total_tokens = 2000

[fleet]
launcher = "simulated"
devices = 12
cores_per_replica = 8
"""


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that read os.environ must not see a developer's MODEL_ID or HF_TOKEN."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str, name: str = "fleet.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load(tmp_path: Path, text: str, **kwargs) -> FleetConfig:
    kwargs.setdefault("env", {})
    kwargs.setdefault("check_host", False)
    return load_config(write(tmp_path, text), **kwargs)


def errors_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    return "\n".join(excinfo.value.errors)


def exported_model(folder: Path, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    neuron = {
        "batch_size": 8,
        "sequence_length": 4096,
        "tp_degree": 8,
        "torch_dtype": "bfloat16",
        "optimum_neuron_version": "0.4.1",
        "neuronxcc_version": "2.21.18209.0",
    } | overrides
    (folder / "neuron_config.json").write_text(json.dumps(neuron))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


# -- the env file ------------------------------------------------------------------------


def test_blog_env_file_parses_as_docker_compose_would(tmp_path: Path) -> None:
    values = parse_env_file(write(tmp_path, BLOG_ENV, ".env"))
    assert values == {
        "MODEL_ID": "/data/exportedmodel",
        "MAX_BATCH_SIZE": "8",
        "MAX_INPUT_TOKENS": "16000",
        "MAX_TOTAL_TOKENS": "16512",
    }


def test_env_file_quotes_comments_and_no_expansion(tmp_path: Path) -> None:
    text = (
        "# a comment\n"
        "\n"
        "export A=1\n"
        "B = two words  # trailing comment\n"
        'C="x # not a comment\\n\\"q\\""\n'
        "D='single \\n literal'\n"
        "E=${HOME}/model\n"
        "F=a#b\n"
        "G=\n"
    )
    values = parse_env_file(write(tmp_path, text, ".env"))
    assert values["A"] == "1"
    assert values["B"] == "two words"
    assert values["C"] == 'x # not a comment\n"q"'
    assert values["D"] == "single \\n literal"
    assert values["E"] == "${HOME}/model"
    assert values["F"] == "a#b"
    assert values["G"] == ""


def test_env_file_errors_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "GOOD=1\nthis is not a setting\nQ='unterminated\n", ".env")
    with pytest.raises(ConfigError) as excinfo:
        parse_env_file(path)
    text = errors_of(excinfo)
    assert f"{path}:2" in text and "KEY=VALUE" in text
    assert f"{path}:3" in text and "unterminated" in text


# -- precedence --------------------------------------------------------------------------


def test_precedence_cli_over_env_over_env_file_over_toml(tmp_path: Path) -> None:
    env_file = write(
        tmp_path, "MAX_BATCH_SIZE=6\nMAX_CONCURRENT_REQUESTS=300\nMODEL_ID=from-file\n", ".env"
    )
    toml = SIMULATED.replace("batch_size = 4", "batch_size = 4\nmax_concurrent_requests = 200")
    env = {"MAX_BATCH_SIZE": "7", "MODEL_ID": "from-env"}

    config = load(tmp_path, toml, env=env, env_file=env_file, overrides={"model.batch_size": 2})
    assert config.model.batch_size == 2  # CLI
    assert config.model.id == "from-env"  # env over env file
    assert config.model.max_concurrent_requests == 300  # env file over TOML

    config = load(tmp_path, toml, env=env, env_file=env_file)
    assert config.model.batch_size == 7

    config = load(tmp_path, toml, env={}, env_file=env_file)
    assert config.model.batch_size == 6

    config = load(tmp_path, toml, env={})
    assert config.model.batch_size == 4
    assert config.model.max_concurrent_requests == 200


def test_overrides_nested_or_dotted_and_none_is_ignored(tmp_path: Path) -> None:
    config = load(
        tmp_path, SIMULATED, overrides={"fleet": {"replicas": 2, "cores_per_replica": None}}
    )
    assert len(config.plan.replicas) == 2
    assert config.fleet.cores_per_replica == 8
    config = load(
        tmp_path, SIMULATED, overrides={"fleet.replicas": 1, "balancer.listen": "127.0.0.1:9999"}
    )
    assert len(config.plan.replicas) == 1
    assert (config.balancer.host, config.balancer.port) == ("127.0.0.1", 9999)


def test_blog_env_file_with_docker_data_dir(tmp_path: Path) -> None:
    exported_model(tmp_path / "exportedmodel", sequence_length=16512, batch_size=8)
    env_file = write(tmp_path, BLOG_ENV, ".env")
    toml = f"""
[fleet]
launcher = "docker"
replicas = 3
[launcher.docker]
data_dir = "{tmp_path}"
"""
    inventory = read_neuron_ls_file(str(FIXTURES / "inf2.48xlarge.json"))
    config = load(tmp_path, toml, env_file=env_file, inventory=inventory)
    assert config.model.path == str(tmp_path / "exportedmodel")
    assert config.model_dir == config.model.path
    assert config.fleet.cores_per_replica == 8  # from the compiled tp_degree
    assert config.model.auto_cast_type == "bf16"
    assert [r.cores for r in config.plan.replicas] == ["0-7", "8-15", "16-23"]


# -- all errors at once, saying what to change ------------------------------------------


def test_unknown_keys_and_wrong_types_are_reported_together(tmp_path: Path) -> None:
    text = """
[fleet]
replica = 3
launcher = "simulated"
cores_per_replica = "eight"
devices = 12

[modle]
id = "x"

[balancer]
polcy = "round-robin"
"""
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, text, env={"MAX_BATCH_SIZE": "eight"})
    text_errors = errors_of(excinfo)
    assert "did you mean 'replicas'" in text_errors
    assert "did you mean 'model'" in text_errors
    assert "did you mean 'policy'" in text_errors
    assert "[fleet] cores_per_replica: expected an integer" in text_errors
    assert "environment MAX_BATCH_SIZE" in text_errors
    assert len(excinfo.value.errors) >= 5
    assert str(excinfo.value).startswith("invalid configuration (")


def test_env_file_and_toml_errors_come_together(tmp_path: Path) -> None:
    env_file = write(tmp_path, "MAX_BATCH_SIZE=4\nHF_TOKEN hf_oops_no_equals\n", ".env")
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, SIMULATED + "[fleet.extra]\n", env_file=env_file)
    text = errors_of(excinfo)
    assert f"{env_file}:2: expected KEY=VALUE" in text
    assert "hf_oops" not in text  # a mistyped secret is not echoed
    assert "[fleet] unknown key 'extra'" in text


def test_non_loopback_replicas_are_flagged(tmp_path: Path) -> None:
    config = load(tmp_path, SIMULATED.replace("devices = 12", 'devices = 12\nhost = "0.0.0.0"'))
    assert any("reachable from other hosts" in w for w in config.warnings)


def test_unknown_launcher_and_template_placeholder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, SIMULATED.replace('launcher = "simulated"', 'launcher = "dockr"'))
    assert "did you mean 'docker'" in errors_of(excinfo)

    text = SIMULATED.replace('launcher = "simulated"', 'launcher = "command"') + (
        '[launcher.command]\ntemplate = "srv --port {port} --gpu {gpus}"\n'
    )
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, text)
    assert "{gpus}" in errors_of(excinfo)


def test_balancer_host_port_keys_point_to_listen(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, SIMULATED + "[balancer]\nport = 8080\n")
    assert 'listen = "HOST:PORT"' in errors_of(excinfo)


def test_trusted_proxies_are_checked_and_kept(tmp_path: Path) -> None:
    config = load(tmp_path, SIMULATED + '[balancer]\ntrusted_proxies = ["10.0.0.0/16", "::1"]\n')
    assert config.balancer.trusted_proxies == ("10.0.0.0/16", "::1")
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, SIMULATED + '[balancer]\ntrusted_proxies = ["10.0.0.0/16", "vpc"]\n')
    assert "[balancer] trusted_proxies: 'vpc' is not an IP address or CIDR" in errors_of(excinfo)


def test_body_and_connection_limits_are_checked_and_kept(tmp_path: Path) -> None:
    good = (
        "[balancer]\nbody_timeout_s = 5\nmax_connections_per_client = 64\n"
        "max_buffered_body_bytes_per_client = 8000000\n"
    )
    config = load(tmp_path, SIMULATED + good)
    b = config.balancer
    assert (b.body_timeout_s, b.max_connections_per_client) == (5, 64)
    assert b.max_buffered_body_bytes_per_client == 8_000_000
    bad = (
        "[balancer]\nbody_timeout_s = 0\nmax_connections_per_client = -1\n"
        "max_buffered_body_bytes_per_client = 1000000\n"
    )
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, SIMULATED + bad)
    errors = errors_of(excinfo)
    assert "[balancer] body_timeout_s = 0.0: expected a positive number of seconds" in errors
    assert "[balancer] max_connections_per_client = -1" in errors
    assert "max_buffered_body_bytes_per_client = 1000000: below one body of" in errors


def test_listen_forms() -> None:
    assert split_listen("localhost:8080") == ("localhost", 8080)
    assert split_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert split_listen("[::1]:9000") == ("::1", 9000)
    assert split_listen("8080") == ("127.0.0.1", 8080)
    with pytest.raises(ValueError):
        split_listen("localhost")


def test_replicas_auto_means_as_many_as_fit(tmp_path: Path) -> None:
    config = load(tmp_path, SIMULATED.replace("devices = 12", 'devices = 12\nreplicas = "auto"'))
    assert config.fleet.replicas is None
    assert len(config.plan.replicas) == 3


def test_cores_requested_beyond_the_host(tmp_path: Path) -> None:
    text = SIMULATED.replace("devices = 12", "devices = 2\nreplicas = 3").replace(
        "cores_per_replica = 8", "cores_per_replica = 2"
    )
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, text)
    assert "needs 6 NeuronCores (3 replicas x 2)" in errors_of(excinfo)
    assert "replicas = 2" in errors_of(excinfo)


def test_cores_per_replica_must_match_hf_num_cores(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, SIMULATED, env={"HF_NUM_CORES": "4"})
    assert "HF_NUM_CORES" in errors_of(excinfo) and "make them equal" in errors_of(excinfo)


def test_min_ready_beyond_replicas(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(
            tmp_path, SIMULATED.replace("devices = 12", "devices = 12\nreplicas = 2\nmin_ready = 3")
        )
    assert "min_ready = 3" in errors_of(excinfo)


def test_input_tokens_must_stay_below_total(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, SIMULATED.replace("max_input_tokens = 1000", "max_input_tokens = 2000"))
    assert "max_input_tokens = 2000 must be below max_total_tokens = 2000" in errors_of(excinfo)


# -- ports -------------------------------------------------------------------------------


def test_port_collision_with_the_balancer(tmp_path: Path) -> None:
    text = SIMULATED.replace("devices = 12", "devices = 12\nbase_port = 8080")
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, text + '[balancer]\nlisten = "127.0.0.1:8081"\n')
    assert "port 8081 is planned for both" in errors_of(excinfo)


def test_port_in_use_is_refused_before_starting(tmp_path: Path) -> None:
    listen = free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        text = SIMULATED.replace("devices = 12", f"devices = 12\nreplicas = 1\nbase_port = {busy}")
        with pytest.raises(ConfigError) as excinfo:
            load(tmp_path, text + f'[balancer]\nlisten = "127.0.0.1:{listen}"\n', check_host=True)
    assert f"port {busy} on 127.0.0.1 (for replica-0" in errors_of(excinfo)
    assert "already in use" in errors_of(excinfo)

    # The same config passes once the port is free.
    config = load(tmp_path, text + f'[balancer]\nlisten = "127.0.0.1:{listen}"\n', check_host=True)
    assert config.plan.replicas[0].port == busy


# -- the model folder --------------------------------------------------------------------


def test_model_folder_fills_defaults_and_feeds_the_balancer(tmp_path: Path) -> None:
    folder = exported_model(tmp_path / "llama")
    text = f"""
[model]
id = "{folder}"
[fleet]
launcher = "native"
devices = 12
"""
    config = load(tmp_path, text)
    assert config.model.neuron is not None and config.model.neuron.tp_degree == 8
    assert (config.model.batch_size, config.model.max_total_tokens) == (8, 4096)
    assert config.model.max_input_tokens == 2048  # sequence_length // 2, like the entry point
    assert config.model.max_batch_prefill_tokens == 8 * 2048
    assert config.balancer.max_inflight_per_replica == 8
    assert config.balancer.max_input_tokens == 2048
    assert config.balancer.max_total_tokens == 4096  # caps a request's work estimate
    assert config.balancer.tokenizer_path == str(folder)
    assert len(config.plan.replicas) == 3


def test_model_refusals_of_the_entry_point_are_config_errors(tmp_path: Path) -> None:
    folder = exported_model(tmp_path / "llama")
    text = f"""
[model]
id = "{folder}"
auto_cast_type = "fp16"
[fleet]
launcher = "native"
devices = 12
cores_per_replica = 4
"""
    env = {"MAX_BATCH_SIZE": "16", "MAX_TOTAL_TOKENS": "8192", "MAX_INPUT_TOKENS": "4096"}
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, text, env=env)
    text_errors = errors_of(excinfo)
    assert "compiled for 8 NeuronCores" in text_errors and "cores_per_replica = 8" in text_errors
    assert (
        "MAX_BATCH_SIZE / [model] batch_size = 16 exceeds the compiled batch size 8" in text_errors
    )
    assert "max_total_tokens = 8192 exceeds the compiled sequence length 4096" in text_errors
    assert "max_input_tokens = 4096 must be below the compiled sequence length 4096" in text_errors
    assert "'fp16' differs from the compiled type 'bf16'" in text_errors


def test_missing_model_folder_is_reported_with_host_checks(tmp_path: Path) -> None:
    text = f"""
[model]
id = "{tmp_path}/not-exported-yet"
[fleet]
launcher = "docker"
cores_per_replica = 8
base_port = {free_port()}
metrics_base_port = {free_port()}
[balancer]
listen = "127.0.0.1:{free_port()}"
"""
    inventory = read_neuron_ls_file(str(FIXTURES / "inf2.xlarge.json"))
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, text, inventory=inventory, check_host=True)
    assert "is not a folder on this host: run `neuron-fleet export`" in errors_of(excinfo)


def test_container_model_path_needs_data_dir(tmp_path: Path) -> None:
    env_file = write(tmp_path, BLOG_ENV, ".env")
    text = '[fleet]\nlauncher = "docker"\ncores_per_replica = 8\n'
    inventory = read_neuron_ls_file(str(FIXTURES / "inf2.48xlarge.json"))
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, text, env_file=env_file, inventory=inventory, check_host=True)
    assert "path inside the container: set [launcher.docker] data_dir" in errors_of(excinfo)


# -- secrets -----------------------------------------------------------------------------


def test_secrets_never_in_repr_str_or_public_dict(tmp_path: Path) -> None:
    env = {
        "HF_TOKEN": SECRET,
        "NEURON_FLEET_ADMIN_TOKEN": "admin-" + SECRET,
        "NEURON_FLEET_API_KEYS": "key1-" + SECRET + ",key2-" + SECRET,
    }
    config = load(tmp_path, SIMULATED, env=env)
    assert config.model.hf_token == SECRET
    assert config.balancer.admin_token == "admin-" + SECRET
    assert len(config.balancer.api_keys) == 2
    for text in (
        repr(config),
        str(config),
        json.dumps(config.to_public_dict()),
        str(config.redacted()),
    ):
        assert SECRET not in text
    public = config.to_public_dict()
    assert public["model"]["hf_token"] == "***"
    assert public["balancer"]["api_keys"] == ["***", "***"]


def test_secret_of_the_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, SIMULATED + "[balancer]\nadmin_token = 123456789\n")
    assert "a secret value" in errors_of(excinfo)
    assert "123456789" not in errors_of(excinfo)


def test_env_file_warnings_for_unknown_and_dollar(tmp_path: Path) -> None:
    env_file = write(tmp_path, "MAX_BATCH_SIZ=4\nMODEL_ID=${HOME}/m\n", ".env")
    config = load(tmp_path, SIMULATED, env_file=env_file)
    warnings = "\n".join(config.warnings)
    assert "did you mean MAX_BATCH_SIZE" in warnings
    assert "does not expand" in warnings


# -- the shipped files -------------------------------------------------------------------


def test_demo_config_is_the_blog_shape() -> None:
    config = load_config(str(REPO / "deploy" / "fleet-demo.toml"), env={}, check_host=False)
    assert config.fleet.launcher == "simulated"
    assert [(r.cores, r.port) for r in config.plan.replicas] == [
        ("0-7", 8081),
        ("8-15", 8082),
        ("16-23", 8083),
    ]
    assert (config.balancer.host, config.balancer.port) == ("127.0.0.1", 8080)
    assert config.balancer.max_inflight_per_replica == 8
    assert [u.url for u in config.balancer.upstreams] == [r.url for r in config.plan.replicas]


def test_example_config_reproduces_the_blog_deployment() -> None:
    inventory = read_neuron_ls_file(str(FIXTURES / "inf2.48xlarge.json"))
    config = load_config(
        str(REPO / "deploy" / "fleet.toml"), env={}, inventory=inventory, check_host=False
    )
    assert config.fleet.launcher == "docker"
    # The blog's image, pinned to the tag TGI's docs name (tests/test_deploy_scaleout.py).
    assert (
        config.launcher.docker.image == "ghcr.io/huggingface/text-generation-inference:3.3.5-neuron"
    )
    assert (
        config.model.batch_size,
        config.model.max_input_tokens,
        config.model.max_total_tokens,
    ) == (
        8,
        16000,
        16512,
    )
    assert config.model.max_concurrent_requests == 512
    assert [r.devices for r in config.plan.replicas][2] == tuple(
        f"/dev/neuron{i}" for i in range(8, 12)
    )
    assert [r.port for r in config.plan.replicas] == [8081, 8082, 8083]


def test_queue_order_is_read_from_the_balancer_section(tmp_path: Path) -> None:
    base = SIMULATED + "\n[balancer]\n"
    cfg = load(tmp_path, base + 'queue_order = "deadline"\nqueue_ageing = 0.5\n')
    assert (cfg.balancer.queue_order, cfg.balancer.queue_ageing) == ("deadline", 0.5)
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, base + 'queue_order = "longest"\n')
    assert "[balancer] queue_order" in errors_of(excinfo) and "deadline" in errors_of(excinfo)


def test_ttft_slo_and_the_long_prompt_floor_are_read_and_checked(tmp_path: Path) -> None:
    base = SIMULATED + "\n[balancer]\n"
    assert load(tmp_path, base).balancer.ttft_slo_s is None  # off by default
    cfg = load(
        tmp_path,
        base + 'ttft_slo_s = 2.5\nqueue_order = "shortest"\nqueue_long_share = 0.3\n',
    )
    b = cfg.balancer
    assert (b.ttft_slo_s, b.queue_order, b.queue_long_share) == (2.5, "shortest", 0.3)
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, base + "ttft_slo_s = 0\nqueue_long_share = 1.5\n")
    errors = errors_of(excinfo)
    assert "[balancer] ttft_slo_s" in errors and "[balancer] queue_long_share" in errors


def test_quarantine_settings_are_read_and_checked(tmp_path: Path) -> None:
    base = SIMULATED + "\n[balancer]\n"
    b = load(tmp_path, base).balancer
    assert (b.quarantine_after, b.quarantine_ttl_s) == (2, 600.0)
    b = load(tmp_path, base + "quarantine_after = 0\nquarantine_ttl_s = 60\n").balancer
    assert (b.quarantine_after, b.quarantine_ttl_s) == (0, 60.0)
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path, base + "quarantine_after = -1\nquarantine_ttl_s = 0\n")
    errors = errors_of(excinfo)
    assert "[balancer] quarantine_after" in errors and "[balancer] quarantine_ttl_s" in errors


def test_the_confirm_window_is_read_and_checked(tmp_path: Path) -> None:
    base = SIMULATED + "\n[balancer]\n"
    assert load(tmp_path, base).balancer.confirm_window_s == 1.0
    assert load(tmp_path, base + "confirm_window_s = 0.3\n").balancer.confirm_window_s == 0.3
    for bad in ("0", "-1", "120"):
        with pytest.raises(ConfigError) as excinfo:
            load(tmp_path, base + f"confirm_window_s = {bad}\n")
        assert "[balancer] confirm_window_s" in errors_of(excinfo)
