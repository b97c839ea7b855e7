"""Who a request comes from, for per-client quotas, when it arrives through a front proxy.

Behind an ALB (or nginx, HAProxy) without API keys every user shares the proxy's socket
address, so a per-client limit keyed on it is a global limit in disguise. When the socket
peer is one of the configured ``trusted_proxies``, the client is taken from
``X-Forwarded-For`` with the trusted-proxy-list method (MDN, "X-Forwarded-For", section
"Selecting an IP address"): all ``X-Forwarded-For`` headers joined as one comma-separated
list in the order received, searched from the right, skipping addresses in
``trusted_proxies``; the first other entry is the client. Entries left of it were written
by the client itself and are never believed.

Used for quotas only: the admin loopback check (balancer/access.py) keeps using the socket
peer, since a header is a client's say-so.

Trust only the load balancer's own addresses. Any host inside a trusted range can name
itself any client in ``X-Forwarded-For`` (a fresh per-client share per request), so a VPC's
whole range (a /16) lets every pod or instance in it do so. A load balancer needs far less:
an AWS ALB or NLB puts its nodes in one subnet per Availability Zone, each at least a /27
for IPv4 and a /64 for IPv6 (AWS, Elastic Load Balancing User Guide, "Subnets for your
load balancer"), so four /24 subnets (one /22) or four /64s (one /62) are more than it
needs. ``too_wide`` names the ranges past that rule; the server warns about them at start.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """``10.0.0.0/16``, ``192.168.1.7`` (one host), ``fd00::/8``; ValueError names a bad one.

    Host bits may be set (``10.0.3.1/16`` means ``10.0.0.0/16``), as in most proxy configs."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"trusted_proxies: {cidr!r} is not an IP address or CIDR range (e.g. 10.0.0.0/16)"
            ) from None
    return tuple(networks)


WIDEST_IPV4_PREFIX = 22
"""Four /24 subnets: a load balancer spanning 3-4 Availability Zones in adjacent /24s."""
WIDEST_IPV6_PREFIX = 62
"""Four /64 subnets (an AWS subnet's IPv6 block is always a /64)."""


def too_wide(networks: Iterable[Network]) -> list[Network]:
    """The trusted ranges wider than a load balancer's subnets need (see the module doc)."""
    return [
        net
        for net in networks
        if net.prefixlen
        < (WIDEST_IPV4_PREFIX if isinstance(net, ipaddress.IPv4Network) else WIDEST_IPV6_PREFIX)
    ]


def _address(entry: str) -> Address | None:
    """An ``X-Forwarded-For`` entry as an address; tolerates ``[v6]:port`` and ``v4:port``
    (some proxies add the port), None when it is not an address at all."""
    text = entry.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address | None, networks: Sequence[Network]) -> bool:
    return address is not None and any(address in net for net in networks)


def is_trusted(peer: str | None, trusted: Sequence[Network]) -> bool:
    """``peer`` (a socket address) is one of the ``trusted`` proxies."""
    return bool(peer) and _trusted(_address(peer or ""), trusted)


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]
) -> str:
    """The client's address: the socket ``peer`` unless it is a trusted proxy, else the
    right-most ``X-Forwarded-For`` entry not in ``trusted`` (the left-most entry when every
    one is trusted; the peer when there is no header)."""
    if not peer or not trusted or not _trusted(_address(peer), trusted):
        return peer or "?"
    entries = [e.strip() for value in forwarded_for for e in value.split(",") if e.strip()]
    for entry in reversed(entries):
        address = _address(entry)
        if not _trusted(address, trusted):
            return str(address) if address is not None else entry[:64]
    return str(_address(entries[0])) if entries else peer
