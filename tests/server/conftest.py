"""Fixtures: a real `python -m aviato.server` on a temporary state directory.

`server` is shared by the tests of one module; `fresh_server` is private to one test (for tests
that kill or restart the service). At teardown every sandbox the state directory knows is
removed through the runtime, and the test fails if any sandbox process or cgroup remains.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _mounts import mounts_beneath, unmount_beneath
from server_helpers import (
    ServerProcess,
    remove_cgroup_parent,
    sandbox_cgroups,
    sandbox_processes,
)


def _known_ids(state_dir: Path) -> set[str]:
    ids: set[str] = set()
    sandboxes = state_dir / "sandboxes"
    if sandboxes.is_dir():
        ids.update(p.name for p in sandboxes.iterdir())
    db = state_dir / "registry.db"
    if db.exists():
        import sqlite3

        with sqlite3.connect(db) as conn:
            ids.update(r[0] for r in conn.execute("SELECT id FROM sandboxes"))
    return ids


def _clean_up(state_dir: Path, cgroup_parent: str) -> set[str]:
    """Removes what the service left (through the runtime); returns the ids it knew."""
    from aviato.runtime.bubblewrap import BubblewrapRuntime

    ids = _known_ids(state_dir)

    async def run() -> None:
        runtime = BubblewrapRuntime(state_dir, cgroup_parent=cgroup_parent)
        for sid in runtime.list_present():
            await runtime.cleanup(sid)
        await runtime.close()

    asyncio.run(run())
    return ids


def finish(server: ServerProcess) -> None:
    """Stops the service, removes every sandbox, asserts that nothing of them remains."""
    if server.proc is not None and server.proc.poll() is None:
        server.stop()
    ids = _clean_up(server.state_dir, server.cgroup_parent)
    layers = mounts_beneath(server.state_dir / "layers")
    # What a killed service left (its sized volumes, the roots' binds) goes before the rmtree.
    unmount_beneath(server.state_dir)
    assert layers in ([], [str(server.state_dir / "layers")]), f"layer mounts remain: {layers}"
    procs = sandbox_processes(ids)
    cgroups = sandbox_cgroups(ids, server.cgroup_parent)
    if not procs:
        remove_cgroup_parent(server.cgroup_parent)
    assert not procs, f"sandbox processes remain: {procs}"
    assert not cgroups, f"sandbox cgroups remain: {cgroups}"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with tempfile.TemporaryDirectory(prefix="avt-srv-") as tmp:
        proc = ServerProcess(Path(tmp) / "state").start()
        try:
            yield proc
        finally:
            finish(proc)


@pytest.fixture
def fresh_server() -> Iterator[ServerProcess]:
    """Not started: the test calls `.start()` (possibly with extra arguments), or runs the
    service in its own process on `state_dir` and `cgroup_parent` (test_service_memory.py)."""
    with tempfile.TemporaryDirectory(prefix="avt-srv-") as tmp:
        proc = ServerProcess(Path(tmp) / "state")
        try:
            yield proc
        finally:
            if proc.proc is not None or proc.state_dir.exists():
                finish(proc)
