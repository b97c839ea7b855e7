"""The admin token of a balancer started without one, in a 0600 file only its user can read.

``serve``, ``demo`` and ``balance`` always protect ``/fleet/*`` with a bearer token. When the
operator configured none (``NEURON_FLEET_ADMIN_TOKEN``), the balancer makes one up and writes
it here, keyed by its port, so ``neuron-fleet status`` run by the same user works with no
extra step, while other local users (and web pages) cannot drive the admin API.

Where: ``$XDG_RUNTIME_DIR/neuron-fleet/`` (a per-user tmpfs, 0700, set by systemd-logind for
login sessions), else ``/tmp/neuron-fleet-<uid>/`` created 0700 and refused if another user
owns it or it is a symlink. Standard library only: ``neuron-fleet status`` imports it.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

TOKEN_BYTES = 32
"""256 bits, URL-safe base64 (43 characters)."""


class TokenFileError(Exception):
    """The runtime folder or file is unsafe or unusable; the message says what to do."""


def generate_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def runtime_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return Path(xdg) / "neuron-fleet"
    return Path(f"/tmp/neuron-fleet-{os.getuid()}")


def token_path(port: int) -> Path:
    return runtime_dir() / f"admin-token-{port}"


def _private_dir(create: bool) -> Path:
    folder = runtime_dir()
    if create:
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
    info = os.lstat(folder)  # FileNotFoundError when absent and not created
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise TokenFileError(
            f"{folder} is not a folder owned by uid {os.getuid()}: remove it, or set "
            "NEURON_FLEET_ADMIN_TOKEN"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(folder, 0o700)
    return folder


def write_token(port: int, token: str) -> Path:
    """Write atomically with mode 0600 from the first byte; returns the path."""
    _private_dir(create=True)
    path = token_path(port)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_token(port: int) -> str | None:
    """The token a local balancer on ``port`` wrote, or None (no file, or not ours)."""
    try:
        _private_dir(create=False)
        fd = os.open(token_path(port), os.O_RDONLY | os.O_NOFOLLOW)
    except (OSError, TokenFileError):
        return None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            return None
        text = os.read(fd, 4096).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return text or None


def remove_token(port: int, token: str) -> None:
    """Remove the file if it still holds ``token`` (a newer balancer may own it now)."""
    if read_token(port) == token:
        try:
            token_path(port).unlink()
        except OSError:
            pass
