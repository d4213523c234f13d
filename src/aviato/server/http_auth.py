"""Who is asking on the HTTP side (`/metrics`, the dashboard): the same owners as the API.

In this order:

1. `Authorization: Bearer <API key>`: the key's owner (what Prometheus sends, with its
   `authorization` setting); a key that is invalid or revoked is refused, never ignored.
2. The cookie `aviato_key`, which the dashboard's login form sets from a key typed into it
   (HttpOnly, SameSite=Strict, Secure under TLS): the key's owner.
3. The local user: a connection from a loopback address whose socket belongs to this
   service's own user (the kernel's table of TCP sockets, `/proc/net/tcp` and `tcp6`, names the
   uid of the client's end; this is how identd answers), with a `Host` header that names a
   loopback address or `localhost`. That is the owner "local", as on the unix socket. Another
   user of the machine, or a web page that rebinds its DNS name to 127.0.0.1 (its requests
   carry its own name in `Host`), is refused and must present a key.

Anything else is refused (401). The owner "local" is the operator: it sees every owner's
sandboxes and the whole service's metrics (as `GetServerInfo` tells it how busy the service
is); a key created for owner "local" (`aviato keys create --owner local`) gives a remote
scraper or browser the same view. Other owners see their own sandboxes only.

What this cannot do: tell a local user's processes apart (any process of the service's user
is the operator, as on the unix socket), or work where `/proc/net` is not this network
namespace's (a service started inside another namespace than its clients').
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping

from aviato.server.auth import LOCAL_OWNER, Authenticator
from aviato.server.errors import Unauthenticated

__all__ = ["COOKIE", "HttpCaller", "socket_uid"]

COOKIE = "aviato_key"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def _hex_address(host: str, port: int) -> tuple[str, str]:
    """`host:port` as /proc/net/tcp or tcp6 writes it, and which of the two files."""
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        packed = ip.packed[::-1]  # one little-endian 32-bit word
        return f"{packed.hex().upper()}:{port:04X}", "/proc/net/tcp"
    words = [ip.packed[i : i + 4][::-1] for i in range(0, 16, 4)]
    return f"{b''.join(words).hex().upper()}:{port:04X}", "/proc/net/tcp6"


def socket_uid(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The uid owning the TCP socket whose own address is `local` and whose peer is `remote`
    (as the kernel lists it), or None when there is no such socket in this namespace."""
    try:
        mine, table = _hex_address(local[0].split("%", 1)[0], local[1])
        theirs, _ = _hex_address(remote[0].split("%", 1)[0], remote[1])
    except ValueError:
        return None
    try:
        with open(table, encoding="ascii") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 7 and fields[1] == mine and fields[2] == theirs:
                    return int(fields[7])
    except (OSError, ValueError):
        return None
    return None


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _host_is_loopback(header: str) -> bool:
    """Whether a `Host` header names this machine's loopback (an address or localhost)."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host in _LOOPBACK_NAMES or _is_loopback(host)


class HttpCaller:
    """Resolves the owner of an HTTP request (see the module docstring)."""

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth
        self._uid = os.getuid()

    def owner_of(
        self,
        headers: Mapping[str, str],
        cookies: Mapping[str, str],
        peer: tuple[str, int] | None,
        local: tuple[str, int] | None,
    ) -> str:
        """The owner, or Unauthenticated saying what to send."""
        header = headers.get("Authorization")
        if header is not None:
            return self._auth.owner_of("http", [("authorization", header)])
        key = cookies.get(COOKIE)
        if key:
            return self.owner_of_key(key)
        if (
            peer is not None
            and local is not None
            and _is_loopback(peer[0])
            and _host_is_loopback(headers.get("Host", ""))
            and socket_uid(peer, local) == self._uid
        ):
            return LOCAL_OWNER
        raise Unauthenticated(
            "an API key is required: send 'Authorization: Bearer <key>' or log in at /login"
        )

    def owner_of_key(self, key: str) -> str:
        return self._auth.owner_of("http", [("authorization", f"Bearer {key.strip()}")])
