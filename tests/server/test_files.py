"""Files through a real service: chunked, binary-safe, large, with modes; escapes refused."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from server_helpers import ServerProcess, code_of

from aviato.v1 import sandbox_pb2 as pb


@pytest.fixture(scope="module")
def sandbox(server: ServerProcess) -> Iterator[str]:
    sb = server.client().running(tags=["file-tests"])
    yield sb.id
    server.client().delete(sb.id)


def test_round_trip_binary_and_mode(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    data = bytes(range(256)) * 1000 + b"\x00\r\n"
    assert c.write_file(sandbox, "/tmp/bin.dat", data, mode=0o600) == len(data)
    info, got = c.read_file(sandbox, "/tmp/bin.dat")
    assert got == data and info.size == len(data) and info.mode & 0o777 == 0o600
    assert c.sh(sandbox, "stat -c %a /tmp/bin.dat").stdout == b"600\n"
    c.write_file(sandbox, "/tmp/x.sh", b"#!/bin/sh\necho run\n", mode=0o755)
    assert c.exec(sandbox, ["/tmp/x.sh"]).stdout == b"run\n"
    # Default mode 0644; empty files work.
    c.write_file(sandbox, "/tmp/empty", b"")
    info, got = c.read_file(sandbox, "/tmp/empty")
    assert got == b"" and info.size == 0 and info.mode & 0o777 == 0o644


@pytest.mark.slow
def test_50_mib(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    data = os.urandom(50 << 20)
    assert c.write_file(sandbox, "/tmp/big.bin", data) == len(data)
    r = c.sh(sandbox, "sha256sum /tmp/big.bin")
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    info, got = c.read_file(sandbox, "/tmp/big.bin")
    assert info.size == len(data) and got == data
    c.sh(sandbox, "rm /tmp/big.bin")


def test_make_parents_and_errors(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    with pytest.raises(grpc.RpcError) as err:
        c.write_file(sandbox, "/tmp/a/b/c.txt", b"x")
    assert code_of(err.value) in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    c.write_file(sandbox, "/tmp/a/b/c.txt", b"x", make_parents=True)
    assert c.read_file(sandbox, "/tmp/a/b/c.txt")[1] == b"x"
    with pytest.raises(grpc.RpcError) as err:
        c.read_file(sandbox, "/tmp/does-not-exist")
    assert code_of(err.value) == grpc.StatusCode.NOT_FOUND
    for bad in ("relative.txt", "/tmp/../etc/passwd", "/tmp/\x00x", ""):
        with pytest.raises(grpc.RpcError) as err:
            c.read_file(sandbox, bad)
        assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT, bad
        with pytest.raises(grpc.RpcError) as err:
            c.write_file(sandbox, bad, b"x")
        assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT, bad
    with pytest.raises(grpc.RpcError) as err:
        c.write_file(sandbox, "/tmp/suid", b"x", mode=0o4755)
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    # The host's read-only system stays read-only.
    with pytest.raises(grpc.RpcError):
        c.write_file(sandbox, "/usr/bin/evil", b"x")


def test_header_must_come_first(server: ServerProcess, sandbox: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        server.stub().WriteFile(iter([pb.WriteFileRequest(data=b"x")]), timeout=10)
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        server.stub().WriteFile(iter([]), timeout=10)
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT


def test_an_upload_without_its_end_frame_leaves_no_file(
    server: ServerProcess, sandbox: str
) -> None:
    """A stream that stops before its end frame (a client gone mid-upload) writes nothing, and
    an earlier complete file of that name is kept as it was."""
    c = server.client()
    c.write_file(sandbox, "/tmp/kept.txt", b"complete")
    for path in ("/tmp/partial.txt", "/tmp/kept.txt"):
        header = pb.WriteFileHeader(sandbox_id=sandbox, path=path)
        frames = [pb.WriteFileRequest(header=header), pb.WriteFileRequest(data=b"half of it")]
        with pytest.raises(grpc.RpcError) as err:
            server.stub().WriteFile(iter(frames), timeout=10)
        assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert "end frame" in (err.value.details() or "")
    assert c.sh(sandbox, "test -e /tmp/partial.txt").exit_code == 1
    assert c.read_file(sandbox, "/tmp/kept.txt")[1] == b"complete"
    # Frames after the end frame are refused too.
    header = pb.WriteFileHeader(sandbox_id=sandbox, path="/tmp/after-end.txt")
    frames = [
        pb.WriteFileRequest(header=header),
        pb.WriteFileRequest(end=True),
        pb.WriteFileRequest(data=b"late"),
    ]
    with pytest.raises(grpc.RpcError) as err:
        server.stub().WriteFile(iter(frames), timeout=10)
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_declared_size_is_held(server: ServerProcess, sandbox: str) -> None:
    """`header.size` (0: not said): a stream with another number of bytes writes nothing, and
    a size outside 0 to 1 TiB is refused, naming the field."""
    c = server.client()
    c.write_file(sandbox, "/tmp/sized.txt", b"kept")
    for size, data in ((10, [b"12345", b"6789"]), (3, [b"12", b"34"]), (-1, [b"x"]), (2**41, [])):
        header = pb.WriteFileHeader(sandbox_id=sandbox, path="/tmp/sized.txt", size=size)
        frames = [pb.WriteFileRequest(header=header)]
        frames += [pb.WriteFileRequest(data=d) for d in data] + [pb.WriteFileRequest(end=True)]
        with pytest.raises(grpc.RpcError) as err:
            server.stub().WriteFile(iter(frames), timeout=10)
        assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT, size
        assert (err.value.details() or "").startswith("header.size: "), size
    header = pb.WriteFileHeader(sandbox_id=sandbox, path="/tmp/sized.txt", size=9)
    frames = [pb.WriteFileRequest(header=header), pb.WriteFileRequest(data=b"123456789"),
              pb.WriteFileRequest(end=True)]  # fmt: skip
    assert server.stub().WriteFile(iter(frames), timeout=10).size == 9
    assert c.read_file(sandbox, "/tmp/sized.txt")[1] == b"123456789"


def test_symlink_escape_is_refused(server: ServerProcess, sandbox: str, tmp_path: Path) -> None:
    c = server.client()
    secret = tmp_path / "host-secret.txt"
    secret.write_text("TOP-SECRET-HOST-CONTENT")
    r = c.sh(sandbox, f"ln -sf {secret} /tmp/escape && ln -sf {tmp_path} /tmp/escape-dir")
    assert r.exit_code == 0
    for path in ("/tmp/escape", f"/tmp/escape-dir/{secret.name}"):
        try:
            _, got = c.read_file(sandbox, path)
        except grpc.RpcError as e:
            assert code_of(e) in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
        else:
            assert b"TOP-SECRET" not in got
    # Writing through the symlink must not touch the host file either.
    with contextlib.suppress(grpc.RpcError):
        c.write_file(sandbox, "/tmp/escape", b"overwritten")
    assert secret.read_text() == "TOP-SECRET-HOST-CONTENT"
