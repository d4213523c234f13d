"""Snapshots and forks of a sandbox (docs/state.md).

`SandboxSnapshots` is a base class of `aviato.Sandbox`, not used alone: `SandboxCore` provides
the state it names.
"""

from __future__ import annotations

import builtins
from typing import Self

from aviato._client import Client
from aviato._operation import OperationRef
from aviato._snapshot import Snapshot, snapshot_of
from aviato.v1 import sandbox_pb2 as pb

MAX_FORKS = 64


class SandboxSnapshots:
    """`snapshot()` and `fork(n)`; `Sandbox` provides the state."""

    _base_url: str | None
    _request_timeout: float

    async def _ensure_started(self) -> None:
        raise NotImplementedError

    async def _client(self) -> Client:
        raise NotImplementedError

    def _require_id(self) -> str:
        raise NotImplementedError

    @classmethod
    def _from_record(cls, record: pb.Sandbox, base_url: str | None, timeout: float | None) -> Self:
        raise NotImplementedError

    def snapshot(self) -> OperationRef[Snapshot]:
        """Saves the sandbox's writable layer (every file outside the image's read-only trees,
        but not /dev/shm) as a `Snapshot` owned by the caller. The sandbox is frozen while its
        layer is copied, so the snapshot is the state of one instant. Start sandboxes from it
        with ``Sandbox.run(snapshot=snap)``; list with `Snapshot.list`. Symlinks are kept as
        links, hard links as links; device nodes and sockets are left out and set-id bits
        dropped."""
        return OperationRef._of(self._snapshot())

    async def _snapshot(self) -> Snapshot:
        await self._ensure_started()
        sandbox_id = self._require_id()
        client = await self._client()
        request = pb.CreateSnapshotRequest(sandbox_id=sandbox_id)
        answer = await client.with_retry(
            lambda: client.transport.create_snapshot(request, call_timeout=self._request_timeout),
            op="snapshot sandbox",
        )
        return snapshot_of(answer)

    def fork(self, n: int) -> OperationRef[builtins.list[Self]]:
        """`n` (1 to 64) new running sandboxes, each starting from this sandbox's current files
        (copy-on-write: none of them sees another's changes) with the same spec. Each counts
        against quotas like a create; all are made or none."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FORKS:
            raise ValueError(f"fork: n must be an integer from 1 to {MAX_FORKS}, not {n!r}")
        return OperationRef._of(self._fork(n))

    async def _fork(self, n: int) -> builtins.list[Self]:
        await self._ensure_started()
        sandbox_id = self._require_id()
        client = await self._client()
        request = pb.ForkSandboxRequest(sandbox_id=sandbox_id, count=n)
        answer = await client.transport.fork_sandbox(
            request, call_timeout=self._request_timeout + 120
        )
        return [
            type(self)._from_record(r, self._base_url, self._request_timeout)
            for r in answer.sandboxes
        ]
