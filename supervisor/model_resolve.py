"""The model a fleet serves: find its local folder, read what the export says about
itself (``model.py``), fill the TGI limits it leaves unset and check those that are set.

Defaults follow TGI's Neuron entry point: batch size, sequence length and tensor-parallel
degree from the export, MAX_INPUT_TOKENS = sequence_length // 2, prefill tokens =
batch x input tokens.
"""

from __future__ import annotations

import dataclasses
import os

from supervisor.model import ModelInfoError, check_model, has_tokenizer, read_model_info
from supervisor.schema import (
    SIMULATED_MODEL_ID,
    DockerLauncherConfig,
    FleetSettings,
    LauncherConfig,
    ModelConfig,
)


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~"))


def resolve_model(
    model: ModelConfig,
    fleet: FleetSettings,
    launcher: LauncherConfig,
    check_host: bool,
    read_model: bool = True,
    require_model: bool = True,
) -> tuple[ModelConfig, FleetSettings, list[str], list[str]]:
    """Find the local folder, read its neuron_config.json, fill defaults, check limits.

    ``require_model=False`` (``neuron-fleet plan``): no model, or an export not made yet,
    is a warning, so cores, devices and ports can be planned before ``export``.
    """
    errors: list[str] = []
    warnings: list[str] = []
    missing = errors if require_model else warnings
    if not model.id:
        if fleet.launcher == "simulated":
            model = dataclasses.replace(model, id=SIMULATED_MODEL_ID)
        elif require_model:
            errors.append(
                "[model] id is not set: set MODEL_ID (env or --env-file) or [model] id to an "
                "exported model folder or a Hub id"
            )
        else:
            warnings.append(
                "no model set ([model] id / MODEL_ID): this plan shows cores, devices and "
                "ports only; serve needs the model"
            )
    path = _local_model_path(model.id, fleet.launcher, launcher.docker) if model.id else None
    hardware = fleet.launcher in ("docker", "native")
    needs_folder = hardware and check_host and read_model
    if model.id and path is None and _looks_like_path(model.id) and needs_folder:
        docker = launcher.docker
        if (
            fleet.launcher == "docker"
            and model.id.startswith(docker.data_mount + "/")
            and not docker.data_dir
        ):
            errors.append(
                f"MODEL_ID {model.id!r} is a path inside the container: set [launcher.docker] "
                f"data_dir to the host folder mounted at {docker.data_mount} "
                "(the compose file's $PWD)"
            )
        else:
            missing.append(
                f"[model] id {model.id!r} is not a folder on this host: run `neuron-fleet export` "
                "first, or fix MODEL_ID"
            )

    if (
        fleet.engine == "vllm"
        and hardware
        and read_model
        and model.id
        and path is None
        and not _looks_like_path(model.id)
    ):
        # optimum-neuron's vLLM loader exports a Hub model that is not a Neuron export, from
        # the Hub cache, in every server it starts (0.4.5, optimum/neuron/vllm/model_loader.py).
        warnings.append(
            f"[model] id {model.id!r} is a Hub id: every vLLM replica exports it (or fetches a "
            "cached export) from the Hub at each start and restart; export it once instead: "
            f'[model] source = "{model.id}", id = a local folder, then `neuron-fleet export`'
        )

    info = None
    if path is not None and read_model:
        try:
            info = read_model_info(path)
        except ModelInfoError as exc:
            errors.append(str(exc))
        if info is not None and hardware and info.checkpoint_id and not info.has_weights:
            warnings.append(
                f"{path} holds no weights: every replica start fetches {info.checkpoint_id} "
                "from the Hub (network and HF_TOKEN needed; kept in the Hub cache): "
                "`neuron-fleet export --force` makes an export that carries them"
            )
        if info is None and hardware and not errors:
            warnings.append(
                f"{path} has no neuron_config.json: "
                f"{'vLLM' if fleet.engine == 'vllm' else 'TGI'} will compile it at every start "
                "(slow); run `neuron-fleet export` once"
            )

    # cores per replica: [fleet] > HF_NUM_CORES > compiled tp_degree
    cores = fleet.cores_per_replica
    if cores is not None and model.num_cores is not None and cores != model.num_cores:
        errors.append(
            f"[fleet] cores_per_replica = {cores} but HF_NUM_CORES / [model] num_cores = "
            f"{model.num_cores}: TGI shards the model over HF_NUM_CORES cores; make them equal"
        )
    if cores is None:
        cores = model.num_cores or (info.tp_degree if info else None)
    if cores is None:
        errors.append(
            "[fleet] cores_per_replica is not set and cannot be read from the model: set it "
            "(or HF_NUM_CORES) to the tensor-parallel degree the model was compiled for"
        )

    if info is not None:
        errors += check_model(
            info,
            cores_per_replica=cores,
            batch_size=model.batch_size,
            max_total_tokens=model.max_total_tokens,
            max_input_tokens=model.max_input_tokens,
            auto_cast_type=model.auto_cast_type,
            engine=fleet.engine,
        )
    batch = model.batch_size or (info.batch_size if info else None)
    total = model.max_total_tokens or (info.sequence_length if info else None)
    if fleet.engine == "vllm":
        # vLLM admits any prompt shorter than --max-model-len (vllm 0.11.0,
        # entrypoints/openai/serving_engine.py ``_validate_input``): no TGI-style halving.
        max_input = model.max_input_tokens or (total - 1 if total and total > 1 else None)
    else:
        max_input = model.max_input_tokens or (info.default_max_input_tokens if info else None)
    dtype = model.auto_cast_type or (info.dtype if info else None)
    prefill = model.max_batch_prefill_tokens
    if prefill is None and batch and max_input:
        prefill = batch * max_input

    for key, value in (
        ("batch_size", batch),
        ("max_input_tokens", max_input),
        ("max_total_tokens", total),
        ("max_batch_prefill_tokens", prefill),
        ("max_concurrent_requests", model.max_concurrent_requests),
    ):
        if value is not None and value < 1:
            errors.append(f"[model] {key} = {value} must be at least 1")
    if max_input and total and max_input >= total:
        errors.append(
            f"[model] max_input_tokens = {max_input} must be below max_total_tokens = {total} "
            "(TGI needs room for at least one generated token)"
        )
    if prefill and max_input and prefill < max_input:
        errors.append(
            f"[model] max_batch_prefill_tokens = {prefill} is below "
            f"max_input_tokens = {max_input}: "
            "TGI's router refuses that"
        )
    if batch and model.max_concurrent_requests < batch:
        errors.append(
            f"[model] max_concurrent_requests = {model.max_concurrent_requests} is below the batch "
            f"size {batch}: the batch could never fill"
        )

    tokenizer = model.tokenizer
    if tokenizer is not None and check_host and not os.path.isdir(tokenizer):
        errors.append(f"[model] tokenizer {tokenizer!r} is not a folder")
    if tokenizer is None and path is not None and has_tokenizer(path):
        tokenizer = path

    model = dataclasses.replace(
        model,
        batch_size=batch,
        max_total_tokens=total,
        max_input_tokens=max_input,
        max_batch_prefill_tokens=prefill,
        auto_cast_type=dtype,
        num_cores=cores,
        tokenizer=tokenizer,
        path=path,
        neuron=info,
    )
    fleet = dataclasses.replace(fleet, cores_per_replica=cores)
    return model, fleet, errors, warnings


def _local_model_path(model_id: str, kind: str, docker: DockerLauncherConfig) -> str | None:
    expanded = os.path.expanduser(model_id)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    # The blog's .env names the folder as the container sees it (/data/exportedmodel).
    prefix = docker.data_mount.rstrip("/") + "/"
    if kind == "docker" and docker.data_dir and model_id.startswith(prefix):
        candidate = os.path.join(docker.data_dir, model_id[len(prefix) :])
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    return None
