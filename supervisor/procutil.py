"""Child-process helpers: spawn replicas that cannot outlive the supervisor, signal groups.

Why each piece exists:

- Every replica runs in its own session / process group (``start_new_session=True``), so one
  ``killpg`` reaches the TGI launcher *and* the shard processes it forks, and a Ctrl-C in the
  supervisor's terminal is not delivered to the replicas behind our back.
- ``PR_SET_PDEATHSIG=SIGKILL`` makes the kernel kill a replica when the supervisor dies, even
  by SIGKILL or OOM: an orphaned replica keeps its NeuronCores reserved and blocks the next
  start. Caveat: the signal fires when the *thread* that forked the child exits, not the
  process, so children must be spawned from a long-lived thread: the event-loop thread.
  It covers the direct child only; the group kill on stop covers its descendants.
- Supervisor-only variables (``NOTIFY_SOCKET``, ``WATCHDOG_*``) are not passed on, so a
  replica cannot talk to systemd in our name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable, Mapping

from balancer.secrets_env import SECRET_VARS

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
_SUPERVISOR_ONLY_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    # The balancer's own secrets: a replica never needs them (HF_TOKEN, which it may need,
    # and the replica key, as API_KEY, come through the launch spec).
    *SECRET_VARS,
)

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    # Loaded in the parent: the child between fork and exec must not import or dlopen.
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        except OSError:
            _libc = None
    return _libc


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks the kernel to SIGKILL the child when we die (Linux only).

    Returns None where prctl is unavailable (then only a clean stop reaps the children).
    """
    libc = _load_libc()
    if libc is None:
        return None
    prctl = libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork() and prctl(): then nobody would kill us.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def hide_own_memory() -> bool:
    """``prctl(PR_SET_DUMPABLE, 0)``: other processes of our user (a native replica runs as
    the service's user) can no longer read our environment or memory — the admin token and
    API keys — from /proc, nor ptrace us; no core dump either.

    proc(5): /proc/[pid] files are owned by root:root when the process is not dumpable;
    prctl(2): ptrace access needs it. Replicas are unaffected: execve makes a process
    dumpable again. False where prctl is unavailable.
    """
    libc = _load_libc()
    if libc is None:
        return False
    return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The supervisor's environment minus systemd hand-offs and the balancer's secrets, plus
    the launch spec's variables."""
    env = {k: v for k, v in os.environ.items() if k not in _SUPERVISOR_ONLY_ENV}
    env.update(extra)
    return env


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a whole process group; False when the group is already gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def describe_returncode(returncode: int) -> str:
    """``exit 1`` / ``signal 9 (SIGKILL)`` from an asyncio/subprocess returncode."""
    if returncode >= 0:
        return f"exit {returncode}"
    signum = -returncode
    try:
        return f"signal {signum} ({signal.Signals(signum).name})"
    except ValueError:
        return f"signal {signum}"


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie waiting to be reaped counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    # "pid (comm) S ...": comm may contain spaces and parentheses, the state follows the last ')'.
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")
