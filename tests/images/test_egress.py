"""The egress rules as pure logic: names, addresses, URLs, and connecting only where checked.

The real service and registry are in tests/security/test_image_egress.py; here, what those
cannot show without a DNS server of our own: that a name is resolved once per connection and
the connection goes to the very address that was checked (a rebinding resolver that answers a
public address, then 127.0.0.1, cannot slip the second one through).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpcore
import httpx
import pytest

from aviato.images.egress import (
    Egress,
    RegistryRefused,
    _GuardedBackend,
    is_public,
    parse_registry_name,
)


@pytest.mark.parametrize(
    ("text", "want"),
    [("127.0.0.1:5000", ("127.0.0.1", 5000)), ("Reg.Example", ("reg.example", None)),
     ("[::1]:80", ("::1", 80)), ("::1", ("::1", None)), ("host:1", ("host", 1))],
)  # fmt: skip
def test_registry_names(text: str, want: tuple[str, int | None]) -> None:
    assert parse_registry_name(text) == want


@pytest.mark.parametrize("bad", ["", "a b", "h:0", "h:65536", "h:x", "user@h", "h/path", "[::1"])
def test_bad_registry_names_say_what_is_wrong(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_registry_name(bad)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.0.1", "169.254.169.254", "100.64.0.1",
     "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "fe80::1%eth0", "fc00::1", "::",
     "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::", "::127.0.0.1", "ff02::1"],
)  # fmt: skip
def test_inner_addresses_are_not_public(address: str) -> None:
    assert not is_public(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses(address: str) -> None:
    assert is_public(address)


def test_urls_a_registry_may_send_us_to() -> None:
    egress = Egress.from_names(["127.0.0.1:5000", "mirror.internal"])
    origin = httpx.URL("http://127.0.0.1:5000")
    ok = ["http://127.0.0.1:5000/token", "https://auth.example.com/token",
          "http://mirror.internal:8080/x", "https://127.0.0.1:9/x"]  # fmt: skip
    for url in ok:  # (an https URL is judged by its address when connecting)
        egress.check_url(httpx.URL(url), origin, "test")
    for url in ["http://127.0.0.1:5001/token", "http://localhost:5000/x", "ftp://a/b",
                "http://auth.example.com/token", "file:///etc/passwd"]:  # fmt: skip
        with pytest.raises(RegistryRefused):
            egress.check_url(httpx.URL(url), origin, "test")
    assert egress.registry_url("127.0.0.1:5000", "127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert egress.registry_url("127.0.0.1:5001", "127.0.0.1:5001") == "https://127.0.0.1:5001"
    assert egress.registry_url("mirror.internal", "mirror.internal") == "http://mirror.internal"


class _Recorder(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.connected: list[str] = []

    async def connect_tcp(self, host: str, port: int, *_: Any, **__: Any) -> Any:
        self.connected.append(host)
        return object()


def _rebinding(answers: list[list[str]]) -> Any:
    calls = iter(answers)

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in next(calls)]

    return getaddrinfo


def test_the_checked_address_is_the_one_connected_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that answers a public address first and loopback after: the connection goes
    to the public address by number (no second lookup), and a name with any inner address among
    its answers is refused before connecting."""

    async def main() -> None:
        backend = _GuardedBackend(Egress())
        inner = _Recorder()
        backend._inner = inner  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "getaddrinfo",
                            _rebinding([["93.184.216.34"], ["127.0.0.1"],
                                        ["93.184.216.34", "10.0.0.1"]]))  # fmt: skip
        await backend.connect_tcp("rebind.example", 443)
        assert inner.connected == ["93.184.216.34"]
        with pytest.raises(RegistryRefused, match=r"127\.0\.0\.1"):
            await backend.connect_tcp("rebind.example", 443)
        with pytest.raises(RegistryRefused, match=r"10\.0\.0\.1"):
            await backend.connect_tcp("rebind.example", 443)
        assert inner.connected == ["93.184.216.34"]

    asyncio.run(main())
