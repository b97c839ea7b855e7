"""``neuron-fleet install-service`` into a temporary --prefix: files, modes, secrets, unit."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

import pytest

from supervisor import install
from tests.test_deploy import DEPLOY, TEMPLATE_EXEC, unit_directives, verify_problems

pytestmark = pytest.mark.timeout(60)

SECRET = "hf_s3cr3t-VALUE-never-printed"
ADMIN = "admin-token-never-printed"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    install.add_arguments(parser)
    return parser.parse_args(list(argv))


def run_install(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = install.run(parse(*argv))
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


@pytest.fixture
def blog_env(tmp_path: Path) -> Path:
    """The blog's .env, plus secrets."""
    path = tmp_path / "blog.env"
    path.write_text(
        "MODEL_ID='/data/exportedmodel'\n"
        "MAX_BATCH_SIZE=8\n"
        "MAX_INPUT_TOKENS=16000\n"
        "MAX_TOTAL_TOKENS=16512\n"
        f"HF_TOKEN={SECRET}\n"
        f'NEURON_FLEET_ADMIN_TOKEN="{ADMIN}"\n'
    )
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def service(prefix: Path) -> dict[str, str]:
    text = (prefix / "etc/systemd/system/neuron-fleet.service").read_text()
    return {k: v for s, k, v in unit_directives(text) if s == "Service"}


def test_installs_unit_config_and_env_file(
    tmp_path: Path, blog_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "root"
    rc, out = run_install(capsys, "--prefix", str(prefix), "--env-source", str(blog_env))
    assert rc == 0, out

    unit = prefix / "etc/systemd/system/neuron-fleet.service"
    config = prefix / "etc/neuron-fleet/fleet.toml"
    env = prefix / "etc/neuron-fleet/neuron-fleet.env"
    assert mode(unit) == 0o644 and mode(config) == 0o644
    assert mode(env) == 0o600
    assert config.read_text() == (DEPLOY / "fleet.toml").read_text()

    # ExecStart: this venv's neuron-fleet, not the template's /opt path.
    exe = Path(sys.executable).parent / "neuron-fleet"
    svc = service(prefix)
    assert svc["ExecStart"] == f"{exe} serve --config /etc/neuron-fleet/fleet.toml"
    assert TEMPLATE_EXEC not in unit.read_text()
    assert svc["User"] == svc["Group"] == "neuron-fleet"
    # deploy/fleet.toml uses the docker launcher: the docker group comes along.
    assert svc["SupplementaryGroups"] == "neuron docker"
    # Only those lines differ from the shipped unit.
    shipped = (DEPLOY / "neuron-fleet.service").read_text().splitlines()
    changed = [a for a, b in zip(shipped, unit.read_text().splitlines(), strict=True) if a != b]
    assert [c.split("=")[0] for c in changed] == ["SupplementaryGroups", "ExecStart"]

    # The env file: systemd syntax, every variable, the secrets included...
    env_text = env.read_text()
    assert f'HF_TOKEN="{SECRET}"' in env_text
    assert f'NEURON_FLEET_ADMIN_TOKEN="{ADMIN}"' in env_text
    assert 'MODEL_ID="/data/exportedmodel"' in env_text
    # ...which are never printed: names only.
    assert SECRET not in out and ADMIN not in out
    assert "HF_TOKEN (secret, not shown)" in out
    assert "MAX_BATCH_SIZE" in out
    # The next commands.
    for command in (
        "useradd --system --user-group --home-dir /var/lib/neuron-fleet",
        "groupadd --system neuron",
        "systemctl daemon-reload",
        "systemctl enable --now neuron-fleet",
    ):
        assert command in out
    # deploy/fleet.toml keeps the blog's model in /home/ubuntu: ProtectHome hides it.
    assert "ProtectHome" in out


def test_installed_unit_passes_verify(
    tmp_path: Path, blog_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "root"
    assert run_install(capsys, "--prefix", str(prefix), "--env-source", str(blog_env))[0] == 0
    assert verify_problems(prefix / "etc/systemd/system/neuron-fleet.service") == []


def test_env_example_installed_without_env_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = run_install(capsys, "--prefix", str(tmp_path))
    assert rc == 0, out
    env = tmp_path / "etc/neuron-fleet/neuron-fleet.env"
    example = (DEPLOY / "neuron-fleet.env.example").read_text().splitlines()
    written = env.read_text().splitlines()
    changed = [(a, b) for a, b in zip(example, written, strict=True) if a != b]
    # The example, but with a generated admin token: the admin API always needs one.
    assert len(changed) == 1 and changed[0][0] == "#NEURON_FLEET_ADMIN_TOKEN="
    token = changed[0][1].removeprefix('NEURON_FLEET_ADMIN_TOKEN="').removesuffix('"')
    assert len(token) >= 43 and token not in out
    assert mode(env) == 0o600


def test_existing_files_kept_and_env_mode_repaired(
    tmp_path: Path, blog_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_install(capsys, "--prefix", str(tmp_path), "--env-source", str(blog_env))[0] == 0
    config = tmp_path / "etc/neuron-fleet/fleet.toml"
    env = tmp_path / "etc/neuron-fleet/neuron-fleet.env"
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    env.write_text(f"HF_TOKEN={SECRET}-rotated\n")
    env.chmod(0o644)

    rc, out = run_install(capsys, "--prefix", str(tmp_path))
    assert rc == 0, out
    assert config.read_text().endswith("# edited by the operator\n")
    # Kept as it was, but for the one thing the service now needs: an admin token.
    kept, added = env.read_text().split("\n", 1)
    assert kept == f"HF_TOKEN={SECRET}-rotated"
    assert added.startswith("# Added by `neuron-fleet install-service`")
    token = added.splitlines()[-1].removeprefix('NEURON_FLEET_ADMIN_TOKEN="').rstrip('"')
    assert len(token) >= 43 and token not in out
    assert mode(env) == 0o600
    assert "0644 -> 0600" in out and "NEURON_FLEET_ADMIN_TOKEN generated and added" in out
    assert SECRET not in out
    env.write_text(f"HF_TOKEN={SECRET}-rotated\nNEURON_FLEET_ADMIN_TOKEN=mine\n")

    # --force replaces fleet.toml, never the env file.
    rc, out = run_install(capsys, "--prefix", str(tmp_path), "--force")
    assert rc == 0, out
    assert config.read_text() == (DEPLOY / "fleet.toml").read_text()
    assert env.read_text() == f"HF_TOKEN={SECRET}-rotated\nNEURON_FLEET_ADMIN_TOKEN=mine\n"


def test_dry_run_writes_nothing(
    tmp_path: Path, blog_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = run_install(
        capsys, "--prefix", str(tmp_path), "--env-source", str(blog_env), "--dry-run"
    )
    assert rc == 0
    assert list(tmp_path.iterdir()) == [blog_env]
    assert "would write" in out and SECRET not in out


def test_native_launcher_without_device_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "fleet.toml"
    source.write_text(
        '[model]\nid = "/var/lib/neuron-fleet/models/m"\n[fleet]\nlauncher = "native"\n'
    )
    prefix = tmp_path / "root"
    rc, out = run_install(
        capsys, "--prefix", str(prefix), "--config-source", str(source), "--device-group", ""
    )
    assert rc == 0, out
    assert service(prefix)["SupplementaryGroups"] == ""
    assert "groupadd" not in out and "docker" not in out
    assert "warning" not in out
    assert verify_problems(prefix / "etc/systemd/system/neuron-fleet.service") == []


def test_secret_in_fleet_toml_is_flagged_not_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "fleet.toml"
    source.write_text(f'[model]\nid = "m"\nhf_token = "{SECRET}"\n[fleet]\nlauncher = "native"\n')
    rc, out = run_install(capsys, "--prefix", str(tmp_path / "r"), "--config-source", str(source))
    assert rc == 0
    assert "[model] hf_token" in out and SECRET not in out


def test_without_a_config_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From an installed wheel (no deploy/ beside the package): --config-source is needed."""
    monkeypatch.setattr(install, "SOURCE_DEPLOY_DIR", tmp_path / "nowhere")
    rc, out = run_install(capsys, "--prefix", str(tmp_path / "r"))
    assert rc == 2 and "--config-source" in out
    assert not (tmp_path / "r").exists()


def test_bad_env_source_does_not_echo_its_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text(f"{SECRET}\n")  # a token pasted without KEY=
    rc, out = run_install(capsys, "--prefix", str(tmp_path / "r"), "--env-source", str(bad))
    assert rc == 2 and "bad.env:1" in out and SECRET not in out


def test_embedded_copies_match_deploy_files() -> None:
    """An installed wheel has no deploy/: install.py carries the same text."""
    assert install.UNIT_TEMPLATE == (DEPLOY / "neuron-fleet.service").read_text()
    assert install.ENV_EXAMPLE == (DEPLOY / "neuron-fleet.env.example").read_text()


def test_exec_start_quoting_and_escaping() -> None:
    assert install.systemd_word("/opt/nf/bin/neuron-fleet") == "/opt/nf/bin/neuron-fleet"
    assert install.systemd_word("/opt/my venv/bin/nf") == '"/opt/my venv/bin/nf"'
    assert install.systemd_word("/opt/50%/$x") == "/opt/50%%/$$x"
    assert install.env_value('a"b\\c$d`e') == '"a\\"b\\\\c\\$d\\`e"'
    with pytest.raises(ValueError):
        install.env_value("two\nlines")


def test_warns_about_paths_hidden_by_protect_home() -> None:
    warnings = install.config_warnings({}, "/home/ubuntu/venv/bin/neuron-fleet")
    assert len(warnings) == 1 and "ProtectHome" in warnings[0]
    assert install.config_warnings({}, "/opt/neuron-fleet/venv/bin/neuron-fleet") == []
    assert install.config_warnings({}, "/homework/bin/neuron-fleet") == []


def test_subcommand_is_wired(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from supervisor.cli import main

    assert main(["install-service", "--prefix", str(tmp_path), "--dry-run"]) == 0
    assert "would write" in capsys.readouterr().out


def test_env_source_without_admin_token_gets_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "blog.env"
    source.write_text(f"HF_TOKEN={SECRET}\nMAX_BATCH_SIZE=8\n")
    rc, out = run_install(capsys, "--prefix", str(tmp_path / "root"), "--env-source", str(source))
    assert rc == 0, out
    from supervisor.config import parse_env_file

    values = parse_env_file(str(tmp_path / "root/etc/neuron-fleet/neuron-fleet.env"))
    assert values["HF_TOKEN"] == SECRET and len(values["NEURON_FLEET_ADMIN_TOKEN"]) >= 43
    assert values["NEURON_FLEET_ADMIN_TOKEN"] not in out
    assert "NEURON_FLEET_ADMIN_TOKEN generated" in out


def test_folders_are_0755_whatever_the_umask(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under umask 000, mkdir(parents=True) made /etc/neuron-fleet and its parents 0777."""
    prefix = tmp_path / "root"
    old = os.umask(0)
    try:
        rc, out = run_install(capsys, "--prefix", str(prefix))
    finally:
        os.umask(old)
    assert rc == 0, out
    for folder in ("etc", "etc/neuron-fleet", "etc/systemd", "etc/systemd/system"):
        assert mode(prefix / folder) == 0o755, folder
    assert mode(prefix / "etc/neuron-fleet/neuron-fleet.env") == 0o600
    assert mode(prefix / "etc/systemd/system/neuron-fleet.service") == 0o644


def test_unit_path_reaches_neuron_ls() -> None:
    """aws-neuronx-tools installs neuron-ls in /opt/aws/neuron/bin, off systemd's PATH."""
    lines = [
        line for line in install.UNIT_TEMPLATE.splitlines() if line.startswith("Environment=PATH=")
    ]
    assert len(lines) == 1
    assert "/opt/aws/neuron/bin" in lines[0].split("=", 2)[2].split(":")
    assert "/usr/bin" in lines[0]


# -- as root, in a throwaway root: the user and groups are really created ----------------------

INSTALL_COLLECT = r"""
import json, subprocess, sys
def run(*argv):
    p = subprocess.run(argv, capture_output=True, text=True, cwd="/etc/systemd/system")
    return {"rc": p.returncode, "out": p.stdout + p.stderr}
print(json.dumps({
    "rc": int(open("/var/log/script.rc").read()),
    "log": open("/var/log/script.out").read(),
    "id": run("id", "neuron-fleet"),
    "passwd": run("getent", "passwd", "neuron-fleet"),
    "groups": {g: run("getent", "group", g) for g in ("neuron", "docker", "neuron-fleet")},
    "verify": run(sys.argv[1], "verify", "--man=no", "--generators=no",
                  "/etc/systemd/system/neuron-fleet.service"),
}))
"""


def install_as_root(tmp_path: Path, launcher: str, before: str = "") -> dict:
    from tests.test_deploy import require_tool
    from tests.throwaway_root import run_in_throwaway_root

    source = tmp_path / "fleet.toml"
    source.write_text(
        f'[model]\nid = "/var/lib/neuron-fleet/models/m"\n[fleet]\nlauncher = "{launcher}"\n'
    )
    exe = Path(sys.executable).parent / "neuron-fleet"
    script = tmp_path / "install.sh"
    script.write_text(
        f"set -euo pipefail\n{before}\n"
        f"{exe} install-service --config-source {source}\n"
        # A second run changes nothing and fails on nothing (the accounts exist by then).
        f"{exe} install-service --config-source {source}\n"
    )
    standins = tmp_path / "standins"
    standins.mkdir()
    collect = tmp_path / "collect.py"
    collect.write_text(INSTALL_COLLECT)
    verify = require_tool("systemd-analyze")
    proc = run_in_throwaway_root(
        script, standins, tmp_path / "scratch", [sys.executable, str(collect), verify]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return __import__("json").loads(proc.stdout.strip().splitlines()[-1])


def test_as_root_creates_the_user_and_groups_the_unit_names(tmp_path: Path) -> None:
    report = install_as_root(tmp_path, "native")
    assert report["rc"] == 0, report["log"]
    assert "created        group neuron" in report["log"]
    assert "created        user neuron-fleet" in report["log"]
    assert report["log"].count("created") == 2  # the second run found them
    assert "useradd" not in report["log"] and "groupadd" not in report["log"]  # not to do
    assert report["id"]["rc"] == 0 and "(neuron-fleet)" in report["id"]["out"], report["id"]
    _, _, uid, gid, _, home, shell = report["passwd"]["out"].strip().split(":")
    assert int(uid) < 1000 and (home, shell) == ("/var/lib/neuron-fleet", "/usr/sbin/nologin")
    assert report["groups"]["neuron"]["rc"] == 0
    assert report["groups"]["neuron-fleet"]["out"].split(":")[2] == gid
    assert report["verify"] == {"rc": 0, "out": ""}


def test_as_root_a_missing_docker_group_is_an_error_not_papered_over(tmp_path: Path) -> None:
    has_docker = __import__("grp").getgrall()
    before = (
        "groupdel docker 2>/dev/null || true"
        if any(g.gr_name == "docker" for g in has_docker)
        else ""
    )
    report = install_as_root(tmp_path, "docker", before)
    assert report["rc"] == 1, report["log"]
    assert "group 'docker' does not exist: install docker first" in report["log"]
    assert report["groups"]["docker"]["rc"] != 0  # not created by install-service


def test_as_root_into_a_prefix_with_account_files_uses_useradd_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A staged root that has account files (an image being built) gets them there, with
    shadow's --prefix; this machine's own accounts are not touched."""
    import pwd
    import shutil

    if os.geteuid() != 0:
        pytest.skip("useradd/groupadd need root (the throwaway-root tests cover this path too)")
    prefix = tmp_path / "image"
    (prefix / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        if Path("/etc", name).exists():
            shutil.copy2(Path("/etc", name), prefix / "etc" / name)
    source = tmp_path / "fleet.toml"
    source.write_text(
        '[model]\nid = "/var/lib/neuron-fleet/models/m"\n[fleet]\nlauncher = "native"\n'
    )
    user = "nf-prefix-test"
    rc, out = run_install(
        capsys, "--prefix", str(prefix), "--config-source", str(source), "--user", user
    )
    assert rc == 0, out
    assert f"created        user {user}" in out and "created        group neuron" in out
    entry = [ln for ln in (prefix / "etc/passwd").read_text().splitlines() if ln.startswith(user)]
    assert len(entry) == 1 and entry[0].endswith(":/var/lib/neuron-fleet:/usr/sbin/nologin")
    with pytest.raises(KeyError):
        pwd.getpwnam(user)  # the machine's own /etc/passwd: untouched


def test_as_root_an_existing_user_without_its_own_group_gets_the_group_the_unit_names(
    tmp_path: Path,
) -> None:
    """A neuron-fleet user made earlier by hand (primary group `users`, a login shell, a home
    under /home): the unit's Group=neuron-fleet must still exist (else 216/GROUP), and the
    differences that matter are named."""
    before = (
        "useradd --no-user-group --gid users --no-create-home --home-dir /home/neuron-fleet "
        "--shell /bin/bash neuron-fleet"
    )
    report = install_as_root(tmp_path, "native", before)
    assert report["rc"] == 0, report["log"]
    assert report["groups"]["neuron-fleet"]["rc"] == 0, report["log"]
    assert int(report["groups"]["neuron-fleet"]["out"].split(":")[2]) < 1000  # a system group
    assert report["log"].count("created        group neuron-fleet") == 1  # not the 2nd run
    # The user is left as it is (it may own files), but its home is named: hidden by
    # ProtectHome=yes, it is not where the service keeps its state.
    assert "/home/neuron-fleet" in report["passwd"]["out"]
    assert "warning: user neuron-fleet exists with home /home/neuron-fleet" in report["log"]
    assert report["verify"] == {"rc": 0, "out": ""}


def test_as_a_non_root_user_says_to_run_as_root(tmp_path: Path) -> None:
    """`neuron-fleet install-service` without sudo: one clear line, exit 1, nothing written."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user (setpriv)")
    from tests.test_deploy import require_tool

    # nobody, allowed to read (only) every file: this checkout's venv may sit in a folder
    # nobody cannot search; writing /etc stays refused, as for any unprivileged user.
    as_nobody = [require_tool("setpriv"), "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    as_nobody += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    source = tmp_path / "fleet.toml"
    source.write_text('[model]\nid = "/var/lib/neuron-fleet/models/m"\n')
    exe = Path(sys.executable).parent / "neuron-fleet"
    proc = subprocess.run(
        [*as_nobody, str(exe), "install-service", "--config-source", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "run it as root (sudo neuron-fleet install-service ...)" in proc.stderr, proc.stderr
    assert "write " not in proc.stdout  # nothing listed as written


# -- the README's inf2 steps, from the wheel users install -----------------------------------


def readme_install_lines() -> list[str]:
    """The README's "On an inf2 host" commands that make the venv and install the service."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## On an inf2 host", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    lines = [ln.split("  #")[0].strip() for ln in section.splitlines()]
    wanted = ("-m venv", "pip install", "install-service")
    return [ln for ln in lines if any(w in ln for w in wanted) and not ln.startswith("#")]


PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w")


def test_readme_install_steps_run_from_the_real_wheel(tmp_path: Path) -> None:
    """`pip wheel .`, then the README's lines as root in a throwaway root, outside the
    checkout: the venv, pip installing that wheel (its dependencies from this venv, no
    network), and `install-service` with the fleet.toml `import` wrote in the current folder.
    From a wheel there is no deploy/fleet.toml to fall back on, and sudo's secure_path
    holds no venv: the README's line must work as written."""
    import json
    import shutil
    import subprocess
    import sysconfig

    from tests.test_deploy import require_tool
    from tests.throwaway_root import run_in_throwaway_root

    lines = readme_install_lines()
    assert len(lines) == 3, lines
    venv_line, pip_line, install_line = lines
    wheels, src, root = tmp_path / "wheels", tmp_path / "src", Path(__file__).parent.parent
    # What the Dockerfile copies too: the build writes build/ and *.egg-info next to it.
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(exist_ok=True)
        shutil.copy2(root / name, src / name)
    for name in ("balancer", "supervisor"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [*PIP_WHEEL, str(wheels), str(src)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = wheels.glob("neuron_fleet-*.whl")
    work = tmp_path / "home-ubuntu"  # where the operator ran `neuron-fleet import`
    work.mkdir()
    (work / "fleet.toml").write_text(
        '[model]\nid = "/var/lib/neuron-fleet/models/m"\n[fleet]\nlauncher = "native"\n'
    )
    deps = sysconfig.get_paths()["purelib"]  # this venv's packages, not this checkout
    python = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    script = tmp_path / "readme.sh"
    script.write_text(
        "set -euo pipefail\n"
        f"cd {work}\n"
        # sudo: we are root already; the README's python3.11 is this test's Python.
        + venv_line.removeprefix("sudo ").replace(
            "python3.11", shutil.which(python) or sys.executable
        )
        + "\n"
        + pip_line.removeprefix("sudo ").replace(
            "install neuron-fleet", f"install -q --no-deps --no-index {wheel}"
        )
        + "\n"
        + f"echo {deps} >$(/opt/neuron-fleet/venv/bin/python -c "
        "'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')/deps.pth\n"
        + "/opt/neuron-fleet/venv/bin/python -c 'import supervisor; print(supervisor.__file__)'\n"
        + install_line.removeprefix("sudo ")
        + "\n"
    )
    collect = tmp_path / "collect.py"
    collect.write_text(INSTALL_COLLECT)
    standins = tmp_path / "standins"
    standins.mkdir()
    proc = run_in_throwaway_root(
        script,
        standins,
        tmp_path / "scratch",
        [sys.executable, str(collect), require_tool("systemd-analyze")],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0, report["log"]
    # The installed package, not this checkout, ran install-service.
    assert "/opt/neuron-fleet/venv/lib/" in report["log"], report["log"]
    assert "ExecStart=/opt/neuron-fleet/venv/bin/neuron-fleet serve" in report["log"]
    assert f"from {work}/fleet.toml" in report["log"] or "from fleet.toml" in report["log"]
    assert report["id"]["rc"] == 0 and report["verify"] == {"rc": 0, "out": ""}


def test_a_kept_env_file_owned_by_another_user_is_given_back_to_root(
    tmp_path: Path, blog_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator wrote the env file as ubuntu (`cp .env /etc/neuron-fleet/...` from a
    shell with write access, or `sudo -e` leaving a copy): mode 0600 alone still lets that
    user read and rewrite the secrets. Run as root, install-service makes it root:root."""
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    assert run_install(capsys, "--prefix", str(tmp_path), "--env-source", str(blog_env))[0] == 0
    env = tmp_path / "etc/neuron-fleet/neuron-fleet.env"
    env.write_text(f"HF_TOKEN={SECRET}\nNEURON_FLEET_ADMIN_TOKEN=mine\n")
    os.chown(env, 1000, 1000)
    env.chmod(0o600)

    rc, out = run_install(capsys, "--prefix", str(tmp_path))
    assert rc == 0, out
    st = env.stat()
    assert (st.st_uid, st.st_gid, mode(env)) == (0, 0, 0o600), out
    assert "owner 1000:1000 -> root:root" in out
    assert env.read_text() == f"HF_TOKEN={SECRET}\nNEURON_FLEET_ADMIN_TOKEN=mine\n"
    assert SECRET not in out
