"""A missing system tool skips its tests with the install command, or fails them under
AVIATO_REQUIRE_ALL_TOOLS=1 (as in CI). Checked with pytest run on a small test file, with a PATH
that lacks the tool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs pytest in a subprocess

HERE = Path(__file__).parent

NEEDS_OPENSSL = """
from _system_tools import require_tools

def test_needs_openssl():
    require_tools("openssl")
"""


def _run_pytest(tmp_path: Path, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_needs_openssl.py").write_text(NEEDS_OPENSSL)
    base = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_REQUIRE")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-q",
         "--rootdir", str(tmp_path), str(tmp_path / "test_needs_openssl.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**base, "PATH": path, "PYTHONPATH": str(HERE), **env},
    )  # fmt: skip


def _path_without(tmp_path: Path, tool: str) -> str:
    """A PATH with nothing on it: python runs by its absolute path, and the tool is missing."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    assert not (empty / tool).exists()
    return str(empty)


def _path_with(tmp_path: Path, tool: str) -> str:
    here = tmp_path / "tool-bin"
    here.mkdir()
    (here / tool).write_text("#!/bin/sh\n")
    (here / tool).chmod(0o755)
    return str(here)


def test_a_missing_tool_skips_with_the_install_command(tmp_path: Path) -> None:
    done = _run_pytest(tmp_path, _path_without(tmp_path, "openssl"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout
    assert "needs openssl: apt-get install openssl" in done.stdout


def test_a_missing_tool_fails_when_all_are_required(tmp_path: Path) -> None:
    done = _run_pytest(tmp_path, _path_without(tmp_path, "openssl"), AVIATO_REQUIRE_ALL_TOOLS="1")
    assert done.returncode != 0
    assert "needs openssl: apt-get install openssl" in done.stdout + done.stderr
    assert "AVIATO_REQUIRE_ALL_TOOLS" in done.stdout + done.stderr


def test_a_present_tool_runs_the_test(tmp_path: Path) -> None:
    done = _run_pytest(tmp_path, _path_with(tmp_path, "openssl"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
