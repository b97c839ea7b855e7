# ruff: noqa: ASYNC220  (a sequential benchmark driver)
"""Where neuron-fleet's balancer spends its CPU: py-spy on the relay hot path.

Two loads, one balancer (least-outstanding, one upstream), py-spy recording the balancer's
PID (``--native`` off, 250 Hz, idle frames dropped):

- ``stream``: the relay-cost load of bench/compare.py (simulated TGI replica, batch 64,
  tokens 2 ms apart, 64 streams of ~200 tokens): per-event cost;
- ``requests``: 64 concurrent clients sending short streams (4 tokens) back to back:
  per-request cost.

Writes bench/results/profile_<mode>.txt (top frames by self and by inclusive samples,
collapsed stacks beside it as profile_<mode>.collapsed). Run:
``bench/.venv/bin/python bench/profile_balancer.py [--mode stream|requests|both]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import subprocess
import sys
import time
from pathlib import Path

from harness import BENCH, PY, Proc, free_ports, stop_all, wait_http
from loadgen import Req, run_closed, summarize
from targets import TARGETS

PYSPY = BENCH / ".venv" / "bin" / "py-spy"


def summarize_collapsed(path: Path, top: int = 30) -> str:
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = [f for f in stack.split(";") if f]
        # Drop the thread/process prefix frames py-spy adds.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        self_c[_short(frames[-1])] += count
        for f in set(map(_short, frames)):
            if not f.endswith(WRAPPERS):
                incl[f] += count
    out = [f"{total} samples\n", "## self (where the CPU is)"]
    out += [f"{c / total * 100:6.1f}%  {f}" for f, c in self_c.most_common(top)]
    out += ["", "## inclusive (what it is for)"]
    out += [f"{c / total * 100:6.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


WRAPPERS = (
    "(<frozen runpy>)", "(cli.py)", "(__main__.py)", "(__init__.py)", "(runners.py)",
    "(web_middlewares.py)", "(web_app.py)", "(web_protocol.py)",
)  # fmt: skip
"""Frames every request passes through: left out of the inclusive list."""


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    name, _, rest = frame.partition(" (")
    file = rest.split(":")[0].rsplit("/", 1)[-1] if rest else ""
    return f"{name} ({file})" if file else name


async def profile(mode: str, out_dir: Path, seconds: float) -> str:
    wd = out_dir / "tmp" / f"profile-{mode}-{time.strftime('%H%M%S')}"
    (rport, lport) = free_ports(2)
    if mode == "stream":
        replica = Proc(
            "replica",
            [
                PY,
                "-m",
                "supervisor.simulator",
                "--port",
                str(rport),
                "--batch-size",
                "64",
                "--max-concurrent-requests",
                "4096",
                "--prefill-ms-per-token",
                "0",
                "--prefill-base-ms",
                "0",
                "--decode-base-ms",
                "2",
                "--decode-ms-per-slot",
                "0",
                "--log-level",
                "WARNING",
            ],
            wd,
        )
    else:
        replica = Proc(
            "pacer",
            [
                PY,
                str(BENCH / "pacer.py"),
                "--port",
                str(rport),
                "--first-ms",
                "1",
                "--step-ms",
                "1",
            ],
            wd,
        )
    procs = [replica]
    try:
        await wait_http(f"http://127.0.0.1:{rport}/health", 60, replica)
        started = TARGETS["neuron-fleet"].launch(lport, [f"http://127.0.0.1:{rport}"], wd, batch=64)
        procs += started.procs
        await wait_http(started.url + "/health", 60, started.balancer)
        rng = random.Random(5)
        if mode == "stream":
            reqs = [Req(0.0, 4, rng.randint(100, 300), "p", i) for i in range(100_000)]
        else:
            reqs = [Req(0.0, 4, 4, "p", i) for i in range(100_000)]
        await run_closed(started.url, reqs[:64], concurrency=64, duration_s=20)  # warm
        raw = out_dir / f"profile_{mode}.collapsed"
        assert started.balancer is not None
        spy = subprocess.Popen(
            [
                str(PYSPY),
                "record",
                "--pid",
                str(started.balancer.pid),
                "--rate",
                "250",
                "--duration",
                str(int(seconds)),
                "--format",
                "raw",
                "--output",
                str(raw),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        await asyncio.sleep(1.0)
        cpu0 = started.balancer.cpu()
        res = await run_closed(started.url, reqs, concurrency=64, duration_s=seconds - 1.5)
        cpu1 = started.balancer.cpu()
        _, err = spy.communicate(timeout=seconds + 30)
        await asyncio.sleep(0.5)  # py-spy finishes writing its output after it exits
        s = summarize(res)
        events = sum(r.tokens for r in res)
        head = (
            f"# neuron-fleet balancer profile, mode {mode}\n"
            f"{s['ok']} requests, {events} events in {seconds - 1.5:.1f} s; balancer CPU "
            f"{cpu1 - cpu0:.2f} s = {(cpu1 - cpu0) / max(events, 1) * 1e5:.2f} s per 100k "
            f"events, {(cpu1 - cpu0) / max(s['ok'], 1) * 1e3:.2f} ms per request\n"
        )
        if spy.returncode != 0 or not raw.exists():
            return head + f"py-spy failed: {err.decode(errors='replace')[-500:]}"
        text = head + summarize_collapsed(raw)
        (out_dir / f"profile_{mode}.txt").write_text(text + "\n")
        return text
    finally:
        stop_all(procs)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="both", choices=["stream", "requests", "both"])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", default=str(BENCH / "results"))
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    modes = ["stream", "requests"] if args.mode == "both" else [args.mode]
    import uvloop

    for m in modes:
        print(uvloop.run(profile(m, out, args.seconds)))
        print()
    sys.exit(0)
