"""supervisor.neuron + supervisor.plan + `neuron-fleet plan`: cores, devices, ports."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor import cli
from supervisor.config import ENV_VARS, ConfigError, FleetSettings, load_config
from supervisor.neuron import (
    Inventory,
    NeuronLsError,
    discover_inventory,
    find_neuron_ls,
    format_core_range,
    format_devices,
    inventory_from_count,
    inventory_from_dev,
    parse_core_range,
    parse_neuron_ls,
    read_neuron_ls_file,
    run_neuron_ls,
)
from supervisor.plan import compute_plan, plan_replicas
from tests.conftest import free_ports

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "neuron-ls"
FAKEBIN = Path(__file__).resolve().parent / "fakebin"


def fixture(name: str) -> Inventory:
    return read_neuron_ls_file(str(FIXTURES / name))


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


# -- neuron-ls parsing -------------------------------------------------------------------


def test_inf2_48xlarge_matches_the_blog_table() -> None:
    inv = fixture("inf2.48xlarge.json")
    assert len(inv.devices) == 12 and inv.total_cores == 24 and inv.cores_per_device == 2
    first, fifth = inv.devices[0], inv.devices[5]
    assert (first.bdf, first.connected_to) == ("80:1e.0", (11, 1))
    assert fifth.core_ids == (10, 11)  # no neuroncore_ids in the old shape: device N = 2N, 2N+1
    assert fifth.path == "/dev/neuron5"
    assert inv.busy_cores() == {}


def test_small_and_trn1_hosts() -> None:
    small = fixture("inf2.xlarge.json")
    assert (len(small.devices), small.total_cores, small.devices[0].connected_to) == (1, 2, ())
    trn1 = fixture("trn1.32xlarge.json")
    assert trn1.total_cores == 32 and trn1.devices[15].core_ids == (30, 31)


def test_tolerant_object_shapes() -> None:
    devices = [{"neuron_device": 1, "nc_count": 2}, {"neuron_device": 0, "nc_count": 2}]
    for document in (
        {"devices": devices},
        {"instance": {"instance_type": "x"}, "data": {"list": devices}},
    ):
        inv = parse_neuron_ls(json.dumps(document))
        assert [d.index for d in inv.devices] == [0, 1]
        assert inv.devices[1].core_ids == (2, 3)
    with pytest.raises(NeuronLsError):
        parse_neuron_ls("not json")
    with pytest.raises(NeuronLsError):
        parse_neuron_ls({"instance_type": "inf2.xlarge"})
    with pytest.raises(NeuronLsError):
        parse_neuron_ls([{"neuron_device": "zero"}])


def _completed(
    argv: list[str], rc: int, out: str = "", err: str = ""
) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(argv, rc, out, err)


def test_run_neuron_ls_uses_the_released_json_flag_first() -> None:
    """-j is the JSON flag of every released neuron-ls; --output-format json is only the
    successor AWS announced for Neuron 2.34, tried when -j is refused."""
    calls = []
    text = (FIXTURES / "inf2.xlarge.json").read_text()

    def released(argv, **kwargs):
        calls.append(argv)
        assert kwargs["timeout"] == 3
        if argv[1:] != ["-j"]:
            return _completed(argv, 2, err=f"unrecognized arguments: {argv[1]}")
        return _completed(argv, 0, out=text)

    inv = run_neuron_ls("neuron-ls", timeout_s=3, runner=released)
    assert inv is not None and inv.total_cores == 2 and inv.source == "neuron-ls -j"
    assert calls == [["neuron-ls", "-j"]]

    def announced(argv, **kwargs):
        if "-j" in argv:
            return _completed(argv, 2, err="unrecognized arguments: -j")
        return _completed(argv, 0, out=json.dumps({"neuron_devices": json.loads(text)}))

    inv = run_neuron_ls("neuron-ls", timeout_s=3, runner=announced)
    assert inv is not None and inv.source == "neuron-ls --output-format json"


def test_fake_neuron_ls_through_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[fleet] neuron_ls names the binary (systemd's PATH lacks /opt/aws/neuron/bin)."""
    monkeypatch.setenv("FAKE_NEURON_LS_JSON", str(FIXTURES / "inf2.48xlarge-cores-in-use.json"))
    ports = free_ports(4)
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[model]\nid = "org/model"\n[fleet]\nlauncher = "command"\ncores_per_replica = 8\n'
        f'replicas = 3\nbase_port = {ports[1]}\nneuron_ls = "{FAKEBIN / "neuron-ls"}"\n'
        '[launcher.command]\ntemplate = "server --port {port}"\n'
        f'[balancer]\nlisten = "127.0.0.1:{ports[0]}"\n'
    )
    with pytest.raises(ConfigError, match="PID 113985"):
        load_config(str(path), env={})
    path.write_text(path.read_text().replace("replicas = 3", "replicas = 2"))
    config = load_config(str(path), env={})
    assert config.plan.inventory["source"].endswith("neuron-ls -j")


def test_configured_neuron_ls_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NeuronLsError, match=r"neuron_ls = .* is not found"):
        discover_inventory(neuron_ls=str(tmp_path / "nope"), dev_dir=str(tmp_path))


def test_neuron_ls_is_found_on_path(tmp_path: Path) -> None:
    assert find_neuron_ls(str(FAKEBIN)) == str(FAKEBIN / "neuron-ls")


def test_run_neuron_ls_missing_or_hanging() -> None:
    def missing(argv, **kwargs):
        raise FileNotFoundError(argv[0])

    def hanging(argv, **kwargs):
        raise subprocess.TimeoutExpired(argv, kwargs["timeout"])

    assert run_neuron_ls(runner=missing) is None
    with pytest.raises(NeuronLsError, match="did not answer"):
        run_neuron_ls(runner=hanging)


def test_dev_fallback_and_discovery_order(tmp_path: Path) -> None:
    for name in ("neuron0", "neuron1", "neuron3", "neuronx", "null"):
        (tmp_path / name).touch()
    inv = inventory_from_dev(str(tmp_path))
    assert [d.index for d in inv.devices] == [0, 1, 3]
    assert inv.devices[2].core_ids == (6, 7)

    def missing(argv, **kwargs):
        raise FileNotFoundError(argv[0])

    found = discover_inventory(dev_dir=str(tmp_path), neuron_ls="", runner=missing)
    assert len(found.devices) == 3 and "not installed" in found.source
    (note,) = found.notes  # said once, as a warning (serve logs config warnings at start)
    assert "NeuronCores held by another process cannot be seen" in note
    assert "/opt/aws/neuron/bin" in note and "[fleet] neuron_ls" in note
    assert len(discover_inventory(devices=12, runner=missing).devices) == 12
    from_file = discover_inventory(
        neuron_ls_file=str(FIXTURES / "trn1.32xlarge.json"), runner=missing
    )
    assert from_file.total_cores == 32


# -- core ranges -------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=200), st.integers(min_value=1, max_value=64))
def test_core_range_round_trip(first: int, count: int) -> None:
    cores = tuple(range(first, first + count))
    text = format_core_range(cores)
    assert parse_core_range(text) == cores
    assert ("-" in text) == (count > 1)


def test_core_range_errors() -> None:
    with pytest.raises(ValueError, match="not contiguous"):
        format_core_range([0, 1, 3])
    for bad in ("0,1", "7-0", "a-b", ""):
        with pytest.raises(ValueError):
            parse_core_range(bad)
    assert format_devices(["/dev/neuron4", "/dev/neuron5", "/dev/neuron6"]) == "neuron4-6"


# -- planning ----------------------------------------------------------------------------


def settings(**kwargs) -> FleetSettings:
    kwargs.setdefault("cores_per_replica", 8)
    return FleetSettings(**kwargs)


def test_blog_plan_three_by_eight() -> None:
    plan, errors = plan_replicas(
        settings(replicas=3), fixture("inf2.48xlarge.json"), whole_devices=True
    )
    assert errors == [] and plan is not None
    assert [r.cores for r in plan.replicas] == ["0-7", "8-15", "16-23"]
    assert plan.replicas[1].devices == tuple(f"/dev/neuron{i}" for i in range(4, 8))
    assert [(r.port, r.metrics_port) for r in plan.replicas] == [
        (8081, 9081),
        (8082, 9082),
        (8083, 9083),
    ]
    assert plan.replicas[2].name == "replica-2" and plan.replicas[2].url == "http://127.0.0.1:8083"
    assert plan.inventory["total_cores"] == 24


def test_default_replicas_is_as_many_as_fit() -> None:
    plan, _ = plan_replicas(settings(), fixture("inf2.48xlarge.json"), whole_devices=True)
    assert plan is not None and len(plan.replicas) == 3
    plan, _ = plan_replicas(
        settings(cores_per_replica=2), fixture("inf2.48xlarge.json"), whole_devices=True
    )
    assert plan is not None and len(plan.replicas) == 12
    plan, _ = plan_replicas(settings(), fixture("trn1.32xlarge.json"), whole_devices=True)
    assert plan is not None and [r.cores for r in plan.replicas][-1] == "24-31"


def test_cores_held_by_a_process_are_refused_with_its_pid() -> None:
    busy = fixture("inf2.48xlarge-cores-in-use.json")
    plan, errors = plan_replicas(settings(replicas=3), busy, whole_devices=True)
    assert plan is None
    assert "PID 113985 (text-generation-server serve /data/exportedmodel" in errors[0]
    assert "0-7" in errors[0]

    # Unset replicas: the free groups only, and a note says why.
    plan, errors = plan_replicas(settings(), busy, whole_devices=True)
    assert errors == [] and plan is not None
    assert [r.cores for r in plan.replicas] == ["8-15", "16-23"]
    assert [r.port for r in plan.replicas] == [8081, 8082]


def test_explicit_core_groups_are_checked() -> None:
    inv = fixture("inf2.48xlarge.json")
    plan, errors = plan_replicas(settings(core_groups=("0-7", "4-11")), inv, whole_devices=True)
    assert plan is None and any("overlaps '0-7'" in e for e in errors)

    plan, errors = plan_replicas(settings(core_groups=("1-8",)), inv, whole_devices=True)
    assert any("device boundary" in e for e in errors)
    plan, errors = plan_replicas(settings(core_groups=("1-8",)), inv, whole_devices=False)
    assert errors == [] and plan is not None and plan.replicas[0].devices[0] == "/dev/neuron0"

    plan, errors = plan_replicas(settings(core_groups=("0-3",)), inv, whole_devices=False)
    assert any("has 4 cores but cores_per_replica is 8" in e for e in errors)
    plan, errors = plan_replicas(
        settings(core_groups=("16-31",), cores_per_replica=16), inv, whole_devices=False
    )
    assert any("has 24" in e for e in errors)


def test_docker_needs_whole_devices_native_does_not() -> None:
    small = fixture("inf2.xlarge.json")
    plan, errors = plan_replicas(settings(cores_per_replica=1), small, whole_devices=True)
    assert plan is None and "multiple of the 2 cores" in errors[0]
    plan, errors = plan_replicas(settings(cores_per_replica=1), small, whole_devices=False)
    assert plan is not None and [r.cores for r in plan.replicas] == ["0", "1"]
    assert plan.replicas[1].devices == ("/dev/neuron0",)


def test_device_numbering_gaps_and_too_small_hosts(tmp_path: Path) -> None:
    for name in ("neuron0", "neuron1", "neuron3", "neuron4"):
        (tmp_path / name).touch()
    gappy = inventory_from_dev(str(tmp_path))
    plan, errors = plan_replicas(settings(cores_per_replica=4), gappy, whole_devices=True)
    assert errors == [] and plan is not None and [r.cores for r in plan.replicas] == ["0-3"]
    plan, errors = plan_replicas(
        settings(cores_per_replica=4, replicas=2), gappy, whole_devices=True
    )
    assert plan is None and "only 1 groups of 4 contiguous NeuronCores" in errors[0]

    plan, errors = plan_replicas(settings(), fixture("inf2.xlarge.json"), whole_devices=True)
    assert plan is None and "fewer than one replica's cores_per_replica = 8" in errors[0]


def test_no_devices_says_what_to_do() -> None:
    empty = inventory_from_count(0, source="/dev/neuron*")
    plan, errors = plan_replicas(settings(), empty, whole_devices=True)
    assert plan is None and "set [fleet] devices = N" in errors[0]


def test_compute_plan_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[model]\nid = "org/model"\n[fleet]\nlauncher = "native"\ncores_per_replica = 8\n'
    )
    config = load_config(
        str(path), env={}, inventory=fixture("trn1.32xlarge.json"), check_host=False
    )
    assert len(config.plan.replicas) == 4
    assert compute_plan(config.fleet, fixture("inf2.48xlarge.json")).replicas[-1].cores == "16-23"

    holder = fixture("inf2.48xlarge-cores-in-use.json").devices[0].processes
    all_busy = Inventory(
        devices=tuple(replace(d, processes=holder) for d in fixture("inf2.48xlarge.json").devices),
        source="test",
    )
    with pytest.raises(ConfigError, match="no free group of 8 NeuronCores") as excinfo:
        compute_plan(config.fleet, all_busy)
    assert "PID 113985" in str(excinfo.value)


# -- neuron-fleet plan -------------------------------------------------------------------

PLAN_TOML = """
[model]
id = "meta-llama/Meta-Llama-3.1-8B-Instruct"
batch_size = 8
max_input_tokens = 16000
max_total_tokens = 16512
max_concurrent_requests = 512
[fleet]
launcher = "native"
cores_per_replica = 8
"""


def test_plan_command_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(PLAN_TOML)
    neuron_ls = str(FIXTURES / "inf2.48xlarge.json")
    args = ["plan", "--config", str(path), "--neuron-ls", neuron_ls, "--no-host-checks"]

    assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert "12 devices x 2 cores = 24 NeuronCores" in table
    row = next(line for line in table.splitlines() if line.startswith("replica-2"))
    assert row.split()[:5] == ["replica-2", "16-23", "neuron8-11", "8083", "9083"]
    assert "NEURON_RT_VISIBLE_CORES=16-23" in row and "text-generation-launcher" in row

    assert cli.main([*args, "--json", "--replicas", "2"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [r["cores"] for r in document["replicas"]] == ["0-7", "8-15"]
    assert document["replicas"][0]["argv"][0] == "text-generation-launcher"
    assert document["replicas"][0]["env"]["NEURON_RT_VISIBLE_CORES"] == "0-7"


def test_plan_shows_the_vllm_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(PLAN_TOML)
    neuron_ls = str(FIXTURES / "inf2.48xlarge.json")
    args = ["plan", "--config", str(path), "--neuron-ls", neuron_ls, "--no-host-checks"]

    assert cli.main([*args, "--engine", "vllm"]) == 0
    table = capsys.readouterr().out
    assert "launcher:  native (engine vllm)" in table
    row = next(line for line in table.splitlines() if line.startswith("replica-1"))
    assert row.split()[3:5] == ["8082", "-"]  # vLLM serves /metrics on its API port
    assert "NEURON_RT_VISIBLE_CORES=8-15 VLLM_WORKER_MULTIPROC_METHOD=spawn" in row
    assert "python3 -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port 8082" in row
    assert "--tensor-parallel-size 8 --max-num-seqs 8 --max-model-len 16512" in row

    assert cli.main([*args, "--engine", "vllm", "--launcher", "docker", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["engine"] == "vllm"
    argv = document["replicas"][2]["argv"]
    assert argv[-1].split("/")[-1].startswith("huggingface-vllm-inference-neuronx:0.11.0-")
    assert "127.0.0.1:8083:8080" in argv and "SM_ON_MAX_NUM_SEQS=8" not in argv
    assert "SM_ON_BATCH_SIZE=8" in argv and "SM_ON_SEQUENCE_LENGTH=16512" in argv


def test_plan_command_invalid_exits_2_with_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        PLAN_TOML.replace("cores_per_replica = 8", "cores_per_replica = 8\nreplicass = 4")
    )
    args = ["plan", "--config", str(path), "--neuron-ls", str(FIXTURES / "inf2.48xlarge.json")]
    assert cli.main([*args, "--no-host-checks", "--replicas", "4"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'replicas'" in err
    assert "needs 32 NeuronCores (4 replicas x 8)" in err

    busy = [
        "plan",
        "--config",
        str(path),
        "--neuron-ls",
        str(FIXTURES / "inf2.48xlarge-cores-in-use.json"),
    ]
    path.write_text(PLAN_TOML)
    assert cli.main([*busy, "--no-host-checks", "--replicas", "3"]) == 2
    assert "PID 113985" in capsys.readouterr().err


def test_plan_without_a_model_plans_cores_devices_and_ports(
    capsys: pytest.CaptureFixture[str],
) -> None:
    neuron_ls = str(FIXTURES / "inf2.48xlarge.json")
    args = ["plan", "--neuron-ls", neuron_ls, "--cores-per-replica", "4", "--no-host-checks"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("replica-")]
    assert [row[1] for row in rows] == ["0-3", "4-7", "8-11", "12-15", "16-19", "20-23"]
    assert "None" not in out  # limits the export will decide are said so, not "None"
    assert "batch from the export" in out
    assert "no model set" in out


def test_plan_before_export_warns_and_serve_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's order: import -> plan -> export -> serve."""
    path = tmp_path / "fleet.toml"
    data = tmp_path / "data"
    data.mkdir()
    ports = free_ports(7)
    path.write_text(
        '[model]\nid = "/data/exportedmodel"\n[fleet]\nlauncher = "docker"\n'
        f"cores_per_replica = 8\nbase_port = {ports[1]}\nmetrics_base_port = {ports[4]}\n"
        f'[launcher.docker]\nbinary = "true"\ndata_dir = "{data}"\n'
        f'[balancer]\nlisten = "127.0.0.1:{ports[0]}"\n'
    )
    neuron_ls = str(FIXTURES / "inf2.48xlarge.json")
    assert cli.main(["plan", "--config", str(path), "--neuron-ls", neuron_ls]) == 0
    assert "run `neuron-fleet export` first" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="run `neuron-fleet export` first"):
        load_config(str(path), env={}, inventory=fixture("inf2.48xlarge.json"))


def test_plan_on_a_host_too_small_for_one_replica_does_not_advise_zero() -> None:
    plan, errors = plan_replicas(
        settings(replicas=1, cores_per_replica=8), fixture("inf2.xlarge.json"), whole_devices=True
    )
    assert plan is None
    assert "replicas = 0" not in errors[0]
    assert "not even one replica fits" in errors[0] and "at most 2 cores" in errors[0]
