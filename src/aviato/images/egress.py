"""Where the registry client may connect: the service must not become a proxy into its network.

Registries, token realms and redirect targets are chosen by whoever names an image, and by the
registry itself. The rules (`Egress`):

- a registry is spoken to over HTTPS, and only on public addresses, unless the operator named
  it (`aviato server --insecure-registry HOST[:PORT]`, or `AVIATO_INSECURE_REGISTRIES`): then
  plain HTTP, and any address (loopback, private, link-local) are allowed for it;
- a token realm or a redirect stays on the registry's own origin (scheme, host and port), or
  goes to a named registry, or to HTTPS on a public address; anything else is refused before a
  single byte is sent;
- "public" is decided on the address actually connected to: every connection resolves its host
  once, refuses when any address is not global (loopback, private, link-local, CGNAT, multicast,
  reserved, and IPv4 hidden in IPv6), and connects to exactly the addresses it checked (a name
  that resolves to a public address for the check and to 127.0.0.1 for the connection, DNS
  rebinding, cannot slip through).

A named entry `HOST:PORT` names that port only; `HOST` every port of that host. Names are
compared as written (case-insensitive): naming `127.0.0.1:5000` does not name `localhost:5000`.

What this cannot do: tell a public address that routes into the operator's network (a NAT64
prefix, a public address of one of their own hosts) from any other public address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from aviato.images.errors import ImageError

__all__ = ["Egress", "RegistryRefused", "parse_registry_name"]


class RegistryRefused(ImageError):
    """The service's rules forbid contacting this registry, realm or redirect target."""


def _default_port(scheme: str) -> int:
    return 80 if scheme == "http" else 443


def parse_registry_name(text: str) -> tuple[str, int | None]:
    """("host", port or None) of a `HOST[:PORT]` name; ValueError saying what is wrong."""
    raw = text.strip().lower()
    if not raw:
        raise ValueError("an empty registry name")
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not HOST or HOST:PORT")
        port_text = rest[1:]
    elif raw.count(":") > 1:
        host, port_text = raw, ""  # a bare IPv6 address
    else:
        host, _, port_text = raw.partition(":")
    if not host or any(c in host for c in "/@?# \t"):
        raise ValueError(f"{text!r} is not HOST or HOST:PORT")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
        return host, int(port_text)
    return host, None


def is_public(address: str) -> bool:
    """Whether `address` is a global unicast address (IPv4 inside IPv6 judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip.packed[:12] == bytes(12):  # IPv4-compatible ::a.b.c.d
            embedded = ipaddress.IPv4Address(ip.packed[12:])
        if embedded is not None:
            return is_public(str(embedded))
    return bool(ip.is_global) and not ip.is_multicast


@dataclass(frozen=True)
class Egress:
    """The operator's named (insecure) registries, and the checks made with them."""

    named: tuple[tuple[str, int | None], ...] = ()

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Egress:
        return cls(tuple(parse_registry_name(n) for n in names))

    def is_named(self, host: str, port: int | None) -> bool:
        host = host.lower().strip("[]")
        return any(h == host and (p is None or p == port) for h, p in self.named)

    def registry_url(self, registry: str, api_host: str) -> str:
        """The base URL of `registry` (served at `api_host`): plain HTTP only when named."""
        host, port = parse_registry_name(registry)
        named = self.is_named(host, port if port is not None else 80)
        return f"{'http' if named else 'https'}://{api_host}"

    def check_url(self, url: httpx.URL, origin: httpx.URL, what: str) -> None:
        """Raises RegistryRefused unless `url` (a realm or a redirect target of the registry at
        `origin`) may be contacted. `what` says which step, for the message."""
        if url.scheme not in ("http", "https") or not url.host:
            raise RegistryRefused(f"{what}: only http and https URLs are followed")
        port = url.port or _default_port(url.scheme)
        if (url.scheme, url.host, port) == (
            origin.scheme, origin.host, origin.port or _default_port(origin.scheme)
        ):  # fmt: skip
            return
        if self.is_named(url.host, port) or url.scheme == "https":
            return  # https: the address is checked when connecting
        raise RegistryRefused(
            f"{what}: plain HTTP to {url.host}:{port}, which is not the registry's own host; "
            "realms and redirects must stay on the registry's host, or use HTTPS on a public "
            "address (or the operator names the host with --insecure-registry)"
        )

    def check_addresses(self, host: str, port: int, addresses: list[str]) -> None:
        """Raises RegistryRefused when `host:port` is not named and any of its addresses is
        not public."""
        if self.is_named(host, port):
            return
        inner = [a for a in addresses if not is_public(a)]
        if inner:
            raise RegistryRefused(
                f"{host}:{port} resolves to a loopback, private or otherwise non-public address "
                f"({inner[0]}); only registries the operator names (aviato server "
                "--insecure-registry HOST:PORT, or AVIATO_INSECURE_REGISTRIES) may be there"
            )

    def transport(self) -> httpx.AsyncBaseTransport:
        """An httpx transport whose every connection obeys `check_addresses` (no proxy, no
        environment)."""
        return _GuardedTransport(self)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves each host once, checks its addresses, and connects to those addresses only."""

    def __init__(self, egress: Egress) -> None:
        self._egress = egress
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
            )
        except (TimeoutError, OSError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve {host}")
        self._egress.check_addresses(host, port, addresses)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not used for registries")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport (its request and error mapping) over a pool that uses _GuardedBackend.

    httpx keeps its connection pool in `_pool`; it is replaced by one built with httpcore's
    public constructor. Should a future httpx name it otherwise, this refuses to start rather
    than run unguarded.
    """

    def __init__(self, egress: Egress) -> None:
        super().__init__(trust_env=False)
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError("this httpx keeps no _pool: registry pulls cannot be guarded")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=16,
            max_keepalive_connections=8,
            keepalive_expiry=5.0,
            network_backend=_GuardedBackend(egress),
        )
