"""neuron-fleet vs optimum-neuron's data-parallel front, in front of the same vLLM replicas.

optimum-neuron's ``optimum-cli neuron serve --data-parallel-size N`` (main branch; in no
release up to 0.4.5) runs N ``python -m vllm.entrypoints.openai.api_server`` processes
(``optimum/neuron/vllm/server_manager.py`` ``VLLMServerManager``) behind an aiohttp
round-robin proxy (``optimum/neuron/vllm/reverse_proxy.py`` ``RoundRobinProxy``), composed by
``optimum/commands/neuron/serve.py`` (``run_data_parallel``): start the servers, wait for
every ``/health``, serve the proxy until it stops *or any server exits*, then stop them all.

Here both pieces are imported from an optimum-neuron installed in a throwaway venv
(``--optimum-python``; the run recorded in BENCHMARKS.md used commit 213224e6, 2026-08-19),
and composed as serve.py composes them. ``serve.py`` itself cannot run without Neuron
hardware (it needs torch-neuronx, vllm and a compiled model), so its composition is
restated in ``optimum_front`` below, in the same order, citing it. A stand-in ``vllm``
package (written to a temp folder, on ``PYTHONPATH``) makes ``python -m
vllm.entrypoints.openai.api_server`` exec neuron-fleet's vLLM 0.11 simulator with the same
flags, so their manager starts exactly the replicas ``neuron-fleet demo --engine vllm``
starts: batch (max-num-seqs) 8, 16,512-token context, inf2 timings / ``--speed``.

Scenarios, each on a fresh front (loopback only, every loop bounded, every process stopped
by PID):

- ``kill``: open-loop streaming load at 60 % of capacity (the same Poisson schedule for each
  front); one replica process is SIGKILLed a third of the way in. Counts requests ok /
  failed (by kind: HTTP status, error event after tokens, cut stream, hung past the client
  timeout, connection refused), those sent from 5 s after the kill that were served, and
  whether the service still answers afterwards.
  optimum's front also without its manager (``proxy-only``: the proxy alone in front of
  replicas this script starts), as its proxy would behave under another supervisor.
- ``load``: capacity (closed loop at the fleet's slot count), then an open loop (Poisson
  arrivals) at 90 % of it: TTFT p50/p99, failures.
- ``metrics``: six scrapes of the front's ``/metrics``: replicas visible per scrape, and
  whether the front has metrics of its own.
- ``body``: request bodies of 0.5, 1.5, 3 and 12 MB: status, body shape, time.

Run by hand (not in CI), about 4 minutes on 2 cores:

    .venv/bin/python bench/vs_optimum_dp.py --optimum-python /tmp/optimum-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "neuron-fleet/simulated-llama-3.1-8b"  # what `demo` serves
BATCH = 8
MAX_MODEL_LEN = 16_512

STAND_IN = '''"""Stand-in for vllm's OpenAI server: exec neuron-fleet's vLLM 0.11 simulator."""
import os
import sys

args, out = sys.argv[1:], []
while args:
    flag = args.pop(0)
    value = args.pop(0) if args and not args[0].startswith("--") else None
    if flag in ("--model", "--served-model-name"):
        flag = "--model-id"
    out += [flag] + ([value] if value is not None else [])
python = os.environ["NF_SIM_PYTHON"]
extra = os.environ.get("NF_SIM_EXTRA", "").split()
os.execv(python, [python, "-m", "supervisor.simulator", "--engine", "vllm", *out, *extra])
'''


# --------------------------------------------------------------------------- their front
def optimum_front(argv: Sequence[str]) -> int:
    """Run under the throwaway venv's interpreter: optimum-neuron's pieces, composed as
    optimum/commands/neuron/serve.py ``run_data_parallel`` does (start, wait for every
    /health, proxy until it stops or any server exits, shut every server down)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--proxy-only", metavar="PORTS", help="comma-separated upstream ports")
    parser.add_argument("vllm_args", nargs="*")
    args = parser.parse_args(argv)
    import logging

    from optimum.neuron.vllm.reverse_proxy import RoundRobinProxy
    from optimum.neuron.vllm.server_manager import VLLMServerManager

    logging.basicConfig(level=logging.INFO)
    if args.proxy_only:
        ports = [int(p) for p in args.proxy_only.split(",")]
        proxy = RoundRobinProxy(upstream_ports=ports, listen_port=args.port)
        asyncio.run(proxy.run())
        return 0
    # serve.py: _allocate_internal_ports(user_port, count) = user_port + 1 + i
    ports = [args.port + 1 + i for i in range(args.replicas)]
    manager = VLLMServerManager(ports=ports, tp_size=8, vllm_args=list(args.vllm_args))
    proxy = RoundRobinProxy(upstream_ports=ports, listen_port=args.port)

    async def run_data_parallel() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        manager.start()
        try:
            monitor = asyncio.create_task(asyncio.to_thread(manager.monitor))
            ready = asyncio.create_task(proxy.wait_for_backends(timeout=600))
            done, _ = await asyncio.wait([monitor, ready], return_when=asyncio.FIRST_COMPLETED)
            if monitor in done:
                return monitor.result() or 1
            served = asyncio.create_task(proxy.run())
            done, pending = await asyncio.wait(
                [served, monitor], return_when=asyncio.FIRST_COMPLETED
            )
            for t in pending:
                t.cancel()
            return (monitor.result() or 0) if monitor in done else 0
        finally:
            manager.shutdown()

    try:
        return asyncio.run(run_data_parallel())
    except asyncio.CancelledError:
        return 0


# --------------------------------------------------------------------------- harness side
def _harness() -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    import harness
    import loadgen

    return harness, loadgen


class Front:
    """One front (and its replicas) on free loopback ports."""

    def __init__(self, kind: str, log_dir: Path, opts: argparse.Namespace) -> None:
        harness, _ = _harness()
        self.kind = kind
        log_dir = log_dir / f"{kind}-{len(list(log_dir.glob(kind + '-*')))}"  # one per run
        self.procs: list[Any] = []
        port = _free_block(opts.replicas + 1)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        sim_extra = f"--speed {opts.speed:g} --seed 42"
        env = {"NF_SIM_PYTHON": sys.executable, "NF_SIM_EXTRA": sim_extra}
        if kind.startswith("neuron-fleet-cap"):
            # The balancer alone (no supervisor) with another slot cap, over replicas
            # started here: `neuron-fleet balance --engine vllm --max-inflight-per-replica N`.
            argv = [str(Path(sys.executable).parent / "neuron-fleet"), "balance", "--engine"]
            argv += ["vllm", "--listen", f"127.0.0.1:{port}"]
            argv += ["--max-inflight-per-replica", kind.removeprefix("neuron-fleet-cap")]
            for i, p in enumerate(range(port + 1, port + 1 + opts.replicas)):
                argv += ["--upstream", f"replica-{i}=http://127.0.0.1:{p}"]
                self.procs.append(harness.Proc(f"{kind}-replica-{i}", _sim(p, sim_extra), log_dir))
            self.root = harness.Proc(kind, argv, log_dir, env=env)
        elif kind == "neuron-fleet":
            argv = [
                str(Path(sys.executable).parent / "neuron-fleet"),
                "demo",
                "--engine",
                "vllm",
                "--listen",
                f"127.0.0.1:{port}",
                "--replicas",
                str(opts.replicas),
                "--speed",
                f"{opts.speed:g}",
            ]
            self.root = harness.Proc(kind, argv, log_dir, env=env)
        else:
            stand_in = Path(tempfile.mkdtemp(prefix="vllm-stand-in-"))
            pkg = stand_in / "vllm" / "entrypoints" / "openai"
            pkg.mkdir(parents=True)
            for folder in (stand_in / "vllm", stand_in / "vllm" / "entrypoints", pkg):
                (folder / "__init__.py").write_text("")
            (pkg / "api_server.py").write_text(STAND_IN)
            env["PYTHONPATH"] = f"{stand_in}:{ROOT}"
            vllm_args = [
                "--model",
                MODEL,
                "--max-num-seqs",
                str(BATCH),
                "--max-model-len",
                str(MAX_MODEL_LEN),
            ]
            front = [opts.optimum_python, str(Path(__file__).resolve()), "optimum-front"]
            front += ["--port", str(port), "--replicas", str(opts.replicas)]
            if kind == "optimum-proxy-only":
                ports = list(range(port + 1, port + 1 + opts.replicas))
                for i, p in enumerate(ports):
                    self.procs.append(
                        harness.Proc(f"{kind}-replica-{i}", _sim(p, sim_extra), log_dir)
                    )
                front += ["--proxy-only", ",".join(map(str, ports))]
            else:
                front += ["--", *vllm_args]
            self.root = harness.Proc(kind, front, log_dir, env=env)
        self.procs.append(self.root)

    async def ready(self, replicas: int) -> None:
        harness, _ = _harness()
        await harness.wait_http(f"{self.url}/health", timeout=90, proc=self.root)
        if self.kind.startswith("neuron-fleet"):  # /health: one replica ready (min_ready)
            deadline = time.monotonic() + 60
            while await _metric(self.url, "neuron_fleet_replicas_ready") < replicas:
                if time.monotonic() > deadline:
                    raise RuntimeError(self.root.tail())
                await asyncio.sleep(0.2)

    def replica_pids(self) -> list[int]:
        """The simulator processes serving this front (by PID: children we started)."""
        harness, _ = _harness()
        pids = [p.pid for p in self.procs if p is not self.root]
        pids += [
            pid
            for pid in harness.descendants(self.root.pid)
            if b"supervisor.simulator" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        return sorted(pids)

    def stop(self) -> None:
        harness, _ = _harness()
        harness.stop_all(self.procs)


def _sim(port: int, extra: str) -> list[str]:
    """One vLLM-wire replica, as the stand-in runs it for optimum's manager."""
    argv = [sys.executable, "-m", "supervisor.simulator", "--engine", "vllm", "--port", str(port)]
    argv += ["--model-id", MODEL, "--batch-size", str(BATCH), "--max-model-len"]
    return [*argv, str(MAX_MODEL_LEN), *extra.split()]


def _free_block(size: int) -> int:
    import socket

    for base in range(20_000, 60_000, 97):
        socks = []
        try:
            for p in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


async def _metric(url: str, name: str) -> float:
    import aiohttp

    try:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return 0.0
    return sum(
        float(line.rsplit(None, 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {"
    )


def _sampler(rng: Any) -> tuple[int, int, str]:
    """Chat-sized requests: ~1,500-token prompts, 96-160 output tokens."""
    return rng.randint(1_200, 1_800), rng.randint(96, 160), "chat"


async def _alive(url: str) -> tuple[int | str, bool]:
    """The front's /health, and whether one fresh request is served completely."""
    import aiohttp

    _, loadgen = _harness()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.get(f"{url}/health") as resp:
                health: int | str = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        health = type(exc).__name__
    res = await loadgen.run_open(url, [loadgen.Req(0.0, 100, 8)], model=MODEL, timeout_s=20)
    return health, res[0].ok


async def scenario_kill(front: Front, opts: argparse.Namespace, rate: float) -> dict[str, Any]:
    """Open loop (the same Poisson schedule for every front) at ``rate``; one replica is
    SIGKILLed a third of the way in. A request that gets no answer within the client
    timeout is *hung*."""
    _, loadgen = _harness()
    reqs = loadgen.poisson_schedule(_sampler, rate, int(rate * opts.duration), seed=11)
    victim = front.replica_pids()[1]
    kill_at = opts.duration / 3

    async def killer() -> None:
        await asyncio.sleep(kill_at)
        os.kill(victim, signal.SIGKILL)  # a replica this script started (directly or not)

    kill = asyncio.create_task(killer())
    results = await loadgen.run_open(front.url, reqs, model=MODEL, timeout_s=opts.client_timeout)
    await kill
    summary = loadgen.summarize(results)
    errors = {("hung" if k == "TimeoutError" else k): v for k, v in summary["errors"].items()}
    after = [r for r in results if r.scheduled >= kill_at + 5]  # once any restart is done
    await asyncio.sleep(2)  # a supervisor (if any) notices the exit
    health, served = await _alive(front.url)
    restarts = 0.0
    if front.kind == "neuron-fleet":
        restarts = await _metric(front.url, "neuron_fleet_replica_restarts_total")
    return {
        "replica_restarts": restarts,
        "sent": summary["requests"],
        "ok": summary["ok"],
        "failed": summary["failed"],
        "errors": errors,
        "ok_from_5s_after_kill": f"{sum(r.ok for r in after)}/{len(after)}",
        "front_process_alive": front.root.alive(),
        "health_after": health,
        "fresh_request_ok": served,
    }


async def scenario_load(front: Front, opts: argparse.Namespace, rate: float) -> dict[str, Any]:
    _, loadgen = _harness()
    n = int(rate * opts.duration)
    reqs = loadgen.poisson_schedule(_sampler, rate, n, seed=5)
    results = await loadgen.run_open(front.url, reqs, model=MODEL, timeout_s=opts.client_timeout)
    s = loadgen.summarize(results)
    keys = ("requests", "ok", "failed", "errors", "req_per_s", "ttft_p50", "ttft_p99", "itl_p99")
    return {k: s[k] for k in keys}


async def capacity(front: Front, opts: argparse.Namespace) -> float:
    _, loadgen = _harness()
    reqs = loadgen.fixed_requests(_sampler, 3000, seed=3)
    warm = opts.duration / 4
    results = await loadgen.run_closed(
        front.url,
        reqs,
        concurrency=BATCH * opts.replicas,
        duration_s=opts.duration + warm,
        model=MODEL,
        timeout_s=opts.client_timeout,
        spread_s=1.0,
    )
    return loadgen.summarize(results, window=(warm, opts.duration + warm))["req_per_s"]


async def scenario_metrics(front: Front) -> dict[str, Any]:
    import aiohttp

    per_scrape, own, status = [], 0, 0
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.get(f"{front.url}/metrics") as resp:
                status = resp.status
                text = await resp.text()
            running = [ln for ln in text.splitlines() if ln.startswith("vllm:num_requests_running")]
            per_scrape.append(len(running))
            own = sum(1 for ln in text.splitlines() if ln.startswith("# TYPE neuron_fleet_"))
    return {"status": status, "replicas_per_scrape": per_scrape, "front_metric_families": own}


async def scenario_body(front: Front) -> list[dict[str, Any]]:
    import aiohttp

    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        for mb in (0.5, 1.5, 3, 12):
            content = "x" * int(mb * 1_000_000)
            body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
            start = time.perf_counter()
            try:
                async with s.post(f"{front.url}/v1/chat/completions", json=body) as resp:
                    raw = await resp.read()
                    status: int | str = resp.status
                    try:
                        doc = json.loads(raw)
                        shape = "vLLM JSON" if isinstance(doc.get("error"), dict) else "JSON"
                    except ValueError:
                        shape = f"text: {raw[:60].decode(errors='replace')!r}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, shape = type(exc).__name__, "-"
            ms = (time.perf_counter() - start) * 1e3
            rows.append({"MB": mb, "status": status, "body": shape, "ms": round(ms)})
    return rows


async def main(opts: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="vs-optimum-"))
    print(f"logs: {log_dir}", flush=True)
    report: dict[str, Any] = {}

    async def on(kind: str, job: Any) -> Any:
        front = Front(kind, log_dir, opts)
        try:
            await front.ready(opts.replicas)
            return await job(front)
        finally:
            front.stop()

    fronts = ("neuron-fleet", "optimum-dp")
    if "kill" in opts.only or "load" in opts.only:
        cap = await on("neuron-fleet", lambda f: capacity(f, opts))
        report["capacity_req_per_s"] = cap
        print("capacity (neuron-fleet, closed loop at the slot count):", cap, flush=True)
    if "kill" in opts.only:
        for kind in (*fronts, "optimum-proxy-only"):
            key = f"kill/{kind}"
            report[key] = await on(kind, lambda f: scenario_kill(f, opts, 0.6 * cap))
            print(kind, "kill at 60% load", report[key], flush=True)
    if "load" in opts.only:
        for kind in (*fronts, *opts.extra_fronts):
            key = f"load90/{kind}"
            report[key] = await on(kind, lambda f: scenario_load(f, opts, 0.9 * cap))
            print(kind, "90% load", report[key], flush=True)
    if "metrics" in opts.only:
        for kind in fronts:
            report[f"metrics/{kind}"] = await on(kind, scenario_metrics)
            print(kind, "metrics", report[f"metrics/{kind}"], flush=True)
    if "body" in opts.only:
        for kind in fronts:
            report[f"body/{kind}"] = await on(kind, scenario_body)
            print(kind, "body", report[f"body/{kind}"], flush=True)
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["optimum-front"]:
        sys.exit(optimum_front(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimum-python", required=True, help="interpreter of the venv")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--speed", type=float, default=2.0, help="simulator speed")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per load")
    parser.add_argument("--client-timeout", type=float, default=30.0)
    parser.add_argument("--only", nargs="*", default=["kill", "load", "metrics", "body"])
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    parser.add_argument(
        "--extra-fronts",
        nargs="*",
        default=[],
        metavar="neuron-fleet-capN",
        help="also run the load scenario on `neuron-fleet balance` with slot cap N",
    )
    options = parser.parse_args()
    figures = json.dumps(asyncio.run(main(options)), indent=1, default=str)
    print(figures)
    if options.json:
        Path(options.json).write_text(figures + "\n")
