"""A local client's write into the memory layer (the default) goes through a pipe the sandbox's
supervisor drains (OpenForWriting with the size in its header): the bytes never cross the
service, the sandbox's memory limit still counts them, and every way a write can go wrong (a
full layer or memory, a client killed mid-write, a sandbox that stops taking bytes, a size
that does not match) ends with the error in words and no file in place."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from aviato import Sandbox, SandboxFileError
from aviato._transport import lean_descriptors
from aviato._transport.grpc import GrpcTransport
from aviato._transport.lean_descriptors import DescriptorFileWriter, _is_pipe_to_write
from aviato.v1 import sandbox_pb2 as pb

from .conftest import TEST_TAG, _server_pid, state_dir

MiB = 1 << 20


def _service_bytes_read() -> int:
    pid = _server_pid(state_dir())
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def _listing(sb: Sandbox) -> list[str]:
    return sb.exec(["ls", "-A", "/workspace"]).result(timeout=60).stdout.split()


def _gone_soon(sb: Sandbox) -> list[str]:
    """/workspace's entries once a dropped write had its moment to be removed."""
    for _ in range(50):
        if not (left := _listing(sb)):
            break
        time.sleep(0.1)
    return left


async def _writer(sandbox_id: str, path: str, size: int) -> tuple[GrpcTransport, object]:
    transport = GrpcTransport(f"unix://{state_dir() / 'aviato.sock'}")
    header = pb.WriteFileHeader(sandbox_id=sandbox_id, path=path, mode=0o644, size=size)
    return transport, await transport.open_write(header, call_timeout=30)


def test_writes_into_memory_take_the_pipe_and_the_sandbox_pays(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(os.urandom(32 * MiB))
    source.chmod(0o750)
    data = os.urandom(32 * MiB + 5)
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:
        before = _service_bytes_read()
        assert sb.upload_file(source, "/workspace/up").result(timeout=120) == 32 * MiB
        assert sb.write_file("/workspace/w", data).result(timeout=120) is None
        assert _service_bytes_read() - before < 8 * MiB  # the bytes did not cross the service
        got = sb.exec(["sh", "-c", "cd /workspace && stat -c %a up w && sha256sum up w"]
                      ).result(timeout=60).stdout.split()  # fmt: skip
        want = [hashlib.sha256(source.read_bytes()).hexdigest(), hashlib.sha256(data).hexdigest()]
        assert got == ["750", "644", want[0], "up", want[1], "w"]

        async def kind() -> str:
            transport, writer = await _writer(sb.sandbox_id, "/workspace/k", MiB)
            try:
                assert isinstance(writer, DescriptorFileWriter)
                writer.cancel()
                return "pipe" if writer._piped else "file"
            finally:
                await transport.close()

        assert asyncio.run(kind()) == "pipe"


def test_several_writes_at_once() -> None:
    blobs = [os.urandom(4 * MiB + i) for i in range(4)]
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:

        async def all_at_once() -> None:
            await asyncio.gather(
                *(sb.write_file(f"/workspace/f{i}", b) for i, b in enumerate(blobs))
            )

        asyncio.run(all_at_once())
        sums = sb.exec(["sh", "-c", "cd /workspace && sha256sum f0 f1 f2 f3"]).result(timeout=60)
        assert sums.stdout.split()[::2] == [hashlib.sha256(b).hexdigest() for b in blobs]


def test_the_memory_limit_still_stops_a_big_write() -> None:
    """More than the sandbox's memory (64 MiB) into the memory layer: refused in words, before
    the OOM killer would answer; nothing is left and the sandbox carries on."""
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG], resources={"memory": "64Mi"}) as sb:
        with pytest.raises(SandboxFileError, match="No space left on device"):
            sb.write_file("/workspace/big", bytes(100 * MiB)).result(timeout=120)
        assert _listing(sb) == []
        assert sb.exec(["echo", "alive"]).result(timeout=60).stdout == "alive\n"


def test_a_full_layer_breaks_the_pipe_and_the_write_says_why(tmp_path: Path) -> None:
    """The layer (32 MiB) fills first: the supervisor stops reading, the client's pipe breaks,
    and the user gets the supervisor's reason, not a BrokenPipeError."""
    source = tmp_path / "src"
    source.write_bytes(os.urandom(48 * MiB))
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG], resources={"disk": "32Mi"}) as sb:
        with pytest.raises(SandboxFileError, match="No space left on device"):
            sb.upload_file(source, "/workspace/big").result(timeout=120)
        with pytest.raises(SandboxFileError, match="No space left on device"):
            sb.write_file("/workspace/big", source.read_bytes()).result(timeout=120)
        assert _listing(sb) == []


def test_a_local_file_that_grows_while_uploaded_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(bytes(4 * MiB))

    def grow(done: int, total: int | None) -> None:
        if done:
            with source.open("ab") as f:
                f.write(bytes(MiB))

    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:
        with pytest.raises(SandboxFileError, match="changed size while it was read"):
            sb.upload_file(source, "/workspace/up", progress=grow).result(timeout=120)
        assert _listing(sb) == []


def test_a_client_killed_mid_write_leaves_nothing() -> None:
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:
        socket_url = f"unix://{state_dir() / 'aviato.sock'}"
        script = textwrap.dedent(
            f"""
            import asyncio, os
            from aviato._transport.grpc import GrpcTransport
            from aviato.v1 import sandbox_pb2 as pb
            async def main():
                transport = GrpcTransport({socket_url!r})
                header = pb.WriteFileHeader(sandbox_id={sb.sandbox_id!r}, path="/workspace/cut",
                                            mode=0o644, size=8_000_000)
                writer = await transport.open_write(header, call_timeout=30)
                assert writer is not None and writer._piped
                await writer.write(memoryview(b"x" * 4_000_000))
                print("written", flush=True)
                os._exit(9)  # killed mid-write: no end frame
            asyncio.run(main())
            """
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
        assert "written" in done.stdout, done.stderr
        assert _gone_soon(sb) == []
        sb.write_file("/workspace/after", bytes(2 * MiB)).result(timeout=60)
        assert _listing(sb) == ["after"]


def test_a_sandbox_that_stops_taking_bytes_fails_the_write_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A paused sandbox's supervisor reads nothing: the pipe fills, and the client's write ends
    after PIPE_STALL_SECONDS with an error saying so, instead of blocking forever."""
    monkeypatch.setattr(lean_descriptors, "PIPE_STALL_SECONDS", 1.5)
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:

        async def stalled() -> None:
            transport, writer = await _writer(sb.sandbox_id, "/workspace/s", 64 * MiB)
            try:
                assert isinstance(writer, DescriptorFileWriter)
                await writer.write(memoryview(bytes(MiB)))
                await sb.pause()
                started = time.monotonic()
                with pytest.raises(OSError, match=r"took no bytes for 1\.5 seconds"):
                    await writer.write(memoryview(bytes(8 * MiB)))
                assert time.monotonic() - started < 10
                writer.cancel()
            finally:
                await transport.close()

        asyncio.run(stalled())
        sb.resume().result(timeout=60)
        assert _gone_soon(sb) == []


def test_a_write_cancelled_while_it_waits_closes_its_pipe_only_after_the_wait() -> None:
    """The worker thread waiting for room holds the descriptor's number: the writer closes it
    only once that thread is done (closed under it, the number could name another file)."""
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:

        async def cancelled() -> tuple[bool, int, int]:
            transport, writer = await _writer(sb.sandbox_id, "/workspace/c", 64 * MiB)
            try:
                assert isinstance(writer, DescriptorFileWriter)
                fds = len(os.listdir("/proc/self/fd"))
                await sb.pause()
                task = asyncio.ensure_future(writer.write(memoryview(bytes(8 * MiB))))
                await asyncio.sleep(0.3)
                task.cancel()
                writer.cancel()
                still_open = writer._fd >= 0  # the worker still waits: not closed under it
                await sb.resume()  # the supervisor drops the write, the worker's pipe breaks
                for _ in range(100):
                    if writer._fd < 0:
                        break
                    await asyncio.sleep(0.05)
                return still_open, fds, len(os.listdir("/proc/self/fd"))
            finally:
                await transport.close()

        still_open, before, after = asyncio.run(cancelled())
        assert still_open
        assert after <= before - 1  # the pipe is closed now (and the call's socket)
        assert _gone_soon(sb) == []


def test_a_size_that_does_not_match_leaves_no_file() -> None:
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:

        async def mismatched(declared: int, sent: int) -> None:
            transport, writer = await _writer(sb.sandbox_id, "/workspace/m", declared)
            try:
                assert isinstance(writer, DescriptorFileWriter)
                await writer.write(memoryview(bytes(sent)))
                await writer.finish()
            finally:
                await transport.close()

        with pytest.raises(SandboxFileError, match="incomplete write: 2097152 of 3145728"):
            asyncio.run(mismatched(3 * MiB, 2 * MiB))
        with pytest.raises(SandboxFileError, match="more bytes arrived than the 1048576"):
            asyncio.run(mismatched(MiB, 4 * MiB))

        async def streamed() -> None:  # WriteFile (the stream) holds the header's size too
            transport = GrpcTransport(f"unix://{state_dir() / 'aviato.sock'}")
            header = pb.WriteFileHeader(sandbox_id=sb.sandbox_id, path="/workspace/m", size=10)
            try:
                await transport.write_file(header, memoryview(b"x" * 9), call_timeout=30)
            finally:
                await transport.close()

        with pytest.raises(Exception, match="incomplete write: 9 bytes sent, the header declared"):
            asyncio.run(streamed())
        assert _listing(sb) == []


def test_a_client_takes_only_a_file_or_a_pipes_write_end(tmp_path: Path) -> None:
    """What the service hands over is checked: a hostile or broken service could pass
    anything (a socket, a pipe's read end, a file open only for reading)."""
    read_end, write_end = os.pipe()
    (tmp_path / "f").write_bytes(b"")
    ro = os.open(tmp_path / "f", os.O_RDONLY)
    rw = os.open(tmp_path / "f", os.O_WRONLY)
    try:
        assert _is_pipe_to_write(write_end) is True
        assert _is_pipe_to_write(rw) is False
        for fd in (read_end, ro):
            with pytest.raises(grpc.RpcError, match="no file to write"):
                _is_pipe_to_write(fd)
    finally:
        for fd in (read_end, write_end, ro, rw):
            os.close(fd)


def test_a_blocking_pipe_nobody_reads_fails_the_write_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pipe's end comes from the sandbox's supervisor, which the sandbox's code may have
    taken over: one handed out blocking, and never read, must not hold the writer forever."""
    monkeypatch.setattr(lean_descriptors, "PIPE_STALL_SECONDS", 0.3)
    read_end, write_end = os.pipe()  # blocking, as a hostile supervisor could hand it out
    try:
        assert _is_pipe_to_write(write_end) is True

        async def stalled() -> None:
            call = lean_descriptors._Call("/nonexistent", "", (), None)
            writer = DescriptorFileWriter(call, write_end, None, True, lambda err: err)
            await asyncio.wait_for(writer.write(memoryview(bytes(8 * MiB))), 10)

        with pytest.raises(OSError, match=r"took no bytes for 0\.3 seconds"):
            asyncio.run(stalled())
    finally:
        os.close(read_end)
        with contextlib.suppress(OSError):
            os.close(write_end)
