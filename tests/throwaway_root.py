"""Run a script as root in a throwaway copy of this machine's root file system.

``unshare --mount`` gives the script a private mount namespace in which /etc, /opt,
/usr/local, /var/lib, /var/log, /var/cache, /root and /tmp are overlayfs mounts over the real
directories, their writes landing in a tmpfs: users and groups it adds (``useradd`` writes
/etc/passwd, /etc/shadow, /etc/group), files and units it installs, all disappear with the
namespace, and the real machine is never written. Commands placed in /usr/local/bin first
(stand-ins for aws, docker, systemctl, apt-get) shadow the real ones, as on an AMI whose
/usr/local/bin holds the AWS CLI.

Whatever must be seen afterwards is collected inside the namespace by ``collect``, a command
that runs in the same namespace after the script and prints to stdout.

Needs root (or passwordless sudo) and util-linux's unshare; otherwise ``runner()`` skips, and
fails under CI=true (tests/test_deploy.py's rule for the tools the deploy tests drive).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_deploy import in_ci

OVERLAID = ("/etc", "/opt", "/usr/local", "/var/lib", "/var/log", "/var/cache", "/root", "/tmp")
"""/tmp last: the overlays' upper folders live in a tmpfs mounted under the test's tmp_path."""
CLOUD_INIT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

WRAPPER = r"""
set -euo pipefail
scratch=$1 standins=$2 script=$3
shift 3
mount -t tmpfs throwaway "$scratch"
for dir in __OVERLAID__; do
  [ -d "$dir" ] || continue
  name=${dir//\//_}
  mkdir -p "$scratch/upper$name" "$scratch/work$name"
  mount -t overlay overlay \
    -o "lowerdir=$dir,upperdir=$scratch/upper$name,workdir=$scratch/work$name" "$dir"
done
mkdir -p /usr/local/bin
cp -a "$standins"/. /usr/local/bin/
rc=0
env -i PATH=__PATH__ HOME=/root LANG=C.UTF-8 bash "$script" >/var/log/script.out 2>&1 || rc=$?
echo "$rc" >/var/log/script.rc
exec "$@"
""".replace("__OVERLAID__", " ".join(OVERLAID)).replace("__PATH__", CLOUD_INIT_PATH)


def runner() -> list[str]:
    """How to become root for unshare: nothing, or ``sudo -n``; skips when neither works."""
    problem = None
    if shutil.which("unshare") is None:
        problem = "unshare (util-linux) is not installed"
    elif os.geteuid() != 0:
        sudo = shutil.which("sudo")
        ok = sudo and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0
        if ok:
            return [str(sudo), "-n"]
        problem = "needs root or passwordless sudo (useradd and mounts in a throwaway root)"
    if problem is None:
        probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            return []
        problem = f"unshare --mount is not permitted here: {probe.stderr.strip()}"
    if in_ci():
        pytest.fail(f"CI: {problem}")
    pytest.skip(problem)


def run_in_throwaway_root(
    script: Path, standins: Path, scratch: Path, collect: list[str], timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with bash as root in the throwaway root, then ``collect`` (whose stdout
    is returned; the script's own output and exit code are in /var/log/script.out / .rc)."""
    scratch.mkdir(exist_ok=True)
    argv = [*runner(), "unshare", "--mount", "--propagation", "private", "bash", "-c", WRAPPER]
    argv += ["throwaway-root", str(scratch), str(standins), str(script), *collect]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
