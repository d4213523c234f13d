"""`ImagePullCredentials`: a login for the registry a sandbox's image is pulled from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from aviato.exceptions import SandboxValidationError
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["ImagePullCredentials", "coerce_pull_credentials"]

_FIELD = "image_pull_credentials"
_MAX_CHARS = 8192  # the service's limit per value


@dataclass(frozen=True, kw_only=True, repr=False)
class ImagePullCredentials:
    """A login for the registry of a sandbox's image (a private registry, or to avoid limits).

    Either a username and password — ``ImagePullCredentials(username="bob", password="...")``,
    sent as basic auth or exchanged for a bearer token, as the registry asks — or a ready
    bearer token — ``ImagePullCredentials(token="...")``. A dict with the same keys is
    accepted wherever these are.

    They are sent with the create and used for that sandbox's pull only: the service never
    stores nor returns them. Without credentials the service uses its own Docker config
    (``~/.docker/config.json`` of the user it runs as), else pulls anonymously. An image
    already in the node's store is not pulled again, so credentials are not checked then.
    The password and token never appear in ``repr()``/``str()`` (nor in logs).

    Invalid values raise `SandboxValidationError` (a ValueError) naming the field, and a
    value that is not a string raises TypeError.
    """

    username: str = ""
    password: str = ""
    token: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            where = f"{_FIELD}.{f.name}"
            if not isinstance(value, str):
                raise TypeError(f"{where} must be a string, not {type(value).__name__}")
            if len(value) > _MAX_CHARS:
                raise SandboxValidationError(f"{where}: longer than {_MAX_CHARS} characters")
            if "\x00" in value or "\n" in value or "\r" in value:
                raise SandboxValidationError(f"{where}: contains NUL or a line break")
        if self.token:
            if self.username or self.password:
                raise SandboxValidationError(
                    f"{_FIELD}: give either a token or a username and password, not both"
                )
            return
        if not self.username and not self.password:
            raise SandboxValidationError(
                f"{_FIELD}: empty; give username= and password=, or token="
            )
        if not self.username:
            raise SandboxValidationError(f"{_FIELD}.username: required with a password")
        if not self.password:
            raise SandboxValidationError(f"{_FIELD}.password: required with a username")
        if ":" in self.username:
            raise SandboxValidationError(f"{_FIELD}.username: must not contain ':'")

    def __repr__(self) -> str:
        if self.token:
            return "ImagePullCredentials(token='***')"
        return f"ImagePullCredentials(username={self.username!r}, password='***')"

    __str__ = __repr__

    def _to_proto(self) -> pb.RegistryAuth:
        return pb.RegistryAuth(username=self.username, password=self.password, token=self.token)


def coerce_pull_credentials(
    value: ImagePullCredentials | Mapping[str, Any] | None,
) -> ImagePullCredentials | None:
    """Accepts ImagePullCredentials, a dict of its fields, or None; anything else: TypeError."""
    if value is None or isinstance(value, ImagePullCredentials):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(ImagePullCredentials)}
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            raise SandboxValidationError(
                f"{_FIELD}: unknown keys {unknown}; use username and password, or token"
            )
        return ImagePullCredentials(**dict(value))
    raise TypeError(
        f"{_FIELD} must be ImagePullCredentials, a dict or None, not {type(value).__name__}"
    )
