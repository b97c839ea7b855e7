"""``neuron-fleet status``: one look at a running service (``GET /fleet/status``).

Standard library only, so it answers instantly even on a host under load.

The admin token comes from ``NEURON_FLEET_ADMIN_TOKEN``, else (for a balancer on this host)
the 0600 file a balancer started without a configured token writes
(balancer/token_file.py), else the service's env file when this user may read it (root).
Never from the command line, where every local user could read it in ``ps``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from balancer import token_file
from balancer.secrets_env import ADMIN_TOKEN_VAR, parse_token

ENV_FILE = "/etc/neuron-fleet/neuron-fleet.env"

DEFAULT_URL = "http://127.0.0.1:8080"
COLUMNS = ("NAME", "STATE", "CORES", "PID", "PORT", "INFLIGHT", "RESTARTS", "UPTIME", "LAST EXIT")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--url",
        default=DEFAULT_URL,
        help=f"the balancer: URL, HOST:PORT or PORT (default {DEFAULT_URL})",
    )
    add("--json", action="store_true", help="print the raw JSON")
    add("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")


def normalize_url(text: str) -> str:
    """``127.0.0.1:8080``, ``[::1]:8080``, ``8080`` -> an http:// URL (as ``listen`` is
    written); a URL with a scheme is kept."""
    text = text.strip().rstrip("/")
    if "://" in text:
        return text
    if text.isdigit():
        return f"http://127.0.0.1:{text}"
    return f"http://{text}"


def fetch_status(url: str, token: str | None, timeout: float = 5.0) -> dict[str, Any]:
    request = urllib.request.Request(f"{url.rstrip('/')}/fleet/status")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def find_token(url: str, env_file: str = ENV_FILE) -> str | None:
    """The admin token for ``url``: environment, then (loopback URLs only) the runtime file
    of a balancer on that port, then the service's env file if readable."""
    token = parse_token(os.environ.get(ADMIN_TOKEN_VAR, ""))
    if token:
        return token
    parts = urllib.parse.urlsplit(url)
    try:
        local = (
            parts.hostname == "localhost" or ipaddress.ip_address(parts.hostname or "").is_loopback
        )
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if not local:
        return None  # never send a local secret to another host
    return token_file.read_token(port) or _token_from_env_file(env_file)


def _token_from_env_file(path: str) -> str | None:
    if not os.access(path, os.R_OK):
        return None  # absent, or root-only and we are not root
    from supervisor.config import ConfigError, parse_env_file

    try:
        return parse_token(parse_env_file(path).get(ADMIN_TOKEN_VAR, ""))
    except (OSError, UnicodeDecodeError, ConfigError):
        return None


def format_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def format_table(status: dict[str, Any], url: str = "") -> str:
    replicas = status.get("replicas", [])
    ready = status.get("ready_replicas", sum(1 for r in replicas if r.get("state") == "ready"))
    head = [f"{ready}/{len(replicas)} replicas ready"]
    if "queue_depth" in status:
        head.append(f"queue {status['queue_depth']}/{status.get('max_queue', '?')}")
    if "inflight" in status:
        head.append(f"{status['inflight']} in flight")
    for key in ("policy", "launcher"):
        if status.get(key):
            head.append(f"{key} {status[key]}")
    if status.get("ttft_slo_s"):
        head.append(f"TTFT SLO {status['ttft_slo_s']:g} s")
    if status.get("draining"):
        head.append("SHUTTING DOWN")
    elif status.get("phase") == "stopping":
        head.append("STOPPING (health 503, still serving)")
    lines = [f"neuron-fleet{' at ' + url if url else ''}: {', '.join(head)}"]
    if status.get("operation"):
        lines.append(f"in progress: {status['operation']}")

    rows = [COLUMNS]
    for r in replicas:
        cap = r.get("slot_cap")
        inflight = f"{r.get('inflight', 0)}/{cap}" if cap else _cell(r.get("inflight"))
        rows.append(
            (
                _cell(r.get("name")),
                _cell(r.get("state")),
                _cell(r.get("cores")),
                _cell(r.get("pid")),
                _cell(r.get("port")),
                inflight,
                _cell(r.get("restarts")),
                format_uptime(r.get("uptime_s")),
                _cell(r.get("last_exit")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for name, reason in (status.get("failed") or {}).items():
        lines.append(f"{name} failed: {reason}")
    learned = [
        f"{r.get('name')} prefill {f['prefill_base_s'] * 1000:.0f} ms + "
        f"{f['prefill_s_per_1k_tokens']:.3f} s/1k tokens, step {f['decode_step_s'] * 1000:.1f} ms"
        for r in replicas
        if (f := r.get("forecast"))
    ]
    if learned:
        lines.append("forecast: " + "; ".join(learned))
    quarantine = status.get("quarantine") or {}
    if quarantine.get("count"):
        lines.append(
            f"quarantined requests: {quarantine['count']} (they broke replica processes; "
            f"refused with 422 until they expire)"
        )
    for q in quarantine.get("requests") or ():
        lines.append(
            f"quarantined request {q.get('digest')} ({q.get('route')}): broke "
            f"{', '.join(q.get('broke') or ())}; {q.get('refused', 0)} refused since, "
            f"expires in {format_uptime(q.get('expires_in_s'))}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    url = normalize_url(args.url)
    token = find_token(url)
    try:
        status = fetch_status(url, token, args.timeout)
    except urllib.error.HTTPError as exc:
        hints = {
            401: "it needs the admin token: set NEURON_FLEET_ADMIN_TOKEN (the service's value, "
            f"in {ENV_FILE}), or run this as the user who started the balancer",
            403: "admin routes answer loopback clients only: run this on the host itself",
            404: "no /fleet/status there: is that a neuron-fleet balancer?",
        }
        print(
            f"neuron-fleet status: {url} answered HTTP {exc.code}; "
            f"{hints.get(exc.code, exc.reason)}",
            file=sys.stderr,
        )
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"neuron-fleet status: cannot reach {url}: {reason}. Is the service running "
            "(systemctl status neuron-fleet)? Pass --url if it listens elsewhere.",
            file=sys.stderr,
        )
        return 1
    text = json.dumps(status, indent=2, sort_keys=True) if args.json else format_table(status, url)
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader left (`| head -1`): no traceback. Python's documented way: point stdout
        # at /dev/null so the interpreter's final flush does not raise again
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
