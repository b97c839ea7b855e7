"""Process plumbing shared by the peer benchmarks: ports, start/stop by PID, /proc CPU.

Every process the benchmark needs is started here with ``subprocess.Popen`` (its own
process group, output to a log file under the run's temp folder) and stopped by its PID:
SIGTERM (or the signal the program documents for a fast stop), a bounded wait, then SIGKILL
of that PID. Nothing is ever killed by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def consecutive_free_ports(n: int) -> list[int]:
    """``n`` consecutive free ports (replicas use base_port + k)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for port in range(base, base + n):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(base, base + n))
    raise RuntimeError("no free port range")


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def cpu_seconds(pid: int, *, reaped_children: bool = True) -> float:
    """utime + stime of one process (all its threads), plus its reaped children."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    upto = 15 if reaped_children else 13
    return sum(int(x) for x in fields[11:upto]) / CLK_TCK


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (nginx workers, a router's helper processes...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and every live descendant (each one's own utime+stime),
    plus what reaped children left in the root's cutime/cstime."""
    total = cpu_seconds(pid, reaped_children=True)
    for child in descendants(pid):
        total += cpu_seconds(child, reaped_children=True)
    return total


# --------------------------------------------------------------------------- processes


class Proc:
    """One child process, started and stopped by PID."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        env: dict[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.stop_signal = stop_signal
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=str(cwd or ROOT),
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> float:
        return tree_cpu_seconds(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            kids = descendants(self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
            # Helpers of this process that outlived it (by PID, never by name).
            for kid in kids:
                if _stat_fields(kid) is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(kid, signal.SIGKILL)
        self._log.close()

    def tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def stop_all(procs: Sequence[Proc]) -> None:
    for p in reversed(list(procs)):
        try:
            p.stop()
        except Exception as exc:  # keep stopping the others
            print(f"warning: stopping {p.name} (pid {p.pid}): {exc}", file=sys.stderr)


async def wait_http(
    url: str, timeout: float = 60.0, proc: Proc | None = None, ok: tuple[int, ...] = (200,)
) -> None:
    """Poll ``url`` until it answers one of ``ok`` (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
            try:
                async with session.get(url) as resp:
                    if resp.status in ok:
                        return
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(0.1)
    tail = f"\n{proc.tail()}" if proc is not None else ""
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s ({last}){tail}")


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    k = (len(ordered) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
