"""Replica containers a crashed earlier run left behind, removed before anything is planned.

PR_SET_PDEATHSIG kills the ``docker run`` client when the supervisor dies, not the
container: that lives in dockerd's cgroup, out of reach of systemd's KillMode. Left
running it keeps its NeuronCores (neuron-ls shows them held) and its ports, so the next
start would refuse both. Every replica container carries the label ``neuron-fleet.replica``
(launchers.docker_spec): at start, before the plan, the supervisor removes the containers
with that label and names them in the log. One fleet per docker daemon: the container
names (``neuron-fleet-replica-N``) are fixed too.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable

REPLICA_LABEL = "neuron-fleet.replica"
DOCKER_TIMEOUT_S = 60.0

log = logging.getLogger("neuron_fleet.leftovers")

Runner = Callable[..., subprocess.CompletedProcess]


class LeftoverError(RuntimeError):
    """docker could not list or remove the leftover containers."""


def leftover_containers(binary: str, *, runner: Runner = subprocess.run) -> list[str]:
    """Names of the containers (running or not) labelled as this fleet's replicas."""
    argv = [binary, "ps", "-a", "--filter", f"label={REPLICA_LABEL}", "--format", "{{.Names}}"]
    done = _run(argv, runner)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def remove_leftover_containers(binary: str, *, runner: Runner = subprocess.run) -> list[str]:
    """``docker rm -f`` every leftover replica container; returns the names removed."""
    names = leftover_containers(binary, runner=runner)
    if names:
        _run([binary, "rm", "-f", *names], runner)
    return names


def clean_up_leftovers(binary: str, *, runner: Runner = subprocess.run) -> list[str]:
    """Remove leftovers and say so once in the log; a docker failure is a warning (the
    config checks report a missing docker, and a held core is named by the plan)."""
    try:
        names = remove_leftover_containers(binary, runner=runner)
    except LeftoverError as exc:
        log.warning("cannot remove replica containers left by an earlier run: %s", exc)
        return []
    if names:
        log.warning(
            "removed %d replica container(s) left by an earlier run (they held NeuronCores "
            "and ports): %s",
            len(names),
            ", ".join(names),
        )
    return names


def _run(argv: list[str], runner: Runner) -> subprocess.CompletedProcess:
    try:
        done = runner(argv, capture_output=True, text=True, timeout=DOCKER_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise LeftoverError(f"{argv[0]!r} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise LeftoverError(
            f"`{' '.join(argv[:3])}` did not answer in {DOCKER_TIMEOUT_S:g} s"
        ) from None
    if done.returncode:
        raise LeftoverError(
            f"`{' '.join(argv[:3])}` exited {done.returncode}: {done.stderr.strip()[:300]}"
        )
    return done
