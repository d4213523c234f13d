"""Fixtures of the SDK tests: a real local service, started by the SDK itself.

`pytest_configure` points `AVIATO_STATE_DIR` at a fresh short directory under /tmp (a unix socket
path is limited to 107 bytes) and removes `AVIATO_BASE_URL`, so the first SDK call of the session
autostarts `python -m aviato.server` there, exactly as on a user's machine. Subprocesses (seed
blocks, the Jupyter kernel, session scripts) inherit the environment, including a PYTHONPATH that
makes this checkout's `aviato` importable.

At the end of the session every sandbox still running is stopped (the seed documents leave some
running on purpose: a bare `Sandbox.run()` lives until its max lifetime), the service is stopped
with SIGTERM (pid from `server.pid`), and the session fails if any sandbox process remains.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
TEST_TAG = f"sdk-tests-{uuid.uuid4().hex[:8]}"

try:  # a checkout without `pip install -e .`
    import aviato  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(SRC))

_STATE_DIR: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _STATE_DIR
    _STATE_DIR = Path(tempfile.mkdtemp(prefix="avt", dir="/tmp"))
    os.environ["AVIATO_STATE_DIR"] = str(_STATE_DIR)
    os.environ.pop("AVIATO_BASE_URL", None)
    os.environ.pop("AVIATO_API_KEY", None)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(SRC) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *parts])


def pytest_unconfigure(config: pytest.Config) -> None:
    # e.g. --collect-only: the service never started, so the fixture below never cleaned up
    if _STATE_DIR is not None and _STATE_DIR.is_dir() and not (_STATE_DIR / "server.log").exists():
        shutil.rmtree(_STATE_DIR, ignore_errors=True)


def state_dir() -> Path:
    assert _STATE_DIR is not None
    return _STATE_DIR


def _sandbox_ids(directory: Path) -> set[str]:
    sandboxes = directory / "sandboxes"
    return {p.name for p in sandboxes.iterdir()} if sandboxes.is_dir() else set()


def sandbox_processes(directory: Path) -> list[int]:
    """Host pids that belong to a sandbox of `directory` (by cgroup path or command line)."""
    ids = _sandbox_ids(directory)
    patterns = [re.escape(str(directory) + "/sandboxes/")] + [re.escape(i) for i in ids]
    pattern = re.compile("|".join(patterns))
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cgroup = Path(entry.path, "cgroup").read_text() if ids else ""
            if pattern.search(cmdline) or (ids and pattern.search(cgroup)):
                found.append(int(entry.name))
    return found


def _server_pid(directory: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((directory / "server.pid").read_text().split()[0])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            return False
    return True


@pytest.fixture(scope="session", autouse=True)
def aviato_service() -> Iterator[Path]:
    """The session's state directory; stops leftovers and the service at the end."""
    directory = state_dir()
    yield directory
    from aviato import Sandbox

    if (directory / "aviato.sock").exists():
        with contextlib.suppress(Exception):
            leftovers = Sandbox.list().result(timeout=60)
            refs = [sb.stop(graceful_shutdown_seconds=1) for sb in leftovers]
            for ref in refs:
                with contextlib.suppress(Exception):
                    ref.result(timeout=60)
    pid = _server_pid(directory)
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), f"the aviato service (pid {pid}) did not exit on SIGTERM"
    deadline = time.monotonic() + 10
    remaining = sandbox_processes(directory)
    while remaining and time.monotonic() < deadline:
        time.sleep(0.2)
        remaining = sandbox_processes(directory)
    for leftover in remaining:
        with contextlib.suppress(OSError):
            os.kill(leftover, signal.SIGKILL)
    assert not remaining, f"sandbox processes remain after the tests: {remaining}"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[object]:
    """A running sandbox shared by the tests of a module, stopped afterwards."""
    from aviato import Sandbox

    with Sandbox.run(tags=[TEST_TAG]) as sb:
        sb.wait()
        yield sb


@pytest.fixture
def fake_server() -> Iterator[object]:
    """A scriptable fake service on its own unix socket (see fake_service.py)."""
    from .fake_service import FakeServer

    directory = tempfile.mkdtemp(prefix="avf", dir="/tmp")
    server = FakeServer(os.path.join(directory, "fake.sock")).start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def slow_tests_enabled() -> bool:
    return os.environ.get("AVIATO_SLOW_TESTS", "") not in ("", "0", "false", "no")
