"""`Secret`: a value the service keeps for you, encrypted, and puts into the environment of the
sandboxes that name it (docs/secrets.md).

    Secret.create("OPENAI_API_KEY", os.environ["OPENAI_API_KEY"]).result()
    sb = Sandbox.run(secrets=["OPENAI_API_KEY"])

Write-only: no call gives a value back (`Secret` has no value field), and neither does any
error. A secret is the caller's own: another owner's secret of the same name is another one.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from aviato import _defaults
from aviato._client import get_client
from aviato._operation import OperationRef
from aviato.exceptions import SandboxValidationError
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["MAX_SECRET_BYTES", "Secret", "secret_names"]

#: The largest value the service keeps (bytes of its UTF-8 text).
MAX_SECRET_BYTES = 64 * 1024
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        # Not repeated: a value given where a name goes must not reach a log through this.
        raise SandboxValidationError(
            f"{where}: that is not a secret name (not shown, in case it is a value); a secret "
            "is named like the environment variable it becomes: a letter or '_', then letters, "
            "digits and '_', at most 128"
        )
    return name


def secret_names(names: Iterable[str] | None, where: str = "secrets") -> list[str]:
    """The `secrets` option (a list of names) checked, in order, without duplicates."""
    if names is None:
        return []
    if isinstance(names, str):
        raise SandboxValidationError(
            f"{where} must be a list of secret names, e.g. secrets=['OPENAI_API_KEY'], not a string"
        )
    result: list[str] = []
    for name in names:
        if _check_name(name, where) not in result:
            result.append(name)
    return result


def _when(msg: pb.SecretInfo, field: str) -> datetime | None:
    if not msg.HasField(field):
        return None
    return datetime.fromtimestamp(getattr(msg, field).ToNanoseconds() / 1e9, tz=UTC)


@dataclass(frozen=True)
class Secret:
    """One of your secrets, as the service describes it: its name (the environment variable it
    becomes in a sandbox) and when it was created and last given a value. Never its value."""

    name: str
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @classmethod
    def _of(cls, msg: pb.SecretInfo) -> Secret:
        return cls(msg.name, _when(msg, "created_at"), _when(msg, "updated_at"))

    @classmethod
    def create(
        cls,
        name: str,
        value: str,
        *,
        replace: bool = False,
        base_url: str | None = None,
        timeout_seconds: float | None = None,
    ) -> OperationRef[Secret]:
        """Stores `value` (text, at most 64 KiB, no NUL) as your secret `name`. A name you
        have already is refused (`SandboxError`, code ALREADY_EXISTS) unless ``replace=True``;
        sandboxes already running keep the value they started with."""
        _check_name(name, "Secret.create(name, value)")
        if not isinstance(value, str):
            raise SandboxValidationError(
                f"Secret.create({name!r}, ...): the value must be text (str), not "
                f"{type(value).__name__}"
            )
        if "\x00" in value or len(value.encode()) > MAX_SECRET_BYTES:
            raise SandboxValidationError(
                f"Secret.create({name!r}, ...): a value is text of at most {MAX_SECRET_BYTES} "
                "bytes without NUL characters"
            )
        request = pb.CreateSecretRequest(name=name, value=value, replace=bool(replace))
        return OperationRef._of(cls._create(request, base_url, timeout_seconds))

    @classmethod
    async def _create(
        cls, request: pb.CreateSecretRequest, base_url: str | None, timeout_s: float | None
    ) -> Secret:
        client = await get_client(_defaults.resolve_base_url(base_url, None))
        timeout = timeout_s or _defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
        # Not retried: a create that reached the service would be refused as existing.
        return cls._of(await client.transport.create_secret(request, call_timeout=timeout))

    @classmethod
    def list(
        cls, *, base_url: str | None = None, timeout_seconds: float | None = None
    ) -> OperationRef[builtins.list[Secret]]:
        """Your secrets, by name (names and dates only)."""
        return OperationRef._of(cls._list(base_url, timeout_seconds))

    @classmethod
    async def _list(cls, base_url: str | None, timeout_s: float | None) -> builtins.list[Secret]:
        client = await get_client(_defaults.resolve_base_url(base_url, None))
        timeout = timeout_s or _defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
        found = await client.with_retry(
            lambda: client.transport.list_secrets(call_timeout=timeout), op="list secrets"
        )
        return [cls._of(s) for s in found]

    @classmethod
    def delete(
        cls,
        secret: Secret | str,
        *,
        base_url: str | None = None,
        timeout_seconds: float | None = None,
    ) -> OperationRef[None]:
        """Forgets your secret (or the secret of that name). A name you have no secret of is
        `SandboxNotFoundError`. Sandboxes already running keep its value in their environment;
        new ones naming it are refused."""
        name = _check_name(secret if isinstance(secret, str) else secret.name, "Secret.delete")
        return OperationRef._of(cls._delete(name, base_url, timeout_seconds))

    @classmethod
    async def _delete(cls, name: str, base_url: str | None, timeout_s: float | None) -> None:
        client = await get_client(_defaults.resolve_base_url(base_url, None))
        timeout = timeout_s or _defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
        await client.transport.delete_secret(name, call_timeout=timeout)
