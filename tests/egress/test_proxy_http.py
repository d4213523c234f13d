"""The proxy's HTTP: destinations, refusals, forwarded headers, a tunnel's first bytes (pure)."""

from __future__ import annotations

import ipaddress

import pytest

from aviato.egress.proxy_http import (
    Destination,
    ProxyError,
    Refusal,
    absolute_destination,
    connect_destination,
    forwarded_headers,
    same_authority,
    tunnel_http_host,
)
from aviato.egress.tunnel import TunnelMismatch, first_bytes_verdict

from .test_sni import client_hello


def test_connect_targets() -> None:
    assert connect_destination("PyPI.test:443") == Destination("pypi.test", 443)
    v6 = connect_destination("[2001:db8::1]:443")
    assert v6.address == ipaddress.ip_address("2001:db8::1") and not v6.by_name
    assert str(v6) == "[2001:db8::1]:443"
    assert connect_destination("192.0.2.1:80").address == ipaddress.ip_address("192.0.2.1")


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("pypi.test", "host:port"),
        ("pypi.test:0", "valid port"),
        ("pypi.test:65536", "valid port"),
        ("pypi.test:http", "valid port"),
        (":443", "host:port"),
        ("127.1:80", "neither a name nor an IP"),
        ("[127.0.0.1]:80", "not an IPv6"),
        ("a_b.test:80", "letters, digits"),
    ],
)
def test_bad_connect_targets_are_refused_in_words(target: str, words: str) -> None:
    with pytest.raises(Refusal, match=words) as caught:
        connect_destination(target)
    assert caught.value.error is ProxyError.HTTP_REQUEST_ERROR


def test_absolute_targets() -> None:
    assert absolute_destination("http://PyPI.test/simple/?q=1#x") == (
        Destination("pypi.test", 80),
        "PyPI.test",
        "/simple/?q=1",
    )
    assert absolute_destination("http://pypi.test:8080") == (
        Destination("pypi.test", 8080),
        "pypi.test:8080",
        "/",
    )
    assert absolute_destination("HTTP://[2001:db8::1]:81/x")[0].port == 81
    with pytest.raises(Refusal, match="use CONNECT"):
        absolute_destination("https://pypi.test/")
    with pytest.raises(Refusal, match="user information"):
        absolute_destination("http://user@pypi.test/")
    with pytest.raises(Refusal, match="not an absolute URI"):
        absolute_destination("/simple/")


def test_host_headers_must_name_the_authority() -> None:
    pypi = Destination("pypi.test", 80)
    assert same_authority("PYPI.test", pypi, 80)
    assert same_authority("pypi.test:80", pypi, 80)
    assert not same_authority("pypi.test:8080", pypi, 80)
    assert not same_authority("evil.test", pypi, 80)
    assert not same_authority("", pypi, 80)


def test_a_refusal_is_one_response_with_proxy_status() -> None:
    response = Refusal(ProxyError.DESTINATION_IP_PROHIBITED, 'evil.test is "not" listed').response()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    status = b"Proxy-Status: aviato; error=destination_ip_prohibited; details="
    assert status + b'"aviato egress: evil.test is \\"not\\" listed"' in head
    assert body == b'aviato egress: evil.test is "not" listed\n'
    assert f"Content-Length: {len(body)}".encode() in head


def test_forwarded_headers_drop_hop_by_hop_and_proxy_headers() -> None:
    headers = [
        (b"Host", b"pypi.test"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"X-Secret", b"1"),
        (b"Keep-Alive", b"300"),
        (b"Proxy-Authorization", b"Basic eA=="),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"websocket"),
        (b"Content-Length", b"3"),
        (b"Accept", b"*/*"),
    ]
    assert forwarded_headers(headers) == [
        (b"Host", b"pypi.test"),
        (b"Content-Length", b"3"),
        (b"Accept", b"*/*"),
        (b"Connection", b"close"),
    ]


def test_tunnel_http_host() -> None:
    assert tunnel_http_host(b"GE") == (False, None)
    assert tunnel_http_host(b"GET / HTTP/1.1\r\nHost: a.test\r\n") == (False, None)
    assert tunnel_http_host(b"GET / HTTP/1.1\r\nhost:  a.test:80 \r\n\r\n") == (True, "a.test:80")
    assert tunnel_http_host(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n") == (True, "")
    assert tunnel_http_host(b"GET / HTTP/1.0\r\n\r\n") == (True, None)
    assert tunnel_http_host(b"SSH-2.0-x\r\n") == (True, None)
    assert tunnel_http_host(b"\x00\x01") == (True, None)


PYPI = Destination("pypi.test", 443)


def test_a_tunnel_must_name_its_destination() -> None:
    assert first_bytes_verdict(PYPI, client_hello("PYPI.test"))
    assert first_bytes_verdict(PYPI, client_hello(None))
    assert not first_bytes_verdict(PYPI, client_hello("pypi.test")[:20])
    with pytest.raises(TunnelMismatch, match=r"TLS server name 'evil\.test' differs"):
        first_bytes_verdict(PYPI, client_hello("evil.test"))
    with pytest.raises(TunnelMismatch, match="invalid TLS ClientHello"):
        first_bytes_verdict(PYPI, b"\x16\x03\x01\x00\x00")
    assert first_bytes_verdict(PYPI, b"GET / HTTP/1.1\r\nHost: pypi.test:8080\r\n\r\n")
    assert not first_bytes_verdict(PYPI, b"GET / HTTP/1.1\r\nHost: pypi.test")
    with pytest.raises(TunnelMismatch, match=r"HTTP Host 'evil\.test' differs"):
        first_bytes_verdict(PYPI, b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    with pytest.raises(TunnelMismatch):
        first_bytes_verdict(PYPI, b"GET / HTTP/1.1\r\nHost: a\r\nHost: pypi.test\r\n\r\n")
    assert first_bytes_verdict(PYPI, b"SSH-2.0-OpenSSH_9\r\n")


def test_an_address_tunnel_must_not_name_a_host() -> None:
    by_address = connect_destination("203.0.113.5:443")
    assert first_bytes_verdict(by_address, client_hello(None))
    assert first_bytes_verdict(by_address, b"GET / HTTP/1.1\r\nHost: 203.0.113.5\r\n\r\n")
    with pytest.raises(TunnelMismatch):
        first_bytes_verdict(by_address, client_hello("pypi.test"))
    v6 = connect_destination("[2001:db8::1]:80")
    assert first_bytes_verdict(v6, b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]:80\r\n\r\n")
