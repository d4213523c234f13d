"""`Snapshot`: a saved copy of a sandbox's writable layer (docs/state-snapshots.md)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["Snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """A snapshot of a sandbox's writable layer, owned by the caller that took it.

    `id` names it to `Sandbox.run(snapshot=...)`; `image` is the image underneath (a sandbox
    started from it uses the same); `size_bytes` the file data it holds (holes of sparse
    files not counted); `source_sandbox_id` the sandbox it was taken from.
    """

    id: str
    source_sandbox_id: str
    image: str
    size_bytes: int
    created_at: datetime | None
    entries: int = 0
    skipped_entries: int = 0
