"""How long the service keeps stopped sandboxes: `aviato server --keep-stopped DURATION`.

A sandbox that ended (COMPLETED, FAILED, TERMINATED) leaves its record in the registry and its
main log under the service's logs directory, so that `Sandbox.list(include_stopped=True)`,
`aviato logs` and `aviato ps -a` can still tell how it ended. Left there forever, a service that
runs millions of short sandboxes would grow both without bound. Every `pass_interval` seconds
the service removes the records whose end (`ended_ns`, else `created_ns`) is older than the
retention, oldest first, at most `PASS_LIMIT` in one pass, together with what a delete removes
for an ended sandbox: its kept log, its tags and port rows (the registry's cascades), and what
the service keeps in memory by sandbox id (its commands and their output: the lifecycle's
`when_deleted` listeners). The runtime's state of an ended sandbox went when it ended. Snapshots
a user made from it stay: they are the user's, not the sandbox's. A retention of 0 keeps
everything forever (the behaviour before the retention existed).

Never a live sandbox: the registry removes only rows whose status is terminal (in the same
statement), and the lifecycle's live map is asked first. A call that reads a record while it
goes (a `get`, a listing, a log stream) sees it or gets NOT_FOUND, as after a delete.

Cost: the expired records are found through an index on (status, end time) (migration 10,
`RETENTION_MIGRATION`), a range scan per terminal status that stops at `PASS_LIMIT` (about
2 ms for 1,000 in a registry of a million); their log files are unlinked on a worker thread;
the rows go in transactions of `REMOVE_SLICE` (about 2 ms each), the loop free between them. A
service that starts with a million old records therefore catches up in a thousand passes of
about 0.1 s each, without holding its loop for longer than a slice (figures in docs/state.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from aviato.server.records import TERMINAL_STATUSES
from aviato.v1 import durations

__all__ = [
    "DEFAULT_KEEP_STOPPED_SECONDS",
    "MAX_KEEP_STOPPED_SECONDS",
    "PASS_LIMIT",
    "RETENTION_MIGRATION",
    "Retention",
    "StoppedRecords",
    "describe_retention",
    "pass_interval",
]

log = logging.getLogger("aviato.server.retention")

DEFAULT_KEEP_STOPPED_SECONDS = 7 * 86400.0
MAX_KEEP_STOPPED_SECONDS = 100 * 365 * 86400.0  # beyond this, say 0 (forever)
PASS_LIMIT = 1000
REMOVE_SLICE = 100  # rows deleted in one transaction (about 2 ms of the loop)
MAX_PASS_INTERVAL_SECONDS = 60.0
MIN_PASS_INTERVAL_SECONDS = 0.5

# Migration 10 (registry.py): the end time of each record, by status, so that a pass finds the
# oldest ended records without reading the others.
RETENTION_MIGRATION = (
    "CREATE INDEX sandboxes_stopped_at ON sandboxes (status, COALESCE(ended_ns, created_ns))"
)

_TERMINAL = tuple(sorted(int(s) for s in TERMINAL_STATUSES))
_TERMINAL_MARKS = ",".join("?" * len(_TERMINAL))


def pass_interval(keep_seconds: float) -> float:
    """How often the retention looks for expired records: a tenth of the retention, within
    [0.5 s, 60 s], so that a record goes at most about 10% (or a minute) after its time."""
    return min(MAX_PASS_INTERVAL_SECONDS, max(MIN_PASS_INTERVAL_SECONDS, keep_seconds / 10))


def describe_retention(keep_seconds: float) -> str:
    """The retention in words: "7d", "12h", "90m", "1s", or "forever"."""
    return "forever" if keep_seconds <= 0 else durations.format_duration(keep_seconds)


class StoppedRecords:
    """The registry's ended sandboxes, by age (on the registry's own connection and thread)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def expired(self, cutoff_ns: int, limit: int = PASS_LIMIT) -> list[str]:
        """The ids of at most `limit` ended sandboxes that ended before `cutoff_ns`, oldest
        first. One index range scan per terminal status, each stopped at `limit` rows (an IN
        over the statuses would make SQLite sort every expired row before the limit)."""
        found: list[tuple[int, str]] = []
        for status in _TERMINAL:
            rows = self._db.execute(
                "SELECT COALESCE(ended_ns, created_ns), id FROM sandboxes "
                "WHERE status=? AND COALESCE(ended_ns, created_ns) < ? "
                "ORDER BY COALESCE(ended_ns, created_ns) LIMIT ?",
                (status, cutoff_ns, limit),
            ).fetchall()
            found.extend((int(at), str(sid)) for at, sid in rows)
        found.sort()
        return [sid for _, sid in found[:limit]]

    def remove(self, sandbox_ids: Iterable[str]) -> list[str]:
        """Deletes the rows of those of `sandbox_ids` that are (still) ended, with their tags
        and port rows, in one transaction; returns the ids removed."""
        removed: list[str] = []
        db = self._db
        db.execute("BEGIN")
        try:
            for sid in sandbox_ids:
                cur = db.execute(
                    f"DELETE FROM sandboxes WHERE id=? AND status IN ({_TERMINAL_MARKS})",
                    (sid, *_TERMINAL),
                )
                if cur.rowcount > 0:
                    removed.append(sid)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return removed


def _unlink_logs(logs_dir: Path, sandbox_ids: Iterable[str]) -> None:
    for sid in sandbox_ids:
        with contextlib.suppress(FileNotFoundError):
            (logs_dir / f"{sid}.log").unlink()


class Retention:
    """The periodic removal of expired ended sandboxes (see the module's docstring).

    `is_live(id)`: whether the lifecycle still drives that sandbox (never removed, whatever the
    registry says); `forget(id)`: what the service keeps in memory for it goes (the lifecycle's
    `when_deleted` listeners). Use from the event loop's thread only.
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        keep_seconds: float,
        logs_dir: Path,
        is_live: Callable[[str], bool],
        forget: Callable[[str], None],
    ) -> None:
        self.keep_seconds = keep_seconds
        self.removed = 0  # records removed since the service started
        self._records = StoppedRecords(db)
        self._logs_dir = logs_dir
        self._is_live = is_live
        self._forget = forget
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the passes (none when the retention is 0: forever)."""
        if self.keep_seconds > 0 and self._task is None:
            self._task = asyncio.create_task(self._purge_forever(), name="aviato-retention")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def describe(self, operator: bool) -> str:
        """The retention for `aviato server status`, e.g. "7d (12 removed since the service
        started)"; the count is told only to the service's own user (`operator`)."""
        kept = describe_retention(self.keep_seconds)
        if self.keep_seconds <= 0 or not operator:
            return kept
        return f"{kept} ({self.removed} removed since the service started)"

    async def _purge_forever(self) -> None:
        interval = pass_interval(self.keep_seconds)
        delay = interval
        while True:
            await asyncio.sleep(delay)
            delay = interval
            try:
                if await self.purge_once() >= PASS_LIMIT // 2:
                    delay = 0.0  # more may be due: the next pass once the loop had its turn
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention pass failed")

    async def purge_once(self, now_ns: int | None = None) -> int:
        """One pass: removes up to `PASS_LIMIT` expired ended sandboxes; returns how many."""
        now = time.time_ns() if now_ns is None else now_ns
        cutoff = now - int(self.keep_seconds * 1e9)
        expired = [sid for sid in self._records.expired(cutoff) if not self._is_live(sid)]
        if not expired:
            return 0
        # The logs first: a crash between the two leaves records without logs, which the next
        # pass removes; the other order would leave files no pass ever finds.
        await asyncio.to_thread(_unlink_logs, self._logs_dir, expired)
        removed: list[str] = []
        for start in range(0, len(expired), REMOVE_SLICE):
            if start:
                await asyncio.sleep(0)  # the loop's other work between two transactions
            done = self._records.remove(expired[start : start + REMOVE_SLICE])
            for sid in done:
                self._forget(sid)
            self.removed += len(done)
            removed += done
        log.info("retention: removed %d ended sandboxes older than %s",
                 len(removed), describe_retention(self.keep_seconds))  # fmt: skip
        return len(removed)
