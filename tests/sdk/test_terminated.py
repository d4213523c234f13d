"""A command cut off under its feet ends with `SandboxTerminatedError`, and is never run twice.

A command whose sandbox ends while it runs (stopped by another client, or its supervisor killed
from the host) must not look like a transient failure: an UNAVAILABLE (`AviatoConnectionError`)
invites a retry, and a retried command runs a second time. The service reports such an exec as
ABORTED, the SDK maps that (in one place, `aviato._transport.errors.from_status`) to
`SandboxTerminatedError`, and the SDK itself never re-sends a command once it was sent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aviato import AviatoConnectionError, Sandbox, SandboxTerminatedError

from .conftest import TEST_TAG, state_dir


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def _ppid(pid: int) -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return 0


def supervisor_pid(sandbox_id: str) -> int:
    """The host pid of the sandbox's supervisor: the bwrap-started process of the sandbox that
    runs ``/.aviato/supervisor`` (found by the sandbox's cgroup, or by its bwrap parent)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if "supervisor" not in _cmdline(pid).split(" ", 1)[0]:
            continue
        with contextlib.suppress(OSError):
            if sandbox_id in Path(f"/proc/{pid}/cgroup").read_text():
                return pid
        parent = _cmdline(_ppid(pid))
        if "bwrap" in parent and sandbox_id in parent:
            return pid
    raise AssertionError(f"no supervisor process found for {sandbox_id}")


@pytest.mark.slow
def test_exec_cut_off_by_a_stop_from_another_client() -> None:
    with Sandbox.run(tags=[TEST_TAG]) as sb:
        sb.wait()
        process = sb.exec(["sleep", "30"])
        assert process.poll() is None
        time.sleep(1.0)
        # another client: the CLI, in a process of its own
        stopper = subprocess.run(
            [sys.executable, "-m", "aviato", "stop", "--grace", "0", sb.sandbox_id or ""],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stopper.returncode == 0, stopper.stderr
        started = time.monotonic()
        with pytest.raises(SandboxTerminatedError) as info:
            process.result(timeout=10)
        assert time.monotonic() - started < 5
        err = info.value
        assert not isinstance(err, AviatoConnectionError)
        assert err.code == "ABORTED" and err.sandbox_id == sb.sandbox_id
        assert "stopped" in str(err), str(err)
        assert "UNAVAILABLE" not in str(err) and "grpc" not in str(err).lower()


def test_exec_cut_off_by_the_supervisors_death() -> None:
    with Sandbox.run(tags=[TEST_TAG]) as sb:
        sb.wait()
        process = sb.exec(["sh", "-c", "echo started; sleep 30"])
        assert next(iter(process.stdout.lines())) == "started\n"
        os.kill(supervisor_pid(sb.sandbox_id or ""), signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(SandboxTerminatedError) as info:
            process.result(timeout=10)
        assert time.monotonic() - started < 5
        assert info.value.code == "ABORTED"
        assert not isinstance(info.value, AviatoConnectionError)
        assert "ended" in str(info.value), str(info.value)


@pytest.mark.slow
def test_a_started_exec_is_never_sent_again() -> None:
    """The service dies while a command runs: the command is cut off (the supervisor kills what
    its connection ran) and reported as an error, and neither the SDK's retries (which restart the
    local service) nor anything else sends it again: its start marker is there exactly once."""
    with Sandbox.run(tags=[TEST_TAG]) as sb:
        sb.wait()
        process = sb.exec(["sh", "-c", "echo ran >> /tmp/marker; echo started; sleep 30"])
        assert next(iter(process.stdout.lines())) == "started\n"
        pid = int((state_dir() / "server.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(Exception) as info:
            process.result(timeout=30)
        assert not isinstance(info.value, TimeoutError)
        time.sleep(2.0)  # room for a retry, were there one
        # the next call restarts the local service; the sandbox survived it
        assert sb.read_file("/tmp/marker").result(timeout=60) == b"ran\n"
