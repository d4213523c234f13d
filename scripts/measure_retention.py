"""One-off: what a retention pass (server/retention.py) costs in a registry of N ended records.

Fills a real registry file with N ended records (half of them tagged) and 6,000 kept logs, then
times the pass's steps and, with a ticker coroutine on the same loop, the longest the loop
waited during a pass. Run with nice: `nice .venv/bin/python scripts/measure_retention.py 1000000`
(the million takes about a minute to fill). Figures in docs/state.md, "Ended sandboxes".
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aviato.runtime.model import SandboxConfig
from aviato.server.records import SandboxRecord, SandboxStatus
from aviato.server.registry import Registry
from aviato.server.retention import PASS_LIMIT, REMOVE_SLICE, Retention, StoppedRecords

ENDED = (SandboxStatus.COMPLETED, SandboxStatus.FAILED, SandboxStatus.TERMINATED)
CONFIG = SandboxConfig(
    sandbox_id="", image="host", command=("python", "-c", "print(1)"), env={"A": "1"},
    working_dir="/",
)  # fmt: skip
WEEK_NS = 7 * 86400 * 10**9


def fill(registry: Registry, count: int, now: int) -> None:
    db = registry.connection
    db.execute("BEGIN")
    for i in range(count):
        at = now - 30 * 86400 * 10**9 + i * 10**6
        registry.insert_sandbox(SandboxRecord(
            id=f"sbx-{i:08d}", owner=f"o{i % 50}", request_id=f"r{i}", status=ENDED[i % 3],
            config=CONFIG, created_ns=at - 10**9, ended_ns=at,
        ))  # fmt: skip
    db.execute("COMMIT")
    db.executemany(
        "INSERT INTO sandbox_tags (sandbox_id, tag) VALUES (?, 'rl')",
        [(f"sbx-{i:08d}",) for i in range(0, count, 2)],
    )


async def one_pass(retention: Retention, now: int) -> tuple[float, float]:
    """(the ticker's largest gap, the whole pass), in ms."""
    gaps = [0.0]
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            tick = time.perf_counter()
            gaps.append(tick - last)
            last = tick

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    started = time.perf_counter()
    removed = await retention.purge_once(now)
    whole = time.perf_counter() - started
    done = True
    await task
    assert removed == PASS_LIMIT, removed
    return max(gaps) * 1e3, whole * 1e3


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    sys.setswitchinterval(0.0005)  # as the service sets it (server/__main__.py)
    now = time.time_ns()
    tmp = Path(tempfile.mkdtemp(prefix="avt-retention-"))
    try:
        registry = Registry(tmp / "registry.db")
        fill(registry, count, now)
        logs = tmp / "logs"
        logs.mkdir()
        for i in range(6 * PASS_LIMIT):
            (logs / f"sbx-{i:08d}.log").write_bytes(b"x" * 200)
        records = StoppedRecords(registry.connection)
        query, slices = [], []
        for _ in range(5):
            started = time.perf_counter()
            records.expired(now - WEEK_NS)
            query.append((time.perf_counter() - started) * 1e3)
        for _ in range(10):
            ids = records.expired(now - WEEK_NS, limit=REMOVE_SLICE)
            started = time.perf_counter()
            records.remove(ids)
            slices.append((time.perf_counter() - started) * 1e3)
        retention = Retention(
            registry.connection, 7 * 86400.0, logs, lambda _: False, lambda _: None
        )
        held, whole = zip(*(asyncio.run(one_pass(retention, now)) for _ in range(5)), strict=True)
        print(
            f"registry of {count} ended records; a pass of {PASS_LIMIT}, slices of {REMOVE_SLICE}"
        )
        for name, values in (
            (f"query for {PASS_LIMIT}", query),
            (f"delete of a slice of {REMOVE_SLICE}", slices),
            ("longest wait of the loop in a pass", held),
            ("whole pass", whole),
        ):
            print(f"{name}: median {statistics.median(values):.1f} ms, max {max(values):.1f} ms")

    finally:  # a registry of a million records is ~700 MB
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
