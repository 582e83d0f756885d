"""LATHE_WEBHOOK_DENIED_NETWORKS entries: CIDR networks, and `this-host` for every address
of the server's own interfaces. Parsed once here for the settings' check at start-up and
for the webhook sender's policy (app/services/egress.py)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

THIS_HOST = "this-host"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_denied_networks(entries: Iterable[str]) -> tuple[tuple[IPNetwork, ...], bool]:
    """(the networks, whether `this-host` is among the entries); ValueError names a bad one."""
    stripped = [entry.strip() for entry in entries]
    networks = tuple(
        ipaddress.ip_network(entry, strict=False) for entry in stripped if entry != THIS_HOST
    )
    return networks, THIS_HOST in stripped
