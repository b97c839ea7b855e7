"""The service's user and groups, created by ``install-service`` when it runs as root.

The unit names ``User=``, ``Group=`` and ``SupplementaryGroups=``; systemd refuses to start a
unit whose user or groups do not exist (217/USER, 216/GROUP), and ``systemd-analyze verify``
does not check them. So install-service makes them: the device group and the user with
shadow-utils' ``groupadd`` / ``useradd`` (``--prefix DIR`` when installing into another root:
shadow 4.6+, "apply changes to configuration files under DIR"; no chroot). A group a package
owns (``docker``, made by docker's package) is never created here: its absence means the
package is missing, which is an error to report, not to paper over.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

OWNED_BY_PACKAGES = frozenset({"docker"})
"""Supplementary groups that a package creates; install-service never makes them."""


@dataclass
class AccountsResult:
    done: list[str] = field(default_factory=list)
    """What was created ("group neuron", "user neuron-fleet")."""
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """An existing user that differs from what install-service would make."""


def _names(file: Path) -> set[str]:
    try:
        return {line.split(":", 1)[0] for line in file.read_text().splitlines() if line}
    except OSError:
        return set()


def group_exists(name: str, prefix: Path) -> bool:
    if prefix == Path("/"):
        try:  # NSS: also groups from LDAP / SSSD
            grp.getgrnam(name)
            return True
        except KeyError:
            return False
    return name in _names(prefix / "etc" / "group")


def user_exists(name: str, prefix: Path) -> bool:
    if prefix == Path("/"):
        try:
            pwd.getpwnam(name)
            return True
        except KeyError:
            return False
    return name in _names(prefix / "etc" / "passwd")


def can_manage(prefix: Path) -> bool:
    """Root, and a root file system with account files (a bare staging folder has none)."""
    return os.geteuid() == 0 and (prefix / "etc" / "passwd").is_file()


def ensure_accounts(
    prefix: Path, user: str, groups: list[str], home: str, runner=subprocess.run
) -> AccountsResult:
    """Create missing groups (but package-owned ones) and the system user, in that order."""
    result = AccountsResult()
    where = [] if prefix == Path("/") else ["--prefix", str(prefix)]

    def call(argv: list[str], what: str) -> bool:
        proc = runner(argv, capture_output=True, text=True, check=False)
        if proc.returncode:
            result.errors.append(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
            return False
        result.done.append(what)
        return True

    for group in groups:
        if group_exists(group, prefix):
            continue
        if group in OWNED_BY_PACKAGES:
            result.errors.append(
                f"group {group!r} does not exist: install {group} first (its package creates "
                f"the group); the unit would fail with 216/GROUP"
            )
            continue
        call(["groupadd", "--system", *where, group], f"group {group}")
    if not user_exists(user, prefix):
        # --user-group makes a group of the user's name; reuse one that already exists.
        own = ["--gid", user] if group_exists(user, prefix) else ["--user-group"]
        argv = ["useradd", "--system", *own, "--home-dir", home, "--no-create-home"]
        argv += ["--shell", "/usr/sbin/nologin", *where, user]
        call(argv, f"user {user}")
        return result
    # The user was there already (made by hand, or by an image): left as it is (it may own
    # files), but the unit's Group= (the user's name) must exist too, whatever the user's
    # primary group is (useradd -N / USERGROUPS_ENAB no give it `users`): else 216/GROUP.
    if not group_exists(user, prefix):
        call(["groupadd", "--system", *where, user], f"group {user}")
    entry = passwd_entry(user, prefix)
    if entry is not None and entry[5] != home:
        result.warnings.append(
            f"user {user} exists with home {entry[5]}, not {home}: the service's $HOME (the "
            f"docker CLI's config) is then {entry[5]}, hidden by ProtectHome=yes when under "
            f"/home; `usermod --home {home} {user}` makes it the state folder"
        )
    if entry is not None and not entry[6].endswith(("nologin", "/false")):
        result.warnings.append(
            f"user {user} exists with login shell {entry[6]}: a service account needs none "
            f"(`usermod --shell /usr/sbin/nologin {user}`)"
        )
    return result


def passwd_entry(name: str, prefix: Path) -> list[str] | None:
    """The user's 7 passwd fields (name, x, uid, gid, gecos, home, shell), or None."""
    if prefix == Path("/"):
        try:
            return [str(v) for v in pwd.getpwnam(name)]
        except KeyError:
            return None
    try:
        lines = (prefix / "etc" / "passwd").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(":")
        if fields[0] == name and len(fields) == 7:
            return fields
    return None
