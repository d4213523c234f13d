"""What the first bytes through a CONNECT tunnel must show: the destination's own name (pure).

A tunnel is admitted for one destination. A client that then speaks TLS must name that
destination in its ClientHello's server_name (or name nothing); one that speaks plain HTTP must
name it in its Host header (the port may differ: a Host names the server, the tunnel the port).
Names compare case-insensitively; for an IP-literal destination the name must be that address.
This stops a client from reaching a permitted address while telling the server there (a CDN
front, a shared host) that it wants another site: the server would otherwise answer for a name
the policy never allowed.

What this cannot check: anything after those first bytes (a later request in the same
plain-HTTP tunnel, the Host inside TLS); the destination's address was checked and is the wall.
"""

from __future__ import annotations

from aviato.egress.policy import parse_address
from aviato.egress.proxy_http import Destination, tunnel_http_host
from aviato.egress.sni import HelloStatus, read_client_hello

__all__ = ["TunnelMismatch", "first_bytes_verdict"]


class TunnelMismatch(Exception):
    """The first bytes through a tunnel name another destination, or are not valid TLS."""


def first_bytes_verdict(destination: Destination, data: bytes) -> bool:
    """True when `data` (the client's first bytes, non-empty) may be relayed; False when more
    bytes are needed to tell. Raises TunnelMismatch when they name another host."""
    hello = read_client_hello(data)
    if hello.status is HelloStatus.INCOMPLETE:
        return False
    if hello.status is HelloStatus.INVALID:
        raise TunnelMismatch(f"an invalid TLS ClientHello to {destination}: {hello.why}")
    if hello.status is HelloStatus.NAME:
        if not _same_host(hello.server_name, destination):
            raise TunnelMismatch(
                f"TLS server name {hello.server_name[:100]!r} differs from the tunnel's "
                f"destination {destination.host}"
            )
        return True
    if hello.status is HelloStatus.NO_NAME:
        return True
    complete, host = tunnel_http_host(data)
    if not complete:
        return False
    if host is not None and not _same_host(_host_of(host), destination):
        raise TunnelMismatch(
            f"HTTP Host {host[:100]!r} differs from the tunnel's destination {destination.host}"
        )
    return True


def _host_of(authority: str) -> str:
    """The host part of a Host header ("name:port", "[v6]:port")."""
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    return authority.rpartition(":")[0] if authority.count(":") == 1 else authority


def _same_host(name: str, destination: Destination) -> bool:
    name = name.strip().lower().rstrip(".")
    if destination.address is not None:
        return parse_address(name) == destination.address
    return name == destination.host
