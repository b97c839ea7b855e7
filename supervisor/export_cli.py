"""``neuron-fleet export``: compile the model once, for the shape the fleet will serve.

TGI on Neuron can compile at start-up, but then every replica start (and restart) pays
for it. Exporting once into ``[model] id`` with the fleet's batch size, sequence length
(MAX_TOTAL_TOKENS), tensor-parallel degree (cores per replica) and dtype makes starts
load-only; a matching export (same shape, same optimum-neuron and compiler) is reused.

One optimum-neuron for export and serving: optimum-neuron loads only exports made by its
own version and compiler (see runtime_versions.py). So with the docker launcher the export
runs inside the serving image by default (the blog's way: its optimum-cli, its neuronx-cc);
``--host`` runs the ``optimum-cli`` of this Python instead, which suits the native launcher:
the one of the engine's extra (``neuron-fleet[tgi-neuron]``: optimum-neuron 0.3.0, what
TGI's Neuron server imports; ``neuron-fleet[vllm-neuron]``: 0.4.5 with vllm 0.11.0), checked
before it runs. Both paths build the same ``optimum-cli export neuron`` command line
(``optimum_cli_args``), whose flags and choices tests/test_export.py checks against the
argparse definition in each pinned wheel.

Starts load, never download: the checkpoint is first fetched into the persistent Hub cache
(``[launcher.docker] hub_cache``, or the host's HF cache) and the export is made from that
local folder, which makes optimum-neuron save the sharded weights in the export's
``checkpoint/`` folder (optimum-neuron 0.3.0 and 0.4.5,
models/inference/backend/pretrained_model.py: ``_save_pretrained`` shards the checkpoint
when the model was exported from a local path, and ``load_weights`` reads ``checkpoint/``
first). A Hub id export would instead record ``checkpoint_id`` and fetch the weights at
every replica start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from supervisor.config import ConfigError, FleetConfig, load_config
from supervisor.launchers import HUB_CACHE_MOUNT, hub_cache_host
from supervisor.model import ModelInfoError, export_differences, read_model_info
from supervisor.neuron import inventory_from_dev
from supervisor.runtime_versions import (
    RuntimeVersions,
    VersionQueryError,
    image_versions,
    mismatch,
)

SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
"""What is fetched from the Hub: config, safetensors weights, tokenizer (not *.bin, not the
``original/`` consolidated .pth files some repositories also carry)."""
ENGINE_OPTIMUM_NEURON = {"tgi": "0.3.0", "vllm": "0.4.5"}
"""The optimum-neuron each engine's replicas run natively, pinned by the extras in
pyproject.toml (``tgi-neuron``, ``vllm-neuron``; the reasons are there)."""
ENGINE_EXTRA = {"tgi": "tgi-neuron", "vllm": "vllm-neuron"}
AUTO_CAST_TYPES = ("bf16", "fp16", "tf32")
"""``optimum-cli export neuron --auto_cast_type`` choices, the same in optimum-neuron 0.3.0
and 0.4.5 (optimum/commands/export/neuronx.py); there is no fp32."""


def missing_extra(engine: str) -> str:
    """No optimum-neuron here: the extra of the engine the replicas run, and the other way."""
    extra, want = ENGINE_EXTRA.get(engine, "tgi-neuron"), ENGINE_OPTIMUM_NEURON.get(engine)
    return (
        f"optimum-neuron is not installed: pip install 'neuron-fleet[{extra}]' (optimum-neuron "
        f"{want}, what {engine} replicas run; needs a Neuron SDK host), or pass --docker to "
        "compile inside the serving image (the default with the docker launcher)"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
EXPORT_MARKER = "# neuron-fleet: export"
EXPORT_CODE = f"""{EXPORT_MARKER}
# Runs inside the serving image with its own optimum-neuron: fetch the checkpoint into the
# mounted Hub cache, then export from that local folder so the weights are saved with it.
import json, os, subprocess, sys
job = json.loads(sys.argv[1])
source = job["source"]
if not os.path.isdir(source):
    from huggingface_hub import snapshot_download
    source = snapshot_download(source, revision=job["revision"], allow_patterns=job["patterns"])
argv = ["optimum-cli", *(source if a == "{{source}}" else a for a in job["args"])]
print("running: " + " ".join(argv), flush=True)
sys.exit(subprocess.call(argv))
"""
"""The command line comes from ``optimum_cli_args`` ("{source}" is the fetched folder)."""


@dataclass(frozen=True)
class ExportJob:
    source: str
    """Hub id (or local checkpoint folder) to compile."""
    output: str
    """Host folder the export is written to (the fleet's [model] id)."""
    batch_size: int
    sequence_length: int
    num_cores: int
    auto_cast_type: str
    revision: str | None = None
    hub_cache: str | None = None
    """Host folder the checkpoint is fetched into (docker: mounted as HF_HUB_CACHE)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=os.environ.get("NEURON_FLEET_CONFIG"),
        help="fleet TOML file (default: $NEURON_FLEET_CONFIG)",
    )
    parser.add_argument("--env-file", metavar="FILE", help="KEY=VALUE file, e.g. the blog's .env")
    parser.add_argument(
        "--source", metavar="MODEL", help="Hub model to compile (default: [model] source)"
    )
    parser.add_argument("--output", metavar="DIR", help="export folder (default: [model] id)")
    parser.add_argument("--batch-size", type=int, help="default: [model] batch_size")
    parser.add_argument("--sequence-length", type=int, help="default: [model] max_total_tokens")
    parser.add_argument(
        "--num-cores", type=int, help="tensor parallel size; default: cores per replica"
    )
    parser.add_argument(
        "--auto-cast-type",
        choices=AUTO_CAST_TYPES,
        help="optimum-cli's --auto_cast_type; default: [model] auto_cast_type or bf16",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an export of another shape or version"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--docker",
        action="store_true",
        help="compile inside [launcher.docker] image (the default with the docker launcher)",
    )
    where.add_argument(
        "--host",
        action="store_true",
        help="compile with the optimum-cli of this Python (the [tgi-neuron] or [vllm-neuron] "
        "extra, by [fleet] engine; the default with the native launcher); the replicas must "
        "run the same optimum-neuron",
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(
            args.config,
            env_file=args.env_file,
            overrides={
                "model": {"batch_size": args.batch_size, "max_total_tokens": args.sequence_length},
                "fleet": {"cores_per_replica": args.num_cores},
            },
            check_host=False,
            read_model=False,
        )
        job = job_from_config(
            config, source=args.source, output=args.output, dtype=args.auto_cast_type
        )
    except ConfigError as exc:
        print(f"neuron-fleet export: {exc}", file=sys.stderr)
        return 2
    in_image = args.docker or (not args.host and config.fleet.launcher == "docker")
    runtime = None
    if in_image:
        try:  # the serving image's versions: an export made by others is not "up to date"
            docker = config.launcher.docker
            runtime = image_versions(docker.binary, docker.image)
        except VersionQueryError:
            runtime = None  # not pulled yet: the export's `docker run` pulls it
    status, message = existing_export(job, runtime)
    if status == "match":
        print(message)
        return 0
    if status == "differs" and not args.force:
        print(f"neuron-fleet export: {message}; pass --force to replace it", file=sys.stderr)
        return 2
    if in_image:
        code = export_with_docker(job, config)
    else:
        code = export_with_optimum(job, hf_token=config.model.hf_token, engine=engine_of(config))
    return code or report(job, config if in_image else None)


def job_from_config(
    config: FleetConfig,
    *,
    source: str | None = None,
    output: str | None = None,
    dtype: str | None = None,
) -> ExportJob:
    model = config.model
    errors = []
    output = output or _host_folder(config)
    if not output:
        errors.append(
            f"[model] id {model.id!r} is not a folder path: set it to where the export goes "
            "(e.g. /home/ubuntu/exportedmodel) or pass --output"
        )
    source = source or model.source or (model.id if not _is_path(model.id) else None)
    if not source:
        errors.append("nothing to compile: set [model] source (a Hub id) or pass --source")
    if not model.batch_size:
        errors.append(
            "the batch size is not set: [model] batch_size / MAX_BATCH_SIZE or --batch-size"
        )
    if not model.max_total_tokens:
        errors.append(
            "the sequence length is not set: [model] max_total_tokens / MAX_TOTAL_TOKENS "
            "or --sequence-length"
        )
    dtype = dtype or model.auto_cast_type or "bf16"
    if dtype not in AUTO_CAST_TYPES:
        errors.append(
            f"auto_cast_type {dtype!r}: optimum-cli export neuron takes "
            f"{' | '.join(AUTO_CAST_TYPES)} (--auto_cast_type); pass --auto-cast-type"
        )
    if errors:
        raise ConfigError(errors)
    output = os.path.abspath(os.path.expanduser(str(output)))
    return ExportJob(
        source=str(source),
        output=output,
        batch_size=int(model.batch_size or 0),
        sequence_length=int(model.max_total_tokens or 0),
        num_cores=int(config.fleet.cores_per_replica or 0),
        auto_cast_type=dtype,
        revision=model.revision,
        hub_cache=hub_cache_host(config.launcher.docker, output),
    )


def _is_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~"))


def _host_folder(config: FleetConfig) -> str | None:
    """The export folder on the host, mapping the blog's container path (/data/...) back."""
    model_id = config.model.id
    docker = config.launcher.docker
    prefix = docker.data_mount.rstrip("/") + "/"
    if model_id.startswith(prefix) and docker.data_dir:
        return os.path.join(docker.data_dir, model_id[len(prefix) :])
    return os.path.expanduser(model_id) if _is_path(model_id) else None


def existing_export(job: ExportJob, runtime: RuntimeVersions | None = None) -> tuple[str, str]:
    """("missing" | "match" | "differs", message)."""
    try:
        info = read_model_info(job.output) if os.path.isdir(job.output) else None
    except ModelInfoError as exc:
        return "differs", str(exc)
    if info is None:
        return "missing", f"no export in {job.output}"
    diffs = export_differences(
        info,
        batch_size=job.batch_size,
        sequence_length=job.sequence_length,
        tp_degree=job.num_cores,
        dtype=job.auto_cast_type,
    )
    if runtime is not None and (problem := mismatch(info, runtime)):
        diffs.append(problem)
    if not diffs:
        return "match", f"{job.output} is up to date ({info.describe()}): nothing to do"
    return "differs", f"{job.output} holds another export ({'; '.join(diffs)})"


def engine_of(config: FleetConfig) -> str:
    """``[fleet] engine`` ("tgi" when the configuration has no such key)."""
    return config.fleet.engine


def optimum_cli_args(job: ExportJob, source: str, output: str) -> list[str]:
    """``optimum-cli`` arguments (after the program name) for a decoder export.

    Valid for the argparse of both pinned versions (optimum/commands/export/neuronx.py of
    optimum-neuron 0.3.0 and 0.4.5; tests/test_export.py parses them with it): 0.3.0 passes
    ``--num_cores`` and ``--auto_cast_type`` to the decoder export; 0.4.5 keeps ``--num_cores``
    as a hidden alias of ``--tensor_parallel_size`` and takes the dtype from the checkpoint.
    """
    return [
        "export",
        "neuron",
        "--model",
        source,
        "--task",
        "text-generation",
        "--batch_size",
        str(job.batch_size),
        "--sequence_length",
        str(job.sequence_length),
        "--num_cores",
        str(job.num_cores),
        "--auto_cast_type",
        job.auto_cast_type,
        output,
    ]


def installed_optimum_neuron() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("optimum-neuron")
    except metadata.PackageNotFoundError:
        return None


def find_optimum_cli() -> str | None:
    """The optimum-cli installed with this Python (its venv's bin/), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "optimum-cli")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("optimum-cli")


def host_toolchain_problem(engine: str) -> str | None:
    """Why this Python cannot export for ``engine``'s replicas; None when it can."""
    version = installed_optimum_neuron()
    if version is None:
        return missing_extra(engine)
    want = ENGINE_OPTIMUM_NEURON.get(engine)
    if want is None:
        return f"[fleet] engine {engine!r}: no optimum-neuron is known for it"
    if version != want:
        return (
            f"optimum-neuron {version} is installed, but {engine} replicas run {want} and load "
            f"only exports of their own version: pip install 'neuron-fleet[{ENGINE_EXTRA[engine]}]'"
        )
    if find_optimum_cli() is None:
        return f"optimum-neuron {version} is installed but optimum-cli is not on PATH"
    return None


def export_with_optimum(job: ExportJob, *, hf_token: str | None, engine: str = "tgi") -> int:
    """Fetch the checkpoint, then run this Python's ``optimum-cli export neuron`` on it."""
    problem = host_toolchain_problem(engine)
    if problem:
        print(f"neuron-fleet export: {problem}", file=sys.stderr)
        return 2
    from huggingface_hub import snapshot_download

    print(
        f"compiling {job.source} -> {job.output} (batch {job.batch_size}, sequence "
        f"{job.sequence_length}, {job.num_cores} cores, {job.auto_cast_type}) with "
        f"optimum-neuron {installed_optimum_neuron()}; this takes a while",
        file=sys.stderr,
    )
    local = job.source
    if not os.path.isdir(local):  # a local folder makes the export keep the weights
        local = snapshot_download(
            job.source, revision=job.revision, token=hf_token, allow_patterns=SOURCE_PATTERNS
        )
    env = dict(os.environ)
    if hf_token:
        env["HF_TOKEN"] = hf_token  # the environment, never the command line
    argv = [str(find_optimum_cli()), *optimum_cli_args(job, local, job.output)]
    print("running: " + " ".join(argv), file=sys.stderr)
    code = subprocess.run(argv, env=env, check=False).returncode
    if code:
        return code
    if not any(os.path.isfile(os.path.join(job.output, f)) for f in TOKENIZER_FILES):
        # The balancer counts prompt tokens with the tokenizer in this folder.
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(local).save_pretrained(job.output)
    return 0


def docker_export_argv(
    job: ExportJob, config: FleetConfig, dev_dir: str = "/dev"
) -> tuple[list[str], str]:
    """``docker run --entrypoint python IMAGE -c EXPORT_CODE JOB``: fetch, then optimum-cli.

    Returns (argv, the export folder as the container sees it).
    """
    docker = config.launcher.docker
    mount = docker.data_mount.rstrip("/") or "/data"
    parent = os.path.dirname(job.output)
    inside = f"{mount}/{os.path.basename(job.output)}"
    argv = [
        docker.binary,
        "run",
        "--rm",
        "--label",
        "neuron-fleet.export=1",
        "-v",
        f"{parent}:{mount}",
    ]
    source = job.source
    if os.path.isdir(source):
        argv += ["-v", f"{os.path.abspath(source)}:/source:ro"]
        source = "/source"
    if job.hub_cache:
        argv += [
            "-v",
            f"{job.hub_cache}:{HUB_CACHE_MOUNT}",
            "-e",
            f"HF_HUB_CACHE={HUB_CACHE_MOUNT}",
        ]
    argv += [f"--device={d.path}" for d in inventory_from_dev(dev_dir).devices]
    if config.model.hf_token:
        argv += ["-e", "HF_TOKEN"]  # name only: docker copies the value from its environment
    spec = {
        "source": source,
        "revision": job.revision,
        "patterns": SOURCE_PATTERNS,
        "args": optimum_cli_args(job, "{source}", inside),
    }
    argv += ["--entrypoint", "python", docker.image, "-c", EXPORT_CODE, json.dumps(spec)]
    return argv, inside


def export_with_docker(job: ExportJob, config: FleetConfig) -> int:
    argv, inside = docker_export_argv(job, config)
    os.makedirs(os.path.dirname(job.output), exist_ok=True)
    if job.hub_cache:
        os.makedirs(job.hub_cache, exist_ok=True)
    env = dict(os.environ)
    if config.model.hf_token:
        env["HF_TOKEN"] = config.model.hf_token
    print(
        f"compiling {job.source} -> {job.output} inside {config.launcher.docker.image} "
        f"(as {inside}); this takes a while",
        file=sys.stderr,
    )
    try:
        return subprocess.run(argv, env=env, check=False).returncode
    except FileNotFoundError:
        print(f"neuron-fleet export: {argv[0]!r} is not on PATH", file=sys.stderr)
        return 2


def report(job: ExportJob, config: FleetConfig | None) -> int:
    """After a compile: the export's shape, weights and versions against the runtime."""
    status, message = existing_export(job)
    if status != "match":
        print(f"neuron-fleet export: the new export does not match: {message}", file=sys.stderr)
        return 1
    print(message)
    if not os.path.isdir(os.path.join(job.output, "checkpoint")):
        print(
            f"warning: {job.output} has no checkpoint/ folder: replicas will fetch the weights "
            "from the Hub at every start",
            file=sys.stderr,
        )
    if config is not None:
        docker = config.launcher.docker
        try:
            runtime = image_versions(docker.binary, docker.image)
        except VersionQueryError as exc:
            print(f"warning: cannot ask {docker.image} for its versions: {exc}", file=sys.stderr)
            return 0
        status, message = existing_export(job, runtime)
        if status != "match":
            print(f"neuron-fleet export: {message}", file=sys.stderr)
            return 1
    return 0
