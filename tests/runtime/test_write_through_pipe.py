"""A write by descriptor into a file the sandbox keeps in memory (OPEN_THROUGH_PIPE): the
supervisor hands out the write end of a pipe and moves its bytes into the file itself, in the
sandbox's cgroups, so that the sandbox's memory limit counts them; the file is in place only
with exactly the declared bytes, and nothing is left of a write that failed or was dropped."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import shutil
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from one_sandbox import run_in_sandbox, sh
from supervisor_descriptors import open_fds, settled_fds, supervisor_pid

from aviato.runtime.base import (
    CapacityExhausted,
    SandboxRuntimeError,
    Unsupported,
)
from aviato.runtime.bubblewrap import BubblewrapSandbox
from aviato.runtime.supervisor.file_descriptors import _check_handed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run sandboxes as root")
T = TypeVar("T")
MiB = 1 << 20


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="avpipe-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_with(
    state_dir: Path,
    body: Callable[[BubblewrapSandbox], Awaitable[T]],
    *,
    memory: int = 512 * MiB,
    disk: int = 256 * MiB,
    layer: str = "memory",
) -> T:
    """`body` with a sandbox whose writable layer is `layer` (kept in memory unless told)."""
    return run_in_sandbox(state_dir, body, layer=layer, memory=memory, disk=disk)


def _write_all(fd: int, data: bytes) -> None:
    """Writes `data` into the non-blocking pipe `fd` (BrokenPipeError once its reader left)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view[: 1 << 20]) :]
        except BlockingIOError:
            assert select.select([], [fd], [], 30)[1], "the supervisor took no bytes for 30 s"


async def _pipe_write(h: BubblewrapSandbox, path: str, data: bytes, declared: int) -> int:
    write = await h.open_for_writing(path, 0o640, False, declared)
    assert stat.S_ISFIFO(os.fstat(write.fd).st_mode)
    with contextlib.suppress(BrokenPipeError):  # the supervisor ended the write: commit says why
        await asyncio.to_thread(_write_all, write.fd, data)
    return await write.commit()


def _memory_charged(h: BubblewrapSandbox) -> int:
    assert h.cgroup is not None
    directory = Path(h.cgroup.dirs["memory"])
    name = "memory.current" if h.cgroup.version == 2 else "memory.usage_in_bytes"
    return int((directory / name).read_text())


def test_a_file_kept_in_memory_is_written_through_a_pipe_the_sandbox_pays_for(
    state_dir: Path,
) -> None:
    data = os.urandom(64 * MiB)

    async def body(h: BubblewrapSandbox) -> None:
        sup = supervisor_pid(h)
        assert h.cgroup is not None  # the supervisor runs in the sandbox's memory cgroup
        cgroups = Path(f"/proc/{sup}/cgroup").read_bytes().decode().splitlines()  # noqa: ASYNC240
        memory = [
            line.split(":", 2)[2] for line in cgroups if ":memory:" in line or line[:3] == "0::"
        ]
        assert any(p != "/" and h.cgroup.dirs["memory"].endswith(p) for p in memory), cgroups
        before_fds = await settled_fds(sup)
        before = _memory_charged(h)
        assert await _pipe_write(h, "/workspace/big", data, len(data)) == len(data)
        assert _memory_charged(h) - before > 60 * MiB  # the sandbox's memory holds its file
        listing = await sh(h, "cd /workspace && ls -A && stat -c %a%s big && sha256sum big")
        digest = hashlib.sha256(data).hexdigest()
        assert listing.split() == ["big", f"640{len(data)}", digest, "big"]
        assert await settled_fds(sup) == before_fds, open_fds(sup)

    run_with(state_dir, body)


def test_the_declared_size_must_match(state_dir: Path) -> None:
    async def body(h: BubblewrapSandbox) -> None:
        with pytest.raises(SandboxRuntimeError, match="incomplete write: 1000 of 3000 bytes"):
            await _pipe_write(h, "/workspace/short", b"x" * 1000, 3000)
        with pytest.raises(CapacityExhausted, match="more bytes arrived than the 1000 declared"):
            await _pipe_write(h, "/workspace/long", b"x" * (3 * MiB), 1000)
        assert await sh(h, "ls -A /workspace") == ""

    async def on_disk(h: BubblewrapSandbox) -> None:
        """A file on disk is handed out as itself, and the declared size holds there too."""
        write = await h.open_for_writing("/workspace/x", 0o644, False, 5)
        assert stat.S_ISREG(os.fstat(write.fd).st_mode)
        os.write(write.fd, b"abc")
        with pytest.raises(SandboxRuntimeError, match="incomplete write: 3 of 5 bytes"):
            await write.commit()
        assert await sh(h, "ls -A /workspace") == ""

    run_with(state_dir, body)
    run_with(state_dir, on_disk, layer="disk")


def test_a_full_memory_layer_fails_the_write_and_leaves_nothing(state_dir: Path) -> None:
    """The layer (32 MiB) fills before the memory: the supervisor's splice gets ENOSPC, closes
    its end (the writer's pipe breaks at once) and the commit says why."""

    async def body(h: BubblewrapSandbox) -> None:
        with pytest.raises(CapacityExhausted, match="No space left on device"):
            await _pipe_write(h, "/workspace/big", bytes(48 * MiB), 48 * MiB)
        assert await sh(h, "ls -A /workspace; echo alive") == "alive\n"

    run_with(state_dir, body, disk=32 * MiB)


def test_more_than_the_memory_can_hold_is_refused_before_a_byte_moves(state_dir: Path) -> None:
    """The memory (64 MiB) is smaller than the layer: a tmpfs write past the memory limit
    would meet the OOM killer, not ENOSPC, so the size is checked against the room left."""

    async def body(h: BubblewrapSandbox) -> None:
        with pytest.raises(CapacityExhausted, match="memory limit is reached"):
            await h.open_for_writing("/workspace/big", 0o644, False, 100 * MiB)
        assert h.cgroup is not None
        assert h.cgroup.oom_kills() == 0
        assert await sh(h, "ls -A /workspace; echo alive") == "alive\n"

    run_with(state_dir, body, memory=64 * MiB)


def test_a_write_is_dropped_when_the_sandbox_takes_the_memory_meanwhile(state_dir: Path) -> None:
    """The size fitted when the write began; then the sandbox's own processes take nearly all
    the memory: the write is dropped (the writer's pipe breaks) before the supervisor's next
    bytes would meet the OOM killer, and the commit says why."""

    async def body(h: BubblewrapSandbox) -> None:
        assert h.cgroup is not None
        write = await h.open_for_writing("/workspace/big", 0o644, False, 64 * MiB)
        await asyncio.to_thread(_write_all, write.fd, bytes(MiB))
        headroom = h.cgroup.memory_headroom()
        assert headroom is not None
        await sh(h, f"head -c {headroom - 5 * MiB} /dev/zero > /dev/shm/hog")
        await asyncio.sleep(0.2)
        with pytest.raises(BrokenPipeError):
            await asyncio.to_thread(_write_all, write.fd, bytes(63 * MiB))
        with pytest.raises(CapacityExhausted, match="memory limit is reached"):
            await write.commit()
        assert h.cgroup.oom_kills() == 0
        assert await sh(h, "rm /dev/shm/hog; ls -A /workspace; echo alive") == "alive\n"

    run_with(state_dir, body, memory=160 * MiB)


def test_a_dropped_write_leaves_nothing_and_the_loop_serves_others(state_dir: Path) -> None:
    async def body(h: BubblewrapSandbox) -> None:
        sup = supervisor_pid(h)
        before = await settled_fds(sup)
        stalled = await h.open_for_writing("/workspace/a", 0o644, False, 10 * MiB)
        os.write(stalled.fd, b"x" * 4096)  # the writer stops here, its pipe open
        assert await sh(h, "echo served") == "served\n"
        other = await _pipe_write(h, "/workspace/b", b"y" * (2 * MiB), 2 * MiB)
        assert other == 2 * MiB
        stalled.abort()  # the service or its client went away mid-write
        for _ in range(50):
            if await sh(h, "ls -A /workspace") == "b\n":
                break
            await asyncio.sleep(0.1)
        assert await sh(h, "ls -A /workspace") == "b\n"
        assert await settled_fds(sup) == before, open_fds(sup)

    run_with(state_dir, body)


def test_several_writes_at_once(state_dir: Path) -> None:
    blobs = [os.urandom(8 * MiB + i) for i in range(4)]

    async def body(h: BubblewrapSandbox) -> None:
        sizes = await asyncio.gather(
            *(_pipe_write(h, f"/workspace/f{i}", b, len(b)) for i, b in enumerate(blobs))
        )
        assert sizes == [len(b) for b in blobs]
        sums = (await sh(h, "cd /workspace && sha256sum f0 f1 f2 f3")).split()[::2]
        assert sums == [hashlib.sha256(b).hexdigest() for b in blobs]

    run_with(state_dir, body)


def test_without_a_size_a_file_kept_in_memory_is_still_refused(state_dir: Path) -> None:
    async def body(h: BubblewrapSandbox) -> None:
        with pytest.raises(Unsupported, match="kept in memory"):
            await h.open_for_writing("/workspace/f", 0o644, False)
        assert await sh(h, "ls -A /workspace") == ""

    run_with(state_dir, body)


def test_only_a_file_or_a_pipes_write_end_is_taken_from_a_supervisor(tmp_path: Path) -> None:
    """A hostile supervisor could hand anything over: the service takes a regular file open
    for writing, or a pipe's write end when it asked for a pipe, and nothing else."""
    read_end, write_end = os.pipe()
    sock_a, sock_b = socket.socketpair()
    (tmp_path / "f").write_bytes(b"")
    ro = os.open(tmp_path / "f", os.O_RDONLY)
    rw = os.open(tmp_path / "f", os.O_WRONLY)
    try:
        _check_handed(rw, pipe_allowed=False, sandbox="s")
        _check_handed(write_end, pipe_allowed=True, sandbox="s")
        for fd, pipe_allowed in ((write_end, False), (read_end, True), (ro, True),
                                 (sock_a.fileno(), True)):  # fmt: skip
            with pytest.raises(SandboxRuntimeError, match="other than a file to write"):
                _check_handed(fd, pipe_allowed=pipe_allowed, sandbox="s")
    finally:
        for fd in (read_end, write_end, ro, rw):
            os.close(fd)
        sock_a.close()
        sock_b.close()
