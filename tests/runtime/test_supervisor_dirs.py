"""The supervisor's directory and metadata operations (FS_OP) and its reads and writes beneath a
root (READ_AT, WRITE_AT), against the real binary: what they answer, and the links they never
follow."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import test_supervisor
from test_supervisor import Supervisor, run

from aviato.runtime.base import FileNotFound, PathOp, PathRefused
from aviato.runtime.supervisor.frames import FS_LIST_MAX

binary, start, sup = test_supervisor.binary, test_supervisor.start, test_supervisor.sup  # fixtures


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def test_stat_list_mkdir_rename_remove(sup: Supervisor, tmp_path: Path) -> None:
    tmp_path = tmp_path / "t"
    tmp_path.mkdir()
    (tmp_path / "f").write_bytes(b"hello")
    os.chmod(tmp_path / "f", 0o640)
    os.utime(tmp_path / "f", ns=(0, 1_500_000_000_123_456_789))
    (tmp_path / "link").symlink_to("/etc/hostname")
    os.mkfifo(tmp_path / "fifo")

    async def main() -> None:
        conn = await sup.connect()
        f = (await conn.path_op(PathOp("stat", str(tmp_path / "f")))).entries[0]
        assert (f.name, f.type, f.size, f.mode, f.mtime_ns) == (
            "f",
            "file",
            5,
            0o640,
            1_500_000_000_123_456_789,
        )
        link = (await conn.path_op(PathOp("stat", str(tmp_path / "link")))).entries[0]
        assert (link.type, link.target) == ("symlink", "/etc/hostname")  # lstat: not followed
        listing = await conn.path_op(PathOp("list", str(tmp_path), limit=100))
        kinds = {e.name: e.type for e in listing.entries}
        assert kinds == {"f": "file", "link": "symlink", "fifo": "other"}
        assert not listing.truncated
        await conn.path_op(PathOp("mkdir", str(tmp_path / "a/b/c"), parents=True, mode=0o750))
        assert (tmp_path / "a/b/c").is_dir() and (
            tmp_path / "a/b/c"
        ).stat().st_mode & 0o777 == 0o750
        await conn.path_op(PathOp("mkdir", str(tmp_path / "a/b/c"), parents=True))  # exists: fine
        with pytest.raises(PathRefused, match="exists"):
            await conn.path_op(PathOp("mkdir", str(tmp_path / "a")))
        with pytest.raises(FileNotFound):
            await conn.path_op(PathOp("mkdir", str(tmp_path / "x/y")))
        await conn.path_op(PathOp("rename", str(tmp_path / "f"), arg=str(tmp_path / "a/g")))
        assert (tmp_path / "a/g").read_bytes() == b"hello"
        with pytest.raises(PathRefused, match="not empty"):
            await conn.path_op(PathOp("remove", str(tmp_path / "a")))
        await conn.path_op(PathOp("remove", str(tmp_path / "a"), recursive=True))
        assert not (tmp_path / "a").exists()
        await conn.path_op(PathOp("remove", str(tmp_path / "link")))  # the link, not /etc/hostname
        assert os.lstat("/etc/hostname") and "link" not in os.listdir(tmp_path)
        with pytest.raises(PathRefused, match="itself"):
            await conn.path_op(PathOp("remove", "/", recursive=True))
        with pytest.raises(FileNotFound):
            await conn.path_op(PathOp("stat", str(tmp_path / "nothing")))

    run(main())


def test_a_listing_is_bounded_and_pages(sup: Supervisor, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    for i in range(FS_LIST_MAX + 500):
        (big / f"n{i}").touch()

    async def main() -> None:
        conn = await sup.connect()
        first = await conn.path_op(PathOp("list", str(big), limit=10**9))
        assert len(first.entries) == FS_LIST_MAX and first.truncated
        rest = await conn.path_op(PathOp("list", str(big), offset=FS_LIST_MAX, limit=FS_LIST_MAX))
        assert len(rest.entries) == 500 and not rest.truncated
        names = {e.name for e in first.entries} | {e.name for e in rest.entries}
        assert len(names) == FS_LIST_MAX + 500

    run(main())


def test_beneath_follows_no_symlink(sup: Supervisor, tmp_path: Path) -> None:
    """A symlink planted under the root never redirects a write, a read, a mkdir or a remove."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    (root / "planted").symlink_to(outside)
    (root / "file-link").symlink_to(outside / "secret")

    async def main() -> None:
        conn = await sup.connect()
        for rel in ["planted/x", "../outside/x", "/abs", "a//b", "./x", "a/../x"]:
            with pytest.raises(PathRefused):
                await conn.write_file_at(str(root), rel, 0o644, None, chunks_of(b"evil"))
            with pytest.raises(PathRefused):
                await conn.path_op(PathOp("mkdir", str(root), rel=rel, parents=True))
        with pytest.raises(PathRefused):
            await conn.read_file_at(str(root), "planted/secret")
        with pytest.raises(PathRefused):
            await conn.read_file_at(str(root), "file-link")
        with pytest.raises(PathRefused):
            await conn.path_op(PathOp("remove", str(root), rel="planted/secret"))
        with pytest.raises(PathRefused):
            await conn.path_op(PathOp("set_meta", str(root), rel="planted/secret", mode=0o777))
        # the link itself may be replaced: it is the entry, not a way through
        await conn.write_file_at(str(root), "file-link", 0o600, 7 * 10**9, chunks_of(b"new"))
        assert (outside / "secret").read_bytes() == b"s"
        assert (root / "file-link").read_bytes() == b"new"
        assert (root / "file-link").stat().st_mtime_ns == 7 * 10**9
        await conn.write_file_at(str(root), "d/e/f", 0o755, None, chunks_of(b"deep"))
        assert (root / "d/e/f").read_bytes() == b"deep"
        await conn.path_op(PathOp("symlink", str(root), rel="d/l", arg="/etc/passwd"))
        assert os.readlink(root / "d/l") == "/etc/passwd"
        await conn.path_op(
            PathOp("set_meta", str(root), rel="d/l", mtime_ns=3 * 10**9)
        )  # a link's own time
        assert os.lstat(root / "d/l").st_mtime_ns == 3 * 10**9
        assert sorted(os.listdir(outside)) == ["secret"]
        assert oct((outside / "secret").stat().st_mode & 0o777) != "0o777"

    run(main())
