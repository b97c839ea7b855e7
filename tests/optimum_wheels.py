"""The pinned optimum-neuron wheels, installed ``--no-deps`` into a folder, and the argparse
definition of their ``optimum-cli export neuron`` built from the wheel's own source.

``parse_args_neuronx`` (optimum/commands/export/neuronx.py) is taken out of the installed
file with ``ast`` and executed as written; only its module-level imports, which would pull
in optimum, transformers and torch, are given stand-ins: ``TasksManager`` (used for help
text only), ``get_neuron_major`` (0.4.5 makes ``--instance_type`` required off a Neuron
host; export --host runs on one, so it answers 2) and ``SUPPORTED_INSTANCE_TYPES`` (read from
the wheel's optimum/neuron/utils/instance.py). Every flag, type, choice, alias and required
argument is the wheel's.

Also runnable as a stand-in ``optimum-cli`` (see ``stand_in_optimum_cli``): it parses its
command line with that parser, refuses what the real one refuses (exit 2), and writes what an
export leaves behind.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PINS = {"tgi": "0.3.0", "vllm": "0.4.5"}
"""What pyproject.toml's tgi-neuron / vllm-neuron extras pin (tests check they agree)."""


def install_wheel(version: str, folder: Path) -> Path:
    """``pip download --no-deps`` + ``pip install --no-deps --target``; raises OSError."""
    site = folder / f"optimum-neuron-{version}"
    if (site / "optimum" / "commands" / "export" / "neuronx.py").is_file():
        return site
    for argv in (
        ["download", "--no-deps", "-d", str(folder / "wheels"), f"optimum-neuron=={version}"],
        ["install", "--no-deps", "--no-compile", "--target", str(site), "--no-index",
         "--find-links", str(folder / "wheels"), f"optimum-neuron=={version}"],
    ):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode:
            raise OSError(f"pip {argv[0]} optimum-neuron=={version}: {proc.stderr[-500:]}")
    return site


def sites_or_skip(folder: Path) -> dict[str, Path]:
    """engine -> its pinned wheel installed in ``folder``; skips the test when PyPI cannot be
    reached (the checks need the real wheels, about 0.5 MB each)."""
    import pytest

    try:
        return {engine: install_wheel(version, folder) for engine, version in PINS.items()}
    except OSError as exc:
        pytest.skip(f"cannot fetch the pinned optimum-neuron wheels from PyPI: {exc}")


def _literal(path: Path, name: str) -> object:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise LookupError(f"{name} not in {path}")


def export_parser(site: Path) -> argparse.ArgumentParser:
    """``optimum-cli export neuron``'s parser, from the wheel installed in ``site``."""
    source = site / "optimum" / "commands" / "export" / "neuronx.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    (function,) = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "parse_args_neuronx"
    ]

    class TasksManager:  # help text only
        _TRANSFORMERS_TASKS_TO_MODEL_LOADERS: dict = {}
        _DIFFUSERS_TASKS_TO_MODEL_LOADERS: dict = {}

    namespace: dict = {
        "ArgumentParser": argparse.ArgumentParser,
        "SUPPRESS": argparse.SUPPRESS,
        "Path": Path,
        "TasksManager": TasksManager,
        "get_neuron_major": lambda: 2,
    }
    instance = site / "optimum" / "neuron" / "utils" / "instance.py"
    if instance.is_file():
        namespace["SUPPORTED_INSTANCE_TYPES"] = _literal(instance, "SUPPORTED_INSTANCE_TYPES")
    exec(compile(ast.Module([function], type_ignores=[]), str(source), "exec"), namespace)
    parser = argparse.ArgumentParser(prog="optimum-cli export neuron")
    namespace["parse_args_neuronx"](parser)
    return parser


def wheel_version(site: Path) -> str:
    (info,) = site.glob("optimum_neuron-*.dist-info")
    return info.name.removeprefix("optimum_neuron-").removesuffix(".dist-info")


def stand_in_optimum_cli(path: Path, site: Path) -> Path:
    """An ``optimum-cli`` at ``path`` that parses with ``site``'s parser (see main())."""
    root = Path(__file__).resolve().parent.parent
    path.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(root)!r})\n"
        "from tests.optimum_wheels import main\n"
        f"sys.exit(main({str(site)!r}, sys.argv[1:]))\n"
    )
    path.chmod(0o755)
    return path


def main(site: str, argv: list[str]) -> int:
    if argv[:2] != ["export", "neuron"]:
        print(f"stand-in optimum-cli: only `export neuron`, not {argv[:2]}", file=sys.stderr)
        return 2
    args = export_parser(Path(site)).parse_args(argv[2:])  # exits 2 as the real one does
    os.makedirs(args.output, exist_ok=True)
    if os.path.isdir(args.model):
        # optimum-neuron saves the sharded weights only for an export from a local folder
        # (0.3.0 and 0.4.5, models/inference/backend/pretrained_model.py, _save_pretrained).
        os.makedirs(os.path.join(args.output, "checkpoint"), exist_ok=True)
    tp = args.num_cores if getattr(args, "num_cores", None) else args.tensor_parallel_size
    config = {
        "batch_size": args.batch_size,
        "sequence_length": args.sequence_length,
        "tp_degree": tp,
        "auto_cast_type": args.auto_cast_type,
        "optimum_neuron_version": wheel_version(Path(site)),
        "neuronxcc_version": "2.19.8089.0",
        "checkpoint_id": None if os.path.isdir(args.model) else args.model,
        "argv": argv,
    }
    with open(os.path.join(args.output, "neuron_config.json"), "w") as handle:
        json.dump(config, handle)
    return 0
