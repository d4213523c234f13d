"""The server name (SNI) of a TLS ClientHello, read from the first bytes of a tunnel (pure).

`read_client_hello(data)` looks at what a client sent first through a CONNECT tunnel and says
one of: NOT_TLS (the first byte is not a TLS handshake record), INCOMPLETE (a ClientHello is
starting but more bytes are needed), INVALID (not a well-formed ClientHello, or larger than
`MAX_HELLO` bytes), NO_NAME (a ClientHello without a server_name), or NAME with the name in
lower case. The ClientHello may be split across several TLS records (RFC 8446 5.1 allows it);
they are joined. Nothing beyond `MAX_HELLO` bytes is read, so the caller buffers at most that.

What this cannot see: anything after the ClientHello. With TLS 1.3 the rest is encrypted, an
HTTP Host header inside TLS included, and Encrypted Client Hello (ECH) hides the real name in
an extension: the outer name, which is what the network sees, is what is checked.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["MAX_HELLO", "Hello", "HelloStatus", "read_client_hello"]

MAX_HELLO = 16 * 1024
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000
_HOST_NAME = 0x00
_RECORD_HEADER = 5
_MAX_RECORD = 16384 + 2048  # TLSCiphertext may exceed 2^14 by 2048 (RFC 8446 5.2)


class HelloStatus(enum.Enum):
    NOT_TLS = "not_tls"
    INCOMPLETE = "incomplete"
    INVALID = "invalid"
    NO_NAME = "no_name"
    NAME = "name"


@dataclass(frozen=True)
class Hello:
    status: HelloStatus
    server_name: str = ""
    why: str = ""  # for INVALID: what is wrong, in words


class _Invalid(Exception):
    pass


def read_client_hello(data: bytes) -> Hello:
    """What the first bytes `data` of a tunnel say about TLS (see the module)."""
    if not data:
        return Hello(HelloStatus.INCOMPLETE)
    if data[0] != _HANDSHAKE:
        return Hello(HelloStatus.NOT_TLS)
    try:
        body = _handshake_bytes(data[:MAX_HELLO])
        if body is None:
            if len(data) >= MAX_HELLO:
                raise _Invalid(f"no complete ClientHello within {MAX_HELLO} bytes")
            return Hello(HelloStatus.INCOMPLETE)
        name = _server_name(body)
    except _Invalid as e:
        return Hello(HelloStatus.INVALID, why=str(e))
    if name is None:
        return Hello(HelloStatus.NO_NAME)
    return Hello(HelloStatus.NAME, server_name=name)


def _handshake_bytes(data: bytes) -> bytes | None:
    """The ClientHello handshake message (without its 4-byte header) joined from the
    handshake records at the start of `data`, or None when more bytes are needed."""
    joined = bytearray()
    offset = 0
    while True:
        message = _complete_message(joined)
        if message is not None:
            return message
        if len(data) - offset < _RECORD_HEADER:
            return None
        if data[offset] != _HANDSHAKE:
            raise _Invalid("a record that is not a handshake interrupts the ClientHello")
        if data[offset + 1] != 0x03:
            raise _Invalid("not a TLS record version")
        record_length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if record_length == 0 or record_length > _MAX_RECORD:
            raise _Invalid(f"a handshake record of {record_length} bytes")
        start = offset + _RECORD_HEADER
        joined += data[start : start + record_length]
        if len(data) - start < record_length:  # a partial record may hold the whole message
            return _complete_message(joined)
        offset = start + record_length


def _complete_message(joined: bytearray) -> bytes | None:
    if len(joined) < 4:
        return None
    if joined[0] != _CLIENT_HELLO:
        raise _Invalid("the first handshake message is not a ClientHello")
    length = int.from_bytes(joined[1:4], "big")
    if length + 4 > MAX_HELLO:
        raise _Invalid(f"a ClientHello of {length} bytes is over {MAX_HELLO}")
    if len(joined) < length + 4:
        return None
    return bytes(joined[4 : 4 + length])


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.offset + count > len(self.data):
            raise _Invalid("the ClientHello ends in the middle of a field")
        chunk = self.data[self.offset : self.offset + count]
        self.offset += count
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    @property
    def left(self) -> int:
        return len(self.data) - self.offset


def _server_name(body: bytes) -> str | None:
    hello = _Reader(body)
    hello.take(2)  # legacy_version
    hello.take(32)  # random
    hello.vector(1)  # legacy_session_id
    suites = hello.vector(2)
    if not suites or len(suites) % 2:
        raise _Invalid("the ClientHello's cipher suites are malformed")
    hello.vector(1)  # legacy_compression_methods
    if hello.left == 0:
        return None  # no extensions at all (TLS 1.2 allows it)
    extensions = _Reader(hello.vector(2))
    if hello.left:
        raise _Invalid("bytes after the ClientHello's extensions")
    found: str | None = None
    seen: set[int] = set()
    while extensions.left:
        kind = extensions.number(2)
        content = extensions.vector(2)
        if kind in seen:
            raise _Invalid(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == _SERVER_NAME:
            found = _host_name(content)
    return found


def _host_name(content: bytes) -> str:
    names = _Reader(_Reader(content).vector(2))
    host: str | None = None
    while names.left:
        kind = names.number(1)
        value = names.vector(2)
        if kind != _HOST_NAME:
            continue
        if host is not None:
            raise _Invalid("two host names in server_name")
        try:
            host = value.decode("ascii")
        except UnicodeDecodeError:
            raise _Invalid("a server_name that is not ASCII") from None
        if not host or "\x00" in host:
            raise _Invalid("an empty server_name")
    if host is None:
        raise _Invalid("server_name without a host name")
    return host.lower().rstrip(".")
