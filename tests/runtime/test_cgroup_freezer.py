"""The freezer of a sandbox's cgroup (pause and resume): the real v1 freezer of this host, the
v2 files (`cgroup.freeze`, `cgroup.events`) on a stand-in directory, and the refusal in words
of a sandbox without one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato.runtime.base import Unsupported
from aviato.runtime.bubblewrap.host_processes import ProcessWatch
from aviato.runtime.bubblewrap.sandbox import BubblewrapSandbox
from aviato.runtime.cgroups import CgroupError, CgroupManager, Limits, SandboxCgroup


@pytest.fixture
def manager() -> Iterator[CgroupManager]:
    mgr = CgroupManager(parent=f"aviato-test-{uuid.uuid4().hex[:8]}")
    if not mgr.available or not mgr.sandbox("x").has_freezer:
        pytest.skip(f"no cgroup freezer here: {mgr.reason or mgr.describe()}")
    yield mgr
    for path in {os.path.dirname(d) for d in mgr.sandbox("x").unique_dirs}:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_freeze_holds_a_busy_process_and_thaw_lets_it_go_on(manager: CgroupManager) -> None:
    cg = manager.create("sbx", Limits(memory_bytes=64 << 20, pids=32))
    script = "; ".join(f"echo $$ > {f}" for f in cg.procs_files) + "; while :; do :; done"
    busy = subprocess.Popen(["sh", "-c", script])
    try:
        deadline = time.monotonic() + 5
        while not cg.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cg.has_freezer and not cg.frozen()
        asyncio.run(cg.freeze())
        assert cg.frozen()
        ticks = _cpu_ticks(busy.pid)
        time.sleep(0.5)
        assert _cpu_ticks(busy.pid) == ticks
        cg.thaw()
        assert not cg.frozen()
        time.sleep(0.3)
        assert _cpu_ticks(busy.pid) > ticks
        # Killing everything works on a frozen cgroup (a stop of a paused sandbox).
        asyncio.run(cg.freeze())
        assert asyncio.run(cg.kill_all())
        busy.wait(5)
    finally:
        busy.kill()
        busy.wait()
    assert asyncio.run(cg.remove())


def test_v2_freezer_files(tmp_path: Path) -> None:
    (tmp_path / "cgroup.freeze").write_text("0\n")
    (tmp_path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    cg = SandboxCgroup(2, {"memory": str(tmp_path), "pids": str(tmp_path)})
    assert cg.has_freezer and not cg.frozen()

    async def freeze_as_the_kernel_would() -> None:
        async def kernel() -> None:
            await asyncio.sleep(0.05)
            (tmp_path / "cgroup.events").write_text("populated 1\nfrozen 1\n")

        done = asyncio.ensure_future(kernel())
        await cg.freeze(max_wait=2)
        await done

    asyncio.run(freeze_as_the_kernel_would())
    assert (tmp_path / "cgroup.freeze").read_text().strip() == "1" and cg.frozen()
    cg.thaw()
    assert (tmp_path / "cgroup.freeze").read_text().strip() == "0" and not cg.frozen()

    # A process that never freezes: refused in words, and thawed again (never half frozen).
    (tmp_path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    with pytest.raises(CgroupError, match="uninterruptible"):
        asyncio.run(cg.freeze(max_wait=0.1))
    assert (tmp_path / "cgroup.freeze").read_text().strip() == "0"


def test_without_a_freezer_pause_is_refused_in_words(tmp_path: Path) -> None:
    class Owner:
        supports_protected = False

        def release_ids(self, sandbox_id: str, ids: object) -> None:
            return None

    async def attempt(cgroup: SandboxCgroup | None) -> None:
        loop = asyncio.get_running_loop()
        watch = ProcessWatch(0, None, False)
        watch.done = loop.create_future()  # still running
        sb = BubblewrapSandbox(Owner(), "sbx-x", tmp_path, watch, cgroup, None)  # type: ignore[arg-type]
        assert not await sb.paused()
        with pytest.raises(Unsupported, match=r"cannot be paused.*cgroup freezer"):
            await sb.pause()
        with pytest.raises(Unsupported):
            await sb.resume()

    asyncio.run(attempt(None))
    asyncio.run(attempt(SandboxCgroup(1, {"memory": str(tmp_path)})))  # v1 without freezer
