"""The orphan reaper that runs when `neuron-fleet serve` is a container's PID 1.

A helper process stands in for PID 1: it makes itself a child subreaper (prctl(2)
PR_SET_CHILD_SUBREAPER: orphans of its descendants are re-parented to it, as to PID 1),
lets a shell leave an orphan behind, and runs the reaper's scans.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HELPER = r"""
import ctypes, json, os, subprocess, time
from supervisor.reaper import Reaper, zombie_children

PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
# The shell exits at once; its background `sleep` becomes our orphan and then a zombie.
subprocess.run(["sh", "-c", "sleep 0.2 & echo $!"], check=True, capture_output=True)
own = subprocess.Popen(["true"])  # our own child: its owner waits for it, not the reaper
deadline = time.monotonic() + 5
while len(zombie_children(os.getpid())) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
orphans = zombie_children(os.getpid()) - {own.pid}
reaper = Reaper()
first = reaper.scan()  # seen once: left alone (an owner may be about to wait)
own.wait()  # the owner waits, as the event loop does
second = reaper.scan()
print(json.dumps({
    "orphans": len(orphans), "first": first, "second": second,
    "left": sorted(zombie_children(os.getpid())), "own_status": own.returncode,
}))
"""


def test_reaper_reaps_orphans_but_not_our_own_children() -> None:
    out = subprocess.run(
        [sys.executable, "-c", HELPER], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["orphans"] == 1, doc
    assert doc["first"] == 0 and doc["second"] == 1, doc
    assert doc["left"] == [] and doc["own_status"] == 0, doc
