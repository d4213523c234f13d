"""Is an address one of the host's own? (Never reachable from a sandbox: policy.py.)

The exact test is the kernel's: binding a fresh socket to (address, 0) succeeds only for an
address of a local interface of this network namespace (and for the local-table routes, such
as a whole 127.0.0.0/8). It asks about the moment of the call, so a new address is seen at
once. That test lies when `net.ipv4.ip_nonlocal_bind` (or `net.ipv6.ip_nonlocal_bind`) is 1:
then any address binds. Those sysctls are read first; when one is set, the addresses are listed
instead from /proc/net/fib_trie (IPv4: entries of type "host LOCAL") and /proc/net/if_inet6.

Answers are kept for `CACHE_SECONDS`, so a flood of connections costs one bind per address
per second, not one per connection; an address added to the host is seen within that time.

What this cannot see: addresses of other network namespaces (another container's, a sandbox's
own loopback), or of other machines that route to this host. It answers for the network
namespace of the process that asks, which must be the one the gateway connects from.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["CACHE_SECONDS", "HostAddresses"]

CACHE_SECONDS = 1.0
MAX_CACHED = 4096
_PROC = Path("/proc")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class HostAddresses:
    """`host_addresses(ip)` -> whether `ip` is an address of this host (see the module)."""

    def __init__(self, proc: Path = _PROC, clock: Callable[[], float] = time.monotonic) -> None:
        self._proc = proc
        self._clock = clock
        self._answers: dict[IPAddress, tuple[float, bool]] = {}
        self._listed: tuple[float, frozenset[IPAddress]] | None = None

    def __call__(self, ip: IPAddress) -> bool:
        now = self._clock()
        cached = self._answers.get(ip)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        if self._nonlocal_bind(ip.version):
            answer = ip in self._listed_addresses(now)
        else:
            answer = _binds(ip)
        if len(self._answers) >= MAX_CACHED:
            self._answers.clear()
        self._answers[ip] = (now, answer)
        return answer

    def _nonlocal_bind(self, version: int) -> bool:
        name = "ipv4" if version == 4 else "ipv6"
        try:
            text = (self._proc / "sys/net" / name / "ip_nonlocal_bind").read_text()
        except OSError:
            return version == 6  # no IPv6 sysctl: IPv6 is off, the list answers (empty)
        return text.strip() != "0"

    def _listed_addresses(self, now: float) -> frozenset[IPAddress]:
        if self._listed is not None and now - self._listed[0] < CACHE_SECONDS:
            return self._listed[1]
        found = frozenset(
            [*_fib_trie_local(self._proc / "net/fib_trie"), *_if_inet6(self._proc / "net/if_inet6")]
        )
        self._listed = (now, found)
        return found


def _binds(ip: IPAddress) -> bool:
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return False  # no such family here: nothing of it is local
    with sock:
        try:
            sock.bind((str(ip), 0))
        except OSError as e:
            return e.errno == errno.EADDRINUSE  # cannot happen with port 0, but it is local
    return True


def _fib_trie_local(path: Path) -> list[IPAddress]:
    """The IPv4 addresses of type "host LOCAL" in /proc/net/fib_trie ("|-- ADDR" followed by
    "/32 host LOCAL")."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    found: list[IPAddress] = []
    last = ""
    for line in lines:
        text = line.strip()
        if text.startswith("|-- "):
            last = text[4:]
        elif text.startswith("/32 host LOCAL") and last:
            with contextlib.suppress(ValueError):
                found.append(ipaddress.IPv4Address(last))
    return found


def _if_inet6(path: Path) -> list[IPAddress]:
    """The IPv6 addresses of /proc/net/if_inet6 (32 hex digits per line)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    found: list[IPAddress] = []
    for line in lines:
        fields = line.split()
        if fields and len(fields[0]) == 32:
            with contextlib.suppress(ValueError):
                found.append(ipaddress.IPv6Address(int(fields[0], 16)))
    return found
