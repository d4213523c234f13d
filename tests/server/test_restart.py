"""Restarts of the service: sandboxes survive (even kill -9); dead ones are recorded; no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from _wait import wait_until
from server_helpers import SRC, S, ServerProcess


def _bwrap_pid(state_dir, sandbox_id: str) -> int:  # type: ignore[no-untyped-def]
    import json

    return int(
        json.loads((state_dir / "sandboxes" / sandbox_id / "runtime.json").read_text())["pid"]
    )


@pytest.mark.slow
def test_kill9_and_restart_keeps_sandboxes(fresh_server: ServerProcess) -> None:
    c = fresh_server.start().client()
    alive = c.running(tags=["restart"])
    c.write_file(alive.id, "/tmp/state.txt", b"before restart")
    doomed = c.running(tags=["restart"])
    finishes = c.running(command=["/bin/sh", "-c", "sleep 1; exit 4"])
    lease = c.running(lease_id="restart-lease", lease_ttl=6)  # outlives the outage below

    fresh_server.kill9()
    os.kill(_bwrap_pid(fresh_server.state_dir, doomed.id), signal.SIGKILL)
    exit_file = fresh_server.state_dir / "sandboxes" / finishes.id / "exit"
    wait_until(  # `finishes` ends while the service is down
        lambda: exit_file.exists() and exit_file.read_text().strip(),
        "the sandbox `finishes` to end (its exit file)",
        timeout=15,
    )
    c = fresh_server.start().client()

    got = c.get(alive.id)
    assert got.status == S.SANDBOX_STATUS_RUNNING
    assert c.read_file(alive.id, "/tmp/state.txt")[1] == b"before restart"
    assert c.exec(alive.id, ["/bin/echo", "still here"]).stdout == b"still here\n"

    dead = c.get(doomed.id)
    assert dead.status == S.SANDBOX_STATUS_FAILED and dead.status_reason
    assert "restart" in dead.status_reason or "OOM" not in dead.status_reason

    fin = c.get(finishes.id)
    assert fin.status == S.SANDBOX_STATUS_FAILED and fin.exit_code == 4
    assert fin.status_reason == "exited with code 4"

    # The lease got a fresh TTL after the restart; without renewals it now expires.
    assert c.get(lease.id).status == S.SANDBOX_STATUS_RUNNING
    end = c.wait(lease.id, terminal=True, timeout=15)
    assert end.status_reason == "lease expired"

    # Stop works on a re-attached sandbox, and its end is recorded by the new service.
    stopped = c.stop(alive.id)
    assert stopped.status == S.SANDBOX_STATUS_TERMINATED
    for sb in (alive, doomed, finishes, lease):
        c.delete(sb.id)


@pytest.mark.slow
def test_graceful_shutdown_does_not_stop_sandboxes(fresh_server: ServerProcess) -> None:
    c = fresh_server.start().client()
    sb = c.running()
    pid = _bwrap_pid(fresh_server.state_dir, sb.id)
    assert fresh_server.stop() == 0
    os.kill(pid, 0)  # still running
    assert not (fresh_server.state_dir / "aviato.sock").exists()
    c = fresh_server.start().client()
    assert c.get(sb.id).status == S.SANDBOX_STATUS_RUNNING
    assert c.exec(sb.id, ["/bin/true"]).exit_code == 0
    c.delete(sb.id)


@pytest.mark.slow
def test_orphan_runtime_state_is_killed(fresh_server: ServerProcess) -> None:
    """A sandbox on disk without a record (e.g. its record was lost) is killed on start."""
    import sqlite3

    c = fresh_server.start().client()
    sb = c.running()
    pid = _bwrap_pid(fresh_server.state_dir, sb.id)
    fresh_server.kill9()
    with sqlite3.connect(fresh_server.state_dir / "registry.db") as db:
        db.execute("DELETE FROM sandboxes WHERE id=?", (sb.id,))
    fresh_server.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the orphan sandbox still runs")
    assert not (fresh_server.state_dir / "sandboxes" / sb.id).exists()


@pytest.mark.slow
def test_creating_record_from_a_crash_is_failed(fresh_server: ServerProcess) -> None:
    import sqlite3

    c = fresh_server.start().client()
    sb = c.running()
    fresh_server.kill9()
    with sqlite3.connect(fresh_server.state_dir / "registry.db") as db:
        db.execute("UPDATE sandboxes SET status=2 WHERE id=?", (sb.id,))
    c = fresh_server.start().client()
    got = c.get(sb.id)
    assert got.status == S.SANDBOX_STATUS_FAILED
    assert got.status_reason == "interrupted by service restart"
    assert not (fresh_server.state_dir / "sandboxes" / sb.id).exists()
    c.delete(sb.id)


def test_second_server_on_same_state_dir_refused(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    env = dict(os.environ, PYTHONPATH=SRC)
    other = subprocess.run(
        [sys.executable, "-m", "aviato.server", "--state-dir", str(fresh_server.state_dir)],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert other.returncode == 1
    assert "another aviato server is running" in other.stderr
    # The first one still answers, on its socket.
    assert fresh_server.client().list().sandboxes is not None
