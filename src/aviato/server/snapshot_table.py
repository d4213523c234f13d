"""The registry's `snapshots` table (migration 6 of server/registry.py): one row a snapshot."""

from __future__ import annotations

import dataclasses

from aviato.server.records import SnapshotRecord
from aviato.server.registry import Registry

__all__ = ["SnapshotTable"]

_COLUMNS = (
    "id, owner, source_sandbox_id, image, node, size_bytes, entries, skipped, created_ns, internal"
)


class SnapshotTable:
    def __init__(self, registry: Registry) -> None:
        self._db = registry.connection

    def insert(self, snap: SnapshotRecord) -> None:
        self._db.execute(
            f"INSERT INTO snapshots ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            dataclasses.astuple(snap),
        )

    def find(self, owner: str | None = None, snapshot_id: str = "") -> list[SnapshotRecord]:
        """Snapshots of `owner` (None: every owner's), or the one of `snapshot_id`."""
        where, args = ("WHERE id=?", (snapshot_id,)) if snapshot_id else ("", ())
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM snapshots {where} ORDER BY created_ns, id", args
        ).fetchall()
        found = [
            SnapshotRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], bool(r[9]))
            for r in rows
        ]
        return [s for s in found if owner is None or s.owner == owner]

    def delete(self, snapshot_id: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))
