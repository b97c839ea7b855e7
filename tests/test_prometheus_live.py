"""The deploy files against a running `neuron-fleet demo` (3 simulated replicas):

- the live /metrics passes `promtool check metrics` (the balancer's families cleanly; the
  replicas' re-exported tgi_* families keep TGI's own counter names, which promtool's
  naming lint flags and nothing else), and every metric name the dashboard and the alerts
  query exists there (exact series names, suffixes included);
- a real Prometheus server, with deploy/prometheus.yml at a 1 s scrape interval and
  deploy/alerts.yml loaded, scrapes the demo: after some streaming requests its HTTP API
  returns the balancer's series with the right values (requests, TTFT count, 3 ready
  replicas) and the replicas' re-exported tgi_* series; every alert rule evaluates without
  error and none fires; every dashboard query runs;
- the unit's notify contract, from the real process: READY=1, WATCHDOG=1, STOPPING=1, all
  from the main PID.

Skips without promtool / prometheus, fails without them under CI=true. Every wait is
bounded; processes started here are stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.test_deploy import DEPLOY, concrete, dashboard_exprs, require_tool, run_tool

pytestmark = pytest.mark.timeout(120)

LOOPBACK = "127.0.0.1"
REPLICAS = 3
WAIT_S = 60.0
NAME_RE = re.compile(r"\b(?:neuron_fleet_\w+|tgi_\w+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
LINT_EXIT = 3
"""promtool check metrics: 1 = does not parse, 3 = parses but has lint findings."""
TGI_NAMING_LINT = re.compile(
    r"tgi_\w+ (counter metrics should have \"_total\" suffix"
    r"|non-histogram and non-summary metrics should not have \"_count\" suffix)"
)
"""What promtool says of TGI's counter names (tgi_request_count, ...), kept as TGI has them."""


def replica_line(line: str) -> bool:
    """A line of a re-exported replica family (tgi_*, vllm:*)."""
    name = line.split()[2] if line.startswith(("# HELP ", "# TYPE ")) else line
    return name.startswith(("tgi_", "vllm:"))


# -- processes ----------------------------------------------------------------------------


def free_port_block(size: int) -> int:
    """A port P with P..P+size-1 free (the demo puts its replicas right after the balancer)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            base = s.getsockname()[1]
        if base + size > 65535:
            continue
        try:
            held = []
            for port in range(base, base + size):
                sock = socket.socket()
                held.append(sock)
                sock.bind((LOOPBACK, port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return base
    raise AssertionError("no block of free loopback ports")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """SIGTERM, bounded wait, then SIGKILL: by PID, only this process."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def rules_evaluated(prom: str) -> list[dict[str, Any]]:
    """Prometheus's alert rules once it has evaluated every one of them, else []."""
    groups = json.loads(http_get(f"{prom}/api/v1/rules"))["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    done = all(not r["lastEvaluation"].startswith("0001") for r in rules)
    return rules if rules and done else []


def wait_for(predicate: Any, what: str, timeout: float = WAIT_S, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})\n{tail}")


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def metric_values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@dataclass
class Demo:
    url: str
    proc: subprocess.Popen[Any]


@contextmanager
def running_demo(
    log: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> Iterator[Demo]:
    """`neuron-fleet demo` on a free port, running once all its replicas are ready."""
    port = free_port_block(REPLICAS + 1)
    exe = Path(sys.executable).parent / "neuron-fleet"
    argv = [str(exe), "demo", "--listen", f"{LOOPBACK}:{port}", "--speed", "50", *args]
    systemd = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    env = {**{k: v for k, v in os.environ.items() if k not in systemd}, **(env or {})}
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://{LOOPBACK}:{port}"
    try:
        # It prints the URL when the balancer serves (min_ready = 1)...
        wait_for(
            lambda: proc.poll() is None and f"behind {url}" in log.read_text(),
            "the demo's URL line",
            log=log,
        )
        assert proc.poll() is None, log.read_text()

        # ...then every replica becomes ready.
        def all_ready() -> bool:
            values = metric_values(http_get(f"{url}/metrics"))
            return values.get(("neuron_fleet_replicas_ready", frozenset())) == REPLICAS

        wait_for(all_ready, f"{REPLICAS} ready replicas", log=log)
        yield Demo(url, proc)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]


async def stream_requests(url: str, count: int, max_new_tokens: int = 8) -> int:
    """`count` streaming /generate_stream requests, 4 at a time; the tokens received."""
    body = {"inputs": "What is Inferentia?", "parameters": {"max_new_tokens": max_new_tokens}}
    timeout = aiohttp.ClientTimeout(total=30)
    limit = asyncio.Semaphore(4)

    async def one(session: aiohttp.ClientSession) -> int:
        async with limit, session.post(f"{url}/generate_stream", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.content_type == "text/event-stream"
            raw = await resp.read()
        events = [json.loads(e[5:]) for e in raw.decode().split("\n\n") if e.startswith("data:")]
        assert events and events[-1]["generated_text"] is not None
        return sum(1 for e in events if "token" in e)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        tokens = await asyncio.gather(*(one(session) for _ in range(count)))
        # One OpenAI-style stream and one non-streaming call: more routes in the metrics.
        chat = {
            "model": "tgi",
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": True,
            "max_tokens": 4,
        }
        async with session.post(f"{url}/v1/chat/completions", json=chat) as resp:
            assert resp.status == 200
            await resp.read()
        async with session.post(f"{url}/generate", json=body) as resp:
            assert resp.status == 200
            await resp.read()
    return sum(tokens)


# -- metric names -------------------------------------------------------------------------


def exposed_names(text: str) -> set[str]:
    """Every series name the exposition has or declares, as Prometheus would store it.

    Samples count as they are. A family declared with no sample yet (a labelled counter
    before its first event, e.g. neuron_fleet_stream_errors_total) counts by its declared
    name: counter families come with their _total, histograms with _bucket/_sum/_count.
    """
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind.strip() == "histogram":
                names.update(name + s for s in HISTOGRAM_SUFFIXES)
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def queried_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in NAME_RE.findall(expr)}


def alert_exprs() -> list[str]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for g in groups for rule in g["rules"]]


def test_name_check_is_exact() -> None:
    """A query must name series exactly as exposed: no suffix guessing either way."""
    text = (
        "# TYPE neuron_fleet_requests_total counter\n"
        'neuron_fleet_requests_total{code="200"} 1.0\n'
        "# TYPE neuron_fleet_errors_total counter\n"
        "# TYPE neuron_fleet_ttft_seconds histogram\n"
        'neuron_fleet_ttft_seconds_bucket{le="+Inf"} 1.0\n'
        "# TYPE tgi_request_count counter\n"  # TGI's own name: no _total
        'tgi_request_count{replica="replica-0"} 1.0\n'
    )
    names = exposed_names(text)
    used = queried_names(
        [
            "rate(neuron_fleet_requests_total[5m]) + rate(neuron_fleet_errors_total[5m])",
            "histogram_quantile(0.9, rate(neuron_fleet_ttft_seconds_bucket[5m]))",
            "sum(neuron_fleet_ttft_seconds_count) / sum(tgi_request_count)",
        ]
    )
    assert used - names == set()
    wrong = queried_names(
        ["rate(neuron_fleet_requests[5m])", "tgi_request_count_total", "neuron_fleet_ttft_seconds"]
    )
    assert wrong - names == wrong


# -- live ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_tool("promtool")
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with running_demo(log) as running:
        yield running.url


async def test_live_metrics_pass_promtool_and_cover_dashboard_and_alerts(demo: str) -> None:
    promtool = require_tool("promtool")
    assert await stream_requests(demo, 6) > 0
    async with aiohttp.ClientSession() as session, session.get(f"{demo}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()

    # The balancer's own families lint clean...
    ours = "\n".join(ln for ln in text.splitlines() if not replica_line(ln)) + "\n"
    assert "neuron_fleet_requests_total" in ours and "tgi_" not in ours
    assert run_tool(promtool, "check", "metrics", stdin=ours) == (0, "")
    # ...and the whole page parses; the only lint findings are TGI's own counter names,
    # re-exported exactly as TGI writes them (tgi_request_count, no _total) on purpose.
    rc, out = run_tool(promtool, "check", "metrics", stdin=text)
    findings = [ln for ln in out.splitlines() if ln.strip()]
    assert rc in (0, LINT_EXIT), out
    assert [ln for ln in findings if not TGI_NAMING_LINT.fullmatch(ln)] == [], out
    # The check is real: an exposition with a broken line fails it.
    assert run_tool(promtool, "check", "metrics", stdin=text + "bad metric line\n")[0] != 0

    names = exposed_names(text)
    for source, exprs in (("dashboard", dashboard_exprs()), ("alerts", alert_exprs())):
        used = queried_names(exprs)
        assert used, source
        assert sorted(used - names) == [], f"{source} queries series /metrics does not have"
    # The replicas' own series are there, per replica.
    values = metric_values(text)
    replicas = {dict(labels).get("replica") for name, labels in values if name == "tgi_queue_size"}
    assert replicas == {f"replica-{i}" for i in range(REPLICAS)}


def prometheus_query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        body = json.loads(http_get(url))
    except urllib.error.HTTPError as exc:  # 400: the query does not parse
        raise AssertionError(f"{expr}: {exc.read().decode()}") from None
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(base: str, expr: str) -> float | None:
    result = prometheus_query(base, expr)
    return float(result[0]["value"][1]) if result else None


@contextmanager
def running_prometheus(folder: Path, target: str) -> Iterator[str]:
    """Prometheus with deploy/prometheus.yml, scraping `target` every second."""
    tool = require_tool("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / name) for name in config["rule_files"]]
    job = config["scrape_configs"][0]  # the one-host job (the EC2 job needs the EC2 API)
    config["scrape_configs"] = [job]
    job["scrape_timeout"] = "1s"
    job["static_configs"][0]["targets"] = [target]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))

    port = free_port_block(1)
    log = folder / "prometheus.log"
    argv = [
        tool,
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=folder)
    base = f"http://{LOOPBACK}:{port}"
    try:
        wait_for(
            lambda: proc.poll() is None and "Ready" in http_get(f"{base}/-/ready"),
            "Prometheus ready",
            log=log,
        )
        yield base
    finally:
        stop_process(proc)


async def test_real_prometheus_scrapes_the_demo(tmp_path: Path) -> None:
    require_tool("prometheus")
    requests = 9
    with running_demo(tmp_path / "demo.log") as demo:
        url = demo.url
        target = url.removeprefix("http://")
        with running_prometheus(tmp_path, target) as prom:
            # Before any traffic: the target is up and the balancer's gauges are there.
            wait_for(lambda: scalar(prom, 'up{job="neuron-fleet"}') == 1, "target up")
            wait_for(
                lambda: scalar(prom, "neuron_fleet_replicas_ready") == REPLICAS,
                "neuron_fleet_replicas_ready == 3 in Prometheus",
            )
            tokens = await stream_requests(url, requests)

            stream_ok = 'sum(neuron_fleet_requests_total{route="/generate_stream", code="200"})'
            want = {
                stream_ok: requests,
                'sum(tgi_request_count{replica=~"replica-.*"})': requests + 2,
                "count(tgi_request_count)": REPLICAS,
                "count(count by (replica) (tgi_batch_current_size))": REPLICAS,
                "sum(neuron_fleet_time_to_first_token_seconds_count)": requests + 1,
                "sum(neuron_fleet_replicas)": REPLICAS,
                "sum(neuron_fleet_replica_up)": REPLICAS,
            }

            def values_match() -> bool:
                return all(scalar(prom, e) == v for e, v in want.items())

            try:
                wait_for(values_match, "the traffic's counts in Prometheus")
            except AssertionError:
                got = {e: scalar(prom, e) for e in want}
                raise AssertionError(f"want {want}, got {got}") from None
            # Tokens: what the client received on /generate_stream, plus the chat stream's.
            relayed = scalar(prom, "sum(neuron_fleet_output_tokens_total)")
            assert relayed is not None and relayed >= tokens
            per_replica = prometheus_query(prom, "tgi_request_count")
            assert {r["metric"]["replica"] for r in per_replica} == {
                f"replica-{i}" for i in range(REPLICAS)
            }
            assert all(r["metric"]["job"] == "neuron-fleet" for r in per_replica)

            # Every alert rule loaded and evaluates cleanly against the live series...
            rules = wait_for(lambda: rules_evaluated(prom), "alert rules evaluated")
            assert {r["name"] for r in rules} == {
                r["alert"]
                for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
                for r in g["rules"]
            }
            assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
            # ...and none fires on a healthy fleet.
            assert [r["name"] for r in rules if r["state"] != "inactive"] == []

            # Every dashboard query runs; the core panels have data (a rate needs two
            # scrapes of a series, and histogram series appear with the first request).
            for expr in dashboard_exprs():
                prometheus_query(prom, concrete(expr))
            for expr in (
                "sum by (replica) (neuron_fleet_replica_inflight)",
                "sum by (replica) (tgi_queue_size)",
                "sum by (replica) (tgi_batch_current_size)",
                "histogram_quantile(0.99, sum by (le) "
                "(rate(neuron_fleet_time_to_first_token_seconds_bucket[1m])))",
            ):
                wait_for(lambda e=expr: prometheus_query(prom, e), f"data for {expr}")


async def test_real_prometheus_scrapes_a_vllm_demo(tmp_path: Path) -> None:
    """`demo --engine vllm`: the same dashboard and alerts over vLLM replicas. The engine
    gauges come from vllm:num_requests_*; every vllm:* series the dashboard names is
    exposed; every rule evaluates cleanly and none fires; every dashboard query runs."""
    require_tool("prometheus")
    with running_demo(tmp_path / "demo.log", args=("--engine", "vllm")) as demo:
        chat = {
            "model": "neuron-fleet/simulated-llama-3.1-8b",
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": True,
            "max_tokens": 4,
        }
        async with aiohttp.ClientSession() as session:
            for _ in range(6):
                async with session.post(f"{demo.url}/v1/chat/completions", json=chat) as resp:
                    assert resp.status == 200
                    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
            async with session.get(f"{demo.url}/metrics") as resp:
                text = await resp.text()
        names = exposed_names(text)
        used = {
            name
            for expr in dashboard_exprs() + alert_exprs()
            for name in re.findall(r"\bvllm:\w+", expr)
        }
        assert used and sorted(used - names) == []
        values = metric_values(text)
        for gauge in ("neuron_fleet_replica_engine_running", "neuron_fleet_replica_engine_waiting"):
            replicas = {dict(labels).get("replica") for name, labels in values if name == gauge}
            assert replicas == {f"replica-{i}" for i in range(REPLICAS)}, gauge
        assert "tgi_" not in text  # a vLLM fleet: only vllm:* re-exported

        target = demo.url.removeprefix("http://")
        with running_prometheus(tmp_path, target) as prom:
            wait_for(
                lambda: scalar(prom, "count(neuron_fleet_replica_engine_running)") == REPLICAS,
                "the engine gauges in Prometheus",
            )

            rules = wait_for(lambda: rules_evaluated(prom), "alert rules evaluated")
            assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
            assert [r["name"] for r in rules if r["state"] != "inactive"] == []
            for expr in dashboard_exprs():
                prometheus_query(prom, concrete(expr))


# -- the unit's notify contract -----------------------------------------------------------


def test_service_speaks_the_units_notify_protocol() -> None:
    """What deploy/neuron-fleet.service relies on, from the real process: READY=1 once
    serving (Type=notify), every message from the main PID (NotifyAccess=main drops the
    rest), WATCHDOG=1 at half of WATCHDOG_USEC (WatchdogSec=), STOPPING=1 on SIGTERM."""
    from tests.test_deploy import UNIT, seconds, unit_directives

    svc = {k: v for s, k, v in unit_directives(UNIT.read_text()) if s == "Service"}
    assert (svc["Type"], svc["NotifyAccess"]) == ("notify", "main")
    assert seconds(svc["WatchdogSec"]) >= 10  # the unit's value; the test uses 2 s

    folder = tempfile.mkdtemp(prefix="nf-notify-")  # short: AF_UNIX paths are <= 107 bytes
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    messages: list[tuple[int, str]] = []  # (sender pid, datagram)

    def count(field: str) -> int:
        return sum(field in m.splitlines() for _, m in messages)

    def receive_until(done: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, f"no {what} within {timeout} s: {messages}"
            sock.settimeout(left)
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = next(
                struct.unpack("3i", cdata[:12])[0]
                for level, kind, cdata in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            messages.append((pid, data.decode()))

    try:
        sock.bind(path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
        with tempfile.TemporaryDirectory() as logs, running_demo(Path(logs) / "d.log", env) as demo:
            receive_until(lambda: count("READY=1") > 0, "READY=1", WAIT_S)
            ready = next(m for _, m in messages if "READY=1" in m.splitlines())
            assert "replicas ready" in ready  # STATUS= in the same datagram
            pings, started = count("WATCHDOG=1"), time.monotonic()
            receive_until(lambda: count("WATCHDOG=1") >= pings + 2, "2 x WATCHDOG=1", 10)
            assert time.monotonic() - started < 5  # every 1 s (WATCHDOG_USEC / 2)
            demo.proc.send_signal(signal.SIGTERM)
            receive_until(lambda: count("STOPPING=1") > 0, "STOPPING=1", 20)
            demo.proc.wait(30)
        assert count("READY=1") == 1
        assert {pid for pid, _ in messages} == {demo.proc.pid}
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)
