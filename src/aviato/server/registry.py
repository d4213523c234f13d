"""The sandbox registry: a SQLite database (WAL, synchronous=NORMAL) of sandboxes, leases, keys and
owner quotas.

One `Registry` object owns one connection and must be used from one thread (the service uses it
from its event-loop thread: every statement here is an indexed lookup or a single-row write,
tens of microseconds, so offloading to a thread would cost more than it saves). Other processes
(the CLI's `keys` commands) may open the same file at the same time; SQLite's locking and a busy
timeout arbitrate.

Durability: with synchronous=NORMAL in WAL mode a power loss can lose the last transactions, but
never corrupts the file; a crash of the process loses nothing. The registry does not enforce the
lifecycle's state machine: it stores what it is told.

Times are integers of nanoseconds since the Unix epoch. Page tokens are opaque to clients:
url-safe base64 of "created_ns:id", the keyset position after the last returned row.

A sandbox's row keeps its resolved model (`records.SandboxRecord`: the `SandboxConfig` with
every default resolved, its tags and lifetime) as versioned JSON in the `model` column (see
`record_json`); statuses are `records.SandboxStatus` integers. Up to schema 2 the row kept the
request's wire bytes instead; migration 3 converts such rows once (`codec.decode_stored_spec`).
"""

from __future__ import annotations

import base64
import binascii
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aviato._private import open_private
from aviato.egress.gateway import EgressUsage
from aviato.server.codec import decode_stored_spec
from aviato.server.errors import InvalidArgument
from aviato.server.record_json import MODEL_VERSION, model_json, model_of
from aviato.server.records import (
    ALL_STATUSES,
    TERMINAL_STATUSES,
    SandboxRecord,
    SandboxStatus,
)
from aviato.server.retention import RETENTION_MIGRATION
from aviato.server.secret_store import SECRETS_MIGRATION
from aviato.server.volume_records import VOLUME_HOMES_MIGRATION, VOLUMES_MIGRATION, VolumeRecords

__all__ = [
    "ALL_STATUSES",
    "MODEL_VERSION",
    "TERMINAL_STATUSES",
    "ApiKeyRecord",
    "LeaseRecord",
    "OwnerQuotaRecord",
    "Registry",
    "SandboxRecord",
    "decode_page_token",
    "encode_page_token",
]

PENDING, CREATING, RUNNING = SandboxStatus.PENDING, SandboxStatus.CREATING, SandboxStatus.RUNNING
COMPLETED, FAILED = SandboxStatus.COMPLETED, SandboxStatus.FAILED
TERMINATED = SandboxStatus.TERMINATED


def _store_models(db: sqlite3.Connection) -> None:
    """Migration 3: every row's wire-format spec becomes its resolved model, decoded once."""
    db.execute("ALTER TABLE sandboxes ADD COLUMN model TEXT NOT NULL DEFAULT ''")
    rows = db.execute("SELECT id, spec, created_ns, expires_ns FROM sandboxes").fetchall()
    for sandbox_id, spec, created_ns, expires_ns in rows:
        config, tags, lifetime = decode_stored_spec(bytes(spec), int(created_ns), expires_ns)
        db.execute(
            "UPDATE sandboxes SET model=? WHERE id=?",
            (model_json(config, tags, lifetime), sandbox_id),
        )
    db.execute("ALTER TABLE sandboxes DROP COLUMN spec")


# A migration is a script of statements or a function of the connection; each runs once, in
# order, inside the one transaction that records it.
_MIGRATIONS: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    # 1: the initial schema.
    """
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        request_id TEXT NOT NULL,
        status INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        exit_code INTEGER,
        spec BLOB NOT NULL,
        lease_id TEXT NOT NULL DEFAULT '',
        node TEXT NOT NULL DEFAULT '',
        created_ns INTEGER NOT NULL,
        started_ns INTEGER,
        ended_ns INTEGER,
        expires_ns INTEGER,
        UNIQUE (owner, request_id)
    );
    CREATE INDEX sandboxes_owner_created ON sandboxes (owner, created_ns, id);
    CREATE INDEX sandboxes_status ON sandboxes (status);
    CREATE TABLE sandbox_tags (
        sandbox_id TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
        tag TEXT NOT NULL,
        PRIMARY KEY (sandbox_id, tag)
    );
    CREATE INDEX sandbox_tags_tag ON sandbox_tags (tag, sandbox_id);
    CREATE TABLE leases (
        owner TEXT NOT NULL,
        id TEXT NOT NULL,
        ttl_seconds REAL NOT NULL,
        expires_ns INTEGER NOT NULL,
        PRIMARY KEY (owner, id)
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created_ns INTEGER NOT NULL,
        revoked_ns INTEGER
    );
    """,
    # 2: per-owner quotas (`aviato keys quota`); NULL: the service's default for that value.
    """
    CREATE TABLE owner_quotas (
        owner TEXT PRIMARY KEY,
        sandboxes INTEGER,
        cpu_millis INTEGER,
        memory_bytes INTEGER,
        disk_bytes INTEGER,
        updated_ns INTEGER NOT NULL
    );
    """,
    # 3: the resolved model instead of the request's wire bytes.
    _store_models,
    # 4: where the service relays each exposed port of a running sandbox (port_forward.py), so
    # that a restarted service binds the same addresses again when it can.
    """
    CREATE TABLE sandbox_ports (
        sandbox_id TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
        port INTEGER NOT NULL,
        address TEXT NOT NULL,
        PRIMARY KEY (sandbox_id, port)
    );
    """,
    # 5: what went through a sandbox's egress (written when it ends; live figures come from
    # the egress gateway while it runs), and whether it has an egress listener to serve.
    """
    ALTER TABLE sandboxes ADD COLUMN egress_bytes_sent INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sandboxes ADD COLUMN egress_bytes_received INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sandboxes ADD COLUMN egress_connections INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sandboxes ADD COLUMN egress_refused INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sandboxes ADD COLUMN egress_listener INTEGER NOT NULL DEFAULT 0;
    """,
    # 6: named volumes (server/volumes.py): owner, name, last measured size, creation time.
    VOLUMES_MIGRATION,
    # 7: snapshots of writable layers (server/snapshots.py); `internal`: a fork's (not listed).
    """
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        source_sandbox_id TEXT NOT NULL,
        image TEXT NOT NULL,
        node TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        entries INTEGER NOT NULL,
        skipped INTEGER NOT NULL,
        created_ns INTEGER NOT NULL,
        internal INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX snapshots_owner ON snapshots (owner, created_ns);
    """,
    # 8: the owners' secrets, sealed (server/secret_store.py).
    SECRETS_MIGRATION,
    # 9: where each volume lives under Ray and its enforced size (server/volume_records.py).
    VOLUME_HOMES_MIGRATION,
    # 10: ended sandboxes by end time, for the retention (server/retention.py).
    RETENTION_MIGRATION,
)


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    owner: str
    id: str
    ttl_seconds: float
    expires_ns: int


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: str
    owner: str
    name: str
    hash: str
    created_ns: int
    revoked_ns: int | None

    @property
    def revoked(self) -> bool:
        return self.revoked_ns is not None


@dataclass(frozen=True, slots=True)
class OwnerQuotaRecord:
    """One owner's own quota values; None: the service's default applies (0: no bound)."""

    owner: str
    sandboxes: int | None = None
    cpu_millis: int | None = None
    memory_bytes: int | None = None
    disk_bytes: int | None = None


def encode_page_token(created_ns: int, sandbox_id: str) -> str:
    raw = f"{created_ns}:{sandbox_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[int, str]:
    """The keyset position of a token; InvalidArgument("page_token") when it is not one of ours."""
    try:
        padded = token + "=" * (-len(token) % 4)
        raw = base64.urlsafe_b64decode(padded.encode("ascii")).decode()
        created, sep, sandbox_id = raw.partition(":")
        if not sep or not sandbox_id:
            raise ValueError(raw)
        return int(created), sandbox_id
    except (ValueError, UnicodeError, binascii.Error):
        raise InvalidArgument("page_token", "is not a token returned by ListSandboxes") from None


_SANDBOX_COLUMNS = (
    "id, owner, request_id, status, reason, exit_code, model, lease_id, node, "
    "created_ns, started_ns, ended_ns, expires_ns, "
    "egress_bytes_sent, egress_bytes_received, egress_connections, egress_refused, "
    "egress_listener"
)

_INSERT_SANDBOX = (
    f"INSERT INTO sandboxes ({_SANDBOX_COLUMNS}) "
    f"VALUES ({', '.join('?' * len(_SANDBOX_COLUMNS.split(',')))})"
)


def _sandbox(row: Sequence[Any]) -> SandboxRecord:
    (sid, owner, request_id, status, reason, exit_code, model, lease_id, node,
     created, started, ended, expires, *usage, egress_listener) = row  # fmt: skip
    config, tags, lifetime = model_of(str(model), str(sid))
    return SandboxRecord(
        id=str(sid),
        owner=str(owner),
        request_id=str(request_id),
        status=SandboxStatus(int(status)),
        reason=str(reason),
        exit_code=None if exit_code is None else int(exit_code),
        config=config,
        tags=tags,
        max_lifetime_seconds=lifetime,
        lease_id=str(lease_id),
        node=str(node),
        created_ns=int(created),
        started_ns=None if started is None else int(started),
        ended_ns=None if ended is None else int(ended),
        expires_ns=None if expires is None else int(expires),
        network_usage=EgressUsage(*(int(n) for n in usage)),
        egress_listener=bool(egress_listener),
    )


class Registry:
    """The registry file, opened (and migrated) by the constructor."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # Created 0600 before SQLite opens it: its -wal and -shm files take the same mode.
        os.close(open_private(self.path))
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._migrate()

    # -- schema -------------------------------------------------------------------------------

    def _migrate(self) -> None:
        db = self._db
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_ns INTEGER NOT NULL)"
        )
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
            current = int(row[0] or 0)
            for version, script in enumerate(_MIGRATIONS, start=1):
                if version <= current:
                    continue
                if callable(script):
                    script(db)
                else:
                    for statement in script.split(";"):
                        if statement.strip():
                            db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (version, applied_ns) VALUES (?, ?)",
                    (version, time.time_ns()),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        row = self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        self._db.close()

    @property
    def volumes(self) -> VolumeRecords:
        """The `volumes` table (server/volumes.py)."""
        return VolumeRecords(self._db)

    # -- sandboxes ----------------------------------------------------------------------------

    def insert_sandbox(self, rec: SandboxRecord, config_text: str = "") -> None:
        """Inserts a new record with its tags; sqlite3.IntegrityError on a duplicate request id.
        One statement (atomic by itself) when it has no tags, else one transaction.
        `config_text`: `record_json.config_json(rec.config)` when the caller has it already."""
        db = self._db
        model = model_json(rec.config, rec.tags, rec.max_lifetime_seconds, config_text)
        u = rec.network_usage
        values = (rec.id, rec.owner, rec.request_id, int(rec.status), rec.reason,
                  rec.exit_code, model, rec.lease_id, rec.node, rec.created_ns,
                  rec.started_ns, rec.ended_ns, rec.expires_ns, u.bytes_sent,
                  u.bytes_received, u.connections, u.refused,
                  int(rec.egress_listener))  # fmt: skip
        if not rec.tags:
            db.execute(_INSERT_SANDBOX, values)
            return
        db.execute("BEGIN")
        try:
            db.execute(_INSERT_SANDBOX, values)
            db.executemany(
                "INSERT OR IGNORE INTO sandbox_tags (sandbox_id, tag) VALUES (?, ?)",
                [(rec.id, tag) for tag in rec.tags],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def update_sandbox(self, rec: SandboxRecord) -> None:
        """Writes the mutable fields (status, reason, exit code, node, times, network usage,
        egress listener) of `rec`."""
        u = rec.network_usage
        values = (int(rec.status), rec.reason, rec.exit_code, rec.node, rec.started_ns,
                  rec.ended_ns, rec.expires_ns, u.bytes_sent, u.bytes_received, u.connections,
                  u.refused, int(rec.egress_listener), rec.id)  # fmt: skip
        self._db.execute(
            "UPDATE sandboxes SET status=?, reason=?, exit_code=?, node=?, started_ns=?, "
            "ended_ns=?, expires_ns=?, egress_bytes_sent=?, egress_bytes_received=?, "
            "egress_connections=?, egress_refused=?, egress_listener=? WHERE id=?",
            values,
        )

    def update_config(self, rec: SandboxRecord) -> None:
        """Writes `rec.config`: for the few fields that may change after the create, such as
        the egress policy."""
        model = model_json(rec.config, rec.tags, rec.max_lifetime_seconds)
        self._db.execute("UPDATE sandboxes SET model=? WHERE id=?", (model, rec.id))

    def get_sandbox(self, sandbox_id: str) -> SandboxRecord | None:
        row = self._db.execute(
            f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes WHERE id=?", (sandbox_id,)
        ).fetchone()
        return None if row is None else _sandbox(row)

    def get_by_request(self, owner: str, request_id: str) -> SandboxRecord | None:
        row = self._db.execute(
            f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes WHERE owner=? AND request_id=?",
            (owner, request_id),
        ).fetchone()
        return None if row is None else _sandbox(row)

    def delete_sandbox(self, sandbox_id: str) -> bool:
        cur = self._db.execute("DELETE FROM sandboxes WHERE id=?", (sandbox_id,))
        return cur.rowcount > 0

    def sandboxes_with_status(self, statuses: Iterable[SandboxStatus]) -> list[SandboxRecord]:
        wanted = sorted({int(s) for s in statuses})
        marks = ",".join("?" * len(wanted))
        rows = self._db.execute(
            f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes WHERE status IN ({marks}) "
            "ORDER BY created_ns, id",
            wanted,
        ).fetchall()
        return [_sandbox(r) for r in rows]

    def set_port_addresses(self, sandbox_id: str, pairs: Iterable[tuple[int, str]]) -> None:
        """Replaces the (port, address) pairs recorded for `sandbox_id` (none: forgets them)."""
        db = self._db
        db.execute("BEGIN")
        try:
            db.execute("DELETE FROM sandbox_ports WHERE sandbox_id=?", (sandbox_id,))
            db.executemany(
                "INSERT INTO sandbox_ports (sandbox_id, port, address) VALUES (?, ?, ?)",
                [(sandbox_id, port, address) for port, address in pairs],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def port_addresses(self, sandbox_id: str) -> dict[int, str]:
        """The recorded address of each exposed port of `sandbox_id`."""
        rows = self._db.execute(
            "SELECT port, address FROM sandbox_ports WHERE sandbox_id=?", (sandbox_id,)
        )
        return {int(port): str(address) for port, address in rows}

    def all_sandbox_ids(self) -> set[str]:
        return {str(r[0]) for r in self._db.execute("SELECT id FROM sandboxes")}

    def list_sandboxes(
        self,
        owner: str,
        *,
        statuses: Iterable[SandboxStatus],
        tags: Sequence[str] = (),
        limit: int = 100,
        page_token: str = "",
    ) -> tuple[list[SandboxRecord], str]:
        """One page of `owner`'s sandboxes in creation order, and the next token ("" at the end).

        `tags`: every one must be present (all-of). `statuses`: any of them.
        """
        sql = [f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes WHERE owner=?"]
        args: list[object] = [owner]
        wanted = sorted({int(s) for s in statuses})
        if not wanted:
            return [], ""
        if set(wanted) != {int(s) for s in ALL_STATUSES}:
            sql.append(f"AND status IN ({','.join('?' * len(wanted))})")
            args.extend(wanted)
        if page_token:
            created, sid = decode_page_token(page_token)
            sql.append("AND (created_ns, id) > (?, ?)")
            args.extend((created, sid))
        unique_tags = sorted(set(tags))
        if unique_tags:
            sql.append(
                "AND id IN (SELECT sandbox_id FROM sandbox_tags WHERE tag IN "
                f"({','.join('?' * len(unique_tags))}) GROUP BY sandbox_id HAVING COUNT(*) = ?)"
            )
            args.extend(unique_tags)
            args.append(len(unique_tags))
        sql.append("ORDER BY created_ns, id LIMIT ?")
        args.append(limit + 1)
        rows = self._db.execute(" ".join(sql), args).fetchall()
        records = [_sandbox(r) for r in rows[:limit]]
        token = ""
        if len(rows) > limit and records:
            token = encode_page_token(records[-1].created_ns, records[-1].id)
        return records, token

    # -- leases -------------------------------------------------------------------------------

    def upsert_lease(self, lease: LeaseRecord) -> None:
        self._db.execute(
            "INSERT INTO leases (owner, id, ttl_seconds, expires_ns) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (owner, id) DO UPDATE SET ttl_seconds=excluded.ttl_seconds, "
            "expires_ns=excluded.expires_ns",
            (lease.owner, lease.id, lease.ttl_seconds, lease.expires_ns),
        )

    def delete_lease(self, owner: str, lease_id: str) -> None:
        self._db.execute("DELETE FROM leases WHERE owner=? AND id=?", (owner, lease_id))

    def all_leases(self) -> list[LeaseRecord]:
        rows = self._db.execute("SELECT owner, id, ttl_seconds, expires_ns FROM leases")
        return [LeaseRecord(str(o), str(i), float(t), int(e)) for o, i, t, e in rows]

    # -- API keys -----------------------------------------------------------------------------

    def insert_key(self, key: ApiKeyRecord) -> None:
        self._db.execute(
            "INSERT INTO api_keys (id, owner, name, hash, created_ns, revoked_ns) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key.id, key.owner, key.name, key.hash, key.created_ns, key.revoked_ns),
        )

    def key_by_hash(self, digest: str) -> ApiKeyRecord | None:
        row = self._db.execute(
            "SELECT id, owner, name, hash, created_ns, revoked_ns FROM api_keys WHERE hash=?",
            (digest,),
        ).fetchone()
        return None if row is None else ApiKeyRecord(*row)

    def list_keys(self, owner: str | None = None) -> list[ApiKeyRecord]:
        sql = "SELECT id, owner, name, hash, created_ns, revoked_ns FROM api_keys"
        args: tuple[str, ...] = ()
        if owner is not None:
            sql += " WHERE owner=?"
            args = (owner,)
        rows = self._db.execute(sql + " ORDER BY created_ns, id", args).fetchall()
        return [ApiKeyRecord(*r) for r in rows]

    def revoke_key(self, key_id: str, when_ns: int) -> bool:
        """Marks a key revoked; False when no such key (or it was already revoked)."""
        cur = self._db.execute(
            "UPDATE api_keys SET revoked_ns=? WHERE id=? AND revoked_ns IS NULL",
            (when_ns, key_id),
        )
        return cur.rowcount > 0

    # -- owner quotas -------------------------------------------------------------------------

    def get_owner_quota(self, owner: str) -> OwnerQuotaRecord | None:
        row = self._db.execute(
            "SELECT owner, sandboxes, cpu_millis, memory_bytes, disk_bytes FROM owner_quotas "
            "WHERE owner=?",
            (owner,),
        ).fetchone()
        return None if row is None else OwnerQuotaRecord(*row)

    def set_owner_quota(self, quota: OwnerQuotaRecord) -> None:
        """Stores the owner's values (replacing earlier ones); all None removes the row."""
        values = (quota.sandboxes, quota.cpu_millis, quota.memory_bytes, quota.disk_bytes)
        if all(v is None for v in values):
            self._db.execute("DELETE FROM owner_quotas WHERE owner=?", (quota.owner,))
            return
        self._db.execute(
            "INSERT INTO owner_quotas (owner, sandboxes, cpu_millis, memory_bytes, disk_bytes, "
            "updated_ns) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner) DO UPDATE SET "
            "sandboxes=excluded.sandboxes, cpu_millis=excluded.cpu_millis, "
            "memory_bytes=excluded.memory_bytes, disk_bytes=excluded.disk_bytes, "
            "updated_ns=excluded.updated_ns",
            (quota.owner, *values, time.time_ns()),
        )

    @property
    def connection(self) -> sqlite3.Connection:
        """The open database, for tables kept by their own module (server/snapshot_table.py)."""
        return self._db

    def list_owner_quotas(self) -> list[OwnerQuotaRecord]:
        rows = self._db.execute(
            "SELECT owner, sandboxes, cpu_millis, memory_bytes, disk_bytes FROM owner_quotas "
            "ORDER BY owner"
        ).fetchall()
        return [OwnerQuotaRecord(*r) for r in rows]
