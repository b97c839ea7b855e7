"""nginx.conf for ``neuron-fleet import``: what the load balancer in front of the replicas
did (crossplane parses it, includes and all), what carries over to [balancer], and notes on
what neuron-fleet does differently."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from supervisor.import_common import Notes


@dataclass
class NginxInfo:
    """What the nginx configuration did, as far as the importer understands it."""

    path: str
    upstream: str | None = None
    servers: list[tuple[str, int, list[str]]] = field(default_factory=list)
    method: str = "round-robin"
    keepalive: bool = False
    http_version: str = "1.0"
    buffering: list[str] = field(default_factory=list)
    listen_ports: list[int] = field(default_factory=list)
    tls: bool = False
    read_timeout: str | None = None
    client_max_body_size: str | None = None
    unhandled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Directive:
    name: str
    args: list[str]
    block: list[_Directive] | None
    line: int
    file: str = ""


def parse_nginx(path: str) -> tuple[list[_Directive], list[str]]:
    """(directives with included files inlined, notes on includes that could not be read).

    Parsed by crossplane (NGINX Inc.'s parser, which lexes as nginx does: quotes, ``${var}``,
    comments; crossplane 0.5.8, parser.py). Context and argument checks are off: a conf.d
    snippet (``upstream`` at the top) is as welcome as a whole nginx.conf. Raises ValueError
    for a syntax error in ``path`` itself.
    """
    import crossplane  # only the importer needs it

    with open(path, encoding="utf-8"):
        pass  # a missing or unreadable file is the caller's OSError, not a note
    payload = crossplane.parse(
        path, check_ctx=False, check_args=False, onerror=lambda exc: type(exc).__name__
    )
    notes = []
    for error in payload["errors"]:
        where = f"{os.path.basename(error['file'])}:{error['line']}"
        if error.get("callback") in _IO_ERRORS:
            # e.g. /etc/nginx/mime.types: a path inside the nginx container, not on this host
            notes.append(f"{where}: an include was not read ({error['error']})")
        elif error["file"] == path:
            raise ValueError(f"{where}: {error['error']}")
        else:
            notes.append(f"{where}: not read: {error['error']}")
    configs = payload["config"]

    def build(statements: list[dict[str, Any]], file: str) -> list[_Directive]:
        out: list[_Directive] = []
        for stmt in statements:
            if "includes" in stmt:  # inline the included files where the include stood
                for index in stmt["includes"]:
                    out += build(configs[index]["parsed"], configs[index]["file"])
                continue
            block = build(stmt["block"], file) if "block" in stmt else None
            out.append(_Directive(stmt["directive"], stmt["args"], block, stmt["line"], file))
        return out

    return build(configs[0]["parsed"], path), notes


_IO_ERRORS = frozenset({"FileNotFoundError", "PermissionError", "IsADirectoryError", "OSError"})


def _walk(directives: list[_Directive]) -> Iterator[tuple[_Directive, tuple[str, ...]]]:
    """Every directive with the names of the blocks around it."""

    def inner(items: list[_Directive], ctx: tuple[str, ...]) -> Iterator[Any]:
        for d in items:
            yield d, ctx
            if d.block is not None:
                yield from inner(d.block, (*ctx, d.name))

    yield from inner(directives, ())


def _listen_port(args: list[str]) -> tuple[int | None, bool]:
    """``listen`` arguments -> (port, tls)."""
    if not args:
        return None, False
    address = args[0]
    tls = "ssl" in args[1:] or "quic" in args[1:]
    if address.startswith("unix:"):
        return None, tls
    port = address.rsplit(":", 1)[-1] if not address.endswith("]") else "80"
    return (int(port) if port.isdigit() else 80), tls


_KNOWN_NGINX = frozenset(
    {
        "events",
        "http",
        "upstream",
        "server",
        "location",
        "listen",
        "proxy_pass",
        "proxy_buffering",
        "proxy_http_version",
        "proxy_read_timeout",
        "client_max_body_size",
        "least_conn",
        "keepalive",
        "worker_processes",
        "worker_connections",
        "user",
        "pid",
        "error_log",
        "access_log",
        "server_name",
        "include",
        "default_type",
        "sendfile",
        "keepalive_timeout",
    }
)
_BALANCING = {
    "least_conn": "least_conn",
    "ip_hash": "ip_hash",
    "hash": "hash",
    "random": "random",
    "least_time": "least_time",
}


def analyse_nginx(path: str) -> NginxInfo:
    """Read ``path`` and describe its upstream, listen port and proxy settings."""
    tree, include_notes = parse_nginx(path)
    info = NginxInfo(path=path, notes=include_notes)
    upstreams: dict[str, _Directive] = {}
    proxied: list[str] = []
    unhandled: set[str] = set()
    for d, ctx in _walk(tree):
        if d.name == "upstream" and d.block is not None and d.args:
            upstreams[d.args[0]] = d
        elif d.name == "proxy_pass" and d.args:
            proxied.append(re.sub(r"^https?://", "", d.args[0]).split("/")[0])
        elif d.name == "listen" and "server" in ctx:
            port, tls = _listen_port(d.args)
            if port is not None:
                info.listen_ports.append(port)
            info.tls = info.tls or tls
        elif d.name == "proxy_buffering" and d.args:
            info.buffering.append(d.args[0].lower())
        elif d.name == "proxy_http_version" and d.args:
            info.http_version = d.args[0]
        elif d.name == "proxy_read_timeout" and d.args:
            info.read_timeout = d.args[0]
        elif d.name == "client_max_body_size" and d.args:
            info.client_max_body_size = d.args[0]
        elif "upstream" in ctx:
            if d.name in _BALANCING:
                info.method = _BALANCING[d.name]
            elif d.name == "keepalive":
                info.keepalive = True
            elif d.name != "server":
                unhandled.add(d.name)
        elif d.name not in _KNOWN_NGINX:
            unhandled.add(d.name)
    chosen = next((name for name in proxied if name in upstreams), None)
    if chosen is None and upstreams:
        chosen = next(iter(upstreams))
    if chosen is not None:
        info.upstream = chosen
        for d in upstreams[chosen].block or []:
            if d.name == "server" and d.args:
                host, _, port = d.args[0].rpartition(":")
                if not host or not port.isdigit():
                    host, port = d.args[0], "80"
                info.servers.append((host, int(port), d.args[1:]))
    elif proxied:
        info.notes.append(
            f"{os.path.basename(path)}: proxy_pass goes to {proxied[0]} directly, not to an "
            "upstream block"
        )
    info.unhandled = sorted(unhandled)
    return info


def nginx_notes(nginx: NginxInfo, notes: Notes) -> None:
    conf = os.path.basename(nginx.path)
    if nginx.method == "round-robin":
        notes.add(
            f"{conf}: nginx balanced round-robin, blind to load and to each replica's static "
            'batch slots; neuron-fleet uses policy = "least-outstanding" with a slot cap per '
            "replica ([balancer] max_inflight_per_replica, default: [model] batch_size) and a "
            "FIFO queue at the balancer (max_queue, queue_timeout_s): a request goes to a "
            "replica only when one of its batch slots is free"
        )
    elif nginx.method == "least_conn":
        notes.add(
            f'{conf}: least_conn -> policy = "least-outstanding", plus what nginx lacked: a '
            "slot cap per replica (max_inflight_per_replica = batch size) and a FIFO queue at "
            "the balancer"
        )
    else:
        notes.add(
            f"{conf}: {nginx.method} balancing has no equivalent (no session affinity): "
            'neuron-fleet uses policy = "least-outstanding" with slot caps and a queue'
        )
    if not nginx.buffering:
        notes.add(
            f"{conf}: nginx buffered upstream responses (proxy_buffering on, its default) "
            "unless the replica sent `X-Accel-Buffering: no`, as TGI does on its streaming "
            "routes; neuron-fleet never buffers: each event is relayed as it arrives"
        )
    elif "on" in nginx.buffering:
        notes.add(f"{conf}: proxy_buffering on: neuron-fleet never buffers (nothing to carry)")
    if nginx.http_version != "1.1" or not nginx.keepalive:
        notes.add(
            f"{conf}: nginx spoke HTTP/{nginx.http_version} to the replicas"
            + ("" if nginx.keepalive else ", a new connection per request (no upstream keepalive)")
            + "; neuron-fleet keeps HTTP/1.1 connections to the replicas open"
        )
    if nginx.read_timeout is None:
        notes.add(
            f"{conf}: nginx gave up on a replica silent for 60 s (proxy_read_timeout default); "
            "neuron-fleet waits up to [balancer] first_byte_timeout_s = 300 for the first byte "
            "(a 16k-token prefill behind a full batch is slow) and idle_timeout_s = 120 "
            "between two chunks"
        )
    else:
        notes.add(
            f"{conf}: proxy_read_timeout {nginx.read_timeout} not carried over: see [balancer] "
            "first_byte_timeout_s and idle_timeout_s"
        )
    if nginx.tls:
        notes.add(
            f"{conf}: nginx terminated TLS; neuron-fleet serves plain HTTP: keep a TLS proxy "
            "in front of it (with proxy_buffering off) if clients need HTTPS"
        )
    for host, port, params in nginx.servers:
        for param in params:
            key = param.split("=")[0]
            if key in ("max_fails", "fail_timeout"):
                notes.add(
                    f"{conf}: server {host}:{port} {param}: see [balancer] health_fall, "
                    "eject_after_failures and health_interval_s"
                )
            elif key == "max_conns":
                notes.add(
                    f"{conf}: server {host}:{port} {param} -> [balancer] "
                    "max_inflight_per_replica (when every server has the same value); requests "
                    "beyond it wait in the balancer's queue instead of failing"
                )
            else:
                notes.add(f"{conf}: server {host}:{port} {param}: not carried over")
    if nginx.unhandled:
        notes.add(f"{conf}: not carried over: {', '.join(nginx.unhandled)}")
    notes.extend(nginx.notes)


def body_size(text: str) -> int | None:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", text.strip())
    if not match:
        return None
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(match.group(1)) * scale


def balancer_values(nginx: NginxInfo | None) -> dict[str, Any]:
    """[balancer] keys nginx set explicitly and that have an equivalent."""
    values: dict[str, Any] = {}
    if nginx is None:
        return values
    size = body_size(nginx.client_max_body_size) if nginx.client_max_body_size else None
    if size:
        values["max_body_bytes"] = size
    caps = {
        p.split("=", 1)[1]
        for _, _, params in nginx.servers
        for p in params
        if p.startswith("max_conns=")
    }
    if len(caps) == 1 and (cap := caps.pop()).isdigit() and int(cap) > 0:
        values["max_inflight_per_replica"] = int(cap)
    return values
