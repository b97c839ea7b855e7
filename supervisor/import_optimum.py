"""``optimum-cli neuron serve ... [--data-parallel-size N]`` for ``neuron-fleet import``: the
same model, replicas, cores and ports as a fleet.toml with ``engine = "vllm"``.

What optimum-neuron does with that command line (optimum-neuron main and 0.4.5,
optimum/commands/neuron/serve.py; optimum/neuron/vllm/server_manager.py):

    --model M, --served_model_name  -> [model] id, served_model_name
    --batch_size, --sequence_length -> [model] batch_size, max_total_tokens (vLLM
                                       --max-num-seqs, --max-model-len)
    --tensor_parallel_size          -> [fleet] cores_per_replica
    --data-parallel-size N          -> [fleet] replicas = N, on consecutive core ranges of
                                       NEURON_RT_VISIBLE_CORES (from core 0 when unset)
    --port P                        -> [balancer] listen = 0.0.0.0:P (its proxy, or the one
                                       server, listens on every interface); the servers on
                                       127.0.0.1:P+1 .. P+N -> base_port = P + 1
    any other argument              -> vLLM's (``_unknown_args``): --max-num-seqs,
                                       --max-model-len, --dtype, --revision are read, the
                                       rest is carried into [launcher.native] extra_args

optimum-neuron's vLLM image runs the same command from SM_ON_* variables: each
``SM_ON_NAME=value`` becomes ``--name value`` (lower-cased) after ``--port 8080``, before
the container's own arguments (docker/vllm/Dockerfile, entrypoint.sh).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.import_common import (
    SERVICE_ENV_FILE,
    ImportProblem,
    ImportResult,
    Notes,
    is_secret,
    names_a_secret,
    written_header,
)
from supervisor.import_toml import TomlWriter
from supervisor.model import normalize_dtype, read_model_info
from supervisor.neuron import format_core_range, parse_core_range
from supervisor.vllm import SM_ON_PREFIX, VLLM_IMAGE_PORT

OPTIMUM_DEFAULT_PORT = 8080
"""``optimum-cli neuron serve --port`` default (serve.py)."""
PUBLIC_HOST = "0.0.0.0"
"""RoundRobinProxy's ``listen_host`` default (reverse_proxy.py); vLLM's server binds every
interface when --host is not given (vllm 0.11.0, entrypoints/openai/cli_args.py)."""


@dataclass
class ServeCommand:
    """An ``optimum-cli neuron serve`` invocation, as optimum-neuron parses it."""

    model: str
    served_model_name: str | None = None
    task: str = "generate"
    tensor_parallel_size: int | None = None
    batch_size: int | None = None
    sequence_length: int | None = None
    port: int = OPTIMUM_DEFAULT_PORT
    data_parallel_size: int = 1
    allow_non_cached_model: bool = False
    vllm_args: list[str] = field(default_factory=list)
    """What optimum-cli passes on to vLLM untouched (its ``_unknown_args``)."""
    visible_cores: str | None = None
    """NEURON_RT_VISIBLE_CORES=... written before the command, if any."""
    assignments: dict[str, str] = field(default_factory=dict)
    """Every VAR=value written before the command (NEURON_RT_VISIBLE_CORES included)."""
    from_image: bool = False
    """Configured by SM_ON_* variables (optimum-neuron's vLLM image) rather than a shell."""


def _parser() -> argparse.ArgumentParser:
    """optimum-cli neuron serve's own arguments (serve.py ``ServeCommand.parse_args``)."""
    parser = argparse.ArgumentParser(prog="optimum-cli neuron serve", add_help=False)
    add = parser.add_argument
    add("-m", "--model")
    add("--served_model_name", "--served-model-name", dest="served_model_name")
    add("--task", default="generate")
    add("--tensor_parallel_size", "--tensor-parallel-size", dest="tensor_parallel_size", type=int)
    add("--batch_size", "--batch-size", dest="batch_size", type=int)
    add("--sequence_length", "--sequence-length", dest="sequence_length", type=int)
    add("--port", type=int, default=OPTIMUM_DEFAULT_PORT)
    add("--data-parallel-size", dest="data_parallel_size", type=int, default=1)
    add("--allow_non_cached_model", "--allow-non-cached-model", action="store_true")
    return parser


def sm_on_arguments(env: Mapping[str, str]) -> list[str]:
    """The arguments the image's entry point builds from SM_ON_* (in ``env``'s order)."""
    args: list[str] = []
    for key, value in env.items():
        if key.startswith(SM_ON_PREFIX):
            args.append("--" + key[len(SM_ON_PREFIX) :].lower())
            if value:
                args.append(value)
    return args


_PREFIX_COMMANDS = frozenset({"env", "exec", "sudo", "nohup"})


def _is_assignment(word: str) -> bool:
    name, eq, _ = word.partition("=")
    return bool(eq) and name.isidentifier()


def parse_serve(command_line: str, sm_env: Mapping[str, str] | None = None) -> ServeCommand:
    """``command_line`` (``optimum-cli neuron serve ...``, maybe after VAR=value words) and the
    image's SM_ON_* variables -> ServeCommand; raises ImportProblem."""
    # A shell drops backslash-newline (POSIX, Shell Command Language 2.2.1): the command as
    # optimum-neuron's docs print it, over several lines, is one command. shlex would keep
    # each newline as a word of its own, and vLLM would refuse them as arguments.
    command_line = re.sub(r"\\\r?\n", "", command_line)
    try:
        words = shlex.split(command_line)
    except ValueError as exc:
        problem = f"the serve command line cannot be split like a shell's: {exc}"
        raise ImportProblem([problem]) from None
    assignments: dict[str, str] = {}
    while words and (words[0] in _PREFIX_COMMANDS or _is_assignment(words[0])):
        # VAR=value words, and what runs the command with them: `env VAR=value optimum-cli`,
        # `exec optimum-cli` (the image's entrypoint.sh), `sudo`, `nohup`.
        word = words.pop(0)
        if _is_assignment(word):
            name, _, value = word.partition("=")
            assignments[name] = value
    if words and os.path.basename(words[0]) == "optimum-cli":
        words[0] = "optimum-cli"  # /opt/aws_neuronx_venv_pytorch_2_7/bin/optimum-cli
    if words[:3] == ["optimum-cli", "neuron", "serve"]:
        words = words[3:]
    elif words and not words[0].startswith("-"):
        raise ImportProblem(
            [
                f"not an `optimum-cli neuron serve` command line: it starts with {words[0]!r} "
                '(give e.g. "optimum-cli neuron serve --model /models/llama '
                '--data-parallel-size 3")'
            ]
        )
    image_args = sm_on_arguments(sm_env or {})
    from_image = bool(image_args)
    if from_image:
        # entrypoint.sh: ARGS=(--port 8080) + SM_ON_* arguments, then the container's own.
        words = ["--port", str(VLLM_IMAGE_PORT), *image_args, *words]
    known, unknown = _parser().parse_known_args(words)
    if not known.model:
        raise ImportProblem(
            ["no --model in the serve command (nor SM_ON_MODEL): the model to serve is needed"]
        )
    problems = []
    if known.task != "generate":
        # A fleet.toml would start vLLM with --task generate on it: refuse, not rewrite.
        problems.append(
            f"--task {known.task}: neuron-fleet starts vLLM with --task generate and balances "
            "the generation routes only; keep serving an embedding model with optimum-cli"
        )
    for name in ("data_parallel_size", "tensor_parallel_size", "batch_size", "sequence_length"):
        value = getattr(known, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} = {value}: must be at least 1")
    if problems:
        raise ImportProblem(problems)
    return ServeCommand(
        model=known.model,
        served_model_name=known.served_model_name,
        task=known.task,
        tensor_parallel_size=known.tensor_parallel_size,
        batch_size=known.batch_size,
        sequence_length=known.sequence_length,
        port=known.port,
        data_parallel_size=known.data_parallel_size,
        allow_non_cached_model=known.allow_non_cached_model,
        vllm_args=unknown,
        visible_cores=assignments.get("NEURON_RT_VISIBLE_CORES"),
        assignments=assignments,
        from_image=from_image,
    )


# vLLM arguments with a fleet.toml key (vllm 0.11.0, engine/arg_utils.py): flag -> key.
_VLLM_KEYS = {
    "--max-num-seqs": "batch_size",
    "--max-model-len": "max_total_tokens",
    "--dtype": "auto_cast_type",
    "--revision": "revision",
    "--host": "host",
}


def _vllm_values(args: list[str], notes: Notes) -> tuple[dict[str, str], list[str]]:
    """(values of the vLLM flags neuron-fleet sets itself, the arguments to carry over)."""
    values: dict[str, str] = {}
    carried: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        name, eq, inline = word.partition("=")
        flag = name.replace("_", "-") if name.startswith("--") else name
        has_value = bool(eq) or (i + 1 < len(args) and not args[i + 1].startswith("-"))
        value = inline if eq else (args[i + 1] if has_value else "")
        step = 1 if eq or not has_value else 2
        if flag in _VLLM_KEYS and has_value:
            values[_VLLM_KEYS[flag]] = value
        elif names_a_secret(flag):
            notes.add(
                f"{flag} is a secret: not copied; clients' keys go in NEURON_FLEET_API_KEYS "
                f"({SERVICE_ENV_FILE}), and the replicas get a key of their own per run "
                "([fleet] replica_auth)"
            )
        else:
            carried += args[i : i + step]
        i += step
    return values, carried


def _export_tp(model: str) -> int | None:
    """The export's tp_degree, which optimum-cli uses when --tensor_parallel_size is not
    given (serve.py ``run``: ``tensor_parallel_size = neuron_config.tp_degree``)."""
    if not os.path.isdir(model):
        return None
    try:
        info = read_model_info(model)
    except (OSError, ValueError):  # ModelInfoError is a ValueError
        return None
    return info.tp_degree if info is not None else None


def _is_plain_checkpoint(model: str) -> bool:
    """A local folder here with no Neuron metadata (optimum-cli exports it at each start)."""
    try:
        return os.path.isdir(model) and read_model_info(model) is None
    except (OSError, ValueError):
        return False


def _core_groups(command: ServeCommand, tp: int | None, notes: Notes) -> list[str]:
    """The ranges VLLMServerManager gives the ranks when NEURON_RT_VISIBLE_CORES is set."""
    if command.visible_cores is None:
        return []
    if tp is None:
        # Without the tensor-parallel degree the ranks' cores are unknown; writing nothing
        # would put the replicas on cores from 0, which NEURON_RT_VISIBLE_CORES kept them off.
        notes.add(
            f"NEURON_RT_VISIBLE_CORES={command.visible_cores} is not applied: the "
            "tensor-parallel degree is unknown (no --tensor_parallel_size, and --model is not "
            "a local export here); set [fleet] core_groups to its ranges, one per rank of "
            "tp_degree cores, or the replicas start on cores from 0"
        )
        return []
    try:
        cores = list(parse_core_range(command.visible_cores))
    except ValueError:
        try:
            cores = [int(c) for c in command.visible_cores.split(",")]
        except ValueError:
            notes.add(
                f"NEURON_RT_VISIBLE_CORES={command.visible_cores} cannot be read: "
                "set [fleet] core_groups yourself"
            )
            return []
    n = command.data_parallel_size
    groups = [cores[k * tp : (k + 1) * tp] for k in range(n)]
    if any(len(g) < tp for g in groups):
        notes.add(
            f"NEURON_RT_VISIBLE_CORES={command.visible_cores} holds fewer than {n} x {tp} cores "
            "(optimum-cli refuses it too): the default layout is written"
        )
        return []
    contiguous = all(g == list(range(g[0], g[0] + tp)) for g in groups)
    if not contiguous:
        notes.add(
            f"NEURON_RT_VISIBLE_CORES={command.visible_cores} gives a rank cores that are not "
            "one range: neuron-fleet's groups are ranges; the default layout is written"
        )
        return []
    ranges = [format_core_range(g) for g in groups]
    default = [format_core_range(range(k * tp, (k + 1) * tp)) for k in range(n)]
    return [] if ranges == default else ranges


def import_serve(
    command_line: str,
    sm_env: Mapping[str, str] | None = None,
    *,
    sources: str = "",
    env_source: str = "the env file",
    on_argv: bool = True,
) -> ImportResult:
    """The fleet.toml of an ``optimum-cli neuron serve`` deployment; raises ImportProblem."""
    notes = Notes()
    command = parse_serve(command_line, sm_env)
    secret_notes(sm_env or {}, env_source, notes)
    prefixed = {k: v for k, v in command.assignments.items() if k != "NEURON_RT_VISIBLE_CORES"}
    secret_notes(prefixed, "the command line", notes)
    others = sorted(name for name in prefixed if not is_secret(name))
    if others:
        notes.add(
            f"{', '.join(others)} set before the command: not carried over; put them in the "
            f"service's environment ({SERVICE_ENV_FILE}), which native replicas inherit"
        )
    vllm, carried = _vllm_values(command.vllm_args, notes)
    n = command.data_parallel_size
    tp = command.tensor_parallel_size
    export_tp = None if tp is not None else _export_tp(command.model)

    local = os.path.isabs(command.model) or command.model.startswith(".")
    # optimum-cli resolved a relative --model against the directory it ran in; the service
    # runs elsewhere (systemd: /), so the folder is written absolute, resolved here. Clients
    # keep sending what optimum-cli served it as: --served_model_name, else --model as typed.
    relative = local and not os.path.isabs(command.model) and not command.from_image
    model_id = os.path.abspath(command.model) if relative else command.model
    model: dict[str, Any] = {"id": model_id}
    served = command.served_model_name or command.model
    if served != model_id or command.from_image:
        # From the image, id is a path inside its container that [launcher.docker] data_dir
        # may lead to rewrite: the name clients send is pinned.
        model["served_model_name"] = served
    if vllm.get("revision"):
        model["revision"] = vllm["revision"]
    # optimum-cli's own flags decide what it checks; vLLM's, appended after, decide what
    # vLLM runs with: both must equal the export's, so either is the value.
    batch = command.batch_size or _int(vllm.get("batch_size"), "--max-num-seqs", notes)
    total = command.sequence_length or _int(vllm.get("max_total_tokens"), "--max-model-len", notes)
    if batch:
        model["batch_size"] = batch
    if total:
        model["max_total_tokens"] = total
    if vllm.get("auto_cast_type"):
        model["auto_cast_type"] = normalize_dtype(vllm["auto_cast_type"])

    if model_id != command.model:
        notes.add(
            f"--model {command.model} is relative: written as {model_id}, resolved against "
            "this directory (run the import where optimum-cli ran)"
        )
    if not local:
        notes.add(
            f"--model {command.model} is a Hub id: optimum-cli exports it (or fetches a cached "
            "export) at every start, once per server; with neuron-fleet export it once: set "
            f'[model] source = "{command.model}" and id to a local folder, then run '
            "`neuron-fleet export`; every replica, and every restart, loads that folder"
        )
    elif not command.from_image and _is_plain_checkpoint(model_id):
        notes.add(
            f"--model {command.model} is a checkpoint, not a Neuron export (no "
            "neuron_config.json): every server compiles it at every start; with neuron-fleet "
            f'export it once: [model] source = "{model_id}", id = a new folder, then '
            "`neuron-fleet export`"
        )
    if command.allow_non_cached_model:
        notes.add(
            "--allow_non_cached_model: compiles a model the Hub cache lacks at every start; "
            "`neuron-fleet export` compiles it once instead (not carried over)"
        )
    if tp is None:
        notes.add(
            "--tensor_parallel_size not given: [fleet] cores_per_replica is read from the "
            "export's neuron_config.json (tp_degree) when the fleet loads"
        )
    groups = _core_groups(command, tp or export_tp, notes)
    host = PUBLIC_HOST if n > 1 else vllm.get("host", PUBLIC_HOST)
    listen = f"[{host}]:{command.port}" if ":" in host else f"{host}:{command.port}"
    if host == PUBLIC_HOST:
        notes.add(
            f'listen = "{listen}": optimum-cli served on every interface, and so does '
            f'neuron-fleet; use "127.0.0.1:{command.port}" if only local clients need it; '
            "on 0.0.0.0 `serve` refuses to start without NEURON_FLEET_API_KEYS (or [balancer] "
            "allow_public_without_api_keys = true)"
        )
    base_port = command.port + 1  # _allocate_internal_ports: user port + 1 + rank
    launcher = "docker" if command.from_image else "native"
    if n > 1:
        notes.add(
            f"--data-parallel-size {n}: optimum-cli stops every server when one exits and "
            "restarts none; neuron-fleet restarts the one that exited (with backoff) while the "
            "others keep serving"
        )
        notes.add(
            "optimum-cli's proxy sent requests round-robin with no slot cap, queue, timeout "
            'or retry; neuron-fleet uses policy = "least-outstanding" with one request per '
            "batch slot ([balancer] max_inflight_per_replica = batch_size), a queue, and "
            "retries on another replica before the first token"
        )
    image_args = sm_on_pairs(carried) if command.from_image else []
    if carried and not command.from_image:
        notes.add("carried into [launcher.native] extra_args: " + shlex.join(carried))
    elif image_args:
        notes.add(
            "carried into [launcher.docker] extra_args as the image takes them (SM_ON_*): "
            + shlex.join(image_args)
        )
    if on_argv and _secret_in_argv(command_line):
        notes.add(
            "the command line held a secret, which `ps` showed while this import ran: next "
            "time give the command on standard input (--optimum-serve - < serve.sh)"
        )
    if command.from_image:
        notes.add(
            'configured by SM_ON_* variables: launcher = "docker" runs optimum-neuron\'s '
            "vLLM image the same way, one container per replica on its own devices"
        )

    w = TomlWriter(written_header(sources or "an optimum-cli neuron serve command"))
    w.table("model")
    w.key("id", model["id"], "--model (SM_ON_MODEL)" if command.from_image else "--model")
    if not local:
        w.commented_key("source", command.model, "then id = a local folder: neuron-fleet export")
    comments = {
        "served_model_name": "what clients send as model (--served_model_name, else --model)",
        "revision": "--revision",
        "batch_size": "--batch_size = vLLM --max-num-seqs",
        "max_total_tokens": "--sequence_length = vLLM --max-model-len",
        "auto_cast_type": "--dtype",
    }
    for key, comment in comments.items():
        if key in model:
            w.key(key, model[key], comment)
    w.table("fleet")
    w.key("engine", "vllm", "vLLM with optimum-neuron's plugin, as optimum-cli runs it")
    how = (
        "container of optimum-neuron's vLLM image"
        if command.from_image
        else "python -m vllm.entrypoints.openai.api_server"
    )
    w.key("launcher", launcher, f"one {how} per replica")
    w.key("replicas", n, "--data-parallel-size")
    if tp:
        w.key("cores_per_replica", tp, "--tensor_parallel_size")
    if groups:
        w.key("core_groups", groups, "NEURON_RT_VISIBLE_CORES split per rank, as optimum-cli")
    w.key("host", "127.0.0.1", "replicas on loopback, as optimum-cli's servers")
    w.key("base_port", base_port, "--port + 1, as optimum-cli's servers")
    if not command.from_image:
        w.table("launcher.native")
        w.commented_key(
            "python", "/opt/aws_neuronx_venv_pytorch_2_7/bin/python", "the one optimum-cli runs on"
        )
        if carried:
            w.key("extra_args", carried, "vLLM arguments carried over from the command")
        notes.add(
            "[launcher.native] python: set it to the Python optimum-cli runs on (the #! line "
            "of `which optimum-cli`) unless that is the python3 on PATH"
        )
    else:
        w.table("launcher.docker")
        w.commented_key("data_dir", "/host/folder", "the host folder the image saw at /data")
        if local:
            notes.add(
                f"SM_ON_MODEL {command.model} is a path inside the container: set "
                "[launcher.docker] data_dir (and data_mount, default /data) to the host folder "
                "mounted there"
            )
        if image_args:
            w.key("extra_args", image_args, "vLLM arguments, as SM_ON_* (the image's only way)")
        notes.add(
            f"the image listened on {VLLM_IMAGE_PORT} inside its container: set [balancer] "
            "listen to the host port clients used (docker run -p HOST_PORT:8080)"
        )
    w.table("balancer")
    w.key("listen", listen, "--port: where clients connect")
    w.key("policy", "least-outstanding", "optimum-cli's proxy was round-robin")
    return ImportResult(
        toml=w.text(),
        notes=notes.render(),
        services=[f"rank {k}" for k in range(n)],
        listen=listen,
        replaces="OPTIMUM SERVER",
    )


def sm_on_pairs(args: list[str]) -> list[str]:
    """vLLM arguments as ``docker run -e SM_ON_NAME=value`` pairs: the entry point turns each
    back into ``--name value`` (lower-cased; vLLM's parser takes ``_`` for ``-``), a flag
    without a value from an empty one (docker/vllm/Dockerfile, entrypoint.sh)."""
    pairs: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if not word.startswith("--"):
            continue  # a value already taken, or a positional: no SM_ON_* spelling
        name, eq, value = word[2:].partition("=")
        if not eq and i < len(args) and not args[i].startswith("-"):
            value = args[i]
            i += 1
        pairs += ["-e", f"{SM_ON_PREFIX}{name.replace('-', '_').upper()}={value}"]
    return pairs


def _secret_in_argv(command_line: str) -> bool:
    """A ``--flag`` named like a secret on the command line itself (not from SM_ON_*)."""
    for word in command_line.split():
        if word.startswith("--") and names_a_secret(word.partition("=")[0]):
            return True
    return False


def secret_notes(env: Mapping[str, str], source: str, notes: Notes) -> None:
    """Secrets beside the SM_ON_* variables: named, never copied."""
    for name in sorted(env):
        if not name.startswith(SM_ON_PREFIX) and is_secret(name):
            notes.add(
                f"{name} is set in {source}: not copied into fleet.toml; keep it in the "
                f"service's env file {SERVICE_ENV_FILE} (mode 0600)"
            )


def _int(text: str | None, flag: str, notes: Notes) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        notes.add(f"{flag} {text!r} is not a number: left out of fleet.toml")
        return None
