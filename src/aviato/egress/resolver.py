"""Resolving a name to its addresses for the egress gateway (A and AAAA, by DNS only).

`dnspython`'s asyncio resolver asks the given nameservers (None: those of the host's
/etc/resolv.conf) for A and AAAA at once, within `timeout` seconds for both; the answer is
at most `MAX_ADDRESSES` addresses, IPv4 first, in the order received. Only DNS is asked:
/etc/hosts, mDNS and the search domains of resolv.conf are not (the name is absolute), so
"localhost" or a name in the host's /etc/hosts means nothing special here.

Answers are cached (dnspython's LRU cache, `CACHE_ENTRIES` answers at most, each for its
record's TTL): a name asked for again within its TTL costs no round trip, which is about a
millisecond of every proxied request to a name otherwise (docs/benchmarks.md). The cache holds
answers, not verdicts: every address is judged again on every connection.

Errors are one exception, ResolveError, with a message in words ("evil.test: no such name").
What this cannot do: tell a lying nameserver from an honest one. Every address it returns is
judged by policy.address_verdict before anything connects to it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

__all__ = ["DEFAULT_TIMEOUT", "MAX_ADDRESSES", "ResolveError", "Resolver"]

DEFAULT_TIMEOUT = 5.0
MAX_ADDRESSES = 16
CACHE_ENTRIES = 4096

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ResolveError(Exception):
    """A name could not be resolved; the message says why in words. `timed_out`: no
    nameserver answered in time (rather than an answer that the name has no address)."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Resolver:
    """Resolves names with `nameservers` (addresses; None: /etc/resolv.conf's)."""

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        port: int = 53,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if nameservers is None:
            self._resolver = dns.asyncresolver.Resolver(configure=True)
        else:
            if not nameservers:
                raise ValueError("at least one nameserver is needed")
            for server in nameservers:
                ipaddress.ip_address(server)  # ValueError for anything but an address
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(nameservers)
        self._resolver.port = port
        self._resolver.cache = dns.resolver.LRUCache(CACHE_ENTRIES)
        self._resolver.search = []
        self._resolver.use_search_by_default = False
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout
        self._timeout = timeout

    @property
    def nameservers(self) -> tuple[str, ...]:
        return tuple(str(server) for server in self._resolver.nameservers)

    async def resolve(self, host: str) -> list[IPAddress]:
        """The addresses of `host` (a normalized name), at most MAX_ADDRESSES, IPv4 first.
        Raises ResolveError when the name does not exist, has no address, or no nameserver
        answered in time."""
        try:
            name = dns.name.from_text(host)
        except dns.exception.DNSException as e:
            raise ResolveError(f"{host}: not a name that DNS can ask for ({e})") from None
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(
                    self._query(name, dns.rdatatype.A),
                    self._query(name, dns.rdatatype.AAAA),
                    return_exceptions=True,
                ),
                self._timeout + 0.5,
            )
        except TimeoutError:
            raise ResolveError(
                f"{host}: no nameserver answered within {self._timeout:g} s", timed_out=True
            ) from None
        found: list[IPAddress] = []
        errors: list[BaseException] = []
        for answer in answers:
            if isinstance(answer, BaseException):
                errors.append(answer)
                continue
            for ip in answer:
                if ip not in found and len(found) < MAX_ADDRESSES:
                    found.append(ip)
        if found:
            return found
        words, timed_out = _words(errors)
        raise ResolveError(f"{host}: {words}", timed_out)

    async def _query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> list[IPAddress]:
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return []
        found: list[IPAddress] = []
        for record in answer:
            if len(found) >= MAX_ADDRESSES:
                break
            try:
                found.append(ipaddress.ip_address(record.address))
            except (AttributeError, ValueError):
                continue
        return found


def _words(errors: Sequence[BaseException]) -> tuple[str, bool]:
    """What went wrong, in words, and whether it was a timeout."""
    for error in errors:
        if isinstance(error, dns.resolver.NXDOMAIN):
            return "no such name", False
    for error in errors:
        if isinstance(error, dns.resolver.LifetimeTimeout | dns.exception.Timeout):
            return "no nameserver answered in time", True
    for error in errors:
        if isinstance(error, dns.resolver.NoNameservers):
            return "the nameservers failed to answer (SERVFAIL or refused)", False
    if errors:
        return f"resolution failed ({type(errors[0]).__name__}: {errors[0]})", False
    return "the name has no address", False
