"""`Admin`: the service's Admin API from Python — API keys for remote clients and owners'
quotas — with its records `ApiKey`, `CreatedKey` and `OwnerQuota`.

The Admin API is served only on the local service's unix socket, whose mode 0600 makes the
service's user the only one who can connect: being that user is the authority to issue keys. So
an `Admin` always talks to the service of a state directory (never to `AVIATO_BASE_URL`), and
starts it there when it is not running, as every SDK call does for the local service.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from aviato._bridge import get_bridge
from aviato._client import ensure_local_service
from aviato._transport.base import Transport
from aviato._transport.grpc import GrpcTransport
from aviato.v1 import admin_pb2 as apb

__all__ = ["Admin", "ApiKey", "CreatedKey", "OwnerQuota"]

CALL_TIMEOUT_SECONDS = 30.0
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as the registry keeps it (never its secret)."""

    #: ``key_...``
    id: str
    #: whose sandboxes the key reaches
    owner: str
    #: a note to recognise the key by
    name: str
    created_at: datetime | None
    revoked: bool

    @classmethod
    def _of(cls, key: apb.ApiKey) -> ApiKey:
        created = key.created_at.ToDatetime(tzinfo=UTC) if key.HasField("created_at") else None
        return cls(key.id, key.owner, key.name, created, key.revoked)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key and its secret (``avt_...``), which is shown this once: store it now."""

    key: ApiKey
    secret: str


@dataclass(frozen=True, slots=True)
class OwnerQuota:
    """An owner's own bounds, in place of the service's defaults. None: the service's default
    applies; 0: no bound. CPU in thousandths of a core, memory and disk in bytes."""

    owner: str
    max_sandboxes: int | None = None
    max_cpu_millis: int | None = None
    max_memory_bytes: int | None = None
    max_disk_bytes: int | None = None

    @classmethod
    def _of(cls, quota: apb.OwnerQuota) -> OwnerQuota:
        def value(name: str) -> int | None:
            return int(getattr(quota, name)) if quota.HasField(name) else None

        return cls(
            owner=quota.owner,
            max_sandboxes=value("max_sandboxes"),
            max_cpu_millis=value("max_cpu_millis"),
            max_memory_bytes=value("max_memory_bytes"),
            max_disk_bytes=value("max_disk_bytes"),
        )

    def _to_proto(self) -> apb.OwnerQuota:
        return apb.OwnerQuota(
            owner=self.owner,
            max_sandboxes=self.max_sandboxes,
            max_cpu_millis=self.max_cpu_millis,
            max_memory_bytes=self.max_memory_bytes,
            max_disk_bytes=self.max_disk_bytes,
        )


class Admin:
    """The Admin API of the service of `state_dir` (default: `AVIATO_STATE_DIR`, else the
    user's). All methods block and raise the `aviato.exceptions` error of the service's answer
    (`SandboxValidationError` for a bad owner or name, an `AviatoError` with
    ``code == "NOT_FOUND"`` for an unknown key)."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        self.state_dir = None if state_dir is None else os.fspath(state_dir)

    def create_key(self, owner: str = "local", name: str = "") -> CreatedKey:
        """Creates a key for `owner` ("local" shares the unix socket's sandboxes)."""
        request = apb.CreateKeyRequest(owner=owner, name=name)
        created = self._run(lambda t: t.create_key(request, call_timeout=CALL_TIMEOUT_SECONDS))
        return CreatedKey(ApiKey._of(created.key), created.secret)

    def list_keys(self, owner: str | None = None) -> list[ApiKey]:
        """Every key (or `owner`'s), revoked ones included."""
        request = apb.ListKeysRequest(owner=owner)
        keys = self._run(lambda t: t.list_keys(request, call_timeout=CALL_TIMEOUT_SECONDS))
        return [ApiKey._of(k) for k in keys]

    def revoke_key(self, key_id: str) -> None:
        """Revokes a key: calls presenting it are refused from then on."""
        self._run(lambda t: t.revoke_key(key_id, call_timeout=CALL_TIMEOUT_SECONDS))

    def owner_quotas(self, owner: str | None = None) -> builtins.list[OwnerQuota]:
        """`owner`'s quota (all None when it has no values of its own), or, without `owner`,
        those of every owner that has values of its own, ordered by owner."""
        rows = self._run(lambda t: t.get_owner_quotas(owner, call_timeout=CALL_TIMEOUT_SECONDS))
        return [OwnerQuota._of(row) for row in rows]

    def set_owner_quota(self, quota: OwnerQuota) -> OwnerQuota:
        """Replaces `quota.owner`'s own values (a None field goes back to the service's
        default), from the next create on; returns what was stored."""
        message = quota._to_proto()
        stored = self._run(lambda t: t.set_owner_quota(message, call_timeout=CALL_TIMEOUT_SECONDS))
        return OwnerQuota._of(stored)

    def _run(self, call: Callable[[Transport], Awaitable[R]]) -> R:
        return get_bridge().run(self._call(call))

    async def _call(self, call: Callable[[Transport], Awaitable[R]]) -> R:
        """One call on a connection of its own to the state directory's socket."""
        socket_path = await ensure_local_service(self.state_dir)
        transport = GrpcTransport(f"unix://{socket_path}")
        try:
            return await call(transport)
        finally:
            await transport.close()
