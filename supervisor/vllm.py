"""What a vLLM replica on Neuron is started with: [model] keys as vLLM's flags, or as the
SM_ON_* variables of optimum-neuron's vLLM image.

The flags are the ones ``optimum-cli neuron serve`` builds for every server it starts
(optimum-neuron 0.4.5 and main, optimum/commands/neuron/serve.py ``run``)::

    --model M --served_model_name NAME --task generate --tensor-parallel-size TP
    --max-num-seqs BATCH --max-model-len SEQUENCE --dtype DTYPE

    [fleet] cores_per_replica -> --tensor-parallel-size
    [model] batch_size        -> --max-num-seqs
    [model] max_total_tokens  -> --max-model-len
    [model] auto_cast_type    -> --dtype (bf16 -> bfloat16)
    [model] revision          -> --revision (a Hub id's; optimum-cli passes none)

Every replica loads the same local export (``neuron-fleet export`` once): with one there,
HF_HUB_OFFLINE=1 keeps a start or restart off the Hub.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from supervisor.model import vllm_dtype

if TYPE_CHECKING:  # the launchers pass a loaded config; no import of the loader at run time
    from supervisor.config import FleetConfig

VLLM_API_SERVER = "vllm.entrypoints.openai.api_server"
"""The module each data-parallel server runs (optimum-neuron main,
optimum/neuron/vllm/server_manager.py ``VLLMServerManager.start``)."""
VLLM_IMAGE_PORT = 8080
"""The image's entry point always passes ``--port 8080`` (SageMaker's port) before the
SM_ON_* flags (optimum-neuron 0.4.5, docker/vllm/Dockerfile, entrypoint.sh)."""
SM_ON_PREFIX = "SM_ON_"
"""The entry point turns every ``SM_ON_NAME=value`` into ``--name value`` (lower-cased) on
``optimum-cli neuron serve`` (docker/vllm/Dockerfile, entrypoint.sh)."""


def served_model_name(config: FleetConfig) -> str:
    """What clients send as ``model``; ``optimum-cli neuron serve`` defaults it to ``--model``."""
    return config.model.served_model_name or config.model.id


def _values(config: FleetConfig) -> dict[str, str]:
    """The serve flags whose values are known (unknown ones: vLLM reads the export)."""
    model = config.model
    values = {
        "served_model_name": served_model_name(config),
        "tensor_parallel_size": config.fleet.cores_per_replica,
        "batch_size": model.batch_size,
        "sequence_length": model.max_total_tokens,
        "dtype": vllm_dtype(model.auto_cast_type),
        "revision": model.revision,
    }
    return {key: str(value) for key, value in values.items() if value is not None}


_FLAGS = {
    "served_model_name": "--served-model-name",
    "tensor_parallel_size": "--tensor-parallel-size",
    "batch_size": "--max-num-seqs",
    "sequence_length": "--max-model-len",
    "dtype": "--dtype",
    "revision": "--revision",  # vllm 0.11.0, engine/arg_utils.py; for a Hub id only
}


def vllm_server_args(config: FleetConfig, model_path: str) -> list[str]:
    """The api_server flags optimum-cli neuron serve passes, for ``model_path``."""
    args = ["--model", model_path]
    values = _values(config)
    for key, flag in _FLAGS.items():
        if key in values:
            args += [flag, values[key]]
            if key == "served_model_name":
                # optimum-neuron passes --task generate (serve.py); vllm 0.11.0 keeps the
                # option, deprecated (config/model.py ``task``).
                args += ["--task", "generate"]
    return args


def vllm_image_env(config: FleetConfig, model_id: str) -> dict[str, str]:
    """The SM_ON_* variables that make the image's ``optimum-cli neuron serve`` run this
    replica: its own flags (--model, --served_model_name, --tensor_parallel_size,
    --batch_size, --sequence_length, which it checks against the export), and --dtype,
    which it passes through to vLLM (unknown arguments go last, so they win)."""
    env = {f"{SM_ON_PREFIX}MODEL": model_id}
    for key, value in _values(config).items():
        env[SM_ON_PREFIX + key.upper()] = value
    return env


def hub_offline_env(config: FleetConfig) -> dict[str, str]:
    """HF_HUB_OFFLINE=1 when every replica loads a local export that carries its weights:
    nothing to fetch, so a start or a restart never waits on (or fails with) the Hub
    (huggingface_hub 0.36.2, constants.py ``HF_HUB_OFFLINE``: read by huggingface_hub itself,
    through which transformers, vLLM and optimum-neuron reach the Hub).
    An export without weights fetches its checkpoint at load time: left online."""
    info = config.model.neuron
    return {"HF_HUB_OFFLINE": "1"} if info is not None and info.has_weights else {}
