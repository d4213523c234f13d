"""Cgroup discovery (pure) and real per-sandbox cgroups on this host."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato.runtime.cgroups import (
    CgroupError,
    CgroupManager,
    Limits,
    ParentLimits,
    parse_mountinfo,
)

HYBRID = """\
25 1 0:23 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:24 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
27 25 0:25 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
28 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
29 25 0:27 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
30 25 0:28 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
31 25 0:29 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
32 25 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

COMOUNTED = """\
40 25 0:40 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
"""


def test_parse_mountinfo_hybrid() -> None:
    mounts = parse_mountinfo(HYBRID)
    v1 = {m.path: m.controllers for m in mounts if m.version == 1}
    assert v1["/sys/fs/cgroup/memory"] == frozenset({"memory"})
    assert v1["/sys/fs/cgroup/systemd"] == frozenset()
    assert [m.path for m in mounts if m.version == 2] == ["/sys/fs/cgroup/unified"]
    (co,) = parse_mountinfo(COMOUNTED)
    assert co.controllers == frozenset({"cpu", "cpuacct"})


def test_no_usable_hierarchy_is_explained(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("hugetlb\n")
    info = tmp_path / "mountinfo"
    info.write_text(f"32 25 0:30 / {unified} rw - cgroup2 cgroup2 rw\n")
    manager = CgroupManager(mountinfo_path=str(info))
    assert not manager.available and manager.mode == "none"
    assert "memory and pids" in manager.reason and "v2:hugetlb" in manager.reason
    assert manager.describe().startswith("unavailable")
    with pytest.raises(CgroupError):
        manager.create("x", Limits(1 << 20, 10))


@pytest.fixture
def manager() -> Iterator[CgroupManager]:
    mgr = CgroupManager(parent=f"aviato-test-{uuid.uuid4().hex[:8]}")
    if not mgr.available:
        pytest.skip(f"cgroups unavailable here: {mgr.reason}")
    yield mgr
    for path in {os.path.dirname(d) for d in mgr.sandbox("x").unique_dirs}:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def test_limits_written_kill_all_and_remove(manager: CgroupManager) -> None:
    cg = manager.create("sbx", Limits(memory_bytes=64 << 20, pids=32, cpu_millis=500))
    if cg.version == 1:
        mem = Path(cg.dirs["memory"])
        assert int((mem / "memory.limit_in_bytes").read_text()) == 64 << 20
        if (mem / "memory.memsw.limit_in_bytes").exists():
            assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 64 << 20
        assert (Path(cg.dirs["pids"]) / "pids.max").read_text().strip() == "32"
        if "cpu" in cg.dirs:
            assert (Path(cg.dirs["cpu"]) / "cpu.cfs_quota_us").read_text().strip() == "50000"
    procs = []
    for _ in range(3):
        # A child that moves itself into the cgroup, then forks a grandchild.
        script = "; ".join(f"echo $$ > {f}" for f in cg.procs_files) + "; sleep 60 & exec sleep 61"
        procs.append(subprocess.Popen(["sh", "-c", script]))
    deadline = time.monotonic() + 5
    while len(cg.pids()) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(cg.pids()) == 6
    with pytest.raises(CgroupError, match="has processes"):
        manager.create("sbx", Limits(1 << 20, 1))

    async def kill() -> tuple[bool, bool]:
        killed = await cg.kill_all()
        for p in procs:
            p.wait()
        return killed, await cg.remove()

    killed, removed = asyncio.run(kill())
    assert killed and removed
    assert all(p.returncode == -signal.SIGKILL for p in procs)
    assert not cg.exists()


def test_create_reuses_only_empty_leftovers(manager: CgroupManager) -> None:
    cg = manager.create("again", Limits(32 << 20, 16))
    again = manager.create("again", Limits(32 << 20, 16))  # empty leftover: reused
    assert again.unique_dirs == cg.unique_dirs
    assert "again" in manager.present()
    assert asyncio.run(cg.remove())
    assert "again" not in manager.present()


def test_oom_counter_starts_at_zero(manager: CgroupManager) -> None:
    cg = manager.create("oom", Limits(32 << 20, 16))
    try:
        assert cg.oom_kills() == 0
        assert cg.memory_peak() >= 0
    finally:
        asyncio.run(cg.remove())


def test_parent_limits_lowered_raised_and_refused(manager: CgroupManager) -> None:
    # Lowering from no limit, then raising (v1 wants memsw >= limit at every step).
    assert manager.limit_parent(ParentLimits(memory_bytes=256 << 20, pids=100)) == []
    assert manager.parent_limits() == (256 << 20, 100)
    assert manager.limit_parent(ParentLimits(memory_bytes=1 << 30, pids=200)) == []
    assert manager.parent_limits() == (1 << 30, 200)
    assert manager.limit_parent(ParentLimits(memory_bytes=128 << 20)) == []
    assert manager.parent_limits() == (128 << 20, 200)  # 0: pids left as they were
    # A sandbox holding more than a new limit: refused on v1 (EBUSY), never forced.
    cg = manager.create("holder", Limits(64 << 20, 16))
    proc = subprocess.Popen(
        ["sh", "-c", "; ".join(f"echo $$ > {f}" for f in cg.procs_files)
         + "; exec python3 -c 'b = bytearray(48 << 20); import time; time.sleep(60)'"]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while (headroom := cg.memory_headroom()) is not None and headroom > 20 << 20:
            assert time.monotonic() < deadline, headroom
            time.sleep(0.05)
        assert headroom is not None and headroom < 20 << 20
        problems = manager.limit_parent(ParentLimits(memory_bytes=8 << 20))
        if cg.version == 1:
            assert problems and "memory" in problems[0], problems
            assert manager.parent_limits()[0] == 128 << 20
    finally:
        proc.kill()
        proc.wait()
        asyncio.run(cg.kill_all())
        asyncio.run(cg.remove())


def test_unavailable_manager_sets_no_parent_limits(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text("")
    manager = CgroupManager(mountinfo_path=str(info))
    assert manager.limit_parent(ParentLimits(1 << 30, 10))[0].startswith("cgroups are unavailable")
    assert manager.parent_limits() == (None, None)
