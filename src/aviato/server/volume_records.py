"""The registry's `volumes` table: one row per owner and name (server/volumes.py).

Migration 6 made it (owner, name, last measured size, creation time); migration 9 adds where
a volume lives and how large it may be:
- `node`: the Ray node that holds its files (its home: the node of the first sandbox that
  mounted it); "" for a volume of the local placement, or one not placed yet;
- `max_bytes`: its size, enforced by a filesystem of its own (a sized volume); 0 for a directory
  volume (made before sizes were enforced, or by a service that cannot loop-mount), whose size
  is measured against the service's bound instead.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

__all__ = ["VOLUMES_MIGRATION", "VOLUME_HOMES_MIGRATION", "VolumeRecords", "VolumeRow"]

VOLUMES_MIGRATION = """
    CREATE TABLE volumes (
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        size_bytes INTEGER NOT NULL DEFAULT 0,
        created_ns INTEGER NOT NULL,
        PRIMARY KEY (owner, name)
    );
"""

VOLUME_HOMES_MIGRATION = """
    ALTER TABLE volumes ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE volumes ADD COLUMN max_bytes INTEGER NOT NULL DEFAULT 0;
"""


@dataclass(frozen=True)
class VolumeRow:
    name: str
    size_bytes: int  # as last measured
    created_ns: int
    node: str  # its home node under Ray ("" locally, or not placed yet)
    max_bytes: int  # its enforced size (0: a directory volume)


_COLUMNS = "name, size_bytes, created_ns, node, max_bytes"


def _row(r: tuple[object, ...]) -> VolumeRow:
    return VolumeRow(str(r[0]), int(str(r[1])), int(str(r[2])), str(r[3]), int(str(r[4])))


class VolumeRecords:
    """The `volumes` table."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get(self, owner: str, name: str) -> VolumeRow | None:
        found = self._db.execute(
            f"SELECT {_COLUMNS} FROM volumes WHERE owner=? AND name=?", (owner, name)
        ).fetchone()
        return None if found is None else _row(found)

    def insert(self, owner: str, name: str, created_ns: int, max_bytes: int) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO volumes (owner, name, size_bytes, created_ns, max_bytes) "
            "VALUES (?,?,0,?,?)",
            (owner, name, created_ns, max_bytes),
        )

    def set_size(self, owner: str, name: str, size: int) -> None:
        self._db.execute(
            "UPDATE volumes SET size_bytes=? WHERE owner=? AND name=?", (size, owner, name)
        )

    def settle_node(self, owner: str, name: str, node: str) -> str:
        """Records `node` as the volume's home unless it has one; returns its home."""
        self._db.execute(
            "UPDATE volumes SET node=? WHERE owner=? AND name=? AND node=''", (node, owner, name)
        )
        row = self.get(owner, name)
        return "" if row is None else row.node

    def count(self, owner: str) -> int:
        found = self._db.execute("SELECT COUNT(*) FROM volumes WHERE owner=?", (owner,)).fetchone()
        return int(found[0])

    def of_owner(self, owner: str) -> list[VolumeRow]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM volumes WHERE owner=? ORDER BY name", (owner,)
        ).fetchall()
        return [_row(r) for r in rows]

    def delete(self, owner: str, name: str) -> bool:
        cur = self._db.execute("DELETE FROM volumes WHERE owner=? AND name=?", (owner, name))
        return cur.rowcount > 0
