"""A local client reads and writes a sandbox's files through descriptors the service hands it on
the lean socket (OpenForReading, OpenForWriting): the bytes pass through neither the service
nor the sandbox's supervisor, whose own read/write counters show it (gRPC's stream, the same
calls made with AVIATO_TRANSPORT=grpc, goes through it); files without a meaningful size are
streamed as before, and files kept in memory are written through a pipe the supervisor drains
(test_files_through_pipe.py) or, without a declared size, streamed; nothing leaks, nothing
half-written stays."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest

from aviato import Sandbox, SandboxFileError
from aviato._transport.grpc import GrpcTransport
from aviato._transport.lean_descriptors import open_for_reading
from aviato.server import auth
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.local_frames import local_socket_path

from .conftest import TEST_TAG, _server_pid, state_dir

MiB = 1 << 20


def _transport_answers(sandbox_id: str, path: str, size: int = 0) -> tuple[str, str]:
    """What a local client's transport gets for reading and for writing (`size` bytes to)
    `path`: the class of its reader, and of its writer ("None": streamed)."""

    async def ask() -> tuple[str, str]:
        transport = GrpcTransport(f"unix://{state_dir() / 'aviato.sock'}")
        try:
            reader = await transport.open_read(sandbox_id, path, call_timeout=30)
            reader.cancel()
            header = pb.WriteFileHeader(
                sandbox_id=sandbox_id, path=path + ".new", mode=0o644, size=size
            )
            writer = await transport.open_write(header, call_timeout=30)
            if writer is not None:
                writer.cancel()
            return type(reader).__name__, type(writer).__name__ if writer else "None"
        finally:
            await transport.close()

    return asyncio.run(ask())


def _read_in_a_new_process(sandbox_id: str, path: str, target: Path, transport: str) -> str:
    """Reads and downloads `path` in a client process of its own (the transport is chosen when
    a client is made); the sha256 of what it read."""
    script = textwrap.dedent(
        f"""
        import hashlib
        from aviato import Sandbox
        sb = Sandbox.from_id({sandbox_id!r}).result(timeout=60)
        data = sb.read_file({path!r}, max_bytes=1 << 30).result(timeout=120)
        sb.download_file({path!r}, {str(target)!r}).result(timeout=120)
        print(hashlib.sha256(data).hexdigest())
        """
    )
    env = {**os.environ, "AVIATO_TRANSPORT": transport}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=240, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_local_read_takes_the_descriptor_and_is_byte_exact(tmp_path: Path) -> None:
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:
        sb.exec(["sh", "-c", "head -c 24M /dev/urandom > /workspace/big; chmod 640 /workspace/big"]
                ).result(timeout=60)  # fmt: skip
        want = sb.exec(["sha256sum", "/workspace/big"]).result(timeout=60).stdout.split()[0]
        for transport in ("lean", "grpc"):
            target = tmp_path / f"via-{transport}"
            got = _read_in_a_new_process(sb.sandbox_id, "/workspace/big", target, transport)
            assert got == want
            assert hashlib.sha256(target.read_bytes()).hexdigest() == want
            assert os.stat(target).st_mode & 0o777 == 0o640
        # A memory layer: read by descriptor; a write without a declared size is streamed.
        answers = _transport_answers(sb.sandbox_id, "/workspace/big")
        assert answers == ("DescriptorFileReader", "None")


def test_files_without_a_meaningful_size_are_streamed() -> None:
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:
        status = sb.read_file("/proc/self/status").result(timeout=60)
        assert b"Pid:" in status
        sb.exec(["mkdir", "/workspace/d"]).result(timeout=60)
        with pytest.raises(SandboxFileError):
            sb.read_file("/workspace/d").result(timeout=60)
        with pytest.raises(SandboxFileError):
            sb.read_file("/proc/self/fd/4").result(timeout=60)  # never a host file


def test_reads_leave_no_descriptor_open(tmp_path: Path) -> None:
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:
        sb.exec(["sh", "-c", "head -c 300000 /dev/urandom > /workspace/f"]).result(timeout=60)
        sb.read_file("/workspace/f").result(timeout=60)
        pid = _server_pid(state_dir())
        ours, theirs = len(os.listdir("/proc/self/fd")), len(os.listdir(f"/proc/{pid}/fd"))
        for i in range(30):
            assert len(sb.read_file("/workspace/f").result(timeout=60)) == 300000
            sb.download_file("/workspace/f", tmp_path / f"f{i}").result(timeout=60)
            stream = sb.read_file_streaming("/workspace/f")
            next(iter(stream))
            stream.close()  # a read left early
        assert len(os.listdir("/proc/self/fd")) <= ours + 2
        assert len(os.listdir(f"/proc/{pid}/fd")) <= theirs + 2


def test_another_owner_gets_no_descriptor() -> None:
    """OpenForReading is owner-scoped like ReadFile: a key of another owner on the lean socket
    finds no such sandbox, and receives no descriptor."""
    registry = Registry(state_dir() / "registry.db")
    try:
        _, key = auth.create_key(registry, "mallory", "t")
    finally:
        registry.close()
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:
        sb.exec(["sh", "-c", "echo secret > /workspace/s"]).result(timeout=60)
        request = pb.ReadFileRequest(sandbox_id=sb.sandbox_id, path="/workspace/s")
        lean = local_socket_path(str(state_dir() / "aviato.sock"))
        fds_before = len(os.listdir("/proc/self/fd"))

        async def attempt() -> grpc.StatusCode:
            try:
                await open_for_reading(lean, request, (("authorization", f"Bearer {key}"),), 10)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        assert asyncio.run(attempt()) == grpc.StatusCode.NOT_FOUND
        assert len(os.listdir("/proc/self/fd")) == fds_before


disk_layers = pytest.mark.skipif(os.geteuid() != 0, reason="disk layers need a root service")


@disk_layers
def test_an_upload_to_a_disk_layer_takes_the_descriptor(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(os.urandom(16 * MiB))
    source.chmod(0o750)
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG], writable_layer="disk",
                     resources={"disk": "256Mi"}) as sb:  # fmt: skip
        sb.write_file("/workspace/x", b"x").result(timeout=60)
        answers = _transport_answers(sb.sandbox_id, "/workspace/x")
        assert sb.upload_file(source, "/workspace/up/file").result(timeout=120) == 16 * MiB
        assert sb.write_file("/workspace/w", source.read_bytes()).result(timeout=120) is None
        assert answers == ("DescriptorFileReader", "DescriptorFileWriter")
        listing = sb.exec(["sh", "-c", "cd /workspace && stat -c '%a %s' up/file w && ls -A up"]
                          ).result(timeout=60).stdout.split()  # fmt: skip
        assert listing == ["750", str(16 * MiB), "644", str(16 * MiB), "file"]
        got = sb.exec(["sha256sum", "/workspace/up/file", "/workspace/w"]).result(timeout=60)
        want = hashlib.sha256(source.read_bytes()).hexdigest()
        assert got.stdout.split()[::2] == [want, want]


def test_an_upload_to_a_memory_layer_is_written_by_the_sandbox(tmp_path: Path) -> None:
    """Bytes written through a file's descriptor would be charged to the client's memory, not
    to the sandbox's: a file kept in memory is written by its supervisor, from a pipe when the
    size is declared (as the SDK does), else streamed (a client that declares none)."""
    source = tmp_path / "src"
    source.write_bytes(os.urandom(8 * MiB))
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:
        assert sb.upload_file(source, "/workspace/up").result(timeout=120) == 8 * MiB
        assert _transport_answers(sb.sandbox_id, "/workspace/up")[1] == "None"
        assert _transport_answers(sb.sandbox_id, "/workspace/up", MiB)[1] == "DescriptorFileWriter"
        # The write just opened and dropped leaves nothing, once its end has reached the
        # sandbox (the client's connection closes, then the service's to the supervisor).
        for _ in range(50):
            listed = sb.exec(["ls", "-A", "/workspace"]).result(timeout=60).stdout.split()
            if listed == ["up"]:
                break
            time.sleep(0.1)
        assert listed == ["up"]


@disk_layers
def test_a_full_disk_and_a_killed_writer_leave_no_file(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(os.urandom(48 * MiB))
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG], writable_layer="disk",
                     resources={"disk": "32Mi"}) as sb:  # fmt: skip
        with pytest.raises(SandboxFileError, match="No space left on device"):
            sb.upload_file(source, "/workspace/big").result(timeout=120)
        socket_url = f"unix://{state_dir() / 'aviato.sock'}"
        script = textwrap.dedent(
            f"""
            import asyncio, os
            from aviato._transport.grpc import GrpcTransport
            from aviato.v1 import sandbox_pb2 as pb
            async def main():
                transport = GrpcTransport({socket_url!r})
                header = pb.WriteFileHeader(sandbox_id={sb.sandbox_id!r}, path="/workspace/cut",
                                            mode=0o644)
                writer = await transport.open_write(header, call_timeout=30)
                assert writer is not None
                await writer.write(memoryview(b"x" * 4_000_000))
                print("written", flush=True)
                os._exit(9)  # killed mid-write: no end frame
            asyncio.run(main())
            """
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
        assert "written" in done.stdout, done.stderr
        for _ in range(50):
            left = sb.exec(["ls", "-A", "/workspace"]).result(timeout=60).stdout.split()
            if not left:
                break
            time.sleep(0.1)
        assert left == []
