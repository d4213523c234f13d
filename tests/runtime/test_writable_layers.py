"""Disk-backed writable layers, snapshots of a layer and starts from a snapshot, on real
sandboxes of `BubblewrapRuntime` (docs/state.md)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _mounts import mounts_beneath, unmount_beneath
from test_bubblewrap_runtime import config, new_id, sh

from aviato.runtime.bubblewrap import BubblewrapRuntime, BubblewrapSandbox
from aviato.runtime.mount_tools import is_mount_point
from aviato.runtime.snapshot_store import SnapshotTooLarge
from aviato.runtime.writable_layers import WritableLayers

MiB = 1 << 20
T = TypeVar("T")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="layers need a root service")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="avwl-", dir="/tmp"))
    yield path
    unmount_beneath(path)  # what a failed test left
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


def test_the_layers_root_is_bound_only_while_a_layer_is_mounted(state_dir: Path) -> None:
    root = state_dir / "layers"

    async def body(rt: BubblewrapRuntime) -> None:
        assert not is_mount_point(root)
        a = await rt.create(config(writable_layer="disk", disk_bytes=32 * MiB))
        b = await rt.create(config(writable_layer="disk", disk_bytes=32 * MiB))
        assert is_mount_point(root)
        await rt.cleanup(a.sandbox_id)
        assert is_mount_point(root), "b's layer is still mounted beneath it"
        assert (await sh(b, "echo b > /workspace/b; cat /workspace/b"))[1] == "b\n"
        await rt.cleanup(b.sandbox_id)
        assert mounts_beneath(root) == [], "the last layer took the root's bind with it"
        plain = await rt.create(config())  # launched with the root unbound
        c = await rt.create(config(writable_layer="disk", disk_bytes=32 * MiB))
        assert is_mount_point(root), "bound again for the next layer"
        assert (await sh(c, "echo c > /workspace/c; cat /workspace/c"))[1] == "c\n"
        assert f"layers/{c.sandbox_id}" not in mount_table(plain.pid)
        await rt.close()  # c outlives the runtime: its layer and the root's bind stay
        assert is_mount_point(root) and is_mount_point(root / c.sandbox_id)
        again = BubblewrapRuntime(state_dir)  # a new service re-attaches
        try:
            h = await again.attach(c.sandbox_id)
            assert isinstance(h, BubblewrapSandbox)
            assert (await sh(h, "cat /workspace/c"))[1] == "c\n"
        finally:
            await again.cleanup(c.sandbox_id)
            await again.cleanup(plain.sandbox_id)
            await again.close()
        assert mounts_beneath(state_dir) == []

    run(state_dir, body)


def test_the_root_stays_bound_while_a_layer_is_being_made(state_dir: Path) -> None:
    """The race that `release_root` must lose: a layer made while the last one is removed is
    mounted beneath a bound root (a launcher could not detach it otherwise)."""
    layers = WritableLayers(state_dir)
    entered, go = threading.Event(), threading.Event()
    make_now = layers._make

    def paused_make(sandbox_id: str, kind: str, size_bytes: int) -> Any:
        entered.set()  # the root is bound, the layer not yet mounted
        assert go.wait(30)
        return make_now(sandbox_id, kind, size_bytes)

    layers._make = paused_make  # type: ignore[method-assign]
    made: list[Any] = []
    maker = threading.Thread(target=lambda: made.append(layers.make("t-race", "memory", MiB)))
    maker.start()
    try:
        assert entered.wait(30)
        assert is_mount_point(layers.root)
        assert not layers.release_root(), "unbound under a layer being made"
        assert is_mount_point(layers.root)
    finally:
        go.set()
        maker.join(30)
    assert made and is_mount_point(layers.root / "t-race") and is_mount_point(layers.root)
    assert "--detach" in layers.launcher_args(None)
    layers.remove("t-race")
    assert mounts_beneath(state_dir) == []
    assert layers.launcher_args(None) == ["--detach", str(layers.root)]


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
