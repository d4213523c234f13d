"""SandboxHandle.open_for_reading / open_for_writing against real sandboxes: the supervisor
opens a file of the sandbox and hands its descriptor over (OPEN_FILE), so that the bytes move
in the kernel; a write is in place only once committed, and nothing is left of one that was
not; no path reaches a host file through the descriptor."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from one_sandbox import run_in_sandbox, sh
from supervisor_descriptors import open_fds, settled_fds, supervisor_pid

from aviato.runtime.base import (
    FileNotFound,
    PathRefused,
    Unsupported,
)
from aviato.runtime.bubblewrap import BubblewrapSandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run sandboxes as root")
T = TypeVar("T")
MiB = 1 << 20


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="avfd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_with(
    state_dir: Path, body: Callable[[BubblewrapSandbox], Awaitable[T]], layer: str = "disk"
) -> T:
    """`body` with a sandbox whose writable layer is `layer` (a disk: descriptors may write)."""
    return run_in_sandbox(state_dir, body, layer=layer)


def test_a_file_read_through_its_descriptor(state_dir: Path, tmp_path: Path) -> None:
    async def body(h: BubblewrapSandbox) -> None:
        await sh(h, "head -c 5000000 /dev/urandom > /workspace/data && chmod 640 /workspace/data")
        digest = (await sh(h, "sha256sum /workspace/data")).split()[0]
        fd, info = await h.open_for_reading("/workspace/data")
        try:
            assert (info.size, info.mode) == (5_000_000, 0o640)
            local = tmp_path / "copy"
            out = os.open(local, os.O_WRONLY | os.O_CREAT, 0o600)
            done = 0
            while done < info.size:
                done += os.sendfile(out, fd, done, info.size - done)
            os.close(out)
            assert hashlib.sha256(local.read_bytes()).hexdigest() == digest
        finally:
            os.close(fd)

    run_with(state_dir, body)


def test_a_write_is_in_place_only_once_committed(state_dir: Path) -> None:
    async def body(h: BubblewrapSandbox) -> None:
        data = os.urandom(3 * MiB)
        write = await h.open_for_writing("/workspace/new/dir/out.bin", 0o600, True)
        os.write(write.fd, data[:MiB])
        assert "absent" in await sh(h, "test -e /workspace/new/dir/out.bin || echo absent")
        view = memoryview(data)[MiB:]
        while view:
            view = view[os.write(write.fd, view) :]
        assert await write.commit() == len(data)
        listing = await sh(
            h, "stat -c '%a %s' /workspace/new/dir/out.bin; ls -A /workspace/new/dir"
        )
        assert listing.split() == ["600", str(len(data)), "out.bin"]  # no temporary file left
        assert (await sh(h, "sha256sum /workspace/new/dir/out.bin")).split()[0] == (
            hashlib.sha256(data).hexdigest()
        )

    run_with(state_dir, body)


def test_a_write_dropped_or_cut_off_leaves_nothing(state_dir: Path) -> None:
    """Abort, and a connection that closes without a commit (the service killed mid-write), both
    leave neither the target nor a temporary file; the old file stays as it was."""

    async def body(h: BubblewrapSandbox) -> None:
        await sh(h, "echo old > /workspace/kept")
        write = await h.open_for_writing("/workspace/kept", 0o644, False)
        os.write(write.fd, b"new and half")
        write.abort()
        write.abort()  # idempotent
        cut = await h.open_for_writing("/workspace/cut", 0o644, False)
        os.write(cut.fd, b"x" * MiB)
        os.close(cut.fd)
        cut._exchange.close()  # type: ignore[attr-defined]  # as a killed service's would
        for _ in range(50):
            if (await sh(h, "ls -A /workspace")).split() == ["kept"]:
                break
            await asyncio.sleep(0.1)
        assert (await sh(h, "ls -A /workspace")).split() == ["kept"]
        assert await sh(h, "cat /workspace/kept") == "old\n"

    run_with(state_dir, body)


def test_no_descriptor_of_a_host_file_and_no_stream_by_mistake(state_dir: Path) -> None:
    """A link planted in the sandbox to the supervisor's own descriptors (its main log is a host
    file) is refused; a fifo, /proc and a directory are not handed out (a fifo must not block
    the supervisor); a missing file is not found."""

    async def body(h: BubblewrapSandbox) -> None:
        await sh(h, "ln -s /proc/self/fd/4 /workspace/evil; ln -s /proc/1/fd/4 /workspace/evil1;"
                    " mkfifo /workspace/fifo")  # fmt: skip
        for path in ("/workspace/evil", "/workspace/evil1", "/proc/self/fd/4"):
            with pytest.raises(PathRefused, match=r"symbolic links|/proc"):
                await h.open_for_reading(path)
        for path in ("/workspace/fifo", "/proc/self/status"):
            with pytest.raises(Unsupported):
                await h.open_for_reading(path)
        with pytest.raises(PathRefused, match="directory"):
            await h.open_for_reading("/workspace")
        with pytest.raises(FileNotFound):
            await h.open_for_reading("/workspace/none")
        with pytest.raises(FileNotFound):
            await h.open_for_writing("/workspace/no/parents", 0o644, False)

    run_with(state_dir, body)


def test_the_supervisor_keeps_no_descriptor(state_dir: Path) -> None:
    async def body(h: BubblewrapSandbox) -> None:
        await sh(h, "echo x > /workspace/f")
        sup = supervisor_pid(h)
        before = await settled_fds(sup)
        for _ in range(20):
            fd, _ = await h.open_for_reading("/workspace/f")
            os.close(fd)
            write = await h.open_for_writing("/workspace/g", 0o644, False)
            os.write(write.fd, b"y")
            await write.commit()
            write = await h.open_for_writing("/workspace/h", 0o644, False)
            write.abort()
        assert await settled_fds(sup) == before, open_fds(sup)

    run_with(state_dir, body)


def test_no_descriptor_to_write_a_file_kept_in_memory(state_dir: Path) -> None:
    """Bytes written through a descriptor would be charged to the writer's memory: files on
    tmpfs (the memory layer, /dev/shm on any layer) are never handed out for writing; without a
    declared size they are refused (streamed), with one they go through a pipe
    (test_write_through_pipe.py)."""

    async def body(h: BubblewrapSandbox) -> None:
        with pytest.raises(Unsupported, match="kept in memory"):
            await h.open_for_writing("/workspace/f", 0o644, False)
        assert await sh(h, "ls -A /workspace") == ""  # no temporary file left

    async def on_disk(h: BubblewrapSandbox) -> None:
        with pytest.raises(Unsupported, match="kept in memory"):
            await h.open_for_writing("/dev/shm/f", 0o644, False)

    run_with(state_dir, body, layer="memory")
    run_with(state_dir, on_disk)
