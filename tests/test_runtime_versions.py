"""The export's optimum-neuron / neuronx-cc against what the replicas run (fake docker)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from supervisor import cli
from supervisor.config import ConfigError, load_config
from supervisor.model import read_model_info
from supervisor.runtime_versions import (
    RuntimeVersions,
    VersionQueryError,
    image_versions,
    mismatch,
    native_versions,
)
from tests.conftest import IMAGE, TGI_33, free_ports

TESTS = Path(__file__).resolve().parent
FAKEBIN = TESTS / "fakebin"


def docker_calls(logs: Path) -> list[list[str]]:
    if not (logs / "calls.jsonl").exists():
        return []
    return [json.loads(line)["argv"][1:3] for line in (logs / "calls.jsonl").open()]


def test_the_image_is_asked_once_per_image_id(tmp_path: Path, fake_docker: Path) -> None:
    versions = image_versions("docker", IMAGE)
    assert (versions.optimum_neuron, versions.neuronxcc) == ("0.3.0", "2.19.8089.0+8ab9f450")
    assert docker_calls(fake_docker) == [["image", "inspect"], ["run", "--rm"]]
    assert image_versions("docker", IMAGE) == versions  # cached by image id
    assert docker_calls(fake_docker)[2:] == [["image", "inspect"]]

    # `docker pull` brought a new image under the same tag: asked again.
    (tmp_path / "images.json").write_text(
        json.dumps({IMAGE: {"id": "sha256:bbb", "optimum_neuron": "0.4.5", "neuronxcc": "2.21"}})
    )
    assert image_versions("docker", IMAGE).optimum_neuron == "0.4.5"
    assert docker_calls(fake_docker)[3:] == [["image", "inspect"], ["run", "--rm"]]


def test_an_image_not_pulled_is_not_pulled(fake_docker: Path) -> None:
    with pytest.raises(VersionQueryError, match="No such image"):
        image_versions("docker", "example.com/other:tag")
    assert docker_calls(fake_docker) == [["image", "inspect"]]


def test_native_versions_come_from_the_tgi_servers_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.write_text('#!/bin/sh\necho \'{"optimum_neuron": "0.3.0", "neuronxcc": "2.19"}\'\n')
    server = bin_dir / "text-generation-server"
    server.write_text(f"#!{python}\nimport sys\n")
    for script in (python, server):
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert native_versions() == RuntimeVersions("0.3.0", "2.19", str(python))


def write_export(folder: Path, optimum: str, neuronxcc: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "neuron_config.json").write_text(
        json.dumps(
            {
                "batch_size": 4,
                "sequence_length": 4096,
                "tp_degree": 8,
                "auto_cast_type": "bf16",
                "optimum_neuron_version": optimum,
                "neuronxcc_version": neuronxcc,
            }
        )
    )


def test_mismatch_names_both_versions_and_the_fix(tmp_path: Path) -> None:
    write_export(tmp_path / "m", "0.4.5", "2.21.18209.0")
    info = read_model_info(str(tmp_path / "m"))
    assert info is not None
    message = mismatch(info, RuntimeVersions(*TGI_33.values(), f"image {IMAGE}"))
    assert message is not None
    assert "optimum-neuron 0.4.5" in message and "runs 0.3.0" in message
    assert "neuronx-cc 2.21.18209.0" in message and "2.19.8089.0+8ab9f450" in message
    assert "neuron-fleet export --force" in message
    assert mismatch(info, RuntimeVersions("0.4.5", "2.21.18209.0", "x")) is None


def fleet_toml(tmp_path: Path) -> Path:
    ports = free_ports(2)
    path = tmp_path / "fleet.toml"
    path.write_text(
        f'[model]\nid = "{tmp_path / "data" / "model"}"\n[fleet]\nlauncher = "docker"\n'
        f"devices = 12\nreplicas = 1\nbase_port = {ports[1]}\n"
        f'[launcher.docker]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[balancer]\nlisten = "127.0.0.1:{ports[0]}"\n'
    )
    return path


def test_serve_and_plan_refuse_an_export_of_other_versions(
    tmp_path: Path, fake_docker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_export(tmp_path / "data" / "model", "0.4.5", "2.21.18209.0")
    path = fleet_toml(tmp_path)
    with pytest.raises(ConfigError, match=r"optimum-neuron 0\.4\.5 \(the image .* runs 0\.3\.0\)"):
        load_config(str(path), env={})
    assert cli.main(["plan", "--config", str(path)]) == 2
    assert "neuron-fleet export --force" in capsys.readouterr().err

    write_export(tmp_path / "data" / "model", *TGI_33.values())
    config = load_config(str(path), env={})
    assert config.model.neuron is not None
    assert config.model.neuron.optimum_neuron_version == "0.3.0"


def test_plan_warns_when_the_image_is_not_pulled(
    tmp_path: Path, fake_docker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_export(tmp_path / "data" / "model", *TGI_33.values())
    (tmp_path / "images.json").write_text("{}")
    assert cli.main(["plan", "--config", str(fleet_toml(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "cannot check the export's optimum-neuron 0.3.0" in out
    assert f"docker pull {IMAGE}" in out
