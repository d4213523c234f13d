"""A local client reads a sandbox's regular file through a descriptor the service hands it on
the lean socket (OpenForReading): the bytes never pass through the service, which the service's
own I/O counters show (and gRPC's stream, the same calls made with AVIATO_TRANSPORT=grpc, does
not); other files are streamed as before; nothing leaks."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import grpc.aio
import pytest

from aviato import Sandbox, SandboxFileError
from aviato._transport.lean_descriptors import open_for_reading
from aviato.server import auth
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.local_frames import local_socket_path

from .conftest import TEST_TAG, _server_pid, state_dir

MiB = 1 << 20


def _service_io() -> int:
    """Bytes the local service has read and written through system calls so far."""
    pid = _server_pid(state_dir())
    assert pid is not None
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


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


def test_the_bytes_of_a_local_read_do_not_pass_through_the_service(tmp_path: Path) -> None:
    with Sandbox.run("sleep", "infinity", tags=[TEST_TAG]) as sb:
        sb.exec(["sh", "-c", "head -c 24M /dev/urandom > /workspace/big; chmod 640 /workspace/big"]
                ).result(timeout=60)  # fmt: skip
        want = sb.exec(["sha256sum", "/workspace/big"]).result(timeout=60).stdout.split()[0]
        moved = {}
        for transport in ("lean", "grpc"):
            before = _service_io()
            target = tmp_path / f"via-{transport}"
            assert (
                _read_in_a_new_process(sb.sandbox_id, "/workspace/big", target, transport) == want
            )
            moved[transport] = _service_io() - before
            assert hashlib.sha256(target.read_bytes()).hexdigest() == want
            assert os.stat(target).st_mode & 0o777 == 0o640
        # The stream carries the file twice (read and download) through the service.
        assert moved["grpc"] > 2 * 20 * MiB, moved
        assert moved["lean"] < 4 * MiB, moved


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
