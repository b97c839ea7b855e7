"""``neuron-fleet install-service``: the systemd unit, fleet.toml and env file, in place.

Writes, under ``--prefix`` (default ``/``; another prefix stages the files like DESTDIR,
and the unit still names the final paths):

    etc/systemd/system/neuron-fleet.service   the unit, ExecStart = this installation's
                                              neuron-fleet, User= / SupplementaryGroups=
                                              from --user, --device-group and the launcher
    etc/neuron-fleet/fleet.toml               a copy of --config-source; an existing one is
                                              kept unless --force
    etc/neuron-fleet/neuron-fleet.env         root-only (0600): the commented example, or the
                                              variables of --env-source (e.g. the blog's
                                              .env); an existing one is never replaced

Run as root on a root file system (``/``, or a prefix holding etc/passwd), it then creates
the device group and the service user the unit names (supervisor/accounts.py: systemd would
refuse to start without them, 217/USER / 216/GROUP); otherwise, or with ``--no-accounts``,
it prints those commands. Last it prints what is left to run (daemon-reload, enable). It
never starts the service. Secret values are never printed: only variable names.

Where the files come from: the unit and the env example are embedded below (UNIT_TEMPLATE,
ENV_EXAMPLE), so an installed wheel needs no data files; a test keeps them identical to
``deploy/neuron-fleet.service`` and ``deploy/neuron-fleet.env.example``. fleet.toml is the
user's: ``--config-source``, by default ``deploy/fleet.toml`` of the source checkout this
module runs from, when there is one.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import stat
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from balancer.secrets_env import ADMIN_TOKEN_VAR, API_KEYS_VAR
from supervisor.accounts import can_manage, ensure_accounts
from supervisor.layering import SECRET_KEYS

UNIT_PATH = "/etc/systemd/system/neuron-fleet.service"
CONFIG_PATH = "/etc/neuron-fleet/fleet.toml"
ENV_PATH = "/etc/neuron-fleet/neuron-fleet.env"
STATE_DIR = "/var/lib/neuron-fleet"
DEFAULT_USER = "neuron-fleet"
DEFAULT_DEVICE_GROUP = "neuron"
SOURCE_DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"
"""deploy/ of a source checkout (absent from an installed wheel)."""
PROTECTED_HOME = ("/home", "/root", "/run/user")
"""Hidden from the service by ProtectHome=yes."""
SECRET_WORDS = frozenset({"TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "KEYS", "CREDENTIALS"})

UNIT_TEMPLATE = """\
# neuron-fleet: TGI Neuron replicas + streaming balancer on one inf2 host, as one service.
#
# Replaces the blog's `docker compose up` (3 TGI Neuron containers + nginx on :8080).
# Install with `neuron-fleet install-service` (writes this file with ExecStart pointing at
# the venv it runs from, /etc/neuron-fleet/fleet.toml and the 0600 env file), then:
#   systemctl daemon-reload && systemctl enable --now neuron-fleet
#   systemctl status neuron-fleet      # STATUS= line: "3/3 replicas ready"
#   systemctl reload neuron-fleet      # SIGHUP: rolling restart, one replica at a time
#   journalctl -u neuron-fleet -f
# Change settings with `systemctl edit neuron-fleet` (a drop-in), not by editing this file.

[Unit]
Description=neuron-fleet: TGI Neuron replicas behind a streaming balancer
# The network is needed for Hub downloads (MODEL_ID as a Hub id) and for clients.
Wants=network-online.target
After=network-online.target
# The Neuron driver is loaded by /etc/modules-load.d/neuron.conf (aws-neuronx-dkms):
# "char-neuron" below is resolved from /proc/devices when the unit starts, so the module
# must be loaded by then.
After=systemd-modules-load.service
# With launcher = "docker", replicas are containers run by dockerd: start after it, and
# stop before it (units stop in reverse order), so the drain can still `docker stop`.
# Harmless when docker is not installed or not used.
After=docker.service
# A start can take many minutes (TimeoutStartSec below), so a crash-looping service would
# never hit systemd's default 5 starts in 10 s: count failures over a longer window.
StartLimitIntervalSec=2h
StartLimitBurst=5
# Boot is not held for the model load. With default dependencies, multi-user.target (which
# WantedBy= below pulls this unit into) is ordered after it (systemd.target(5): a target
# gets After= on the units it wants unless they set DefaultDependencies=no), so a reboot
# would reach multi-user.target, and start what is ordered after it (cloud-init's final
# stage), only at READY=1: up to TimeoutStartSec. So no default dependencies, and the ones a
# service gets by default written out (systemd.service(5), "Default Dependencies").
DefaultDependencies=no
Requires=sysinit.target
After=sysinit.target basic.target
Conflicts=shutdown.target
Before=shutdown.target

[Service]
# READY=1 is sent once the balancer listens AND [fleet] min_ready replicas serve; STATUS=
# lines ("2/3 replicas ready (1 starting)") show in `systemctl status`; STOPPING=1 on stop.
Type=notify
# Only the supervisor may speak for the service. It does not pass $NOTIFY_SOCKET on to
# replicas; this makes sure no child (TGI's launcher, docker) can mark the unit ready.
NotifyAccess=main
# The supervisor's event loop sends WATCHDOG=1 every WatchdogSec/2 (15 s), from the moment
# it starts, including while models load: a wedged event loop (the balancer is frozen for
# every client) gets SIGABRT and a restart. 30 s leaves room for a loaded 2-core host.
WatchdogSec=30s
# Loading a compiled 8B model on NeuronCores takes minutes, and the default 90 s would
# kill every start. The service gives up by itself (exit 1) when min_ready can no longer
# be reached ([fleet] startup_timeout_s = 1800 per replica, crash-loop limit), so this is
# only a backstop above 30 min + a restart. Not "infinity": a start wedged before the
# watchdog task runs must still end.
TimeoutStartSec=45min
# Stop = drain: /health turns 503, new requests are refused, in-flight streams get up to
# [fleet] drain_timeout_s (300 s), then replicas get SIGTERM and stop_grace_s (30 s) before
# SIGKILL. 400 s > 300 + 30 + margin; raise it with drain_timeout_s.
TimeoutStopSec=400s
# mixed: SIGTERM goes to the supervisor only, so it drains and stops its replicas in order;
# the SIGKILL that follows (leftovers once it exited, or everything at TimeoutStopSec)
# goes to the whole cgroup, so no replica can outlive the service.
# (control-group would SIGTERM every replica at once and cut streams mid-way.)
KillMode=mixed
# Crashes, watchdog timeouts and "min_ready unreachable" (exit 1) restart the service;
# `systemctl stop` and a clean exit (0) do not. Single replica crashes never reach here:
# the supervisor restarts replicas itself, with backoff.
Restart=on-failure
RestartSec=10s
# A replica killed by the kernel OOM killer is the supervisor's to restart. The default
# (OOMPolicy=stop) would stop the whole service, i.e. every other replica too.
OOMPolicy=continue

# Dedicated unprivileged user (`useradd --system --user-group --home-dir
# /var/lib/neuron-fleet --shell /usr/sbin/nologin neuron-fleet`; install-service, run as
# root, creates it and the group below: without them the start fails, 217/USER, 216/GROUP).
User=neuron-fleet
Group=neuron-fleet
# neuron: the group owning /dev/neuron* when the host follows AWS's Neuron security
# guidance (udev: SUBSYSTEM=="neuron*", KERNEL=="neuron*", GROUP="neuron", MODE="0660");
# the driver's default rule is MODE="0666". The group must exist, or the start fails with
# 216/GROUP: `groupadd --system neuron` (install-service does it).
# install-service adds "docker" here only for launcher = "docker" (to reach
# /var/run/docker.sock): membership of docker is root-equivalent on the host, so the shipped
# unit, meant for any launcher, leaves it out. (install-service writes this line from the
# config's launcher and --device-group.)
SupplementaryGroups=neuron

# Secrets (HF_TOKEN, NEURON_FLEET_ADMIN_TOKEN, NEURON_FLEET_API_KEYS) and overrides live
# here, root:root 0600: systemd reads it as root before dropping privileges, so the service
# user needs no read access to the file. "-": a missing file is not an error.
EnvironmentFile=-/etc/neuron-fleet/neuron-fleet.env
# Under PrivateTmp, /var/tmp (the Neuron compile cache's default home) is private and
# emptied at every restart: keep the compile cache and Hub downloads in CacheDirectory.
Environment=NEURON_COMPILE_CACHE_URL=/var/cache/neuron-fleet/neuron-compile-cache
Environment=HF_HOME=/var/cache/neuron-fleet/huggingface
Environment=PYTHONUNBUFFERED=1
# neuron-ls (aws-neuronx-tools) lives in /opt/aws/neuron/bin, which systemd's default PATH
# lacks: without it the supervisor could only count /dev/neuron* and would not see cores
# held by another process (or set [fleet] neuron_ls).
Environment=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/aws/neuron/bin

ExecStart=/opt/neuron-fleet/venv/bin/neuron-fleet serve --config /etc/neuron-fleet/fleet.toml
# SIGHUP = rolling restart: one replica drained, restarted and ready before the next.
ExecReload=/bin/kill -HUP $MAINPID
SyslogIdentifier=neuron-fleet
# Each stream holds two sockets (client + replica) and the replicas hold their own: the
# usual soft limit of 1024 would cap the balancer near 500 concurrent streams.
LimitNOFILE=65536

# -- where the service may write -------------------------------------------------------
# /var/lib/neuron-fleet (created and chown'ed by systemd): exported models (put MODEL_ID
# folders under /var/lib/neuron-fleet/models) and the service user's $HOME (docker CLI
# config). Writable despite ProtectSystem=strict.
StateDirectory=neuron-fleet
# /var/cache/neuron-fleet: compile cache and Hub downloads (see Environment= above).
CacheDirectory=neuron-fleet
# /etc/neuron-fleet is read (never written) by the service.
ConfigurationDirectory=neuron-fleet
# Anything else a replica must write (an existing model folder or compile cache outside
# the paths above) goes in a drop-in: ReadWritePaths=/data/models

# -- hardening that leaves Neuron device access intact ---------------------------------
# Every file system read-only but /dev, /proc, /sys and the directories above.
ProtectSystem=strict
# /home, /root and /run/user invisible. A model in /home/ubuntu (the blog's layout) must
# move under /var/lib/neuron-fleet/models, or set ProtectHome=read-only in a drop-in.
# (launcher = "docker": dockerd bind-mounts data_dir, unaffected; the supervisor still
# reads neuron_config.json from the folder to check the config.)
ProtectHome=yes
# Private /tmp and /var/tmp shared by all processes of this unit: the native launcher's
# --shard-uds-path sockets in /tmp (launcher.native.shard_uds_dir) work as before, and
# nothing is left behind between restarts.
PrivateTmp=yes
# NOT PrivateDevices=yes: it would hide /dev/neuron*. Instead a device allow-list:
# "closed" permits the basics (/dev/null, zero, full, random, urandom, tty, ptmx) plus
# what DeviceAllow names. DeviceAllow takes no globs (/dev/neuron* is not accepted);
# "char-neuron" means every character device of the "neuron" major in /proc/devices,
# which the Neuron driver registers (alloc_chrdev_region(..., "neuron")), i.e. all
# /dev/neuronN, including devices that appear later. Docker containers live in dockerd's
# cgroups: this list does not apply to them (docker's --device does).
PrivateDevices=no
DevicePolicy=closed
DeviceAllow=char-neuron rw
# setuid binaries cannot raise privileges (the service needs none).
NoNewPrivileges=yes
# An unprivileged user on ports > 1024 needs no capabilities. (To listen on :80, add
# AmbientCapabilities=CAP_NET_BIND_SERVICE and the same in CapabilityBoundingSet.)
# Locked memory stays at systemd's default limit; should the Neuron runtime ask for more
# (EFA on trn1 does; inf2 inference does not), raise LimitMEMLOCK= in a drop-in.
CapabilityBoundingSet=
AmbientCapabilities=
# /proc/sys, /sys and /proc/sysrq-trigger read-only: the Neuron runtime and neuron-ls only
# read sysfs (/sys/devices/virtual/neuron_device, ...).
ProtectKernelTunables=yes
# No module loading (the driver is loaded at boot), no kernel log, no clock changes.
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
# /sys/fs/cgroup read-only: the service does not manage cgroups (docker does, its own).
ProtectControlGroups=yes
# TCP/IP (clients, replicas on 127.0.0.1), UNIX (sd_notify, docker.sock, TGI's shard
# sockets) and NETLINK (interface enumeration by the runtimes and getaddrinfo); no raw
# packets, no AF_PACKET.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# No new namespaces (containers are dockerd's doing, not ours), no realtime scheduling,
# no setuid/setgid files, no personality(2) tricks, native system calls only.
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
# SysV IPC objects of the (dedicated) user are removed when the service stops; mounts made
# inside the unit stay inside it.
RemoveIPC=yes
PrivateMounts=yes
# Not set: ProtectProc=invisible (neuron-ls / neuron-top name the processes holding the
# NeuronCores from /proc) and ProcSubset=pid (runtimes read /proc/meminfo, /proc/cpuinfo).
# Kept off on purpose: Python's ctypes/cffi callbacks (libffi closures), PyTorch and the
# Neuron runtime/XLA need writable+executable memory, which yes would forbid.
MemoryDenyWriteExecute=no
# Not set: SystemCallFilter= (the Neuron runtime's system calls are unaudited; try
# SystemCallFilter=@system-service in a drop-in and watch the journal for SIGSYS).
# Files the service creates (logs, caches) are not world-readable.
UMask=0027

[Install]
# `systemctl enable` starts it at boot, with the other services of a normal boot.
WantedBy=multi-user.target
"""

ENV_EXAMPLE = """\
# /etc/neuron-fleet/neuron-fleet.env -- environment of neuron-fleet.service.
#
# Read by systemd (EnvironmentFile=), as root, before the service drops to its user:
# keep it root:root, mode 0600 (`neuron-fleet install-service` creates it that way).
# Secrets belong here, never in fleet.toml: neuron-fleet never logs or prints them.
#
# Syntax: KEY=VALUE, one per line; '#' starts a comment line; no `export`; no ${VAR}
# expansion. Quote values with spaces: KEY="a b". Every variable set here overrides
# /etc/neuron-fleet/fleet.toml (the precedence is described at the top of that file).
# After a change: systemctl restart neuron-fleet (a reload does not re-read this file).

# -- secrets -------------------------------------------------------------------------
# Hugging Face token, for gated models (meta-llama/...) downloaded by the replicas.
#HF_TOKEN=
# Bearer token for the balancer's /fleet/* admin routes (drain, restart, rolling-restart),
# always required: install-service generates one when none is set. `neuron-fleet status`
# run as root reads it from this file.
#NEURON_FLEET_ADMIN_TOKEN=
# Comma-separated API keys clients must send (Authorization: Bearer KEY); unset = open.
#NEURON_FLEET_API_KEYS=

# -- the blog's .env (the TGI image's own names) -------------------------------------
# A folder exported by optimum-neuron (host path), or a Hub id. With ProtectHome=yes in
# the unit, keep models under /var/lib/neuron-fleet/models, not /home.
#MODEL_ID=/var/lib/neuron-fleet/models/exportedmodel
#MAX_BATCH_SIZE=8
#MAX_INPUT_TOKENS=16000
#MAX_TOTAL_TOKENS=16512
#MAX_CONCURRENT_REQUESTS=512
#HF_NUM_CORES=8
#HF_AUTO_CAST_TYPE=bf16

# -- neuron-fleet ----------------------------------------------------------------------
#NEURON_FLEET_REPLICAS=3
#NEURON_FLEET_LISTEN=127.0.0.1:8080
#NEURON_FLEET_LOG_LEVEL=INFO
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--prefix", default="/", metavar="DIR", help="install under DIR (default /)")
    add(
        "--user",
        default=DEFAULT_USER,
        help=f"the service's system user and group (default {DEFAULT_USER})",
    )
    add(
        "--config-source",
        metavar="FILE",
        help="fleet.toml to install (default: deploy/fleet.toml of the source checkout)",
    )
    add(
        "--env-source",
        metavar="FILE",
        help="KEY=VALUE file (e.g. the blog's .env) to install as the env file, "
        "instead of the commented example; values are never printed",
    )
    add(
        "--device-group",
        default=DEFAULT_DEVICE_GROUP,
        metavar="GROUP",
        help="group owning /dev/neuron* (default neuron; '' when the devices are 0666)",
    )
    add(
        "--executable",
        metavar="PATH",
        help="neuron-fleet for ExecStart (default: the one next to this Python)",
    )
    add("--force", action="store_true", help="replace an existing fleet.toml")
    add(
        "--no-accounts",
        action="store_true",
        help="do not create the service user and device group (as root, they are created); "
        "print the commands instead",
    )
    add("--dry-run", action="store_true", help="show what would be written; write nothing")


# -- what goes into the files --------------------------------------------------------------


def find_executable(explicit: str | None = None) -> list[str]:
    """The ExecStart command prefix: this installation's neuron-fleet.

    The script next to the running interpreter (the venv's ``bin/``; not resolved, so a venv
    python symlinked to /usr/bin stays in the venv), else ``neuron-fleet`` on PATH, else
    ``python -m supervisor``.
    """
    if explicit:
        return [os.path.abspath(explicit)]
    beside = Path(sys.executable).parent / "neuron-fleet"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside.absolute())]
    on_path = shutil.which("neuron-fleet")
    if on_path:
        return [os.path.abspath(on_path)]
    return [os.path.abspath(sys.executable), "-m", "supervisor"]


def systemd_word(word: str) -> str:
    """One ExecStart argument: % and $ escaped, quoted when it holds spaces or quotes."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not re.search(r"[\s\"'\\]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _set_line(text: str, key: str, value: str) -> str:
    pattern = re.compile(rf"^{re.escape(key)}=.*$", re.M)
    if len(pattern.findall(text)) != 1:
        raise RuntimeError(f"unit template: expected exactly one {key}= line")
    return pattern.sub(lambda _: f"{key}={value}", text)


def render_unit(exec_argv: list[str], user: str, groups: list[str]) -> str:
    command = [*exec_argv, "serve", "--config", CONFIG_PATH]
    text = _set_line(UNIT_TEMPLATE, "ExecStart", " ".join(systemd_word(w) for w in command))
    text = _set_line(text, "User", user)
    text = _set_line(text, "Group", user)
    return _set_line(text, "SupplementaryGroups", " ".join(groups))


def env_value(value: str) -> str:
    """A value in systemd EnvironmentFile syntax: double quotes, no expansion."""
    if "\n" in value or "\r" in value:
        raise ValueError("multi-line values are not supported by EnvironmentFile=")
    escaped = re.sub(r'([\\"`$])', r"\\\1", value)
    return f'"{escaped}"'


def render_env(values: dict[str, str], source: str) -> str:
    lines = [
        "# /etc/neuron-fleet/neuron-fleet.env -- environment of neuron-fleet.service",
        f"# Written by `neuron-fleet install-service` from {source}. root:root, mode 0600.",
        '# KEY="VALUE" per line, read by systemd (EnvironmentFile=); no ${VAR} expansion.',
        "# deploy/neuron-fleet.env.example lists the variables neuron-fleet reads.",
        "",
    ]
    lines += [f"{key}={env_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def is_secret_name(name: str) -> bool:
    return bool(SECRET_WORDS & set(name.upper().replace(".", "_").split("_")))


def describe_names(values: dict[str, str]) -> str:
    """Variable names only; secrets flagged, no value ever shown."""
    names = [f"{k} (secret, not shown)" if is_secret_name(k) else k for k in values]
    return ", ".join(names) if names else "none"


def service_groups(device_group: str, launcher: str) -> list[str]:
    groups = [device_group] if device_group else []
    if launcher == "docker":
        groups.append("docker")
    return groups


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def config_warnings(config: dict, exec_path: str) -> list[str]:
    """What the unit's hardening or the secrets policy will trip over, found in advance."""
    warnings = []
    if _under(exec_path, PROTECTED_HOME):
        warnings.append(
            f"ExecStart {exec_path} is under /home or /root, which ProtectHome=yes hides from "
            "the service (it would fail with 203/EXEC): install into a venv such as "
            "/opt/neuron-fleet/venv, or pass --executable"
        )
    model_id = str(config.get("model", {}).get("id", ""))
    if model_id.startswith("/") and _under(model_id, PROTECTED_HOME):
        warnings.append(
            f"[model] id {model_id} is under /home or /root, hidden by ProtectHome=yes: move "
            f"the model under {STATE_DIR}/models (and update fleet.toml), or add "
            "ProtectHome=read-only with `systemctl edit neuron-fleet`"
        )
    for section, key in sorted(SECRET_KEYS):
        if config.get(section, {}).get(key):
            warnings.append(
                f"fleet.toml sets [{section}] {key}: a secret in a world-readable file; move it "
                f"to {ENV_PATH} (HF_TOKEN, {ADMIN_TOKEN_VAR}, {API_KEYS_VAR})"
            )
    return warnings


# -- doing it ---------------------------------------------------------------------------------


@dataclass
class _File:
    path: Path
    """Where it goes, under the prefix."""
    shown: str
    """The final path (what the unit and the printed commands name)."""
    content: str
    mode: int
    note: str = ""
    action: str = "write"
    """write, replace, keep."""
    extra: list[str] = field(default_factory=list)


def _write(path: Path, content: str, mode: int) -> None:
    """Atomically, with ``mode`` from the first byte (no window where a secret is 0644)."""
    _make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def generate_token() -> str:
    from balancer.token_file import generate_token as make

    return make()


def _existing_env(path: Path) -> tuple[str, dict[str, str]] | None:
    """The kept env file's text and variables; None when it cannot be parsed (left alone)."""
    from supervisor.config import ConfigError, parse_env_file

    try:
        return path.read_text(encoding="utf-8"), parse_env_file(str(path))
    except (OSError, UnicodeDecodeError, ConfigError):
        return None


def _make_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents as 0755 whatever the umask (mkdir's mode
    is masked by it, and ``parents=True`` gives parents the default 0777 & ~umask)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        os.chmod(path, 0o755)


def _writable(path: Path) -> bool:
    """Whether ``path`` can be written (replaced, or created with its missing parents)."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    return not path.exists() or os.access(path, os.W_OK) or os.access(path.parent, os.W_OK)


def _target(prefix: Path, final: str) -> Path:
    return prefix / final.lstrip("/")


def _name_ok(name: str) -> bool:
    return bool(re.fullmatch(r"[a-z_][a-z0-9_-]{0,30}", name))


def run(args: argparse.Namespace) -> int:
    err = sys.stderr
    prefix = Path(args.prefix).absolute()
    if not _name_ok(args.user) or (args.device_group and not _name_ok(args.device_group)):
        print("neuron-fleet install-service: --user / --device-group: not a valid name", file=err)
        return 2

    config_target = _target(prefix, CONFIG_PATH)
    source = args.config_source
    if source is None and (SOURCE_DEPLOY_DIR / "fleet.toml").is_file():
        source = str(SOURCE_DEPLOY_DIR / "fleet.toml")
    if source is None and not config_target.exists():
        print(
            "neuron-fleet install-service: no fleet.toml to install: pass --config-source FILE "
            "(the source tree's deploy/fleet.toml documents every key)",
            file=err,
        )
        return 2
    keep_config = config_target.exists() and not args.force
    config_file = str(config_target) if keep_config or source is None else source
    try:
        config_text = Path(config_file).read_text(encoding="utf-8")
        config = tomllib.loads(config_text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        print(f"neuron-fleet install-service: cannot read {config_file}: {exc}", file=err)
        return 2

    admin_token = generate_token()
    """Used only where the operator set none: the admin API always needs one."""
    env_values: dict[str, str] | None = None
    if args.env_source:
        from supervisor.config import ConfigError, parse_env_file

        try:
            env_values = parse_env_file(args.env_source)
            generated = not env_values.get(ADMIN_TOKEN_VAR)
            if generated:
                env_values[ADMIN_TOKEN_VAR] = admin_token
            env_text = render_env(env_values, os.path.abspath(args.env_source))
        except (ConfigError, ValueError) as exc:
            # ConfigError names files and lines, never values.
            print(f"neuron-fleet install-service: {args.env_source}: {exc}", file=err)
            return 2
    else:
        generated = True
        env_text = ENV_EXAMPLE.replace(
            f"#{ADMIN_TOKEN_VAR}=\n", f"{ADMIN_TOKEN_VAR}={env_value(admin_token)}\n"
        )

    launcher = (env_values or {}).get("NEURON_FLEET_LAUNCHER") or str(
        config.get("fleet", {}).get("launcher", "docker")
    )
    exec_argv = find_executable(args.executable)
    groups = service_groups(args.device_group, launcher)
    unit_text = render_unit(exec_argv, args.user, groups)

    files = [
        _File(
            _target(prefix, UNIT_PATH),
            UNIT_PATH,
            unit_text,
            0o644,
            note=f"ExecStart={' '.join(exec_argv)} serve --config {CONFIG_PATH}; "
            f"User={args.user}; SupplementaryGroups={' '.join(groups) or '(none)'}",
        ),
        _File(config_target, CONFIG_PATH, config_text, 0o644, note=f"from {config_file}"),
        _File(
            _target(prefix, ENV_PATH),
            ENV_PATH,
            env_text,
            0o600,
            note="mode 0600; variables: "
            + (
                describe_names(env_values)
                if env_values is not None
                else f"{ADMIN_TOKEN_VAR} (secret, not shown), the rest commented out (example)"
            )
            + (f"; {ADMIN_TOKEN_VAR} generated" if generated else ""),
        ),
    ]
    unit_file, config_out, env_file = files
    if unit_file.path.exists():
        unit_file.action = "replace"
    if keep_config:
        config_out.action = "keep"
        config_out.note = "exists; --force replaces it"
    elif config_out.path.exists():
        config_out.action = "replace"
    if env_file.path.exists():
        # Never replaced: it holds the secrets. Only its mode is put right.
        env_file.action = "keep"
        env_file.note = "exists, never replaced (it holds the secrets)"
        if args.env_source:
            env_file.note += f"; {args.env_source} NOT applied: edit the file, or remove it first"
        st = env_file.path.stat()
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            env_file.extra.append(f"mode {mode:04o} -> 0600")
        if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
            # 0600 alone leaves the secrets to the file's owner: root's only, as written.
            env_file.extra.append(f"owner {st.st_uid}:{st.st_gid} -> root:root")
        existing = _existing_env(env_file.path)
        if existing is not None and ADMIN_TOKEN_VAR not in existing[1]:
            # The one change made to a kept env file: the admin API always needs a token.
            env_file.action = "add token"
            env_file.content = (
                existing[0]
                + ("" if existing[0].endswith("\n") or not existing[0] else "\n")
                + (
                    "# Added by `neuron-fleet install-service`: the admin API (/fleet/*) always "
                    "needs a token.\n"
                    f"{ADMIN_TOKEN_VAR}={env_value(admin_token)}\n"
                )
            )
            env_file.extra.append(f"{ADMIN_TOKEN_VAR} generated and added")

    dry = args.dry_run
    blocked = [f.shown for f in files if f.action != "keep" and not _writable(f.path)]
    if blocked and not dry:
        # Before anything is written or printed as done: a half-installed service is worse.
        hint = (
            "run it as root (sudo neuron-fleet install-service ...), or stage the files "
            "with --prefix DIR"
            if os.geteuid() != 0
            else "check the file system (read-only? another owner?)"
        )
        print(
            f"neuron-fleet install-service: cannot write {', '.join(blocked)}: {hint}",
            file=err,
        )
        return 1
    print(f"neuron-fleet install-service{' (dry run: nothing written)' if dry else ''}:")
    for f in files:
        verb = f"would {f.action}" if dry and f.action != "keep" else f.action
        shown = f.shown if prefix == Path("/") else str(f.path)
        notes = "; ".join([f.note, *f.extra])
        print(f"  {verb:<14} {shown}  ({notes})")
        if dry:
            continue
        try:
            if f.action in ("write", "replace", "add token"):
                _write(f.path, f.content, f.mode)
            elif f.extra:
                os.chmod(f.path, 0o600)
                if os.geteuid() == 0:
                    os.chown(f.path, 0, 0)
        except OSError as exc:
            print(f"neuron-fleet install-service: cannot write {f.path}: {exc}", file=err)
            return 1

    manage = not dry and not args.no_accounts and can_manage(prefix)
    if manage:
        accounts = ensure_accounts(prefix, args.user, groups, STATE_DIR)
        for what in accounts.done:
            print(f"  created        {what}")
        for error in accounts.errors:
            print(f"neuron-fleet install-service: {error}", file=err)
        if accounts.errors:
            return 1
        for warning in accounts.warnings:
            print(f"warning: {warning}")
    for warning in config_warnings(config, exec_argv[0]):
        print(f"warning: {warning}")
    if prefix != Path("/"):
        print(f"\nFiles are staged under {prefix}; the unit names their final paths (/etc/...).")
    print()
    print(next_steps(args.user, args.device_group, groups, exec_argv, accounts_made=manage))
    return 0


def next_steps(
    user: str,
    device_group: str,
    groups: list[str],
    exec_argv: list[str],
    accounts_made: bool = False,
) -> str:
    q = shlex.quote
    plan = " ".join(q(w) for w in exec_argv)
    lines = ["Next, as root:"]
    if device_group and not accounts_made:
        lines.append(
            f"  getent group {device_group} >/dev/null || groupadd --system {device_group}"
        )
    if device_group:
        lines += [
            f"  # /dev/neuron* owned by group {device_group}, mode 0660 (AWS's advice; the "
            "driver's own rule makes them 0666):",
            f'  echo \'SUBSYSTEM=="neuron*", KERNEL=="neuron*", GROUP="{device_group}", '
            'MODE="0660"\' > /etc/udev/rules.d/90-neuron.rules',
            "  udevadm control --reload && udevadm trigger --subsystem-match=neuron",
        ]
    if not accounts_made:
        lines.append(
            f"  id -u {user} >/dev/null 2>&1 || useradd --system --user-group --home-dir "
            f"{STATE_DIR} --no-create-home --shell /usr/sbin/nologin {user}"
        )
    if "docker" in groups:
        lines.append(
            "  # launcher = docker: the service joins the docker group (root-equivalent) "
            "to reach /var/run/docker.sock"
        )
    lines += [
        f"  ${{EDITOR:-vi}} {ENV_PATH}   # HF_TOKEN=... for gated models; stays 0600",
        "  # other local users can reach the replicas' own ports: docs/security.md has the "
        "nftables rule that keeps them to the service user",
        f"  {plan} plan --config {CONFIG_PATH}   # cores, ports, model: checked before starting",
        "  systemctl daemon-reload",
        "  systemctl enable --now neuron-fleet",
        '  systemctl status neuron-fleet   # Status: "3/3 replicas ready"',
        "  journalctl -u neuron-fleet -f",
    ]
    return "\n".join(lines)
