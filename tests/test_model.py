"""supervisor.model and `neuron-fleet export`: exported-model metadata and its checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from supervisor import cli
from supervisor.config import ENV_VARS, load_config
from supervisor.export_cli import job_from_config, missing_extra
from supervisor.model import (
    ModelInfoError,
    check_model,
    export_differences,
    normalize_dtype,
    read_model_info,
)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_optimum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import optimum.neuron` fail even where the extra happens to be installed."""
    monkeypatch.setitem(sys.modules, "optimum", None)
    monkeypatch.setitem(sys.modules, "optimum.neuron", None)


def neuron_config(folder: Path, **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "batch_size": 8,
        "sequence_length": 16512,
        "tp_degree": 8,
        "torch_dtype": "bfloat16",
        "optimum_neuron_version": "0.4.1",
        "neuronxcc_version": "2.21.18209.0",
    } | values
    (folder / "neuron_config.json").write_text(json.dumps(data))
    return folder


# -- reading -----------------------------------------------------------------------------


def test_neuron_config_json(tmp_path: Path) -> None:
    info = read_model_info(str(neuron_config(tmp_path / "m")))
    assert info is not None
    assert (info.batch_size, info.sequence_length, info.tp_degree, info.dtype) == (
        8,
        16512,
        8,
        "bf16",
    )
    assert info.optimum_neuron_version == "0.4.1"
    assert info.default_max_input_tokens == 8256
    assert info.source == "neuron_config.json"


def test_legacy_config_json_neuron_section(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    legacy = {"num_cores": 2, "auto_cast_type": "fp16", "batch_size": 4, "sequence_length": 4096}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "neuron": legacy}))
    info = read_model_info(str(folder))
    assert info is not None
    assert (info.tp_degree, info.dtype, info.batch_size, info.sequence_length) == (
        2,
        "fp16",
        4,
        4096,
    )
    assert "config.json" in info.source


def test_plain_checkpoint_and_broken_json(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert read_model_info(str(plain)) is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "neuron_config.json").write_text("{not json")
    with pytest.raises(ModelInfoError, match="cannot read"):
        read_model_info(str(broken))


def test_normalize_dtype() -> None:
    assert normalize_dtype("bfloat16") == normalize_dtype("BF16") == "bf16"
    assert normalize_dtype("torch.float16") == "fp16"
    assert normalize_dtype("float32") == "fp32"
    assert normalize_dtype(None) is None


# -- the entry point's refusals ----------------------------------------------------------


def test_check_model_accepts_the_blog_settings(tmp_path: Path) -> None:
    info = read_model_info(str(neuron_config(tmp_path / "m")))
    assert info is not None
    ok = dict(batch_size=8, max_total_tokens=16512, max_input_tokens=16000, auto_cast_type="bf16")
    assert check_model(info, cores_per_replica=8, **ok) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cores_per_replica": 4}, "compiled for 8 NeuronCores"),
        ({"cores_per_replica": 12}, "compiled for 8 NeuronCores"),
        ({"batch_size": 9}, "exceeds the compiled batch size 8"),
        ({"max_total_tokens": 16513}, "exceeds the compiled sequence length 16512"),
        ({"max_input_tokens": 16512}, "must be below the compiled sequence length 16512"),
        ({"auto_cast_type": "fp32"}, "differs from the compiled type 'bf16'"),
    ],
)
def test_check_model_refusals(tmp_path: Path, change: dict, message: str) -> None:
    info = read_model_info(str(neuron_config(tmp_path / "m")))
    assert info is not None
    values = (
        dict(
            cores_per_replica=8,
            batch_size=8,
            max_total_tokens=16512,
            max_input_tokens=16000,
            auto_cast_type=None,
        )
        | change
    )
    errors = check_model(info, **values)
    assert len(errors) == 1 and message in errors[0]


# -- export ------------------------------------------------------------------------------


def export_toml(tmp_path: Path, **model) -> str:
    lines = [f"{k} = {json.dumps(v)}" for k, v in model.items()]
    path = tmp_path / "fleet.toml"
    path.write_text(
        "[model]\n" + "\n".join(lines) + '\n[fleet]\nlauncher = "docker"\ncores_per_replica = 8\n'
        f'[launcher.docker]\ndata_dir = "{tmp_path}"\n'
    )
    return str(path)


BLOG_MODEL = dict(
    id="/data/exportedmodel",
    source="meta-llama/Meta-Llama-3.1-8B-Instruct",
    batch_size=8,
    max_input_tokens=16000,
    max_total_tokens=16512,
)


def test_export_job_maps_the_container_path_back_to_the_host(tmp_path: Path) -> None:
    config = load_config(
        export_toml(tmp_path, **BLOG_MODEL), env={}, check_host=False, read_model=False
    )
    job = job_from_config(config)
    assert job.output == str(tmp_path / "exportedmodel")
    assert (job.source, job.batch_size, job.sequence_length, job.num_cores, job.auto_cast_type) == (
        "meta-llama/Meta-Llama-3.1-8B-Instruct",
        8,
        16512,
        8,
        "bf16",
    )


def test_export_skips_a_matching_export_without_importing_optimum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_optimum: None
) -> None:
    neuron_config(tmp_path / "exportedmodel")
    assert cli.main(["export", "--host", "--config", export_toml(tmp_path, **BLOG_MODEL)]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize(("engine", "extra"), [("tgi", "tgi-neuron"), ("vllm", "vllm-neuron")])
def test_export_without_the_extra_says_how_to_install_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_optimum: None,
    engine: str,
    extra: str,
) -> None:
    """The extra of the engine in the config, and only that one."""
    config = export_toml(tmp_path, **BLOG_MODEL)
    text = Path(config).read_text()
    Path(config).write_text(text.replace("[fleet]\n", f'[fleet]\nengine = "{engine}"\n', 1))
    assert f'engine = "{engine}"' in Path(config).read_text()
    assert cli.main(["export", "--host", "--config", config]) == 2
    err = capsys.readouterr().err
    assert f"optimum-neuron is not installed: pip install 'neuron-fleet[{extra}]'" in err
    assert err.count("neuron-fleet[") == 1
    assert missing_extra(engine) in err


def test_export_refuses_to_overwrite_another_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_optimum: None
) -> None:
    neuron_config(tmp_path / "exportedmodel", batch_size=4)
    config = export_toml(tmp_path, **BLOG_MODEL)
    assert cli.main(["export", "--host", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "batch_size: found 4, want 8" in err and "--force" in err
    # --force goes on to compile, which needs the extra here.
    assert cli.main(["export", "--host", "--config", config, "--force"]) == 2
    assert "optimum-neuron is not installed" in capsys.readouterr().err


def test_export_needs_a_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = export_toml(tmp_path, id="/data/exportedmodel", source="org/m")
    assert cli.main(["export", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "batch size is not set" in err and "sequence length is not set" in err


def test_export_differences() -> None:
    from supervisor.model import NeuronModelInfo

    info = NeuronModelInfo("p", "neuron_config.json", 8, 4096, 2, "bf16")
    assert (
        export_differences(info, batch_size=8, sequence_length=4096, tp_degree=2, dtype="bfloat16")
        == []
    )
    assert export_differences(
        info, batch_size=8, sequence_length=4096, tp_degree=8, dtype="bf16"
    ) == ["tp_degree: found 2, want 8"]
