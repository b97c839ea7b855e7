"""balancer/client_address.py: the client behind trusted front proxies (X-Forwarded-For)."""

from __future__ import annotations

import pytest

from balancer.client_address import client_address, parse_networks

ALB = parse_networks(["10.0.0.0/16"])


@pytest.mark.parametrize(
    ("peer", "headers", "trusted", "expected"),
    [
        # no trusted proxies: the header is ignored, whatever it says
        ("10.0.3.4", ["203.0.113.7"], (), "10.0.3.4"),
        # a peer outside trusted_proxies: its header is the client's say-so
        ("198.51.100.2", ["203.0.113.7"], ALB, "198.51.100.2"),
        # through the ALB: the right-most entry not in trusted_proxies
        ("10.0.3.4", ["203.0.113.7"], ALB, "203.0.113.7"),
        ("10.0.3.4", ["6.6.6.6, 203.0.113.7"], ALB, "203.0.113.7"),  # left: client-written
        ("10.0.3.4", ["6.6.6.6, 203.0.113.7, 10.0.9.9"], ALB, "203.0.113.7"),  # 2 trusted hops
        # several headers are one list, in the order received
        ("10.0.3.4", ["6.6.6.6", "203.0.113.7, 10.0.9.9"], ALB, "203.0.113.7"),
        # every entry trusted: the left-most; no header: the peer
        ("10.0.3.4", ["10.0.1.1, 10.0.2.2"], ALB, "10.0.1.1"),
        ("10.0.3.4", [], ALB, "10.0.3.4"),
        ("10.0.3.4", [" , "], ALB, "10.0.3.4"),
        # ports, brackets, IPv6, an IPv4-mapped peer
        ("10.0.3.4", ["203.0.113.7:5123"], ALB, "203.0.113.7"),
        ("10.0.3.4", ["[2001:db8::1]:443"], ALB, "2001:db8::1"),
        ("10.0.3.4", ["2001:db8::1"], ALB, "2001:db8::1"),
        ("::ffff:10.0.3.4", ["203.0.113.7"], ALB, "203.0.113.7"),
        # not an address: kept as the key (bounded), never skipped as if trusted
        ("10.0.3.4", ["unknown"], ALB, "unknown"),
        (None, ["203.0.113.7"], ALB, "?"),
    ],
)
def test_client_address(
    peer: str | None, headers: list[str], trusted: tuple, expected: str
) -> None:
    assert client_address(peer, headers, trusted) == expected


def test_parse_networks_accepts_hosts_and_ranges_and_names_a_bad_one() -> None:
    nets = parse_networks(["10.0.3.1/16", "192.168.1.7", "fd00::/8"])
    assert [str(n) for n in nets] == ["10.0.0.0/16", "192.168.1.7/32", "fd00::/8"]
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33' is not an IP address or CIDR"):
        parse_networks(["10.0.0.0/33"])
