"""The secret calls of the gRPC transport (a base class of `GrpcTransport`)."""

from __future__ import annotations

from aviato._transport.grpc_unary import UnaryCalls
from aviato.v1 import sandbox_pb2 as pb


class SecretCalls(UnaryCalls):
    """CreateSecret, ListSecrets and DeleteSecret over `_stub`."""

    async def create_secret(
        self, request: pb.CreateSecretRequest, *, call_timeout: float | None
    ) -> pb.SecretInfo:
        answer: pb.SecretInfo = await self._unary(
            self._stub.CreateSecret, request, call_timeout, f"create secret {request.name}"
        )
        return answer

    async def list_secrets(self, *, call_timeout: float | None) -> list[pb.SecretInfo]:
        answer: pb.ListSecretsResponse = await self._unary(
            self._stub.ListSecrets, pb.ListSecretsRequest(), call_timeout, "list secrets"
        )
        return list(answer.secrets)

    async def delete_secret(self, name: str, *, call_timeout: float | None) -> None:
        request = pb.DeleteSecretRequest(name=name)
        await self._unary(self._stub.DeleteSecret, request, call_timeout, f"delete secret {name}")
