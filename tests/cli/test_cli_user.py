"""The command line as an ordinary user (uid 65534): service, sandboxes and exec without root.

Run only as root, which can become that user with setpriv. The user runs the system's Python of
the same version as this one, importing the very packages under test through PYTHONPATH: the
interpreter of the test run may sit in a directory the user cannot enter (pyenv under /root).
"""

from __future__ import annotations

import os
import shutil
import site
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _system_tools import require_tools

import aviato

USER_ID = 65534
SYSTEM_PYTHON = "/usr/bin/python3"


def _reachable_by_others(path: Path) -> bool:
    for part in [path, *path.parents]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return bool(path.stat().st_mode & stat.S_IROTH)


def _import_path() -> list[Path]:
    package_root = Path(aviato.__file__).resolve().parents[1]
    return [package_root, *(Path(p) for p in site.getsitepackages())]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to become an ordinary user"
    require_tools("setpriv")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"needs {SYSTEM_PYTHON}"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.stdout.strip() != str(sys.version_info[:2]):
        return f"{SYSTEM_PYTHON} is not Python {sys.version_info[0]}.{sys.version_info[1]}"
    unreachable = [str(p) for p in _import_path() if not _reachable_by_others(p)]
    if unreachable:
        return f"not readable by other users: {', '.join(unreachable)}"
    return None


@pytest.fixture
def as_user() -> Iterator[list[str]]:
    """argv prefix that runs `aviato` as uid 65534 with a private home and state directory."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    home = Path(tempfile.mkdtemp(prefix="avt-user-", dir="/tmp"))
    os.chown(home, USER_ID, USER_ID)
    prefix = [
        "setpriv", f"--reuid={USER_ID}", f"--regid={USER_ID}", "--clear-groups",
        "env", "-i", f"HOME={home}", f"AVIATO_STATE_DIR={home}/state",
        f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}",
        f"PYTHONPATH={os.pathsep.join(str(p) for p in _import_path())}",
        SYSTEM_PYTHON, "-m", "aviato",
    ]  # fmt: skip
    yield prefix
    subprocess.run([*prefix, "rm", "--all", "-y"], capture_output=True, timeout=120, check=False)
    subprocess.run([*prefix, "server", "stop"], capture_output=True, timeout=60, check=False)
    shutil.rmtree(home, ignore_errors=True)


def _run(prefix: list[str], *args: str, input: str | None = None) -> str:
    result = subprocess.run(
        [*prefix, *args],
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"aviato {' '.join(args)}: {result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_an_ordinary_user_runs_sandboxes(as_user: list[str]) -> None:
    status = _run(as_user, "server", "start")
    assert "started" in status
    info = _run(as_user, "server", "status")
    assert "rootless" in info or "user namespace" in info
    sandbox_id = _run(as_user, "run", "--wait").strip()
    assert _run(as_user, "exec", sandbox_id, "--", "id", "-u").strip() == str(USER_ID)
    assert _run(as_user, "exec", sandbox_id, "--", "python3", "-c", "print(1 + 1)") == "2\n"
    assert _run(as_user, "exec", sandbox_id, "--", "cat", input="piped") == "piped"
    assert sandbox_id in _run(as_user, "ls", "-q")
    _run(as_user, "rm", sandbox_id)


@pytest.mark.slow
def test_a_rootless_service_refuses_limits_it_cannot_apply(as_user: list[str]) -> None:
    """Without a delegated cgroup, a create asking for limits is refused at once, not accepted."""
    _run(as_user, "server", "start")
    info = _run(as_user, "server", "status")
    if "cgroups:   none" not in info:  # e.g. a cgroup v2 subtree delegated to this user
        pytest.skip(f"this service can apply limits here:\n{info}")
    assert "creates that ask for limits are refused" in info
    result = subprocess.run(
        [*as_user, "run", "--memory", "256Mi"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "memory" in result.stderr and "cannot apply" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert _run(as_user, "ls", "-q", "--all").strip() == ""  # nothing was recorded
