"""The run's guard against mounts left behind (tests/conftest.py, tests/_mounts.py): a mount
left beneath a directory the run made with `tempfile` fails the run and is undone; a mount
beneath a directory the run did not make is not its business. Checked with pytest run on a
small test file, with this directory's conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from _mounts import mounts_beneath, unmount_beneath

pytestmark = [
    pytest.mark.slow,  # each runs pytest in a subprocess
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
]

HERE = Path(__file__).parent

MOUNTS_A_TMPFS = """
import ctypes
import os
import tempfile

def test_mounts_a_tmpfs():
    directory = os.environ.get("MOUNT_AT") or tempfile.mkdtemp(prefix="avguard-", dir="/tmp")
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mount(b"tmpfs", directory.encode(), b"tmpfs", 0, b"size=1m") == 0
    print("MOUNTED", directory)
    if os.environ.get("UNDO"):
        assert libc.umount2(directory.encode(), 0) == 0
"""


def _run_pytest(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], str]:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_mounts_a_tmpfs.py").write_text(MOUNTS_A_TMPFS)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s",
         "--rootdir", str(tmp_path), str(tmp_path / "test_mounts_a_tmpfs.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(HERE), **env},
    )  # fmt: skip
    [mounted] = [line.split()[-1] for line in done.stdout.splitlines() if "MOUNTED" in line]
    return done, mounted


def test_a_mount_left_in_a_directory_of_the_run_fails_it_and_is_undone(tmp_path: Path) -> None:
    done, mounted = _run_pytest(tmp_path)
    try:
        assert done.returncode == 1, done.stdout + done.stderr
        assert "1 passed" in done.stdout
        assert "the run left 1 mount(s) in the host's mount table (now undone)" in done.stdout
        assert f"  {mounted}\n" in done.stdout
        assert mounts_beneath(mounted) == []
    finally:
        unmount_beneath(mounted)
        os.rmdir(mounted)


def test_a_run_that_undoes_its_mounts_passes(tmp_path: Path) -> None:
    done, mounted = _run_pytest(tmp_path, UNDO="1")
    os.rmdir(mounted)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the run left" not in done.stdout


def test_a_mount_beneath_a_directory_the_run_did_not_make_is_not_reported(
    tmp_path: Path,
) -> None:
    elsewhere = Path("/tmp") / f"avguard-other-{uuid.uuid4().hex[:8]}"
    elsewhere.mkdir()  # not with tempfile: as another process's directory would be
    try:
        done, mounted = _run_pytest(tmp_path, MOUNT_AT=str(elsewhere))
        assert mounted == str(elsewhere)
        assert done.returncode == 0, done.stdout + done.stderr
        assert mounts_beneath(elsewhere) == [str(elsewhere)]  # left alone
    finally:
        unmount_beneath(elsewhere)
        elsewhere.rmdir()
