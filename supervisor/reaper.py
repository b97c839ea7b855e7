"""Reap orphaned processes when ``neuron-fleet serve`` is a container's PID 1.

Linux gives a process whose parent died to PID 1 (proc(5), ``/proc/PID/stat`` field 4 is the
parent). In a container started without an init (Kubernetes runs the image's entrypoint as
PID 1), that is us: when a replica's process group is killed, the TGI launcher's shard
processes can outlive the launcher by a moment and become ours, and a child nobody waits
for stays a zombie forever (a PID-table entry per restart).

Our *own* children must not be reaped here: the event loop waits for them and would lose
their exit status. Their owners wait for them as soon as they exit, so we only reap a
zombie child of ours that is still a zombie one scan (a second) later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

log = logging.getLogger("neuron_fleet.reaper")

SCAN_INTERVAL_S = 1.0


def zombie_children(parent: int) -> set[int]:
    """PIDs of ``parent``'s children that are zombies (state Z in /proc/PID/stat)."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) >= 2 and fields[0] == b"Z" and int(fields[1]) == parent:
            found.add(int(entry.name))
    return found


class Reaper:
    """Waits for orphans that were re-parented to us; ``scan`` once per interval."""

    def __init__(self, parent: int | None = None) -> None:
        self.parent = os.getpid() if parent is None else parent
        self._seen: set[int] = set()
        self.reaped = 0

    def scan(self) -> int:
        """Reap the zombies already seen by the previous scan; how many were reaped."""
        zombies = zombie_children(self.parent)
        reaped = 0
        for pid in zombies & self._seen:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
        self._seen = zombies - (zombies & self._seen)
        if reaped:
            self.reaped += reaped
            log.debug("reaped %d orphaned process(es)", reaped)
        return reaped

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SCAN_INTERVAL_S)
            self.scan()


def needed() -> bool:
    """True when we are PID 1 (a container without an init): orphans come to us."""
    return os.getpid() == 1
