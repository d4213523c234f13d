"""UploadTree against crafted archives: each lie is refused in words and nothing lands outside
the target; and directory calls of another owner's sandbox are NOT_FOUND (test_auth.py)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

import grpc
import pytest
from server_helpers import ServerProcess, code_of

from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.tar_stream import BLOCK


def _archive(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    return info


def _upload(stub: object, sandbox_id: str, path: str, data: bytes) -> int:
    def frames() -> Iterator[pb.WriteFileRequest]:
        yield pb.WriteFileRequest(header=pb.WriteFileHeader(sandbox_id=sandbox_id, path=path))
        for i in range(0, len(data), 65536):
            yield pb.WriteFileRequest(data=data[i : i + 65536])
        yield pb.WriteFileRequest(end=True)

    answer = stub.UploadTree(frames(), timeout=60)  # type: ignore[attr-defined]
    return int(answer.size)


def _huge_declared_size() -> bytes:
    info = _member("big")
    info.size = 1 << 40
    head = info.tobuf(tarfile.PAX_FORMAT)
    return head + b"x" * 10 + bytes(2 * BLOCK)  # the end comes long before 1 TiB


ATTACKS = [
    ("climbing", _archive((_member("../escape"), b"evil")), "'..'"),
    ("absolute", _archive((_member("/tmp/abs-escape"), b"evil")), "absolute"),
    ("nested climb", _archive((_member("a/../../escape"), b"evil")), "'..'"),
    (
        "symlink then a file through it",
        _archive(
            (_member("ln", tarfile.SYMTYPE, "/tmp/outside"), b""),
            (_member("ln/pwned"), b"evil"),
        ),
        "symlink|Not a directory|not a directory",
    ),
    (
        "hard link outside",
        _archive((_member("hl", tarfile.LNKTYPE, "/etc/passwd"), b"")),
        "hard link",
    ),
    ("device", _archive((_member("dev", tarfile.CHRTYPE), b"")), "character device"),
    ("fifo", _archive((_member("fifo", tarfile.FIFOTYPE), b"")), "FIFO"),
    ("huge declared size", _huge_declared_size(), "ended"),
    ("long name", _archive((_member("n" * 10_000), b"x")), "longer than"),
    ("not tar", b"hello world" * 100, "checksum"),
]


def test_crafted_archives_are_refused_and_nothing_lands_outside(server: ServerProcess) -> None:
    client = server.client()
    sb = client.running()
    assert client.sh(sb.id, "mkdir -p /tmp/outside").exit_code == 0
    for i, (what, data, message) in enumerate(ATTACKS):
        with pytest.raises(grpc.RpcError) as err:
            _upload(client.stub, sb.id, f"/tmp/t{i}/in", data)
        assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT, what
        assert any(m in (err.value.details() or "") for m in message.split("|")), (
            what,
            err.value.details(),
        )
    found = client.sh(
        sb.id,
        "ls -A /tmp/outside; ls /tmp/escape /tmp/abs-escape /tmp/t*/escape 2>/dev/null;"
        "find /tmp -name big -o -name pwned -o -name '.aviato-tmp-*'",
    )
    assert found.stdout == b"", found.stdout
    # a well-formed archive still goes in
    good = _archive((_member("ok/file"), b"fine"), (_member("ok/l", tarfile.SYMTYPE, "file"), b""))
    assert _upload(client.stub, sb.id, "/tmp/good", good) == 4
    assert client.sh(sb.id, "cat /tmp/good/ok/l").stdout == b"fine"


def test_an_upload_does_not_follow_a_symlink_the_sandbox_planted(server: ServerProcess) -> None:
    client = server.client()
    sb = client.running()
    script = "mkdir -p /tmp/victim /tmp/target && ln -s /tmp/victim /tmp/target/sub"
    assert client.sh(sb.id, script).exit_code == 0
    with pytest.raises(grpc.RpcError) as err:
        _upload(client.stub, sb.id, "/tmp/target", _archive((_member("sub/x"), b"evil")))
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert client.sh(sb.id, "ls -A /tmp/victim").stdout == b""
