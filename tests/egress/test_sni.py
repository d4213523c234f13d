"""The TLS ClientHello reader, on real ClientHellos made by Python's ssl (pure: no network)."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aviato.egress.sni import MAX_HELLO, HelloStatus, read_client_hello


def client_hello(server_name: str | None, *, tls12: bool = False) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def split_records(hello: bytes, size: int) -> bytes:
    """The same handshake message in records of `size` bytes (RFC 8446 5.1 allows it)."""
    body = hello[5:]
    out = b""
    for start in range(0, len(body), size):
        part = body[start : start + size]
        out += hello[:3] + len(part).to_bytes(2, "big") + part
    return out


HELLO = client_hello("Files.PyPI.test")


def test_a_real_client_hello_names_its_server_in_lower_case() -> None:
    assert read_client_hello(HELLO).status is HelloStatus.NAME
    assert read_client_hello(HELLO).server_name == "files.pypi.test"
    assert read_client_hello(client_hello("a.test", tls12=True)).server_name == "a.test"


def test_a_hello_without_a_name() -> None:
    assert read_client_hello(client_hello(None)).status is HelloStatus.NO_NAME


def test_every_prefix_is_incomplete_and_more_bytes_change_nothing() -> None:
    for end in range(len(HELLO)):
        assert read_client_hello(HELLO[:end]).status is HelloStatus.INCOMPLETE, end
    assert read_client_hello(HELLO + b"\x17\x03\x03garbage").server_name == "files.pypi.test"


@pytest.mark.parametrize("size", [1, 7, 100])
def test_a_hello_split_across_records(size: int) -> None:
    split = split_records(HELLO, size)
    assert read_client_hello(split).server_name == "files.pypi.test"
    assert read_client_hello(split[:-1]).status is HelloStatus.INCOMPLETE


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"SSH-2.0-OpenSSH\r\n",
        b"\x17\x03\x03\x00\x10",
    ],
)
def test_not_tls(data: bytes) -> None:
    assert read_client_hello(data).status is HelloStatus.NOT_TLS


def test_invalid_hellos_are_told_apart_from_incomplete_ones() -> None:
    not_a_hello = HELLO[:5] + b"\x02" + HELLO[6:]  # a ServerHello
    assert read_client_hello(not_a_hello).status is HelloStatus.INVALID
    bad_version = HELLO[:1] + b"\x09" + HELLO[2:]
    assert read_client_hello(bad_version).status is HelloStatus.INVALID
    empty_record = HELLO[:3] + b"\x00\x00"
    assert read_client_hello(empty_record).status is HelloStatus.INVALID
    interrupted = split_records(HELLO, 50)[:55] + b"\x17\x03\x03\x00\x01x"
    assert read_client_hello(interrupted).status is HelloStatus.INVALID


def test_a_huge_hello_is_invalid_not_buffered_forever() -> None:
    # A handshake claiming 1 MiB: refused from its header, without waiting for the bytes.
    header = b"\x16\x03\x01\x40\x00" + b"\x01" + (1 << 20).to_bytes(3, "big")
    assert read_client_hello(header).status is HelloStatus.INVALID
    # Records that never complete a message within MAX_HELLO bytes.
    endless = split_records(HELLO[:5] + b"\x01\x00\x3f\xff" + b"\x00" * (MAX_HELLO * 2), 1000)
    assert read_client_hello(endless).status is HelloStatus.INVALID


def test_a_name_not_in_ascii_is_invalid() -> None:
    hello = client_hello("aaaaaa.test")
    assert (
        read_client_hello(hello.replace(b"aaaaaa", b"a\xffaaaa", 1)).status is HelloStatus.INVALID
    )


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_any_bytes_give_an_answer(data: bytes) -> None:
    assert read_client_hello(data).status in HelloStatus


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=len(HELLO) - 1), st.integers(min_value=0, max_value=255))
def test_a_changed_byte_never_crashes(position: int, value: int) -> None:
    changed = HELLO[:position] + bytes([value]) + HELLO[position + 1 :]
    assert read_client_hello(changed).status in HelloStatus
