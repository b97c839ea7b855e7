"""Who may drive the admin API, and which settings the balancer refuses to start with.

The admin API (``/fleet/*``) drains and restarts replicas, so it must be safe on a shared
host where other users and every web page open in a browser can reach loopback:

- the client is on loopback (the socket peer; forwarded headers are ignored), unless
  ``admin_from_any_host``;
- a bearer token, always (a generated one when none is configured: balancer/token_file.py);
- ``Host`` is an IP literal, ``localhost`` or a name in ``admin_hosts``: a DNS name pointing
  at 127.0.0.1 (DNS rebinding) gets 403 even though the browser thinks it is same-origin;
- a browser's cross-site request is refused: ``Origin`` must be the balancer itself and
  ``Sec-Fetch-Site`` (sent by every current browser) ``same-origin`` or ``none``;
- a POST carries ``Content-Type: application/json`` or ``X-Neuron-Fleet-Admin``: neither can
  be sent cross-site without a CORS preflight, which the balancer never grants.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

from balancer.errors import json_error

if TYPE_CHECKING:
    from balancer.config import BalancerConfig

log = logging.getLogger("neuron_fleet.access")

ADMIN_HEADER = "X-Neuron-Fleet-Admin"
"""Any value: proves the request is not a plain cross-site form post."""
BROWSER_SAFE_FETCH_SITES = frozenset({"same-origin", "none"})
"""``Sec-Fetch-Site`` values a browser sends for requests a page of another site did not make
(``none``: typed in the address bar)."""


def bearer_matches(header: str, secrets: Iterable[str]) -> bool:
    """``Authorization: Bearer X`` against every secret, in constant time per secret.

    aiohttp decodes header bytes as UTF-8 with ``surrogateescape`` (aiohttp 3.14.5,
    ``_http_parser.pyx``/``http_parser.py``), so a token that is not UTF-8 holds surrogates:
    encoding them back the same way gives the raw bytes, which simply do not match.
    """
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    given = token.strip().encode("utf-8", "surrogateescape")
    return any([hmac.compare_digest(given, s.encode()) for s in secrets])  # no early exit


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False  # unix sockets and the like: not a network client we can vouch for


def host_allowed(host: str, extra: Iterable[str] = ()) -> bool:
    """An IP literal (no DNS involved, so no rebinding), ``localhost`` or a configured name."""
    name = _hostname(host)
    if name is None:
        return False
    if name == "localhost" or name.endswith(".localhost") or name in {e.lower() for e in extra}:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _hostname(host: str) -> str | None:
    """``[::1]:8080`` -> ``::1``; ``Example.COM.:80`` -> ``example.com``; None if unparsable."""
    try:
        parsed = urlsplit(f"//{host}")
        name = parsed.hostname
        parsed.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        return None
    return name.rstrip(".") if name else None


class _RateLimitedWarning:
    """One log line per ``interval`` per kind; the lines in between are counted, not lost."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval) < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._suppressed.pop(kind, 0)
        suffix = f" ({skipped} more like it in the last {self.interval:g} s)" if skipped else ""
        log.warning(message + suffix, *args)


refusals = _RateLimitedWarning()
"""Denied admin calls and 401s: logged with the client address, never the credentials."""


def admin_denied(request: web.Request, config: BalancerConfig) -> web.Response | None:
    """None if ``request`` may use ``/fleet/*``, else the TGI-shaped refusal (logged)."""
    denied = _admin_check(request, config)
    if denied is not None:
        refusals.warn(
            f"admin-{denied.status}",
            "admin API: refused %s %s from %s (%d: %s)",
            request.method,
            request.path,
            request.remote or "?",
            denied.status,
            denied.reason,
        )
    return denied


def _admin_check(request: web.Request, config: BalancerConfig) -> web.Response | None:
    if not config.admin_from_any_host and not is_loopback(request.remote):
        return json_error(403, "Admin routes answer loopback clients only", "forbidden")
    host = request.headers.get("Host")
    if host is not None and not host_allowed(host, config.admin_hosts):
        return json_error(
            403,
            "Admin routes answer requests for an IP address or localhost only; add this host "
            "name to [balancer] admin_hosts to allow it",
            "forbidden",
        )
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if (site is not None and site.lower() not in BROWSER_SAFE_FETCH_SITES) or (
        origin is not None and not _same_origin(origin, host)
    ):
        return json_error(403, "Cross-site requests to admin routes are refused", "forbidden")
    if not config.admin_token or not bearer_matches(
        request.headers.get("Authorization", ""), (config.admin_token,)
    ):
        return json_error(
            401,
            "Admin routes need `Authorization: Bearer <admin token>`; `neuron-fleet status` "
            "finds it by itself on this host",
            "unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if request.method == "POST" and ADMIN_HEADER not in request.headers:
        ctype = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if ctype != "application/json":
            return json_error(
                415,
                f"Admin POSTs need `Content-Type: application/json` or an `{ADMIN_HEADER}` header",
                "validation",
            )
    return None


def _same_origin(origin: str, host: str | None) -> bool:
    parsed = urlsplit(origin)
    return host is not None and parsed.scheme in ("http", "https") and parsed.netloc == host


# ------------------------------------------------------------------ settings checks


class InsecureConfigError(Exception):
    """A configuration that would expose the fleet; the message names the fix."""


def insecure_settings(config: BalancerConfig, token_configured: bool) -> list[str]:
    """What makes ``config`` unsafe to start with (empty: fine).

    ``token_configured``: the operator set an admin token (a generated one only lives in a
    local file, so remote admins could never use it).
    """
    problems = []
    public = not _is_loopback_address(config.host)
    if public and not config.api_keys and not config.allow_public_without_api_keys:
        problems.append(
            f"listen address {config.host} is reachable from the network and no API keys are "
            "set: anyone who can reach it may generate. Set NEURON_FLEET_API_KEYS, listen on "
            "127.0.0.1, or set [balancer] allow_public_without_api_keys = true (e.g. behind "
            "an authenticating proxy)"
        )
    if config.admin_from_any_host and not token_configured:
        problems.append(
            "admin_from_any_host = true needs an admin token that remote operators know: set "
            "NEURON_FLEET_ADMIN_TOKEN (in /etc/neuron-fleet/neuron-fleet.env under systemd)"
        )
    return problems


def _is_loopback_address(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or 0.0.0.0 / :: : reachable from elsewhere
