"""The retention's passes against a real registry file (pure: no service, no sandbox).

What a pass removes (ended records older than the retention, oldest first, at most
`PASS_LIMIT`), what it never touches (live records, however old; recent ended ones), and that it
finds them through its index rather than by reading the table. The service end to end is in
test_retention.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from aviato.runtime.model import SandboxConfig
from aviato.server.records import SandboxRecord, SandboxStatus
from aviato.server.registry import Registry
from aviato.server.retention import (
    PASS_LIMIT,
    Retention,
    StoppedRecords,
    describe_retention,
    pass_interval,
)

CONFIG = SandboxConfig(sandbox_id="", image="host", command=("true",), env={}, working_dir="/")
DAY_NS = 86400 * 10**9
NOW = 1_800_000_000 * 10**9


def _record(
    sid: str, status: SandboxStatus, ended_ns: int | None, created_ns: int
) -> SandboxRecord:
    return SandboxRecord(
        id=sid, owner="alice", request_id=f"req-{sid}", status=status, config=CONFIG,
        created_ns=created_ns, ended_ns=ended_ns, tags=("t",),
    )  # fmt: skip


def _fill(registry: Registry, old: int) -> None:
    """`old` ended records of 30 to 10 days ago (statuses mixed, the oldest first by id), an
    old RUNNING one, an old PAUSED one, and two ended an hour ago."""
    ended = (SandboxStatus.COMPLETED, SandboxStatus.FAILED, SandboxStatus.TERMINATED)
    for i in range(old):
        at = NOW - 30 * DAY_NS + i * (20 * DAY_NS // old)
        registry.insert_sandbox(_record(f"old-{i:06d}", ended[i % 3], at, at - 10**9))
    registry.insert_sandbox(_record("running", SandboxStatus.RUNNING, None, NOW - 60 * DAY_NS))
    registry.insert_sandbox(_record("paused", SandboxStatus.PAUSED, None, NOW - 60 * DAY_NS))
    registry.insert_sandbox(_record("recent-0", SandboxStatus.COMPLETED, NOW - 3600 * 10**9, 0))
    # An ended record without an end time counts from its creation.
    registry.insert_sandbox(_record("recent-1", SandboxStatus.FAILED, None, NOW - 3600 * 10**9))


def test_a_pass_takes_the_oldest_ended_records_and_at_most_the_bound(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.db")
    _fill(registry, 2 * PASS_LIMIT + 500)
    records = StoppedRecords(registry.connection)
    cutoff = NOW - 7 * DAY_NS
    first = records.expired(cutoff)
    assert first == [f"old-{i:06d}" for i in range(PASS_LIMIT)]
    assert records.expired(cutoff, limit=3) == ["old-000000", "old-000001", "old-000002"]
    # Live records are never expired, however old; recent ended ones not before their time.
    before_a_day = records.expired(NOW - DAY_NS, limit=10 * PASS_LIMIT)
    assert len(before_a_day) == 2 * PASS_LIMIT + 500
    assert not {"running", "paused", "recent-0", "recent-1"} & set(before_a_day)
    everything = records.expired(NOW + 1, limit=10**6)
    assert len(everything) == 2 * PASS_LIMIT + 502 and everything[-2:] == ["recent-0", "recent-1"]
    # A row that became live again (it cannot) or was deleted meanwhile is not removed twice.
    assert records.remove(["running", "old-000000", "nosuch"]) == ["old-000000"]
    assert registry.get_sandbox("running") is not None
    registry.close()


def test_the_pass_finds_its_records_through_the_index(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.db")
    plan = registry.connection.execute(
        "EXPLAIN QUERY PLAN SELECT COALESCE(ended_ns, created_ns), id FROM sandboxes "
        "WHERE status=? AND COALESCE(ended_ns, created_ns) < ? "
        "ORDER BY COALESCE(ended_ns, created_ns) LIMIT ?",
        (4, NOW, PASS_LIMIT),
    ).fetchall()
    text = " ".join(str(row[-1]) for row in plan)
    assert "sandboxes_stopped_at" in text and "TEMP B-TREE" not in text, text
    registry.close()


def test_passes_remove_records_logs_and_memory_in_bounded_steps(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.db")
    old = 2 * PASS_LIMIT + 500
    _fill(registry, old)
    logs = tmp_path / "logs"
    logs.mkdir()
    for sid in ("old-000000", "old-002499", "running", "recent-0"):
        (logs / f"{sid}.log").write_text("x")
    forgotten: list[str] = []
    retention = Retention(
        registry.connection, 7 * 86400.0, logs,
        is_live=lambda sid: sid == "old-000001", forget=forgotten.append,
    )  # fmt: skip

    async def passes() -> list[int]:
        return [await retention.purge_once(NOW) for _ in range(4)]

    # Each pass takes the PASS_LIMIT oldest, one of which is still live in memory: left alone.
    assert asyncio.run(passes()) == [PASS_LIMIT - 1, PASS_LIMIT - 1, 501, 0]
    assert retention.removed == old - 1 and len(forgotten) == old - 1
    assert "old-000001" not in forgotten
    left = {r.id for r in registry.sandboxes_with_status(SandboxStatus)}
    assert left == {"old-000001", "running", "paused", "recent-0", "recent-1"}
    assert sorted(p.name for p in logs.iterdir()) == ["recent-0.log", "running.log"]
    tags = registry.connection.execute("SELECT COUNT(*) FROM sandbox_tags").fetchone()[0]
    assert tags == len(left)  # the tags went with their records
    assert retention.describe(operator=True) == "7d (2499 removed since the service started)"
    assert retention.describe(operator=False) == "7d"
    registry.close()


def test_one_pass_of_the_bound_is_short(tmp_path: Path) -> None:
    """A generous bound (the figure measured is in docs/operations.md): one pass must not hold
    the service's loop for long, whatever the registry holds."""
    registry = Registry(tmp_path / "registry.db")
    _fill(registry, 20 * PASS_LIMIT)
    retention = Retention(registry.connection, 86400.0, tmp_path, lambda _: False, lambda _: None)
    started = time.perf_counter()
    assert asyncio.run(retention.purge_once(NOW)) == PASS_LIMIT
    assert time.perf_counter() - started < 2.0
    registry.close()


@pytest.mark.parametrize(
    ("seconds", "words", "interval"),
    [(0, "forever", 0.5), (1, "1s", 0.5), (90, "90s", 9.0), (5400, "90m", 60.0),
     (43200, "12h", 60.0), (7 * 86400, "7d", 60.0), (3600.5, "3600.5s", 60.0)],
)  # fmt: skip
def test_words_and_pace(seconds: float, words: str, interval: float) -> None:
    assert describe_retention(seconds) == words
    assert pass_interval(seconds) == interval
