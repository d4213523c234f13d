"""Which addresses are the host's own: the kernel's bind test, and the listing fallback."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from aviato.egress.host_addresses import HostAddresses

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
"""
IF_INET6 = """fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def fake_proc(tmp_path: Path, nonlocal_bind: str) -> Path:
    for version in ("ipv4", "ipv6"):
        sysctl = tmp_path / "sys/net" / version
        sysctl.mkdir(parents=True)
        (sysctl / "ip_nonlocal_bind").write_text(nonlocal_bind + "\n")
    (tmp_path / "net").mkdir()
    (tmp_path / "net/fib_trie").write_text(FIB_TRIE)
    (tmp_path / "net/if_inet6").write_text(IF_INET6)
    return tmp_path


def test_the_kernel_says_which_addresses_bind() -> None:
    own = HostAddresses()
    assert own(ip("127.0.0.1"))
    assert own(ip("127.3.4.5"))  # the whole 127/8 is local on Linux
    assert not own(ip("203.0.113.77"))
    assert not own(ip("8.8.8.8"))


def test_with_nonlocal_bind_the_addresses_are_listed_instead(tmp_path: Path) -> None:
    own = HostAddresses(proc=fake_proc(tmp_path, "1"))
    assert own(ip("192.0.2.2"))
    assert own(ip("fd00::2"))
    assert not own(ip("192.0.2.255"))  # a broadcast route, not an address
    assert not own(ip("203.0.113.77"))  # would bind under ip_nonlocal_bind


def test_answers_are_cached_briefly(tmp_path: Path) -> None:
    now = [0.0]
    proc = fake_proc(tmp_path, "1")
    own = HostAddresses(proc=proc, clock=lambda: now[0])
    assert not own(ip("198.51.100.9"))
    (proc / "net/fib_trie").write_text(FIB_TRIE.replace("192.0.2.2", "198.51.100.9"))
    assert not own(ip("198.51.100.9"))
    now[0] = 1.5
    assert own(ip("198.51.100.9"))
