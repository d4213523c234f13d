"""The HTTP of a forward proxy, as the egress gateway speaks it (pure): where a request wants to
go, the refusals it answers, the headers it never passes on.

A request names its destination in one of two forms (RFC 9112 3.2): `CONNECT host:port` (a
tunnel, for HTTPS or any TCP) or the absolute form `GET http://host[:port]/path` (plain HTTP,
forwarded). `Destination` is what either form asks for: the host as given (a name, normalized
as the rules spell names, or an IP literal) and the port.

Refusals are answered with a status, a `Proxy-Status` header (RFC 9209: the proxy's name and
an error type a program can test) and a one-line body in words for the person reading a log.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from aviato.egress.policy import IPAddress, normalize_host, parse_address

__all__ = [
    "HOP_BY_HOP",
    "MAX_HEAD",
    "PROXY_NAME",
    "Destination",
    "ProxyError",
    "Refusal",
    "absolute_destination",
    "bad_request",
    "connect_destination",
    "forwarded_headers",
    "same_authority",
    "tunnel_http_host",
]

MAX_HEAD = 16 * 1024
PROXY_NAME = "aviato"
# Headers of one hop only (RFC 9110 7.6.1), never passed on, and the names listed in a
# request's own Connection header. Proxy-* are for this proxy alone. Content-Length and
# Transfer-Encoding frame the message and are kept (the forwarder re-frames the body).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)


class ProxyError(enum.Enum):
    """RFC 9209 error types, with the status the gateway answers them with."""

    DESTINATION_IP_PROHIBITED = ("destination_ip_prohibited", 403, "Forbidden")
    DESTINATION_IP_UNROUTABLE = ("destination_ip_unroutable", 502, "Bad Gateway")
    DNS_ERROR = ("dns_error", 502, "Bad Gateway")
    DNS_TIMEOUT = ("dns_timeout", 504, "Gateway Timeout")
    CONNECTION_REFUSED = ("connection_refused", 502, "Bad Gateway")
    CONNECTION_TIMEOUT = ("connection_timeout", 504, "Gateway Timeout")
    CONNECTION_LIMIT_REACHED = ("connection_limit_reached", 503, "Service Unavailable")
    HTTP_REQUEST_ERROR = ("http_request_error", 400, "Bad Request")
    HEAD_TOO_LARGE = ("http_request_error", 431, "Request Header Fields Too Large")
    HEAD_TIMEOUT = ("http_request_error", 408, "Request Timeout")
    HTTP_RESPONSE_INCOMPLETE = ("http_response_incomplete", 502, "Bad Gateway")

    def __init__(self, error_type: str, status: int, phrase: str) -> None:
        self.error_type = error_type
        self.status = status
        self.phrase = phrase


class Refusal(Exception):
    """A request the gateway answers with an error instead of a connection. `message`: one
    line in words, without the "aviato egress: " prefix."""

    def __init__(self, error: ProxyError, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message

    def response(self) -> bytes:
        """The whole HTTP/1.1 response, ending the connection."""
        line = " ".join(f"aviato egress: {self.message}".split())[:400]
        body = (line + "\n").encode("utf-8", "replace")
        details = line.replace("\\", "\\\\").replace('"', '\\"')
        details = details.encode("ascii", "replace").decode("ascii")
        head = (
            f"HTTP/1.1 {self.error.status} {self.error.phrase}\r\n"
            f'Proxy-Status: {PROXY_NAME}; error={self.error.error_type}; details="{details}"\r\n'
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("ascii") + body


def bad_request(message: str) -> Refusal:
    """A refusal of a malformed request (400)."""
    return Refusal(ProxyError.HTTP_REQUEST_ERROR, message)


@dataclass(frozen=True)
class Destination:
    """Where a request wants to go: `host` is a normalized name or, when `address` is set,
    the IP literal as the client wrote it."""

    host: str
    port: int
    address: IPAddress | None = None

    @property
    def by_name(self) -> bool:
        return self.address is None

    def __str__(self) -> str:
        host = (
            f"[{self.host}]"
            if self.address is not None and self.address.version == 6
            else self.host
        )
        return f"{host}:{self.port}"


def connect_destination(target: str) -> Destination:
    """The destination of `CONNECT target` ("host:port", "[v6]:port")."""
    host, sep, port_text = target.rpartition(":")
    if not sep or not host:
        raise bad_request(f"CONNECT needs host:port, not {target[:100]!r}")
    return _destination(host, _port(port_text, target))


def absolute_destination(target: str) -> tuple[Destination, str, str]:
    """(destination, authority as written, origin-form path) of an absolute-form target
    "http://host[:port]/path?query". Only http: HTTPS goes through CONNECT."""
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise bad_request(
            f"{target[:100]!r} is not an absolute URI: a proxy needs http://host/path or CONNECT"
        )
    if scheme.lower() != "http":
        raise bad_request(f"the {scheme[:20]!r} scheme is not proxied: use CONNECT for https")
    cut = min(
        (i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest)
    )
    authority, path = rest[:cut], rest[cut:]
    path = path.partition("#")[0]
    if "@" in authority:
        raise bad_request("a URI with user information (user@host) is not proxied")
    if not path.startswith("/"):
        path = "/" + path
    return _authority_destination(authority, 80), authority, path


def same_authority(host_header: str, destination: Destination, default_port: int) -> bool:
    """Whether a Host header names `destination` (case-insensitive; the default port may be
    left out on either side)."""
    try:
        seen = _authority_destination(host_header.strip(), default_port)
    except Refusal:
        return False
    return seen.host == destination.host and seen.port == destination.port


def forwarded_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` without the hop-by-hop ones, the Proxy-* ones, and those the Connection
    header names; `Connection: close` added (one request per connection)."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    kept = [
        (name, value)
        for name, value in headers
        if (low := name.lower().decode("latin-1")) not in HOP_BY_HOP
        and not low.startswith("proxy-")
        and name.lower() not in named
    ]
    return [*kept, (b"Connection", b"close")]


def tunnel_http_host(data: bytes) -> tuple[bool, str | None]:
    """What the first bytes of a tunnel say about plain HTTP: (complete, host).
    (False, None): more bytes are needed to tell. (True, None): not an HTTP request (or one
    without a Host header). (True, host): an HTTP request's Host header, as written (a
    request with two Host headers gives ""). A head longer than MAX_HEAD is judged on what is
    there."""
    method, space, _ = data[:32].partition(b" ")
    if not space:
        if len(data) < 32 and data.isalpha() and data.isupper():
            return False, None  # maybe a method still arriving
        return True, None
    if not (method.isalpha() and method.isupper()):
        return True, None
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD)
    if end < 0 and len(data) < MAX_HEAD:
        return False, None
    head = data[: end if end >= 0 else MAX_HEAD]
    hosts = [
        value.strip().decode("latin-1")
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        if name.strip().lower() == b"host"
    ]
    if not hosts:
        return True, None
    return True, hosts[0] if len(hosts) == 1 else ""


def _authority_destination(authority: str, default_port: int) -> Destination:
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise bad_request(f"{authority[:100]!r}: an unclosed '['")
        host, rest = authority[: close + 1], authority[close + 1 :]
        if rest and not rest.startswith(":"):
            raise bad_request(f"{authority[:100]!r} is not host[:port]")
        port_text = rest[1:]
    else:
        host, _, port_text = authority.partition(":")
    port = _port(port_text, authority) if port_text else default_port
    return _destination(host, port)


def _destination(host: str, port: int) -> Destination:
    address = parse_address(host)
    if address is not None:
        return Destination(str(address), port, address)
    if host.startswith("["):
        raise bad_request(f"{host[:100]!r} is not an IPv6 address")
    try:
        return Destination(normalize_host(host), port)
    except ValueError as e:
        raise bad_request(str(e)) from None


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 0 < int(text) < 65536:
        raise bad_request(f"{whole[:100]!r} has no valid port (1-65535)")
    return int(text)
