"""Finding sandboxes that exist: `Sandbox.list`, `Sandbox.from_id`, `Sandbox.delete`.

`SandboxQueries` is a base class of `aviato.Sandbox`; its class methods make `Sandbox` objects
from the service's records (`_from_record`, provided by `Sandbox`).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
from collections.abc import Sequence
from typing import Self

from aviato import _defaults
from aviato._client import get_client
from aviato._operation import OperationRef
from aviato._options import check_original_only
from aviato._status import SandboxStatus
from aviato.exceptions import SandboxNotFoundError
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["SandboxQueries"]


class SandboxQueries:
    """The class-level queries of `Sandbox` (see the module docstring)."""

    @classmethod
    def _from_record(cls, record: pb.Sandbox, base_url: str | None, timeout: float | None) -> Self:
        raise NotImplementedError

    # -- class-level queries -------------------------------------------------------------------

    @classmethod
    def list(
        cls,
        *,
        tags: Sequence[str] | None = None,
        status: str | SandboxStatus | None = None,
        include_stopped: bool = False,
        base_url: str | None = None,
        timeout_seconds: float | None = None,
        show_terminated: bool | None = None,
        runway_ids: Sequence[str] | None = None,
        tower_ids: Sequence[str] | None = None,
    ) -> OperationRef[builtins.list[Self]]:
        """Finds sandboxes: those with all of `tags`, in `status` if given.

        Terminal sandboxes are left out unless `include_stopped` (or its newer name
        `show_terminated`) or `status` is a terminal status; the service keeps them until they
        are deleted or its retention has passed since they ended (`aviato server
        --keep-stopped`, default 7 days; docs/state.md). All pages are fetched. The results
        are usable `Sandbox` objects. `runway_ids` / `tower_ids`: the original SDK's placement
        filters; empty is accepted and ignored, others refused (`SandboxValidationError`).
        """
        check_original_only("runway_ids", runway_ids, "Sandbox.list")
        check_original_only("tower_ids", tower_ids, "Sandbox.list")
        include_stopped = include_stopped or bool(show_terminated)
        tag_list = list(_defaults.as_str_tuple("tags", tags))
        wanted = SandboxStatus.parse(status) if status is not None else None
        return OperationRef._of(
            cls._list(tag_list, wanted, include_stopped, base_url, timeout_seconds)
        )

    @classmethod
    async def _list(
        cls,
        tags: builtins.list[str],
        status: SandboxStatus | None,
        include_stopped: bool,
        base_url: str | None,
        timeout_s: float | None,
    ) -> builtins.list[Self]:
        url = _defaults.resolve_base_url(base_url, None)
        client = await get_client(url)
        request = pb.ListSandboxesRequest(
            tags=tags,
            include_terminated=include_stopped or bool(status and status.is_terminal),
            page_size=1000,
        )
        if status is not None:
            request.statuses.append(status.to_proto())  # type: ignore[arg-type]
        found: builtins.list[Self] = []
        fetch = functools.partial(
            client.transport.list_sandboxes,
            request,
            call_timeout=timeout_s or _defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS,
        )
        while True:
            response = await client.with_retry(fetch, op="list sandboxes")
            found.extend(cls._from_record(r, url, timeout_s) for r in response.sandboxes)
            if not response.next_page_token:
                return found
            request.page_token = response.next_page_token

    @classmethod
    def from_id(
        cls,
        sandbox_id: str,
        *,
        base_url: str | None = None,
        timeout_seconds: float | None = None,
    ) -> OperationRef[Self]:
        """Attaches to an existing sandbox (also a terminal one). Raises `SandboxNotFoundError`."""
        return OperationRef._of(cls._from_id(sandbox_id, base_url, timeout_seconds))

    @classmethod
    async def _from_id(cls, sandbox_id: str, base_url: str | None, timeout_s: float | None) -> Self:
        url = _defaults.resolve_base_url(base_url, None)
        client = await get_client(url)
        timeout = timeout_s or _defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
        record = await client.with_retry(
            lambda: client.transport.get_sandbox(sandbox_id, call_timeout=timeout), op="get sandbox"
        )
        return cls._from_record(record, url, timeout_s)

    @classmethod
    def delete(
        cls,
        sandbox_id: str,
        *,
        missing_ok: bool = False,
        base_url: str | None = None,
        timeout_seconds: float | None = None,
    ) -> OperationRef[None]:
        """Stops the sandbox if needed and removes its record. `missing_ok` ignores unknown ids."""
        return OperationRef._of(
            cls._delete(sandbox_id, missing_ok, base_url, timeout_seconds), finish_at_exit=True
        )

    @classmethod
    async def _delete(
        cls, sandbox_id: str, missing_ok: bool, base_url: str | None, timeout_s: float | None
    ) -> None:
        client = await get_client(_defaults.resolve_base_url(base_url, None))
        with contextlib.suppress(SandboxNotFoundError) if missing_ok else contextlib.nullcontext():
            timeout = timeout_s or _defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
            await client.with_retry(
                lambda: client.transport.delete_sandbox(sandbox_id, call_timeout=timeout),
                op="delete sandbox",
            )
