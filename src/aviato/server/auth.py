"""API keys and the owner of each call.

Keys look like `avt_<43 url-safe characters>` (32 random bytes). The registry stores only their
SHA-256: a key carries 256 bits of entropy, so nobody can search the key space from a stolen hash,
and a slow password KDF (bcrypt, scrypt) would add cost to every TCP call without adding safety.
The plaintext is shown once, by `create_key`.

Who owns a call (`Authenticator.owner_of`):
- on the unix socket (peer "unix:..."), whose file is mode 0600 so only the service's own user can
  connect: the owner "local", unless the call presents a key, in which case the key's owner;
- on TCP: the owner of a valid, non-revoked key given as `authorization: Bearer <key>`; otherwise
  UNAUTHENTICATED.

What this cannot do: it does not rate-limit guesses, and a revoked key is refused from the next
call on but calls already running continue.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from aviato.server.errors import InvalidArgument, Unauthenticated
from aviato.server.registry import ApiKeyRecord, Registry

__all__ = [
    "KEY_PREFIX",
    "LOCAL_OWNER",
    "Authenticator",
    "KeyInfo",
    "create_key",
    "generate_key",
    "hash_key",
    "list_keys",
    "revoke_key",
]

KEY_PREFIX = "avt_"
LOCAL_OWNER = "local"
_MAX_KEY_CHARS = 256


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key (never its plaintext)."""

    id: str
    owner: str
    name: str
    created_ns: int
    revoked: bool


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """Hex SHA-256 of the key (see the module docstring for why no KDF)."""
    return hashlib.sha256(key.encode()).hexdigest()


def _info(rec: ApiKeyRecord) -> KeyInfo:
    return KeyInfo(rec.id, rec.owner, rec.name, rec.created_ns, rec.revoked)


def create_key(registry: Registry, owner: str, name: str = "") -> tuple[KeyInfo, str]:
    """Creates a key for `owner`; returns its info and the plaintext (shown once, not stored)."""
    if not owner or len(owner) > 128 or not owner.isprintable():
        raise InvalidArgument("owner", "must be 1 to 128 printable characters")
    if len(name) > 256 or not name.isprintable():
        raise InvalidArgument("name", "must be at most 256 printable characters")
    key = generate_key()
    rec = ApiKeyRecord(
        id="key_" + secrets.token_hex(6),
        owner=owner,
        name=name,
        hash=hash_key(key),
        created_ns=time.time_ns(),
        revoked_ns=None,
    )
    registry.insert_key(rec)
    return _info(rec), key


def list_keys(registry: Registry, owner: str | None = None) -> list[KeyInfo]:
    return [_info(r) for r in registry.list_keys(owner)]


def revoke_key(registry: Registry, key_id: str) -> bool:
    """Revokes a key by id; False if there is no such (non-revoked) key."""
    return registry.revoke_key(key_id, time.time_ns())


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization: expected 'Bearer <api key>'")
            return token.strip()
    return None


class Authenticator:
    """Resolves the owner of a call from its peer and metadata (see the module docstring)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def owner_of(self, peer: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        key = _bearer(metadata)
        if key is None:
            if peer.startswith("unix:"):
                return LOCAL_OWNER
            raise Unauthenticated("an API key is required: send 'authorization: Bearer <key>'")
        if len(key) > _MAX_KEY_CHARS or not key.startswith(KEY_PREFIX):
            raise Unauthenticated("invalid API key")
        digest = hash_key(key)
        rec = self._registry.key_by_hash(digest)
        if rec is None or not hmac.compare_digest(rec.hash, digest):
            raise Unauthenticated("invalid API key")
        if rec.revoked:
            raise Unauthenticated("API key revoked")
        return rec.owner
