"""deploy/ec2's user data, run as cloud-init runs it: as root, step by step, in a throwaway
root (tests/throwaway_root.py) with stand-ins for aws (S3 is a folder), docker and systemctl.
Everything else is real: the Python found on PATH, ``python -m venv``, pip installing the
wheel, ``neuron-fleet install-service`` creating the user and groups with useradd/groupadd,
the files and units it writes, and ``systemd-analyze verify`` on them.

The wheel from "S3" is a stand-in too (building the real one and its dependencies needs the
network): a wheel named neuron-fleet with the real console script, whose .pth puts this
checkout and this venv's packages on the path.
"""

from __future__ import annotations

import json
import re
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.test_deploy import ROOT, require_tool
from tests.test_deploy_scaleout import load_fleet, render_sub, template
from tests.throwaway_root import CLOUD_INIT_PATH, run_in_throwaway_root

pytestmark = pytest.mark.timeout(300)

WHEEL = "neuron_fleet-0.1.0-py3-none-any.whl"
PARAMETERS: dict[str, Any] = {
    "WheelS3Uri": f"s3://fleet-artifacts/{WHEEL}",
    "ModelS3Uri": "s3://fleet-artifacts/models/llama-3.1-8b",
    "TrustedProxyCidrs": ["10.0.1.0/24", "10.0.2.0/24"],
    "AWS::Region": "us-east-1",
    "AWS::StackName": "nf",
}
UNITS = "/etc/systemd/system"

STANDINS = {
    "aws": r"""#!/bin/bash
# Stand-in for the AWS CLI v2: `s3 cp` / `s3 sync` read S3 from a folder per bucket.
printf 'aws %s\n' "$*" >>/var/log/standins.log
s3root=__S3__
args=()
for a in "$@"; do case $a in --only-show-errors | --quiet) ;; *) args+=("$a") ;; esac; done
where() { case $1 in s3://*) echo "$s3root/${1#s3://}" ;; *) echo "$1" ;; esac; }
case "${args[0]:-} ${args[1]:-}" in
"s3 cp")
  src=$(where "${args[2]}") dst=$(where "${args[3]}")
  [ -f "$src" ] || { echo "fatal error: (404) Key not found: ${args[2]}" >&2; exit 1; }
  cp "$src" "$dst" ;;
"s3 sync")
  # As the real CLI: a prefix with no objects lists no keys, so nothing is copied and the
  # exit code is 0 (aws-cli issue #376; return codes: 0 = no errors).
  src=$(where "${args[2]}") dst=$(where "${args[3]}")
  mkdir -p "$dst"
  if [ -d "$src" ]; then cp -a "$src"/. "$dst"/; fi ;;
*) echo "stand-in aws: not supported: $*" >&2; exit 2 ;;
esac
""",
    "docker": r"""#!/bin/bash
# Stand-in for docker's CLI: the daemon answers `docker version`.
printf 'docker %s\n' "$*" >>/var/log/standins.log
case ${1:-} in
version) echo "Server: Docker Engine - stand-in" ;;
*) echo "stand-in docker: not supported: $*" >&2; exit 2 ;;
esac
""",
    "systemctl": r"""#!/bin/bash
# Stand-in for systemctl (no systemd as PID 1 here): logs each call with whether the drain
# hook was installed at that moment; `enable` makes the [Install] symlinks as systemctl does.
hook=no
[ -x /usr/local/sbin/neuron-fleet-lifecycle ] &&
  [ -f /etc/systemd/system/neuron-fleet-lifecycle.service ] && hook=yes
printf 'systemctl %s [hook=%s]\n' "$*" "$hook" >>/var/log/standins.log
case ${1:-} in
enable)
  shift
  for unit in "$@"; do
    file=/etc/systemd/system/$unit
    if [ -f "$file" ] && grep -q '^WantedBy=multi-user.target' "$file"; then
      mkdir -p /etc/systemd/system/multi-user.target.wants
      ln -sf "$file" "/etc/systemd/system/multi-user.target.wants/$unit"
    fi
  done ;;
daemon-reload | start | is-active) ;;
*) echo "stand-in systemctl: not supported: $*" >&2; exit 2 ;;
esac
""",
    "apt-get": r"""#!/bin/bash
# Stand-in for apt-get: no network here; the AMI stand-in has what the user data needs.
printf 'apt-get %s\n' "$*" >>/var/log/standins.log
echo "stand-in apt-get: refused (the throwaway root has no network)" >&2
exit 100
""",
}

COLLECT = r"""
import json, os, pwd, stat, subprocess, sys
units = ["/etc/systemd/system/neuron-fleet.service",
         "/etc/systemd/system/neuron-fleet-lifecycle.service"]
def run(*argv, cwd=None):
    p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    return {"rc": p.returncode, "out": p.stdout + p.stderr}
def describe(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    info = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "dir": stat.S_ISDIR(st.st_mode)}
    if not info["dir"] and st.st_size < 100_000 and not path.endswith(".env"):
        info["text"] = open(path, errors="replace").read()
    return info
paths = units + ["/usr/local/sbin/neuron-fleet-lifecycle", "/etc/neuron-fleet/fleet.toml",
                 "/etc/neuron-fleet/neuron-fleet.env", "/opt/neuron-fleet/venv/bin/neuron-fleet",
                 "/opt/neuron-fleet/models/model/neuron_config.json"]
wants = "/etc/systemd/system/multi-user.target.wants"
report = {
    "rc": int(open("/var/log/script.rc").read()),
    "log": open("/var/log/script.out", errors="replace").read()[-20000:],
    "calls": open("/var/log/standins.log").read().splitlines()
    if os.path.exists("/var/log/standins.log") else [],
    "id": run("id", "neuron-fleet"),
    "groups": run("id", "-nG", "neuron-fleet")["out"].split(),
    "getent": {g: run("getent", "group", g) for g in ("neuron", "docker", "neuron-fleet")},
    "files": {p: describe(p) for p in paths},
    "wants": sorted(os.listdir(wants)) if os.path.isdir(wants) else [],
    # The env file's variable names (never its values: they are secrets).
    "env_names": [line.split("=", 1)[0] for line in open(paths[4]).read().splitlines()
                  if "=" in line and not line.startswith("#")]
    if os.path.exists(paths[4]) else [],
}
try:
    report["passwd"] = list(pwd.getpwnam("neuron-fleet"))
except KeyError:
    report["passwd"] = None
if all(os.path.exists(u) for u in units) and sys.argv[1:]:
    report["verify"] = run(sys.argv[1], "verify", "--man=no", "--generators=no", *units,
                           cwd="/etc/systemd/system")
print(json.dumps(report))
"""


def render_user_data(values: dict[str, Any]) -> str:
    data = template()["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    defaults = {k: str(v.get("Default", "")) for k, v in template()["Parameters"].items()}
    return render_sub(data["UserData"]["Fn::Base64"]["Sub"], {**defaults, **values})


def stand_in_wheel(path: Path) -> None:
    """A wheel named neuron-fleet 0.1.0, with the real console script; its .pth puts this
    checkout and this venv's site-packages on the new venv's path."""
    info = "neuron_fleet-0.1.0.dist-info"
    files = {
        "neuron_fleet_checkout.pth": f"{ROOT}\n{sysconfig.get_paths()['purelib']}\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: neuron-fleet\nVersion: 0.1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{info}/entry_points.txt": "[console_scripts]\nneuron-fleet = supervisor.cli:main\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


def chosen_python() -> str | None:
    """The Python the user data will pick on this machine (its own rule), or None."""
    import shutil
    import subprocess

    for candidate in ("python3.13", "python3.12", "python3.11", "python3"):
        found = shutil.which(candidate, path=CLOUD_INIT_PATH)
        if found:
            probe = subprocess.run(
                [found, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.returncode == 0 and tuple(map(int, probe.stdout.split("."))) >= (3, 11):
                return probe.stdout.strip()
    return None


def boot(tmp_path: Path, *, with_model: bool = True, again_after: str | None = None) -> dict:
    """One boot of an instance: the user data, then what it left behind. ``again_after``:
    shell run after the user data, then the user data once more (cloud-init re-running it:
    a new instance id on the same disk, `cloud-init clean`, an operator re-running it)."""
    # The stand-in wheel reuses this venv's packages (compiled for this Python's version).
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if chosen_python() != here:
        pytest.skip(f"the user data would pick Python {chosen_python()}, these tests run {here}")
    s3 = tmp_path / "s3" / "fleet-artifacts"
    (s3 / "models").mkdir(parents=True)
    stand_in_wheel(s3 / WHEEL)
    if with_model:
        model = s3 / "models" / "llama-3.1-8b"
        model.mkdir()
        (model / "neuron_config.json").write_text(json.dumps({"batch_size": 8, "tp_degree": 8}))
    standins = tmp_path / "standins"
    standins.mkdir()
    for name, text in STANDINS.items():
        (standins / name).write_text(text.replace("__S3__", str(tmp_path / "s3")))
        (standins / name).chmod(0o755)
    script = tmp_path / "user-data.sh"
    script.write_text(render_user_data(PARAMETERS))
    if again_after is not None:
        first = tmp_path / "user-data-once.sh"
        script.rename(first)
        script.write_text(
            f"set -e\nbash {first}\n{again_after}\necho '--- second run' >>/var/log/standins.log\n"
            f"bash {first}\n"
        )
    collector = tmp_path / "collect.py"
    collector.write_text(COLLECT)
    verify = require_tool("systemd-analyze")
    proc = run_in_throwaway_root(
        script, standins, tmp_path / "scratch", [sys.executable, str(collector), verify]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def service_lines(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", text, re.M))


def test_user_data_boots_a_host(tmp_path: Path) -> None:
    report = boot(tmp_path)
    log = report["log"]
    assert report["rc"] == 0, log

    # The service user and its groups exist: the unit can start (no 217/USER, 216/GROUP).
    assert report["id"]["rc"] == 0, report["id"]
    assert report["groups"] == ["neuron-fleet"], report["groups"]
    # SupplementaryGroups= (the unit) adds neuron and docker to the service's processes only;
    # systemd needs them to exist (216/GROUP otherwise), not to list the user.
    for group in ("neuron", "docker"):
        assert report["getent"][group]["rc"] == 0, report["getent"]
        assert int(report["getent"][group]["out"].split(":")[2]) < 1000  # system groups
    _, _, uid, _, _, home, shell = report["passwd"]
    assert uid < 1000 and home == "/var/lib/neuron-fleet" and shell == "/usr/sbin/nologin"

    files = report["files"]
    unit = service_lines(files[f"{UNITS}/neuron-fleet.service"]["text"])
    assert unit["User"] == unit["Group"] == "neuron-fleet"
    assert unit["SupplementaryGroups"] == "neuron docker"
    assert unit["ExecStart"] == (
        "/opt/neuron-fleet/venv/bin/neuron-fleet serve --config /etc/neuron-fleet/fleet.toml"
    )
    assert files["/opt/neuron-fleet/venv/bin/neuron-fleet"]["mode"] & 0o111
    env = files["/etc/neuron-fleet/neuron-fleet.env"]
    assert (env["mode"], env["uid"]) == (0o600, 0)
    assert files["/opt/neuron-fleet/models/model/neuron_config.json"] is not None
    hook = files["/usr/local/sbin/neuron-fleet-lifecycle"]
    assert hook["mode"] == 0o755 and "complete-lifecycle-action" in hook["text"]
    hook_unit = files[f"{UNITS}/neuron-fleet-lifecycle.service"]["text"]
    # Active while the model loads: not ordered after the (Type=notify) service.
    assert "neuron-fleet.service" not in service_lines(hook_unit).get("After", "")
    assert {"neuron-fleet-lifecycle.service", "neuron-fleet.service"} <= set(report["wants"])
    assert report["verify"]["rc"] == 0 and report["verify"]["out"].strip() == "", report["verify"]

    # The config it serves: metrics off the ALB's port, keep-alive above the ALB's idle.
    config = load_fleet(files["/etc/neuron-fleet/fleet.toml"]["text"], tmp_path)
    assert config.balancer.port == 8080 and config.balancer.metrics_listen == "0.0.0.0:9400"
    assert config.balancer.client_timeout_s > 300
    assert config.launcher.docker.image == template()["Parameters"]["TgiImage"]["Default"]

    # The order of steps, from the stand-ins' log.
    calls = report["calls"]
    assert not [c for c in calls if c.startswith("apt-get")], calls  # the AMI had it all
    wheel_copy = f"aws s3 cp --only-show-errors {PARAMETERS['WheelS3Uri']} /tmp/"
    assert calls.index("docker version") < calls.index(wheel_copy)
    systemctl = [c for c in calls if c.startswith("systemctl")]
    starts = [c for c in systemctl if c.startswith("systemctl start") and "docker" not in c]
    # Queued, not waited for (cloud-init's final stage would wait for the model to load),
    # and only once the drain hook is in place.
    assert starts == [
        "systemctl start --no-block neuron-fleet-lifecycle.service [hook=yes]",
        "systemctl start --no-block neuron-fleet.service [hook=yes]",
    ], systemctl
    assert systemctl[-1] == starts[-1]
    assert not [c for c in systemctl if "--now" in c]
    enable = systemctl.index(
        "systemctl enable neuron-fleet-lifecycle.service neuron-fleet.service [hook=yes]"
    )
    assert systemctl.index("systemctl daemon-reload [hook=yes]") < enable


def test_a_failed_step_stops_the_boot_before_anything_starts(tmp_path: Path) -> None:
    report = boot(tmp_path, with_model=False)
    assert report["rc"] != 0
    # `s3 sync` of the missing prefix "succeeded" (exit 0, nothing copied): the user data's
    # own check stops the boot, naming the parameter's value.
    calls = report["calls"]
    assert f"aws s3 sync --only-show-errors {PARAMETERS['ModelS3Uri']} " in "\n".join(calls)
    assert f"no neuron_config.json under {PARAMETERS['ModelS3Uri']}" in report["log"]
    assert not [c for c in report["calls"] if "neuron-fleet" in c and "systemctl" in c]
    assert report["passwd"] is None  # install-service never ran


def test_stand_ins_are_written_as_shell() -> None:
    for name, text in STANDINS.items():
        assert text.startswith("#!/bin/bash\n"), name
    assert textwrap.dedent(COLLECT).strip().startswith("import json")


def test_user_data_run_twice_changes_nothing_and_keeps_the_secrets(tmp_path: Path) -> None:
    """Two runs in a row (an operator re-running it, or cloud-init on a new instance id): the
    second succeeds, keeps the env file the operator filled in (HF_TOKEN, mode 0600), creates
    no second user, and never prints the token."""
    token = "hf_SeCrEtToKeN0123456789"
    env = "/etc/neuron-fleet/neuron-fleet.env"
    report = boot(tmp_path, again_after=f"echo 'HF_TOKEN=\"{token}\"' >>{env}; chmod 0644 {env}")
    assert report["rc"] == 0, report["log"]
    calls = report["calls"]
    second = calls[calls.index("--- second run") + 1 :]
    assert "systemctl start --no-block neuron-fleet.service [hook=yes]" in second
    assert "created        user" not in report["log"].split("neuron-fleet install-service")[-1]
    assert report["groups"] == ["neuron-fleet"]
    files = report["files"]
    assert (files[env]["mode"], files[env]["uid"]) == (0o600, 0)  # the mode put right
    assert report["env_names"].count("HF_TOKEN") == 1  # kept, not replaced by the example
    assert report["env_names"].count("NEURON_FLEET_ADMIN_TOKEN") == 1  # not a second one
    assert token not in report["log"]
    assert report["verify"]["rc"] == 0, report["verify"]


def lifecycle_script() -> str:
    """The drain hook the user data writes (its heredoc), with the template's values."""
    text = render_user_data(PARAMETERS)
    match = re.search(
        r"cat > /usr/local/sbin/neuron-fleet-lifecycle <<'EOF'\n(.*?)\nEOF\n", text, re.S
    )
    assert match, "the user data no longer writes the lifecycle hook"
    return match.group(1)


def test_drain_hook_stops_the_service_before_letting_the_termination_continue(
    tmp_path: Path,
) -> None:
    """The hook as written, run with stand-ins for curl (IMDS: InService twice, then
    Terminated), sleep, systemctl and aws: it waits, stops (drains) the service, and only then
    completes the lifecycle action, for this instance, on the template's hook."""
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    standins = {
        "curl": r"""#!/bin/bash
case "$*" in
*api/token*) echo TOKEN ;;
*target-lifecycle-state*)
  n=$(cat "$STATE_COUNT" 2>/dev/null || echo 0); echo $((n + 1)) >"$STATE_COUNT"
  if [ "$n" -lt 2 ]; then echo InService; else echo Terminated; fi ;;
*instance-id*) echo i-0123456789abcdef0 ;;
*) exit 22 ;;
esac
""",
        "sleep": '#!/bin/bash\necho "sleep $*" >>"$CALLS"\n',
        "systemctl": '#!/bin/bash\necho "systemctl $*" >>"$CALLS"\n',
        "aws": '#!/bin/bash\necho "aws $*" >>"$CALLS"\n',
    }
    for name, text in standins.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "neuron-fleet-lifecycle"
    script.write_text(lifecycle_script())
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CALLS": str(log),
        "STATE_COUNT": str(tmp_path / "count"),
        # What the hook's unit sets (Environment=), from the template.
        "REGION": "us-east-1",
        "ASG": "nf-hosts",
        "HOOK": "drain",
    }
    proc = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls == [
        "sleep 5",
        "sleep 5",
        "systemctl stop neuron-fleet.service",
        "aws autoscaling complete-lifecycle-action --region us-east-1 --auto-scaling-group-name "
        "nf-hosts --lifecycle-hook-name drain --instance-id i-0123456789abcdef0 "
        "--lifecycle-action-result CONTINUE",
    ], calls
    # The names the hook's unit passes are the template's own.
    unit = render_user_data(PARAMETERS)
    assert "Environment=REGION=us-east-1 ASG=nf-hosts HOOK=drain" in unit
    hook = template()["Resources"]["AutoScalingGroup"]["Properties"]
    assert hook["LifecycleHookSpecificationList"][0]["LifecycleHookName"] == "drain"
