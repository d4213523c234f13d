"""Disk-backed writable layers, snapshots of a layer and starts from a snapshot, on real
sandboxes of `BubblewrapRuntime` (docs/state.md)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from test_bubblewrap_runtime import config, new_id, sh

from aviato.runtime.bubblewrap import BubblewrapRuntime, BubblewrapSandbox
from aviato.runtime.snapshot_store import SnapshotTooLarge

MiB = 1 << 20
T = TypeVar("T")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="layers need a root service")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="avwl-", dir="/tmp"))
    yield path
    subprocess.run(["umount", "-l", str(path / "layers")], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(f"{path}/layers/")]


def mount_table(pid: int) -> str:
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8") as f:
        return f.read()


def loop_devices_of(image: Path) -> str:
    return subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True, check=False
    ).stdout


def run(state_dir: Path, body: Callable[[BubblewrapRuntime], Awaitable[T]], **kw: Any) -> T:
    async def main() -> T:
        rt = BubblewrapRuntime(state_dir, **kw)
        try:
            return await asyncio.wait_for(body(rt), 120)
        finally:
            for sid in rt.list_present():
                await rt.cleanup(sid)
            await rt.close()

    return asyncio.run(main())


async def capture(rt: BubblewrapRuntime, h: Any, snapshot_id: str, limit: int = 1 << 30) -> Any:
    assert isinstance(h, BubblewrapSandbox) and h._ids is not None
    return await asyncio.to_thread(rt.snapshots.capture, snapshot_id, h.pid, h._ids.base, limit)


def test_disk_layer_holds_its_size_and_is_removed(state_dir: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> None:
        h = await rt.create(config(writable_layer="disk", disk_bytes=48 * MiB))
        code, out, _ = await sh(
            h,
            "stat -f -c %T /; echo data > /workspace/a; "
            "dd if=/dev/zero of=/workspace/big bs=1M count=80 2>&1; echo rc=$?; cat /workspace/a",
        )
        assert code == 0
        assert out.startswith("ext2/ext3"), out
        assert "No space left on device" in out and "rc=1" in out and out.endswith("data\n")
        image = state_dir / "layers" / f"{h.sandbox_id}.img"
        assert image.stat().st_blocks * 512 <= 48 * MiB  # the host holds at most the disk size
        assert mounts_under(state_dir) == [str(state_dir / "layers" / h.sandbox_id)]
        await rt.cleanup(h.sandbox_id)
        assert not image.exists() and mounts_under(state_dir) == []

    run(state_dir, body)


def test_disk_layer_survives_a_restart_of_the_runtime(state_dir: Path) -> None:
    sid = new_id()

    async def first(rt: BubblewrapRuntime) -> None:
        h = await rt.create(config(sid, writable_layer="disk", disk_bytes=32 * MiB))
        assert (await sh(h, "echo kept > /workspace/k"))[0] == 0
        await rt.close()  # the service ends; the sandbox does not

    async def main() -> None:
        await first(BubblewrapRuntime(state_dir))
        rt = BubblewrapRuntime(state_dir)
        try:
            h = await rt.attach(sid)
            assert isinstance(h, BubblewrapSandbox)
            assert (await sh(h, "cat /workspace/k"))[1] == "kept\n"
        finally:
            await rt.cleanup(sid)
            await rt.close()
        assert mounts_under(state_dir) == []

    asyncio.run(main())


def test_a_layer_pins_no_other_sandboxes_layer(state_dir: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> None:
        a = await rt.create(config(writable_layer="disk", disk_bytes=32 * MiB))
        b = await rt.create(config(writable_layer="disk", disk_bytes=32 * MiB))
        await rt.cleanup(a.sandbox_id)
        # b's launcher detached <state>/layers from its mount namespace: a's loop is free
        assert f"layers/{a.sandbox_id}" not in mount_table(b.pid)
        out = loop_devices_of(state_dir / "layers" / f"{a.sandbox_id}.img")
        assert out == ""

    run(state_dir, body)


@pytest.mark.parametrize("source_layer", ["memory", "disk"])
def test_snapshot_of_a_layer_is_copied_safely(state_dir: Path, source_layer: str) -> None:
    async def body(rt: BubblewrapRuntime) -> None:
        h = await rt.create(config(writable_layer=source_layer, disk_bytes=64 * MiB))
        script = (
            "cd /workspace && echo one > f && ln f hard && ln -s /etc/shadow out && "
            "ln -s ../../../../ up && cp /bin/true suid && chmod 4755 suid && "
            "truncate -s 1T sparse && printf x | dd of=sparse bs=1 seek=1000000 conv=notrunc "
            "2>/dev/null && mkfifo pipe && (mknod dev c 1 3 2>/dev/null; true) && "
            "mkdir -p d/e && echo deep > d/e/g && echo ok"
        )
        assert (await sh(h, script))[1:] == ("ok\n", "")
        tree = await capture(rt, h, "snap-0000000001")
        root = rt.snapshots.tree("snap-0000000001")
        ws = root / "workspace"
        assert os.readlink(ws / "out") == "/etc/shadow" and os.readlink(ws / "up") == "../../../../"
        assert os.stat(ws / "f").st_ino == os.stat(ws / "hard").st_ino
        # owned by the sandbox's own root (0), not by its host uid range
        assert (os.stat(ws / "f").st_uid, os.stat(ws / "f").st_gid) == (0, 0)
        assert not os.stat(ws / "suid").st_mode & (stat.S_ISUID | stat.S_ISGID)
        sparse = os.stat(ws / "sparse")
        assert sparse.st_size == 1 << 40 and sparse.st_blocks * 512 <= 64 * 1024
        assert stat.S_ISFIFO(os.lstat(ws / "pipe").st_mode)
        assert not (ws / "dev").exists()
        assert not (root / "usr").exists() and not (root / "proc").exists()
        assert tree.size_bytes < 16 * MiB

    run(state_dir, body)


def test_snapshot_is_bounded_by_max_bytes(state_dir: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> None:
        h = await rt.create(config(disk_bytes=64 * MiB))
        await sh(h, "head -c 8M /dev/urandom > /workspace/r")
        with pytest.raises(SnapshotTooLarge):
            await capture(rt, h, "snap-0000000002", limit=4 * MiB)
        assert rt.snapshots.ids() == [] and os.listdir(rt.snapshots.root) == []

    run(state_dir, body)


@pytest.mark.parametrize("layer", ["memory", "disk"])
def test_sandboxes_from_one_snapshot_share_nothing(state_dir: Path, layer: str) -> None:
    async def body(rt: BubblewrapRuntime) -> None:
        h = await rt.create(config(disk_bytes=64 * MiB))
        await sh(h, "echo base > /workspace/shared; echo keep > /workspace/other")
        await capture(rt, h, "snap-0000000003")
        forks = [
            await rt.create(
                config(writable_layer=layer, snapshot_id="snap-0000000003", disk_bytes=32 * MiB)
            )
            for _ in range(3)
        ]
        await sh(forks[0], "echo changed > /workspace/shared; rm /workspace/other")
        code, out, _ = await sh(forks[1], "cat /workspace/shared /workspace/other; id -u")
        assert (code, out) == (0, "base\nkeep\n0\n")
        _, out, _ = await sh(forks[0], "cat /workspace/shared; ls /workspace")
        assert out == "changed\nshared\n"
        tree = rt.snapshots.tree("snap-0000000003")
        assert (tree / "workspace" / "shared").read_text() == "base\n"
        # the fork's own layer holds its size: a write past it is ENOSPC
        out = (await sh(forks[2], "dd if=/dev/zero of=/workspace/z bs=1M count=48 2>&1"))[1]
        assert "No space left on device" in out

    run(state_dir, body)
