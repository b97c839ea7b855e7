"""``neuron-fleet export``: compile the model once, for the shape the fleet will serve.

TGI on Neuron can compile at start-up, but then every replica start (and restart) pays
for it. Exporting once into ``[model] id`` with the fleet's batch size, sequence length
(MAX_TOTAL_TOKENS), tensor-parallel degree (cores per replica) and dtype makes starts
load-only; a matching export (same neuron_config.json) is reused, not recompiled.

Two ways to compile: optimum-neuron in this Python (the ``neuron-fleet[neuron]`` extra,
imported only here), or ``--docker``: ``optimum-cli`` inside the TGI Neuron image, as the
blog does, which needs nothing installed on the host but docker.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass

from supervisor.config import ConfigError, FleetConfig, load_config
from supervisor.model import ModelInfoError, export_differences, read_model_info
from supervisor.neuron import inventory_from_dev

MISSING_EXTRA = (
    "optimum-neuron is not installed: pip install 'neuron-fleet[neuron]' (needs a Neuron SDK "
    "host), or use --docker to compile inside the TGI Neuron image"
)


@dataclass(frozen=True)
class ExportJob:
    source: str
    """Hub id (or local checkpoint) to compile."""
    output: str
    """Host folder the export is written to (the fleet's [model] id)."""
    batch_size: int
    sequence_length: int
    num_cores: int
    auto_cast_type: str
    revision: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", metavar="FILE", default=os.environ.get("NEURON_FLEET_CONFIG")
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
        "--auto-cast-type", help="bf16 | fp16 | fp32; default: [model] auto_cast_type or bf16"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an export of another shape")
    parser.add_argument(
        "--docker",
        action="store_true",
        help="compile with optimum-cli inside [launcher.docker] image",
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
    status, message = existing_export(job)
    if status == "match":
        print(message)
        return 0
    if status == "differs" and not args.force:
        print(f"neuron-fleet export: {message}; pass --force to replace it", file=sys.stderr)
        return 2
    if args.docker:
        return export_with_docker(job, config)
    return export_with_optimum(job, hf_token=config.model.hf_token)


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
    if errors:
        raise ConfigError(errors)
    return ExportJob(
        source=str(source),
        output=os.path.abspath(str(output)),
        batch_size=int(model.batch_size or 0),
        sequence_length=int(model.max_total_tokens or 0),
        num_cores=int(config.fleet.cores_per_replica or 0),
        auto_cast_type=dtype or model.auto_cast_type or "bf16",
        revision=model.revision,
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


def existing_export(job: ExportJob) -> tuple[str, str]:
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
    if not diffs:
        return "match", f"{job.output} is up to date ({info.describe()}): nothing to do"
    return "differs", f"{job.output} holds another export ({'; '.join(diffs)})"


def export_with_optimum(job: ExportJob, *, hf_token: str | None) -> int:
    try:
        from optimum.neuron import NeuronModelForCausalLM  # optional extra
    except ImportError:
        print(f"neuron-fleet export: {MISSING_EXTRA}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    print(
        f"compiling {job.source} -> {job.output} (batch {job.batch_size}, sequence "
        f"{job.sequence_length}, {job.num_cores} cores, {job.auto_cast_type}); this takes a while",
        file=sys.stderr,
    )
    neuron_config = NeuronModelForCausalLM.get_neuron_config(
        model_name_or_path=job.source,
        token=hf_token,
        revision=job.revision,
        batch_size=job.batch_size,
        sequence_length=job.sequence_length,
        tensor_parallel_size=job.num_cores,
        auto_cast_type=job.auto_cast_type,
    )
    model = NeuronModelForCausalLM.export(
        model_id=job.source, neuron_config=neuron_config, token=hf_token, load_weights=False
    )
    model.save_pretrained(job.output)
    # The balancer counts prompt tokens with the tokenizer in this folder.
    AutoTokenizer.from_pretrained(
        job.source, token=hf_token, revision=job.revision
    ).save_pretrained(job.output)
    status, message = existing_export(job)
    print(message if status == "match" else f"warning: {message}", file=sys.stderr)
    return 0


def docker_export_argv(
    job: ExportJob, config: FleetConfig, dev_dir: str = "/dev"
) -> tuple[list[str], str]:
    """The blog's ``docker run --entrypoint optimum-cli ... export neuron``.

    Returns (argv, the export folder as the container sees it).
    """
    docker = config.launcher.docker
    mount = docker.data_mount.rstrip("/") or "/data"
    parent = os.path.dirname(job.output)
    inside = f"{mount}/{os.path.basename(job.output)}"
    argv = [docker.binary, "run", "--rm", "-v", f"{parent}:{mount}"]
    argv += [f"--device={d.path}" for d in inventory_from_dev(dev_dir).devices]
    if config.model.hf_token:
        argv += ["-e", "HF_TOKEN"]
    argv += ["--entrypoint", "optimum-cli", docker.image, "export", "neuron", "--model", job.source]
    argv += ["--batch_size", str(job.batch_size), "--sequence_length", str(job.sequence_length)]
    argv += ["--num_cores", str(job.num_cores), "--auto_cast_type", job.auto_cast_type]
    argv += ["--task", "text-generation", inside]
    return argv, inside


def export_with_docker(job: ExportJob, config: FleetConfig) -> int:
    argv, _ = docker_export_argv(job, config)
    os.makedirs(os.path.dirname(job.output), exist_ok=True)
    env = dict(os.environ)
    if config.model.hf_token:
        env["HF_TOKEN"] = config.model.hf_token
    print("running: " + " ".join(argv), file=sys.stderr)
    try:
        return subprocess.run(argv, env=env, check=False).returncode
    except FileNotFoundError:
        print(f"neuron-fleet export: {argv[0]!r} is not on PATH", file=sys.stderr)
        return 2
