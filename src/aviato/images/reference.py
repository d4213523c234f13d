"""Image references with Docker Hub's conventions: `python:3.11` → `docker.io/library/python:3.11`.

A reference is `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`. The first component is a registry when it
contains a `.` or a `:` or is `localhost`; otherwise the registry is Docker Hub (`docker.io`,
served at `registry-1.docker.io`), where a one-component repository gets `library/`. With neither
tag nor digest the tag is `latest`. With both, the digest decides what is pulled (the tag is kept
for display), as Docker does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DOCKER_HUB", "ImageRef", "InvalidReference", "parse_reference"]

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
MAX_REFERENCE_CHARS = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_REGISTRY = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


class InvalidReference(ValueError):
    """Not an image reference; the message says which part is wrong."""


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference. `registry` is the name users write (`docker.io`, `127.0.0.1:5000`)."""

    registry: str
    repository: str
    tag: str
    digest: str

    @property
    def api_host(self) -> str:
        """Where the registry's HTTP API is served."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def loopback(self) -> bool:
        """Whether the registry is named as this machine. Informational only: loopback
        registries, as every other, need the operator's --insecure-registry (egress.py)."""
        host = self.registry.rsplit(":", 1)[0] if not self.registry.endswith("]") else self.registry
        return host in _LOOPBACK

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag."""
        return self.digest or self.tag

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageRef:
    """Parses and normalizes `text`. Raises InvalidReference saying what is wrong."""
    if not text or len(text) > MAX_REFERENCE_CHARS:
        raise InvalidReference(f"{text!r} must be 1 to {MAX_REFERENCE_CHARS} characters")
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        raise InvalidReference(f"{text!r}: digest {digest!r} is not sha256:<64 hex digits>")
    tag = ""
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(f"{text!r}: tag {tag!r} is not valid")
    parts = rest.split("/")
    registry = DOCKER_HUB
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry = parts.pop(0)
        if not _REGISTRY.fullmatch(registry):
            raise InvalidReference(f"{text!r}: registry {registry!r} is not a host[:port]")
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    for part in parts:
        if not _COMPONENT.fullmatch(part):
            raise InvalidReference(
                f"{text!r}: repository component {part!r} must be lowercase letters, digits "
                "and single separators (. _ __ -)"
            )
    if registry == DOCKER_HUB and len(parts) == 1:
        parts.insert(0, "library")
    if not tag and not digest:
        tag = "latest"
    return ImageRef(registry=registry, repository="/".join(parts), tag=tag, digest=digest)
