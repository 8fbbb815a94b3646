"""Which addresses may call: allow and deny lists of networks, and the client behind
trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from inferno.kernel import Credentials

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(entries: Sequence[str]) -> list[Network]:
    """``["10.0.0.0/8", "192.168.1.7"]`` as networks; ``ValueError`` names a bad entry."""
    parsed = []
    for entry in entries:
        try:
            parsed.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or a network in CIDR "
                             f"notation (10.0.0.0/8, fd00::/8)") from None
    return parsed


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class NetworkPolicy:
    """Allow list (empty: every address), deny list (wins), and the proxies whose
    ``X-Forwarded-For`` is believed."""

    def __init__(self, allow: Sequence[str], deny: Sequence[str],
                 trusted_proxies: Sequence[str]) -> None:
        self.allow = networks(allow)
        self.deny = networks(deny)
        self.proxies = networks(trusted_proxies)

    def client(self, credentials: Credentials) -> str:
        """The caller's address: the peer, or when the peer is a trusted proxy, the last
        address in ``X-Forwarded-For`` that is not one (a client can put anything at the
        front of that header; only what trusted proxies appended counts)."""
        peer = credentials.peer
        if not self.proxies or not self._trusted(peer):
            return peer
        forwarded = credentials.headers.get("x-forwarded-for", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _trusted(self, text: str) -> bool:
        address = _address(text)
        return address is not None and any(address in net for net in self.proxies)

    def admits(self, client: str, peer: str) -> bool:
        """Whether ``client`` may call. A peer that is no IP address (a Unix socket, the
        stdin pipe) is this machine's own and always may; a forwarded address that is no
        IP address may not."""
        address = _address(client)
        if address is None:
            return client == peer
        if any(address in net for net in self.deny):
            return False
        return not self.allow or any(address in net for net in self.allow)
