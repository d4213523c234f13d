"""The gRPC servicer of aviato.v1.Admin: API keys and owners' own quotas.

Who may call it: whoever can connect to the service's unix socket. The socket is mode 0600, so
that is the service's own user, the same authority that owns the registry file; a call on the
socket is admitted whatever metadata it carries. Every call over TCP is refused with
PERMISSION_DENIED, also one with a valid key: the registry has no admin keys, and an owner's key
must never mint keys for others or lift its own quota.

The registry does the storing (`auth.create_key`, `auth.list_keys`, `auth.revoke_key`,
`Registry.set_owner_quota`); this module checks the caller, validates the request and turns
records into messages. A quota set here applies from the owner's next create on (the lifecycle
reads it from the registry at every check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from aviato.server.auth import KeyInfo, create_key, list_keys, revoke_key
from aviato.server.errors import InvalidArgument, NotFound, ServiceError
from aviato.server.registry import OwnerQuotaRecord, Registry
from aviato.v1 import admin_pb2 as apb

__all__ = ["AdminServicer"]

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]

T = TypeVar("T")

MAX_OWNER_CHARS = 128
MAX_KEY_ID_CHARS = 64
# each OwnerQuota field, and the registry's column for it
_COLUMNS = {
    "max_sandboxes": "sandboxes",
    "max_cpu_millis": "cpu_millis",
    "max_memory_bytes": "memory_bytes",
    "max_disk_bytes": "disk_bytes",
}


def _key_message(info: KeyInfo) -> apb.ApiKey:
    created = Timestamp()
    created.FromNanoseconds(info.created_ns)
    return apb.ApiKey(
        id=info.id, owner=info.owner, name=info.name, created_at=created, revoked=info.revoked
    )


def _quota_message(record: OwnerQuotaRecord) -> apb.OwnerQuota:
    message = apb.OwnerQuota(owner=record.owner)
    for name, column in _COLUMNS.items():
        value = getattr(record, column)
        if value is not None:
            setattr(message, name, value)
    return message


def _check_owner(field: str, owner: str) -> str:
    if not owner or len(owner) > MAX_OWNER_CHARS or not owner.isprintable():
        raise InvalidArgument(field, f"must be 1 to {MAX_OWNER_CHARS} printable characters")
    return owner


def _quota_record(quota: apb.OwnerQuota) -> OwnerQuotaRecord:
    values: dict[str, int | None] = {}
    for name, column in _COLUMNS.items():
        value: int | None = getattr(quota, name) if quota.HasField(name) else None
        if value is not None and value < 0:
            raise InvalidArgument(f"quota.{name}", f"{value} is negative; 0 means no bound")
        values[column] = value
    return OwnerQuotaRecord(_check_owner("quota.owner", quota.owner), **values)


class AdminServicer:
    """Implements aviato.v1.Admin over the service's registry (see the module docstring)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def _serve(self, context: Ctx, work: Callable[[], T]) -> T:
        if not context.peer().startswith("unix:"):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "the admin API is served only on the service's unix socket, to the user it runs "
                "as: run `aviato keys` on the service's machine",
            )
        try:
            return work()
        except ServiceError as e:
            code: grpc.StatusCode = getattr(grpc.StatusCode, e.code, grpc.StatusCode.INTERNAL)
            await context.abort(code, str(e))
            raise  # unreachable: abort raises

    async def CreateKey(self, request: apb.CreateKeyRequest, context: Ctx) -> apb.CreateKeyResponse:
        def create() -> apb.CreateKeyResponse:
            info, secret = create_key(self._registry, request.owner, request.name)
            return apb.CreateKeyResponse(key=_key_message(info), secret=secret)

        return await self._serve(context, create)

    async def ListKeys(self, request: apb.ListKeysRequest, context: Ctx) -> apb.ListKeysResponse:
        def listing() -> apb.ListKeysResponse:
            owner = _check_owner("owner", request.owner) if request.HasField("owner") else None
            keys = list_keys(self._registry, owner)
            return apb.ListKeysResponse(keys=[_key_message(k) for k in keys])

        return await self._serve(context, listing)

    async def RevokeKey(self, request: apb.RevokeKeyRequest, context: Ctx) -> apb.RevokeKeyResponse:
        def revoke() -> apb.RevokeKeyResponse:
            key_id = request.key_id
            if not key_id or len(key_id) > MAX_KEY_ID_CHARS:
                raise InvalidArgument("key_id", f"must be 1 to {MAX_KEY_ID_CHARS} characters")
            if not revoke_key(self._registry, key_id):
                raise NotFound(f"no active key with id {key_id}")
            return apb.RevokeKeyResponse()

        return await self._serve(context, revoke)

    async def SetOwnerQuota(
        self, request: apb.SetOwnerQuotaRequest, context: Ctx
    ) -> apb.OwnerQuota:
        def store() -> apb.OwnerQuota:
            record = _quota_record(request.quota)
            self._registry.set_owner_quota(record)
            return _quota_message(record)

        return await self._serve(context, store)

    async def GetOwnerQuotas(
        self, request: apb.GetOwnerQuotasRequest, context: Ctx
    ) -> apb.GetOwnerQuotasResponse:
        def read() -> apb.GetOwnerQuotasResponse:
            if request.HasField("owner"):
                owner = _check_owner("owner", request.owner)
                rows = [self._registry.get_owner_quota(owner) or OwnerQuotaRecord(owner)]
            else:
                rows = self._registry.list_owner_quotas()
            return apb.GetOwnerQuotasResponse(quotas=[_quota_message(r) for r in rows])

        return await self._serve(context, read)
