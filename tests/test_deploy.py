"""deploy/: the systemd unit, Prometheus config, alerts (+ their promtool unit tests), the
Grafana dashboard and the env example, checked with the real tools.

Tests that need promtool or systemd-analyze skip when the tool is missing, except under CI
(CI=true), where they fail: CI must install them (deploy/ci-requirements.sh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "neuron-fleet.service"
TEMPLATE_EXEC = "/opt/neuron-fleet/venv/bin/neuron-fleet"

VERIFY_ALLOWED: tuple[str, ...] = ()
"""Regexes of `systemd-analyze verify` stderr lines that are not about the unit. None was
needed with systemd 252 (Debian 12), in a container without systemd as PID 1 and with the
service user and groups missing (verify checks neither). Add one only with the reason."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str) -> str:
    """The tool's path; skip without it, but fail under CI so CI cannot pass silently."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (Debian: bash deploy/ci-requirements.sh)"
    if in_ci():
        pytest.fail(f"CI: {message}")
    pytest.skip(message)


def run_tool(*argv: str, cwd: Path | None = None, stdin: str | None = None) -> tuple[int, str]:
    proc = subprocess.run(
        argv, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


# -- systemd ------------------------------------------------------------------------------


def unit_for_verify(text: str, folder: Path, name: str = "neuron-fleet.service") -> Path:
    """The unit with ExecStart pointing at this venv's neuron-fleet (verify wants it to exist)."""
    exe = Path(sys.executable).parent / "neuron-fleet"
    assert exe.exists(), f"{exe} missing: is the project installed in this venv?"
    path = folder / name
    path.write_text(text.replace(f"ExecStart={TEMPLATE_EXEC}", f"ExecStart={exe}"))
    return path


def verify_problems(unit: Path) -> list[str]:
    """Every complaint of `systemd-analyze verify` (it exits 0 on "ignoring" warnings such as
    an unknown key or a bad value, so its stderr is what counts), minus VERIFY_ALLOWED."""
    tool = require_tool("systemd-analyze")
    proc = subprocess.run(
        [tool, "verify", "--man=no", "--generators=no", str(unit)],
        cwd=unit.parent,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    problems = [ln for ln in lines if not any(re.search(p, ln) for p in VERIFY_ALLOWED)]
    if proc.returncode != 0 and not problems:
        problems.append(f"exit code {proc.returncode}")
    return problems


def unit_directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; repeated keys kept."""
    section, out = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def seconds(value: str) -> float:
    """systemd time span ("45min", "400s", "1h 30min", "infinity") in seconds."""
    if value == "infinity":
        return float("inf")
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600, "ms": 0.001, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert verify_problems(unit_for_verify(UNIT.read_text(), tmp_path)) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("Type=notify", "Type=notfy"),  # bad value: verify only warns, exit code 0
        ("WatchdogSec=30s", "WatchdogSecs=30s"),  # unknown key: a warning too
        ("KillMode=mixed", "KillMode=sigterm-main"),
        ("ExecReload=/bin/kill", "ExecReload=bin/kill"),  # not absolute: fatal
    ],
)
def test_a_broken_unit_fails_verify(tmp_path: Path, old: str, new: str) -> None:
    text = UNIT.read_text()
    assert old in text
    problems = verify_problems(unit_for_verify(text.replace(old, new, 1), tmp_path))
    assert problems, f"verify accepted a unit with {new!r}"


def test_unit_missing_executable_fails_verify(tmp_path: Path) -> None:
    path = tmp_path / "neuron-fleet.service"
    path.write_text(UNIT.read_text().replace(TEMPLATE_EXEC, str(tmp_path / "no-such-binary")))
    assert any("not executable" in p for p in verify_problems(path))


def test_unit_settings() -> None:
    text = UNIT.read_text()
    d = {(s, k): v for s, k, v in unit_directives(text)}
    svc = {k: v for (s, k), v in d.items() if s == "Service"}
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert 10 <= seconds(svc["WatchdogSec"]) <= 120
    fleet = tomllib.loads((DEPLOY / "fleet.toml").read_text())["fleet"]
    # Start: longer than one replica's startup_timeout_s (model loading), never the 90 s default.
    assert seconds(svc["TimeoutStartSec"]) > fleet["startup_timeout_s"]
    # Stop: the drain plus the replicas' SIGTERM->SIGKILL grace must fit before systemd's kill.
    assert seconds(svc["TimeoutStopSec"]) > fleet["drain_timeout_s"] + fleet["stop_grace_s"]
    assert svc["KillMode"] == "mixed"
    assert svc["Restart"] == "on-failure"
    assert svc["OOMPolicy"] == "continue"
    assert svc["EnvironmentFile"] == "-/etc/neuron-fleet/neuron-fleet.env"
    assert svc["ExecStart"] == f"{TEMPLATE_EXEC} serve --config /etc/neuron-fleet/fleet.toml"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["User"] == "neuron-fleet"
    assert svc["LimitNOFILE"] == "65536"
    # Neuron devices: no globs in DeviceAllow (systemd does not expand them), the driver's
    # "neuron" major instead; PrivateDevices would hide /dev/neuron*.
    allows = [v for s, k, v in unit_directives(text) if k == "DeviceAllow"]
    assert allows == ["char-neuron rw"]
    assert svc["DevicePolicy"] == "closed"
    assert svc["PrivateDevices"] == "no"
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "no",
    }.items():
        assert svc[key] == value, key
    assert set(svc["RestrictAddressFamilies"].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    assert d[("Install", "WantedBy")] == "multi-user.target"


def test_every_unit_setting_is_explained() -> None:
    """Each directive belongs to a block (lines without a blank between) that has a comment."""
    unexplained = []
    block: list[str] = []
    commented = False
    for raw in [*UNIT.read_text().splitlines(), ""]:
        line = raw.strip()
        if not line or line.startswith("["):
            if not commented:
                unexplained += block
            block, commented = [], False
        elif line.startswith("#"):
            commented = True
        else:
            block.append(line)
    allowed = {"Description=neuron-fleet: TGI Neuron replicas behind a streaming balancer"}
    assert [ln for ln in unexplained if ln not in allowed] == []


def test_unit_security_exposure_is_ok(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    path = unit_for_verify(UNIT.read_text(), tmp_path)
    rc, out = run_tool(tool, "security", "--offline=yes", "--no-pager", str(path), cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert rc == 0 and match, out[-2000:]
    # 3.3 today ("OK"); systemd rates 10 (root, no sandbox) "UNSAFE".
    assert float(match.group(1)) <= 4.0, out[-3000:]


# -- Prometheus ---------------------------------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    tool = require_tool("promtool")
    rc, out = run_tool(tool, "check", "config", "prometheus.yml", cwd=DEPLOY)
    assert rc == 0, out
    assert "1 rule files found" in out
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]
    job, hosts = config["scrape_configs"]
    assert job["job_name"] == "neuron-fleet"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
    # deploy/ec2's hosts, on their metrics port (not the ALB's 8080; tests/test_deploy_scaleout).
    (ec2,) = hosts["ec2_sd_configs"]
    assert hosts["job_name"] == "neuron-fleet-ec2" and ec2["port"] == 9400


def test_alert_rules_are_valid() -> None:
    tool = require_tool("promtool")
    rc, out = run_tool(tool, "check", "rules", "alerts.yml", cwd=DEPLOY)
    assert rc == 0, out


def test_alert_unit_tests_pass() -> None:
    tool = require_tool("promtool")
    rc, out = run_tool(tool, "test", "rules", "alerts.test.yml", cwd=DEPLOY)
    assert rc == 0, out
    assert "SUCCESS" in out


def test_alert_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The promtool tests are not vacuous: a changed threshold makes them fail."""
    tool = require_tool("promtool")
    alerts = (DEPLOY / "alerts.yml").read_text()
    assert "\n          ) > 10\n" in alerts
    (tmp_path / "alerts.yml").write_text(
        alerts.replace("\n          ) > 10\n", "\n          ) > 30\n")
    )
    shutil.copy(DEPLOY / "alerts.test.yml", tmp_path)
    rc, out = run_tool(tool, "test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert rc != 0 and "NeuronFleetTimeToFirstTokenHigh" in out, out


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for g in groups for rule in g["rules"] if "alert" in rule]


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    expected = {
        "NeuronFleetDown",
        "NeuronFleetNoReadyReplica",
        "NeuronFleetReplicaDown",
        "NeuronFleetReplicaCrashLooping",
        "NeuronFleetReplicaEngineQueueing",
        "NeuronFleetQueueSaturated",
        "NeuronFleetTimeToFirstTokenHigh",
        "NeuronFleetUpstreamErrorRatioHigh",
        "NeuronFleetMidStreamFailures",
        "NeuronFleetTtftSloShedding",
        "NeuronFleetQueryOfDeath",
    }
    assert names == expected
    fires, silent = set(), set()
    for test in yaml.safe_load((DEPLOY / "alerts.test.yml").read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fires == names
    assert silent == names


def test_alerts_have_severity_and_annotations() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# -- Grafana ------------------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana-dashboard.json"


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", []) if "expr" in t]


def concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in, as Prometheus would get it."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace('"$job"', '".*"')
        .replace('"$instance"', '".*"')
    )


def test_dashboard_model() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "neuron-fleet" and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert board["__inputs"][0]["name"] == "DS_PROMETHEUS"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    titles = " | ".join(p["title"] for p in panels)
    exprs = "\n".join(dashboard_exprs())
    for needle in (
        "neuron_fleet_requests_total",
        "neuron_fleet_time_to_first_token_seconds_bucket",
        "neuron_fleet_inter_token_latency_seconds_bucket",
        "neuron_fleet_queue_depth",
        "neuron_fleet_queue_wait_seconds_bucket",
        "neuron_fleet_replica_inflight",
        "neuron_fleet_replica_state",
        "neuron_fleet_replica_restarts_total",
        "neuron_fleet_output_tokens_total",
        "neuron_fleet_replica_engine_waiting",  # TGI's tgi_queue_size or vLLM's, normalised
        "neuron_fleet_replica_engine_running",
        "tgi_request_queue_duration_bucket",
        "vllm:request_queue_time_seconds_bucket",
        "neuron_fleet_ttft_slo_requests_total",
        "neuron_fleet_ttft_forecast_error_seconds_bucket",
    ):
        assert needle in exprs, needle
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    assert "TGI" in titles and "vLLM" in titles


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool has no expression checker: the queries become recording rules it parses."""
    tool = require_tool("promtool")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": concrete(e)}
        for i, e in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    rc, out = run_tool(tool, "check", "rules", str(path))
    assert rc == 0, out
    assert f"{len(rules)} rules found" in out
    # ...and a broken query is caught.
    path.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "d", "rules": [{"record": "d:q", "expr": "sum(rate(x[1m])"}]}]}
        )
    )
    assert run_tool(tool, "check", "rules", str(path))[0] != 0


# -- env example, CI requirements ---------------------------------------------------------


def test_env_example_names_only_known_variables() -> None:
    from supervisor.config import ENV_VARS

    text = (DEPLOY / "neuron-fleet.env.example").read_text()
    names = re.findall(r"^#?([A-Z][A-Z0-9_]+)=", text, re.M)
    assert {"HF_TOKEN", "MODEL_ID", "NEURON_FLEET_ADMIN_TOKEN"} <= set(names)
    known = set(ENV_VARS) | {"NEURON_FLEET_LOG_LEVEL"}
    assert [n for n in names if n not in known] == []
    # An example holds no value for a secret.
    assert (
        re.findall(
            r"^#?(?:HF_TOKEN|NEURON_FLEET_ADMIN_TOKEN|NEURON_FLEET_API_KEYS)=(.+)$", text, re.M
        )
        == []
    )


def test_ci_requirements_script_is_valid_bash() -> None:
    script = DEPLOY / "ci-requirements.sh"
    rc, out = run_tool("bash", "-n", str(script))
    assert rc == 0, out
    text = script.read_text()
    assert "prometheus" in text and "apt-get install" in text


def test_unit_does_not_hold_the_boot_for_the_model_load() -> None:
    """A target is ordered after the units it wants unless they set DefaultDependencies=no
    (systemd.target(5)): with defaults, multi-user.target (and cloud-init's final stage after
    it) would wait for READY=1, up to TimeoutStartSec, at every boot. The defaults a service
    gets (systemd.service(5), "Default Dependencies") are written out instead."""
    unit = unit_directives(UNIT.read_text())
    values = {k: v for s, k, v in unit if s == "Unit" and k == "DefaultDependencies"}
    assert values == {"DefaultDependencies": "no"}
    ordering = {
        k: {w for s, kk, v in unit if s == "Unit" and kk == k for w in v.split()}
        for k in ("Requires", "After", "Conflicts", "Before")
    }
    assert "sysinit.target" in ordering["Requires"]
    assert {"sysinit.target", "basic.target"} <= ordering["After"]
    assert "shutdown.target" in ordering["Conflicts"] and "shutdown.target" in ordering["Before"]
    assert ("Install", "WantedBy", "multi-user.target") in unit
