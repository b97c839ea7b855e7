"""deploy/kubernetes run as written: the export Job's script executed with the manifest's
environment (the model volume a folder here, the Hub a pre-filled cache, optimum-cli the
stand-in that parses with the TGI image's optimum-neuron 0.3.0 argparse), then the pod's
environment, volumes and fleet.toml checked to load that export's weights from the volume,
with no Hub id and no download at pod start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.model import read_model_info
from tests import optimum_wheels
from tests.test_deploy_scaleout import fleet_toml_k8s, load_fleet, manifests

pytestmark = pytest.mark.timeout(120)

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tgi_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return optimum_wheels.sites_or_skip(tmp_path_factory.mktemp("optimum-wheels"))["tgi"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def mount_of(container: dict[str, Any], volume: str) -> str:
    (path,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return path


def hub_cache_with(cache: Path, repo: str) -> Path:
    """The Hub, as huggingface_hub's cache layout holds one snapshot of ``repo``."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (snapshot / "model.safetensors").write_bytes(b"\0" * 64)
    return snapshot


def image_tools(bin_dir: Path, site: Path) -> Path:
    """The image's python3 (here: this venv's, which has huggingface_hub) and optimum-cli."""
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    optimum_wheels.stand_in_optimum_cli(bin_dir / "optimum-cli", site)
    return bin_dir


def run_job(
    script: str, env: dict[str, str], data: Path, bin_dir: Path
) -> subprocess.CompletedProcess[str]:
    """The Job's `sh -c` script, its /data paths mapped onto ``data``."""
    mapped = {k: v.replace("/data", str(data), 1) if v.startswith("/data") else v
              for k, v in env.items()}  # fmt: skip
    mapped |= {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "HOME": str(data.parent),
               "HF_HUB_OFFLINE": "1"}  # fmt: skip
    return subprocess.run(
        ["sh", "-c", script], env=mapped, capture_output=True, text=True, timeout=60, check=False
    )


def test_export_job_then_pods_load_the_weights_from_the_volume(
    tmp_path: Path, tgi_site: Path
) -> None:
    docs = manifests()
    job = docs["Job"]["spec"]["template"]["spec"]
    (exporter,) = job["containers"]
    (script,) = exporter["args"]
    job_env = env_of(exporter)
    assert mount_of(exporter, "models") == "/data"
    # The checkpoint is fetched onto the volume, not into the container's /tmp.
    assert job_env["HF_HUB_CACHE"].startswith("/data/")

    data = tmp_path / "data"
    snapshot = hub_cache_with(
        data / job_env["HF_HUB_CACHE"].removeprefix("/data/"), job_env["MODEL"]
    )
    bin_dir = image_tools(tmp_path / "bin", tgi_site)

    done = run_job(script, job_env, data, bin_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    out = data / job_env["OUT"].removeprefix("/data/")
    written = json.loads((out / "neuron_config.json").read_text())
    argv = written["argv"]
    # Compiled from the local snapshot (so the weights are saved), by the image's 0.3.0.
    assert argv[argv.index("--model") + 1] == str(snapshot)
    assert written["optimum_neuron_version"] == "0.3.0" and written["checkpoint_id"] is None
    info = read_model_info(str(out))
    assert info.has_weights and not info.checkpoint_id
    # Applied again, it keeps the export.
    again = run_job(script, job_env, data, bin_dir)
    assert again.returncode == 0 and "export exists" in again.stdout

    # The pods: the export the Job wrote, on the same claim, with no way to the Hub.
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    pod_env = env_of(server)
    pod_volumes = pod["volumes"]
    assert mount_of(server, "models") == "/data"
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod_volumes}
    job_claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in job["volumes"]}
    assert claims["models"] == job_claims["models"]
    assert pod_env["HF_HUB_CACHE"] == pod_env["HUGGINGFACE_HUB_CACHE"] == job_env["HF_HUB_CACHE"]
    assert pod_env["HF_HUB_OFFLINE"] == "1"
    config = load_fleet(fleet_toml_k8s(), tmp_path)
    assert config.model.id == job_env["OUT"]
    assert not config.model.source  # no Hub id anywhere in the pod's config


def test_an_export_from_a_hub_id_fails_the_job(tmp_path: Path, tgi_site: Path) -> None:
    """What the Job did before: `--model "$MODEL"` records checkpoint_id and saves no
    weights, so every pod start would download them; the Job now refuses to keep it."""
    (exporter,) = manifests()["Job"]["spec"]["template"]["spec"]["containers"]
    (script,) = exporter["args"]
    assert '--model "$SRC"' in script
    job_env = env_of(exporter)
    bin_dir = image_tools(tmp_path / "bin", tgi_site)
    data = tmp_path / "data"
    hub_cache_with(data / job_env["HF_HUB_CACHE"].removeprefix("/data/"), job_env["MODEL"])
    done = run_job(script.replace('--model "$SRC"', '--model "$MODEL"'), job_env, data, bin_dir)
    assert done.returncode != 0 and "no checkpoint/" in done.stderr
    assert not (data / job_env["OUT"].removeprefix("/data/")).exists()
