"""`Snapshot`: a saved copy of a sandbox's writable layer (docs/state.md)."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import UTC, datetime

from aviato import _defaults
from aviato._client import get_client
from aviato._operation import OperationRef
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["Snapshot", "snapshot_of"]


@dataclass(frozen=True)
class Snapshot:
    """A snapshot of a sandbox's writable layer, owned by the caller that took it
    (`Sandbox.snapshot`).

    `id` names it to ``Sandbox.run(snapshot=...)``; `image` is the image underneath (a sandbox
    started from it uses the same); `size_bytes` the file data it holds (holes of sparse
    files not counted); `source_sandbox_id` the sandbox it was taken from; `entries` the files,
    directories and links it holds, `skipped_entries` those left out (devices, sockets).
    """

    id: str
    source_sandbox_id: str
    image: str
    size_bytes: int
    created_at: datetime | None
    entries: int = 0
    skipped_entries: int = 0

    @classmethod
    def list(
        cls, *, base_url: str | None = None, timeout_seconds: float | None = None
    ) -> OperationRef[builtins.list[Snapshot]]:
        """The caller's snapshots, oldest first."""
        return OperationRef._of(cls._list(base_url, timeout_seconds))

    @classmethod
    async def _list(cls, base_url: str | None, timeout_s: float | None) -> builtins.list[Snapshot]:
        client = await get_client(_defaults.resolve_base_url(base_url, None))
        timeout = timeout_s or _defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
        answer = await client.with_retry(
            lambda: client.transport.list_snapshots(
                pb.ListSnapshotsRequest(), call_timeout=timeout
            ),
            op="list snapshots",
        )
        return [snapshot_of(s) for s in answer.snapshots]

    @classmethod
    def delete(
        cls,
        snapshot: Snapshot | str,
        *,
        base_url: str | None = None,
        timeout_seconds: float | None = None,
    ) -> OperationRef[None]:
        """Deletes a snapshot (or its id). Refused (`SandboxError`) while a running sandbox
        starts from it; an unknown id is `SandboxNotFoundError`."""
        snapshot_id = snapshot if isinstance(snapshot, str) else snapshot.id
        return OperationRef._of(cls._delete(snapshot_id, base_url, timeout_seconds))

    @classmethod
    async def _delete(cls, snapshot_id: str, base_url: str | None, timeout_s: float | None) -> None:
        client = await get_client(_defaults.resolve_base_url(base_url, None))
        timeout = timeout_s or _defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
        request = pb.DeleteSnapshotRequest(snapshot_id=snapshot_id)
        await client.with_retry(
            lambda: client.transport.delete_snapshot(request, call_timeout=timeout),
            op="delete snapshot",
        )


def snapshot_of(msg: pb.Snapshot) -> Snapshot:
    created = (
        datetime.fromtimestamp(msg.created_at.ToNanoseconds() / 1e9, tz=UTC)
        if msg.HasField("created_at")
        else None
    )
    return Snapshot(
        id=msg.id, source_sandbox_id=msg.source_sandbox_id, image=msg.image,
        size_bytes=msg.size_bytes, created_at=created, entries=msg.entries,
        skipped_entries=msg.skipped_entries,
    )  # fmt: skip
