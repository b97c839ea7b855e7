"""`neuron-fleet export`: in the serving image by default (fake docker), or on the host with
the optimum-cli of the engine's extra, its command line parsed by the argparse definition of
each pinned optimum-neuron wheel (tests/optimum_wheels.py)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from supervisor import cli, export_cli
from supervisor.config import ENV_VARS, load_config
from supervisor.export_cli import EXPORT_MARKER, docker_export_argv, job_from_config
from tests import optimum_wheels
from tests.conftest import IMAGE, TGI_33
from tests.helpers_tokenizer import build_tiny_tokenizer

TESTS = Path(__file__).resolve().parent
FAKEBIN = TESTS / "fakebin"
SECRET = "hf_ExportSecret987"


def blog_toml(tmp_path: Path, launcher: str = "docker") -> str:
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[model]\nid = "/data/exportedmodel"\nsource = "meta-llama/Meta-Llama-3.1-8B-Instruct"\n'
        "batch_size = 8\nmax_input_tokens = 16000\nmax_total_tokens = 16512\n"
        f'[fleet]\nlauncher = "{launcher}"\ncores_per_replica = 8\n'
        f'[launcher.docker]\ndata_dir = "{tmp_path}"\n'
    )
    return str(path)


def last_docker_run(logs: Path) -> dict:
    runs = [json.loads(line) for line in (logs / "calls.jsonl").open()]
    return [c for c in runs if c["argv"][1] == "run" and EXPORT_MARKER in " ".join(c["argv"])][-1]


def test_export_compiles_inside_the_serving_image_by_default(
    tmp_path: Path, fake_docker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert cli.main(["export", "--config", blog_toml(tmp_path)]) == 0
    call = last_docker_run(fake_docker)
    argv = call["argv"]
    assert argv[argv.index("--entrypoint") + 1 : argv.index("--entrypoint") + 3] == [
        "python",
        IMAGE,
    ]
    job = json.loads(argv[-1])
    assert job["source"] == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    flags = job["args"]
    assert flags[-1] == "/data/exportedmodel" and flags[flags.index("--model") + 1] == "{source}"
    assert flags[flags.index("--num_cores") + 1] == "8"
    assert flags[flags.index("--auto_cast_type") + 1] == "bf16"
    # The checkpoint is fetched into the persistent Hub cache the replicas also mount.
    assert f"{tmp_path / 'hf-cache'}:/hf-cache" in argv and "HF_HUB_CACHE=/hf-cache" in argv
    assert SECRET not in json.dumps(argv) and call["hf_token_in_container"] is True
    written = json.loads((tmp_path / "exportedmodel" / "neuron_config.json").read_text())
    assert written["optimum_neuron_version"] == "0.3.0"  # the image's own: they match
    assert (tmp_path / "exportedmodel" / "checkpoint").is_dir()  # starts load, never download

    # Once made, it is up to date: no second compile.
    runs = len(fake_docker.joinpath("calls.jsonl").read_text().splitlines())
    assert cli.main(["export", "--config", blog_toml(tmp_path)]) == 0
    calls = fake_docker.joinpath("calls.jsonl").read_text().splitlines()[runs:]
    assert all(EXPORT_MARKER not in line for line in calls)


def test_an_export_of_other_versions_is_not_up_to_date(
    tmp_path: Path, fake_docker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "exportedmodel"
    folder.mkdir()
    (folder / "neuron_config.json").write_text(
        json.dumps(
            {
                "batch_size": 8,
                "sequence_length": 16512,
                "tp_degree": 8,
                "auto_cast_type": "bf16",
                "optimum_neuron_version": "0.4.5",
                "neuronxcc_version": "2.21.18209.0",
            }
        )
    )
    config = blog_toml(tmp_path)
    assert cli.main(["export", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "optimum-neuron 0.4.5" in err and "runs 0.3.0" in err and "--force" in err
    assert cli.main(["export", "--config", config, "--force"]) == 0
    written = json.loads((folder / "neuron_config.json").read_text())
    assert (written["optimum_neuron_version"], written["neuronxcc_version"]) == tuple(
        TGI_33.values()
    )


def test_a_local_source_folder_is_mounted_not_fetched(tmp_path: Path, fake_docker: Path) -> None:
    source = tmp_path / "checkpoints" / "llama"
    source.mkdir(parents=True)
    config = load_config(blog_toml(tmp_path), env={}, check_host=False, read_model=False)
    argv, inside = docker_export_argv(job_from_config(config, source=str(source)), config)
    assert inside == "/data/exportedmodel"
    assert f"{source}:/source:ro" in argv and json.loads(argv[-1])["source"] == "/source"


# -- --host: the optimum-cli of the engine's extra, checked against the pinned wheels ------


@pytest.fixture(scope="session")
def optimum_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """engine -> the pinned optimum-neuron wheel installed --no-deps."""
    return optimum_wheels.sites_or_skip(tmp_path_factory.mktemp("optimum-wheels"))


def test_pins_agree_with_pyproject_and_export_cli() -> None:
    extras = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras["tgi-neuron"] == [f"optimum-neuron=={optimum_wheels.PINS['tgi']}"]
    assert f"optimum-neuron[vllm]=={optimum_wheels.PINS['vllm']}" in extras["vllm-neuron"]
    assert "vllm==0.11.0" in extras["vllm-neuron"]
    assert extras["neuron"] == ["neuron-fleet[tgi-neuron]"]  # TGI stays the default
    assert export_cli.ENGINE_OPTIMUM_NEURON == optimum_wheels.PINS


@pytest.mark.parametrize("engine", sorted(optimum_wheels.PINS))
def test_export_command_line_parses_with_the_pinned_optimum_cli(
    engine: str, optimum_sites: dict[str, Path], tmp_path: Path
) -> None:
    site = optimum_sites[engine]
    assert optimum_wheels.wheel_version(site) == optimum_wheels.PINS[engine]
    parser = optimum_wheels.export_parser(site)
    (cast,) = [a for a in parser._actions if "--auto_cast_type" in a.option_strings]
    assert tuple(cast.choices) == export_cli.AUTO_CAST_TYPES  # no fp32 in either version

    config = load_config(blog_toml(tmp_path, "native"), env={}, check_host=False, read_model=False)
    job = job_from_config(config)
    args = parser.parse_args(export_cli.optimum_cli_args(job, "/snapshot", job.output)[2:])
    assert (args.model, str(args.output), args.task) == ("/snapshot", job.output, "text-generation")
    assert (args.batch_size, args.sequence_length, args.auto_cast_type) == (8, 16512, "bf16")
    # 0.3.0 reads --num_cores for decoders; 0.4.5 maps it onto --tensor_parallel_size.
    assert 8 in (getattr(args, "num_cores", None), args.tensor_parallel_size)
    # The check has teeth: what the old CLI offered is refused by the wheel's parser.
    bad = export_cli.optimum_cli_args(job, "/snapshot", job.output)[2:]
    bad[bad.index("--auto_cast_type") + 1] = "fp32"
    with pytest.raises(SystemExit):
        parser.parse_args(bad)


def test_export_refuses_fp32_before_compiling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = blog_toml(tmp_path, "native")
    with pytest.raises(SystemExit):
        cli.main(["export", "--host", "--config", config, "--auto-cast-type", "fp32"])
    assert "invalid choice: 'fp32'" in capsys.readouterr().err
    # HF_AUTO_CAST_TYPE=fp32 (a TGI serving setting) is refused with the reason, not passed on.
    assert cli.main(["export", "--host", "--config", config, "--env-file", env_file(tmp_path)]) == 2
    assert "optimum-cli export neuron takes bf16 | fp16 | tf32" in capsys.readouterr().err


def env_file(tmp_path: Path) -> str:
    path = tmp_path / "fp32.env"
    path.write_text("HF_AUTO_CAST_TYPE=fp32\n")
    return str(path)


def host_export_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, site: Path
) -> tuple[Path, list]:
    """This Python sees ``site``'s optimum-neuron (its dist-info), and PATH a stand-in
    optimum-cli that parses with that wheel's parser; the Hub is a local folder."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(site))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    optimum_wheels.stand_in_optimum_cli(bin_dir / "optimum-cli", site)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    checkpoint = build_tiny_tokenizer(tmp_path / "snapshot")
    (checkpoint / "config.json").write_text(
        json.dumps({"model_type": "llama", "torch_dtype": "float32", "vocab_size": 400})
    )
    fetched: list = []
    import huggingface_hub

    def snapshot_download(repo_id, **kwargs):  # the Hub, stood in by a local folder
        fetched.append((repo_id, kwargs.get("allow_patterns")))
        return str(checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return checkpoint, fetched


def test_host_export_runs_the_tgi_extras_optimum_cli_and_keeps_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimum_sites: dict[str, Path]
) -> None:
    checkpoint, fetched = host_export_env(monkeypatch, tmp_path, optimum_sites["tgi"])
    assert cli.main(["export", "--host", "--config", blog_toml(tmp_path, "native")]) == 0

    assert fetched and fetched[0][0] == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert "*.safetensors" in fetched[0][1] and "*.bin" not in fetched[0][1]
    output = tmp_path / "exportedmodel"
    written = json.loads((output / "neuron_config.json").read_text())
    # Compiled from the local folder (optimum-neuron then saves the sharded weights), by the
    # optimum-cli of optimum-neuron 0.3.0: what TGI's Neuron server loads.
    assert written["argv"][written["argv"].index("--model") + 1] == str(checkpoint)
    assert written["optimum_neuron_version"] == "0.3.0" and written["tp_degree"] == 8
    assert (output / "checkpoint").is_dir() and (output / "tokenizer.json").is_file()


def test_host_export_refuses_the_other_engines_optimum_neuron(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    optimum_sites: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    host_export_env(monkeypatch, tmp_path, optimum_sites["vllm"])
    config = load_config(blog_toml(tmp_path, "native"), env={}, check_host=False, read_model=False)
    job = job_from_config(config)
    # optimum-neuron 0.4.5 installed, TGI replicas: their export would not load.
    assert export_cli.export_with_optimum(job, hf_token=None, engine="tgi") == 2
    assert "pip install 'neuron-fleet[tgi-neuron]'" in capsys.readouterr().err
    assert not (tmp_path / "exportedmodel").exists()
    # The vLLM engine runs 0.4.5: its optimum-cli compiles.
    assert export_cli.export_with_optimum(job, hf_token=None, engine="vllm") == 0
    written = json.loads((tmp_path / "exportedmodel" / "neuron_config.json").read_text())
    assert written["optimum_neuron_version"] == "0.4.5"


def test_plan_warns_about_an_export_without_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "exportedmodel"
    folder.mkdir()
    (folder / "neuron_config.json").write_text(
        json.dumps(
            {"batch_size": 8, "sequence_length": 16512, "tp_degree": 8, "checkpoint_id": "org/m"}
        )
    )
    config = blog_toml(tmp_path, "native")
    neuron_ls = str(TESTS / "fixtures" / "neuron-ls" / "inf2.48xlarge.json")
    args = ["plan", "--config", config, "--neuron-ls", neuron_ls, "--no-host-checks"]
    # --no-host-checks still reads the model: the folder is given, not looked for.
    (tmp_path / "fleet.toml").write_text(
        (tmp_path / "fleet.toml").read_text().replace("/data/exportedmodel", str(folder))
    )
    assert cli.main(args) == 0
    assert "holds no weights: every replica start fetches org/m" in capsys.readouterr().out
    (folder / "checkpoint").mkdir()
    assert cli.main(args) == 0
    assert "holds no weights" not in capsys.readouterr().out


@pytest.mark.parametrize("engine", sorted(optimum_wheels.PINS))
def test_each_engine_extra_installs_beside_neuron_fleet(
    engine: str, optimum_sites: dict[str, Path]
) -> None:
    """The pinned wheel's own requirements (its METADATA) meet neuron-fleet's: the
    transformers it requires is inside our range, and vllm is the one the extra names.
    (`pip install --dry-run '.[tgi-neuron]'` / `'.[vllm-neuron]'` resolve too, docs/scale-out.md;
    too slow for every CI run.)"""
    from packaging.requirements import Requirement

    project = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["project"]
    ours = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    (info,) = optimum_sites[engine].glob("optimum_neuron-*.dist-info")
    needs = [
        Requirement(line.removeprefix("Requires-Dist: "))
        for line in (info / "METADATA").read_text().splitlines()
        if line.startswith("Requires-Dist: ")
    ]
    (transformers,) = [r for r in needs if r.name == "transformers" and not r.marker]
    lowest = min(s.version for s in transformers.specifier)
    assert lowest in ours["transformers"], (str(transformers), str(ours["transformers"]))
    if engine == "vllm":
        (vllm,) = [r for r in needs if r.name == "vllm"]
        assert str(vllm.specifier) == "==0.11.0" and vllm.marker is not None  # extra == "vllm"
