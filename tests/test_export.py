"""`neuron-fleet export`: in the serving image by default (fake docker), or on the host with
optimum-neuron 0.4.5's API (a stand-in module with the real signatures)."""

from __future__ import annotations

import inspect
import json
import os
import sys
import types
from pathlib import Path

import pytest

from supervisor import cli
from supervisor.config import ENV_VARS, load_config
from supervisor.export_cli import EXPORT_MARKER, docker_export_argv, job_from_config
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
    assert (job["output"], job["num_cores"], job["auto_cast_type"]) == (
        "/data/exportedmodel",
        8,
        "bf16",
    )
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


# -- --host: optimum-neuron 0.4.5's API ----------------------------------------------------


class _Exported:
    def __init__(self, output_versions: dict[str, str]) -> None:
        self.versions = output_versions

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(os.path.join(folder, "checkpoint"), exist_ok=True)
        with open(os.path.join(folder, "neuron_config.json"), "w") as handle:
            json.dump(self.versions, handle)


def fake_optimum_neuron(calls: list[tuple[str, dict]]) -> types.ModuleType:
    """``NeuronModelForCausalLM`` with optimum-neuron 0.4.5's signatures (copied from
    optimum/neuron/models/inference/modeling_utils.py): a call the real one would refuse
    with TypeError is refused here too."""

    class NeuronModelForCausalLM:
        @classmethod
        def get_neuron_config(
            cls,
            model_name_or_path,
            config=None,
            token=None,
            revision=None,
            instance_type=None,
            batch_size=None,
            sequence_length=None,
            tensor_parallel_size=None,
        ):
            calls.append(
                (
                    "get_neuron_config",
                    dict(
                        inspect.getcallargs(
                            cls.get_neuron_config.__func__,
                            cls,
                            model_name_or_path,
                            config,
                            token,
                            revision,
                            instance_type,
                            batch_size,
                            sequence_length,
                            tensor_parallel_size,
                        )
                    ),
                )
            )
            return {
                "batch_size": batch_size,
                "sequence_length": sequence_length,
                "tp_degree": tensor_parallel_size,
                "auto_cast_type": str(config.dtype),
                "optimum_neuron_version": "0.4.5",
                "neuronxcc_version": "2.21.18209.0",
            }

        @classmethod
        def export(
            cls,
            model_id,
            neuron_config,
            config=None,
            token=None,
            revision=None,
            load_weights=False,
            **kwargs,
        ):
            calls.append(("export", {"model_id": model_id, "load_weights": load_weights}))
            return _Exported(neuron_config)

    module = types.ModuleType("optimum.neuron")
    module.NeuronModelForCausalLM = NeuronModelForCausalLM
    return module


def test_host_export_uses_the_0_4_5_api_and_keeps_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    checkpoint = build_tiny_tokenizer(tmp_path / "snapshot")
    (checkpoint / "config.json").write_text(
        json.dumps({"model_type": "llama", "torch_dtype": "float32", "vocab_size": 400})
    )
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401  (before the stand-in)

    calls: list[tuple[str, dict]] = []
    package = types.ModuleType("optimum")
    package.neuron = fake_optimum_neuron(calls)
    monkeypatch.setitem(sys.modules, "optimum", package)
    monkeypatch.setitem(sys.modules, "optimum.neuron", package.neuron)
    fetched = []
    import huggingface_hub

    def snapshot_download(repo_id, **kwargs):  # the Hub, stood in by a local folder
        fetched.append((repo_id, kwargs.get("allow_patterns")))
        return str(checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert cli.main(["export", "--host", "--config", blog_toml(tmp_path, "native")]) == 0

    assert fetched and fetched[0][0] == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert "*.safetensors" in fetched[0][1] and "*.bin" not in fetched[0][1]
    (_, neuron_args), (_, export_args) = calls
    # Exported from the local folder: optimum-neuron then saves the sharded weights.
    assert neuron_args["model_name_or_path"] == export_args["model_id"] == str(checkpoint)
    assert (neuron_args["batch_size"], neuron_args["sequence_length"]) == (8, 16512)
    assert neuron_args["tensor_parallel_size"] == 8 and neuron_args["config"].dtype == "bf16"
    output = tmp_path / "exportedmodel"
    assert (output / "checkpoint").is_dir() and (output / "tokenizer.json").is_file()


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
