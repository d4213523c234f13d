"""The secret calls of aviato.v1.SandboxService: CreateSecret, ListSecrets, DeleteSecret
(server/secret_store.py, docs/secrets.md). Each is the caller's own: another owner's secret of
the same name is another secret, never seen. No answer carries a value, and neither does an
error or a log line (the value is never formatted into one)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import grpc

from aviato.server import codec, errors
from aviato.server.errors import ServiceError
from aviato.server.servicer import ServicerBase
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato.server.servicer import Ctx

__all__ = ["SecretCalls"]

log = logging.getLogger("aviato.server.secrets")

_R = TypeVar("_R")


class SecretCalls(ServicerBase):
    """CreateSecret, ListSecrets, DeleteSecret over the lifecycle's `SecretStore`."""

    async def _secret_call(self, context: Ctx, op: str, body: Callable[[str], _R]) -> _R:
        owner = await self._owner_or_abort(context)
        try:
            return body(owner)
        except ServiceError as e:
            await errors.abort(context, e)
        except Exception as e:  # a bug; the traceback names no value (none is formatted)
            log.error("%s failed: %s", op, type(e).__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")
        raise AssertionError("unreachable")  # abort raises

    async def CreateSecret(self, request: pb.CreateSecretRequest, context: Ctx) -> pb.SecretInfo:
        def body(owner: str) -> pb.SecretInfo:
            info = self._lifecycle.secrets.create(
                owner, request.name, request.value, replace_value=request.replace
            )
            log.info("secret stored owner=%s name=%s", owner, info.name)
            return codec.encode_secret(info)

        return await self._secret_call(context, "CreateSecret", body)

    async def ListSecrets(
        self, request: pb.ListSecretsRequest, context: Ctx
    ) -> pb.ListSecretsResponse:
        def body(owner: str) -> pb.ListSecretsResponse:
            found = self._lifecycle.secrets.list(owner)
            return pb.ListSecretsResponse(secrets=[codec.encode_secret(s) for s in found])

        return await self._secret_call(context, "ListSecrets", body)

    async def DeleteSecret(
        self, request: pb.DeleteSecretRequest, context: Ctx
    ) -> pb.DeleteSecretResponse:
        def body(owner: str) -> pb.DeleteSecretResponse:
            self._lifecycle.secrets.delete(owner, request.name)
            log.info("secret deleted owner=%s name=%s", owner, request.name)
            return pb.DeleteSecretResponse()

        return await self._secret_call(context, "DeleteSecret", body)
