"""Where webhook deliveries may connect: the denied-network policy, and an httpx transport
that connects only to an address it has just checked.

A webhook URL is chosen by a team and called from inside the deployment, so without care it
reaches what only the deployment can reach (server-side request forgery). The rules:

- Each address is judged as itself and as every IPv4 address it embeds: IPv4-mapped
  (`::ffff:a.b.c.d`, which a dual-stack socket delivers to a.b.c.d), IPv4-compatible
  (`::a.b.c.d`), 6to4 (2002::/16), NAT64 (64:ff9b::/96, 64:ff9b:1::/48) and Teredo.
- Unspecified addresses (0.0.0.0/8, `::`) are always denied: connecting to them reaches
  this host.
- The entry `this-host` in LATHE_WEBHOOK_DENIED_NETWORKS denies every address of this
  machine's network interfaces (its LAN addresses, where services bound to 0.0.0.0 listen).
- A name is denied if any of its addresses is.
- No second lookup (DNS rebinding): the transport resolves the name once per connection,
  checks every answer and connects the socket to one of exactly those addresses; TLS still
  uses the name for SNI and certificate verification, and the Host header keeps the name.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpcore
import httpx
import psutil

from app.domain.denied_networks import IPNetwork, parse_denied_networks

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

"""The denied-networks entry for every address of this machine's interfaces."""

ALWAYS_DENIED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("::/128"),
)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

MAX_ADDRESSES_TRIED = 3
"""Connection attempts per delivery, so a name with many dead addresses cannot hold the
sender for one timeout each."""

Resolver = Callable[[str, int], list[str]]
"""(host, port) -> its addresses as strings; raises OSError when it cannot resolve."""


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def embedded_addresses(address: IPAddress) -> list[IPAddress]:
    """`address` and every IPv4 address it carries, which is where a packet to it may go."""
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        address = ipaddress.IPv6Address(address.packed)  # without a scope id
        low32 = ipaddress.IPv4Address(address.packed[-4:])
        if address.ipv4_mapped is not None:
            found.append(address.ipv4_mapped)
        elif address in _IPV4_COMPATIBLE and low32 not in ALWAYS_DENIED[0]:
            found.append(low32)  # ::a.b.c.d, deprecated; `::` and `::1` are not of this form
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address.teredo is not None:
            found.extend(address.teredo)
        if any(address in prefix for prefix in _NAT64):
            found.append(low32)
    return found


def this_host_addresses() -> set[IPAddress]:
    """Every address on this machine's interfaces, loopback included."""
    found: set[IPAddress] = set()
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                found.add(ipaddress.ip_address(entry.address.split("%", 1)[0]))
    return found


class DeniedAddress(Exception):
    """The host resolves to an address webhooks may not call."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        super().__init__(f"{host} resolves to {address}, {reason}")
        self.host, self.address, self.reason = host, address, reason


@dataclass(frozen=True)
class EgressPolicy:
    networks: tuple[IPNetwork, ...]
    this_host: bool = False
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def from_entries(
        cls, entries: Iterable[str], resolver: Resolver = system_resolver
    ) -> EgressPolicy:
        """From LATHE_WEBHOOK_DENIED_NETWORKS: CIDR networks, and `this-host`."""
        networks, this_host = parse_denied_networks(entries)
        return cls(networks, this_host, resolver)

    def denial(self, address: str, own: set[IPAddress] | None = None) -> str | None:
        """Why `address` may not be called, or None. `own`: this host's addresses, if looked up
        already."""
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
        for candidate in embedded_addresses(parsed):
            shown = "" if candidate == parsed else f" (that is {candidate})"
            if any(candidate in network for network in ALWAYS_DENIED):
                return f"an unspecified address{shown}, which reaches this host"
            for network in self.networks:
                if candidate in network:
                    return f"in the denied network {network}{shown}"
            if self.this_host:
                if own is None:
                    own = this_host_addresses()
                if candidate in own:
                    return f"an address of this host{shown}"
        return None

    def vet(self, host: str, port: int) -> list[str]:
        """`host`'s addresses, each allowed; DeniedAddress if any is not, OSError if it does
        not resolve."""
        addresses = self.resolver(host, port)
        if not addresses:
            raise OSError(f"{host} has no address")
        own = this_host_addresses() if self.this_host else None
        for address in addresses:
            reason = self.denial(address, own)
            if reason:
                raise DeniedAddress(host, address, reason)
        return addresses


class _VettingBackend(httpcore.SyncBackend):
    """Resolves and checks the host itself, then connects to the checked address."""

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = self.policy.vet(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}") from exc
        failure: Exception | None = None
        for address in addresses[:MAX_ADDRESSES_TRIED]:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure


class WebhookTransport(httpx.HTTPTransport):
    """httpx's own transport, except that every connection goes through `policy`. No proxy:
    a proxy would be the address checked, not the receiver."""

    def __init__(self, policy: EgressPolicy, verify: bool | str = True) -> None:
        super().__init__(verify=verify, trust_env=False)
        # httpx 0.28 takes no network backend (encode/httpx#3749 adds one), so its connection
        # pool is rebuilt here with ours, the same TLS context and httpx's default limits.
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_VettingBackend(policy),
        )


def webhook_client(policy: EgressPolicy, timeout: float, verify: bool | str = True) -> httpx.Client:
    """The client deliveries are sent with: checked connections, no redirects, no proxies."""
    return httpx.Client(
        transport=WebhookTransport(policy, verify),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
    )
