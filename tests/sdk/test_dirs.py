"""Directories, metadata and whole trees through the SDK, against the real local service."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aviato import DirListing, FileEntry, Sandbox
from aviato.exceptions import SandboxFileError


def _tree(root: Path, files: int) -> None:
    """`files` small files in 100 directories, modes varied, an empty dir, symlinks."""
    root.mkdir()
    for i in range(files):
        d = root / f"d{i % 100:02d}"
        d.mkdir(exist_ok=True)
        f = d / f"f{i}.txt"
        f.write_bytes(f"file {i}\n".encode() * (i % 7))
        os.chmod(f, (0o644, 0o755, 0o600, 0o640)[i % 4])
        os.utime(f, ns=(0, 1_600_000_000_000_000_000 + i * 1_000_001))
    (root / "empty").mkdir(mode=0o700)
    os.chmod(root / "empty", 0o700)
    (root / "link").symlink_to("d00/f0.txt")
    (root / "abs-link").symlink_to("/etc/passwd")
    (root / "dangling").symlink_to("nowhere")
    os.chmod(root / "d01", 0o750)


def _snapshot(root: Path) -> dict[str, tuple[str, int, bytes | str, int]]:
    out: dict[str, tuple[str, int, bytes | str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(p), 0)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), b"", 0)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes(), st.st_mtime_ns)
    return out


def test_list_stat_make_rename_remove(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.make_dir("/tmp/pt/a/b", parents=True, mode=0o750).result()
    sb.write_file("/tmp/pt/a/f", b"hello").result()
    sb.exec(["ln", "-s", "/etc/hostname", "/tmp/pt/a/link"]).result()
    listing = sb.list_dir("/tmp/pt/a").result()
    assert isinstance(listing, DirListing) and not listing.truncated
    kinds = {e.name: (e.type, e.size if e.is_file else None) for e in listing}
    assert kinds == {"b": ("dir", None), "f": ("file", 5), "link": ("symlink", None)}
    b = sb.stat("/tmp/pt/a/b").result()
    assert isinstance(b, FileEntry) and b.is_dir and b.mode == 0o750 and b.mtime > 1e9
    link = sb.stat("/tmp/pt/a/link").result()
    assert link.is_symlink and link.target == "/etc/hostname"
    with pytest.raises(SandboxFileError, match="exists"):
        sb.make_dir("/tmp/pt/a/b").result()
    sb.make_dir("/tmp/pt/a/b", parents=True).result()  # as mkdir -p: no error
    sb.rename("/tmp/pt/a/f", "/tmp/pt/a/b/g").result()
    assert sb.read_file("/tmp/pt/a/b/g").result() == b"hello"
    with pytest.raises(SandboxFileError, match="not empty"):
        sb.remove("/tmp/pt/a").result()
    sb.remove("/tmp/pt/a/link").result()  # the link, not /etc/hostname
    assert sb.stat("/etc/hostname").result().is_file
    sb.remove("/tmp/pt", recursive=True).result()
    with pytest.raises(SandboxFileError) as missing:
        sb.stat("/tmp/pt").result()
    assert missing.value.filepath == "/tmp/pt"
    with pytest.raises(SandboxFileError, match="never removed"):
        sb.remove("/", recursive=True).result()
    with pytest.raises(SandboxFileError, match=r"not a directory|Not a directory"):
        sb.list_dir("/etc/hostname").result()


def test_a_large_directory_is_listed_in_bounded_pages(sandbox: Sandbox) -> None:
    sb = sandbox
    sb.exec(
        ["sh", "-c", "mkdir -p /tmp/many && cd /tmp/many && seq 1 25000 | xargs touch"]
    ).result()
    first = sb.list_dir("/tmp/many", limit=100).result()
    assert len(first) == 100 and first.truncated
    every = sb.list_dir("/tmp/many", limit=30_000).result()
    assert len(every) == 25_000 and not every.truncated
    assert len(set(every.names())) == 25_000
    sb.remove("/tmp/many", recursive=True).result()


def test_a_tree_round_trips_with_modes_and_links(sandbox: Sandbox, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src, 300)
    sent = sandbox.upload_dir(src, "/tmp/tree/in").result()
    assert sent == sum(p.stat().st_size for p in src.rglob("*.txt"))
    assert sandbox.stat("/tmp/tree/in/link").result().target == "d00/f0.txt"
    assert sandbox.stat("/tmp/tree/in/d01/f1.txt").result().mode == 0o755
    back = tmp_path / "back"
    seen: list[int] = []
    sandbox.download_dir("/tmp/tree/in", back, progress=lambda done, _: seen.append(done)).result()
    assert _snapshot(back) == _snapshot(src)
    assert seen[0] == 0 and seen[-1] > 0
    assert stat.S_IMODE((back / "empty").stat().st_mode) == 0o700
    sandbox.remove("/tmp/tree", recursive=True).result()


def test_a_download_never_follows_what_the_sandbox_planted(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """A symlink in the sandbox's tree comes down as a symlink; nothing is written through one."""
    outside = tmp_path / "outside"
    outside.mkdir()
    sandbox.exec(
        [
            "sh",
            "-c",
            f"mkdir -p /tmp/evil && ln -sfn {outside} /tmp/evil/esc && echo x > /tmp/evil/f",
        ]
    ).result()
    local = tmp_path / "local"
    sandbox.download_dir("/tmp/evil", local).result()
    assert os.readlink(local / "esc") == str(outside)
    assert list(outside.iterdir()) == []
    # a local symlink planted in the target beforehand is replaced, never written through
    (local / "f").unlink()
    (local / "f").symlink_to(outside / "victim")
    sandbox.download_dir("/tmp/evil", local).result()
    assert not (outside / "victim").exists() and (local / "f").read_bytes() == b"x\n"
    sandbox.remove("/tmp/evil", recursive=True).result()


@pytest.mark.slow
def test_a_tree_of_ten_thousand_files_round_trips_byte_exact(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    _tree(src, 10_000)
    sandbox.upload_dir(src, "/tmp/big-tree").result()
    back = tmp_path / "back"
    sandbox.download_dir("/tmp/big-tree", back).result()
    assert _snapshot(back) == _snapshot(src)
    sandbox.remove("/tmp/big-tree", recursive=True).result()
