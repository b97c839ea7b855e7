"""What an exported model folder says about itself, and what TGI's entry point will refuse.

An optimum-neuron export is compiled for one batch size, one sequence length and one
tensor-parallel degree. TGI's Neuron entry point (tgi_entry_point.py) reads them from
``neuron_config.json`` (or, for optimum-neuron <= 0.0.28, the ``"neuron"`` section of
``config.json``), fills MAX_BATCH_SIZE / MAX_TOTAL_TOKENS / HF_NUM_CORES /
HF_AUTO_CAST_TYPE from them and refuses a mismatching environment -- minutes into a
container start, once per replica. Reading the same file here turns that into one error
before anything starts, and gives the native launcher (which has no entry point) the
same defaults.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

NEURON_CONFIG = "neuron_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

_DTYPES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "torch.float16": "fp16",
    "f16": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "torch.float32": "fp32",
    "f32": "fp32",
}


class ModelInfoError(ValueError):
    """A model folder whose Neuron metadata cannot be read."""


@dataclass(frozen=True)
class NeuronModelInfo:
    """The compiled shape of an exported model."""

    path: str
    source: str
    """``neuron_config.json`` or ``config.json ("neuron" section)``."""
    batch_size: int | None
    sequence_length: int | None
    tp_degree: int | None
    dtype: str | None
    """Normalised: ``bf16``, ``fp16``, ``fp32`` (or the raw string if unknown)."""
    optimum_neuron_version: str | None = None
    neuronxcc_version: str | None = None
    checkpoint_id: str | None = None
    """The Hub model the weights are fetched from at load time when the export holds none."""

    @property
    def has_weights(self) -> bool:
        """Sharded weights in ``checkpoint/`` or plain safetensors next to the config: what
        optimum-neuron's ``load_weights`` reads before it goes to the Hub (0.3.0 / 0.4.5,
        models/inference/backend/pretrained_model.py)."""
        if os.path.isdir(os.path.join(self.path, "checkpoint")):
            return True
        try:
            return any(name.endswith(".safetensors") for name in os.listdir(self.path))
        except OSError:
            return False

    @property
    def default_max_input_tokens(self) -> int | None:
        """What the entry point uses when MAX_INPUT_TOKENS is unset."""
        return self.sequence_length // 2 if self.sequence_length else None

    def describe(self) -> str:
        parts = [
            f"batch {self.batch_size}",
            f"sequence {self.sequence_length}",
            f"tp {self.tp_degree}",
        ]
        if self.dtype:
            parts.append(str(self.dtype))
        if self.optimum_neuron_version:
            parts.append(f"optimum-neuron {self.optimum_neuron_version}")
        return ", ".join(parts)


def normalize_dtype(value: str | None) -> str | None:
    if value is None:
        return None
    return _DTYPES.get(str(value).strip().lower(), str(value).strip())


def is_local_model(model_id: str) -> bool:
    return os.path.isdir(model_id)


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)


def read_model_info(path: str) -> NeuronModelInfo | None:
    """Neuron metadata of a local folder; None when it holds none (a plain checkpoint)."""
    neuron_config = os.path.join(path, NEURON_CONFIG)
    if os.path.isfile(neuron_config):
        data = _read_json(neuron_config)
        return _info(path, NEURON_CONFIG, data)
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        data = _read_json(config)
        section = data.get("neuron")
        if isinstance(section, dict):
            return _info(path, 'config.json ("neuron" section)', section)
    return None


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelInfoError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelInfoError(f"{path} is not a JSON object")
    return data


def _int(data: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
    return None


def _info(path: str, source: str, data: dict[str, Any]) -> NeuronModelInfo:
    dtype = data.get("auto_cast_type") or data.get("torch_dtype")
    return NeuronModelInfo(
        path=path,
        source=source,
        batch_size=_int(data, "batch_size"),
        sequence_length=_int(data, "sequence_length", "max_context_length"),
        tp_degree=_int(data, "tp_degree", "num_cores", "tensor_parallel_size"),
        dtype=normalize_dtype(dtype) if dtype else None,
        optimum_neuron_version=data.get("optimum_neuron_version"),
        neuronxcc_version=data.get("neuronxcc_version") or data.get("compiler_version"),
        checkpoint_id=data.get("checkpoint_id")
        if isinstance(data.get("checkpoint_id"), str)
        else None,
    )


def check_model(
    info: NeuronModelInfo,
    *,
    cores_per_replica: int | None,
    batch_size: int | None,
    max_total_tokens: int | None,
    max_input_tokens: int | None,
    auto_cast_type: str | None,
    engine: str = "tgi",
) -> list[str]:
    """The refusals of the engine's own start-up checks, as messages that say what to change.

    TGI (its Neuron entry point): batch and total tokens up to the compiled ones. Stricter
    on one point: a tp degree *below* the cores per replica would start, but the extra
    cores would sit idle (and be reserved), so it is refused too.

    vLLM: ``optimum-cli neuron serve`` refuses a batch size, sequence length or tensor
    parallel size that differs from the export's, in either direction (optimum-neuron
    0.4.5, optimum/commands/neuron/serve.py ``run``: "is inconsistent with the one used to
    export the neuron model"); the per-replica command we run skips that CLI, so the same
    rule is applied here.
    """
    where = (
        f"{info.path}/{info.source}"
        if info.source == NEURON_CONFIG
        else f"{info.path} {info.source}"
    )
    vllm = engine == "vllm"
    names = _VLLM_NAMES if vllm else _TGI_NAMES
    errors = []
    if (
        info.tp_degree is not None
        and cores_per_replica is not None
        and info.tp_degree != cores_per_replica
    ):
        errors.append(
            f"the model was compiled for {info.tp_degree} NeuronCores (tp_degree in {where}) "
            f"but each replica gets {cores_per_replica}: set [fleet] cores_per_replica = "
            f"{info.tp_degree}, or re-export with --num-cores {cores_per_replica}"
        )
    # TGI may run below the compiled value; optimum-cli neuron serve (vLLM) only at it.
    for name, value, compiled, what in (
        ("batch_size", batch_size, info.batch_size, "batch size"),
        ("max_total_tokens", max_total_tokens, info.sequence_length, "sequence length"),
    ):
        if compiled is None or value is None:
            continue
        if value > compiled or (vllm and value != compiled):
            errors.append(
                f"{names[name]} = {value} "
                f"{'differs from' if vllm else 'exceeds'} the compiled {what} {compiled} "
                f"({where}): {'set it to' if vllm else 'lower it to'} {compiled} or re-export"
            )
    seq = info.sequence_length
    if seq is not None and max_input_tokens is not None and max_input_tokens >= seq:
        default = seq - 1 if vllm else seq // 2
        errors.append(
            f"{names['max_input_tokens']} = {max_input_tokens} must be below "
            f"the compiled sequence length {seq} ({where}): the default is {default}"
        )
    want = normalize_dtype(auto_cast_type)
    if want and info.dtype and want != info.dtype:
        errors.append(
            f"{names['auto_cast_type']} = {auto_cast_type!r} differs from the "
            f"compiled type {info.dtype!r} ({where}): remove it or set it to {info.dtype!r}"
        )
    return errors


_TGI_NAMES = {
    "batch_size": "MAX_BATCH_SIZE / [model] batch_size",
    "max_total_tokens": "MAX_TOTAL_TOKENS / [model] max_total_tokens",
    "max_input_tokens": "MAX_INPUT_TOKENS / [model] max_input_tokens",
    "auto_cast_type": "HF_AUTO_CAST_TYPE / [model] auto_cast_type",
}
_VLLM_NAMES = {
    "batch_size": "[model] batch_size (vLLM --max-num-seqs)",
    "max_total_tokens": "[model] max_total_tokens (vLLM --max-model-len)",
    "max_input_tokens": "[model] max_input_tokens",
    "auto_cast_type": "[model] auto_cast_type (vLLM --dtype)",
}

VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""Our dtype names -> vLLM's ``--dtype`` choices (vllm 0.11.0, config/model.py
``ModelDType``); optimum-neuron passes ``str(torch_dtype).split(".")[-1]``, the same
names (0.4.5, optimum/commands/neuron/serve.py)."""


def vllm_dtype(value: str | None) -> str | None:
    """``bf16`` -> ``bfloat16``; an unknown name is passed through for vLLM to judge."""
    normal = normalize_dtype(value)
    return VLLM_DTYPES.get(normal, normal) if normal else None


def export_differences(
    info: NeuronModelInfo,
    *,
    batch_size: int,
    sequence_length: int,
    tp_degree: int,
    dtype: str,
) -> list[str]:
    """What differs between an existing export and the one asked for (empty: reuse it)."""
    wanted = {
        "batch_size": (info.batch_size, batch_size),
        "sequence_length": (info.sequence_length, sequence_length),
        "tp_degree": (info.tp_degree, tp_degree),
        "dtype": (info.dtype, normalize_dtype(dtype)),
    }
    return [
        f"{key}: found {have}, want {want}" for key, (have, want) in wanted.items() if have != want
    ]
