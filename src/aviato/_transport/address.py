"""A service's address: ``unix:///abs/path.sock``, ``http://host[:port]`` (plaintext, port 80
by default) or ``https://host[:port]`` (TLS, port 443 by default), parsed and checked."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Target", "parse_base_url"]


@dataclass(frozen=True)
class Target:
    """A parsed base URL: the gRPC target string and whether TLS is used."""

    url: str
    target: str
    secure: bool


def parse_base_url(url: str) -> Target:
    """Parses ``unix:///path``, ``http://host:port`` or ``https://host:port``."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        path = url[len("unix:") :]
        path = "/" + path.lstrip("/")
        if path == "/":
            raise ValueError(f"base URL {url!r}: a unix URL needs an absolute socket path")
        return Target(url, f"unix://{path}", secure=False)
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"base URL {url!r} has no host")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"base URL {url!r} must not have a path or query")
        port = parts.port or (443 if scheme == "https" else 80)
        host = parts.hostname
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return Target(url, f"{host}:{port}", secure=scheme == "https")
    raise ValueError(
        f"base URL {url!r}: expected unix:///path.sock, http://host:port or https://host:port"
    )
