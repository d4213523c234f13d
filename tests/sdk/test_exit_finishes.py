"""Stops, deletes and file writes fired without waiting still happen when the interpreter exits.

``for sb in sandboxes: sb.stop()`` as the last lines of a script (the clean-up of the user's own
document) used to leave sandboxes running: the exit hook cancelled the stops in flight. Each test
runs a real script in its own interpreter against the session's service, and then asks the
service what happened.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from _wait import wait_until

from aviato import Sandbox, SandboxNotFoundError, SandboxStatus

from .conftest import TEST_TAG


def run_script(code: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, elapsed


def by_tag(tag: str) -> list[Sandbox]:
    return Sandbox.list(tags=[tag], include_stopped=True).result(timeout=60)


def test_stops_fired_at_the_end_of_a_script_complete() -> None:
    tag = f"exit-{uuid.uuid4().hex[:8]}"
    proc, _ = run_script(
        f"""
        from aviato import Sandbox
        sandboxes = [Sandbox.run(tags=[{TEST_TAG!r}, {tag!r}]) for _ in range(3)]
        print(" ".join(sb.sandbox_id for sb in sandboxes), flush=True)
        for sb in sandboxes:
            sb.stop()
        """
    )
    ids = proc.stdout.split()
    assert len(ids) == 3
    # no waiting: the stops finished before the interpreter did
    assert [Sandbox.from_id(i).result(timeout=60).status for i in ids] == [
        SandboxStatus.TERMINATED
    ] * 3


def test_a_stop_that_waits_for_its_create_completes() -> None:
    """Nothing awaited at all: the creates and the stops are both in flight at exit."""
    tag = f"exit-{uuid.uuid4().hex[:8]}"
    run_script(
        f"""
        from aviato import Sandbox
        sandboxes = [Sandbox(tags=[{TEST_TAG!r}, {tag!r}]) for _ in range(3)]
        for sb in sandboxes:
            sb.start()
        for sb in sandboxes:
            sb.stop()
        """
    )
    found = by_tag(tag)
    # Each stop waited for its create, which had to happen first: three sandboxes, all stopped.
    assert sorted(sb.status.value for sb in found if sb.status) == ["terminated"] * 3


def test_deletes_and_writes_fired_at_exit_complete() -> None:
    tag = f"exit-{uuid.uuid4().hex[:8]}"
    proc, _ = run_script(
        f"""
        from aviato import Sandbox
        doomed = [Sandbox.run(tags=[{TEST_TAG!r}, {tag!r}]) for _ in range(2)]
        keeper = Sandbox.run(tags=[{TEST_TAG!r}, {tag!r}])
        print(keeper.sandbox_id, *(sb.sandbox_id for sb in doomed), flush=True)
        keeper.write_file("/tmp/written-at-exit", b"x" * 3_000_000)
        for sb in doomed:
            Sandbox.delete(sb.sandbox_id)
        """
    )
    keeper_id, *doomed = proc.stdout.split()
    for sandbox_id in doomed:
        try:
            Sandbox.from_id(sandbox_id).result(timeout=60)
        except SandboxNotFoundError:
            continue
        raise AssertionError(f"{sandbox_id} was not deleted")
    keeper = Sandbox.from_id(keeper_id).result(timeout=60)
    assert keeper.read_file("/tmp/written-at-exit").result(timeout=60) == b"x" * 3_000_000
    keeper.stop(graceful_shutdown_seconds=0).result(timeout=60)


@pytest.mark.slow
def test_the_exit_wait_is_bounded() -> None:
    """A stop that takes its whole grace (the main process ignores SIGTERM) holds the exit for
    at most the SDK's bound (10 s); the service, which received it, completes it anyway, after
    the whole grace. (Judged by the sandbox's end time, not by its status at some moment after
    the exit, which a loaded machine can push past the grace.)"""
    tag = f"exit-{uuid.uuid4().hex[:8]}"
    grace = 25
    proc, elapsed = run_script(
        f"""
        import time
        from aviato import Sandbox
        sb = Sandbox.run("sh", "-c", "trap '' TERM; : > /tmp/trapped; while :; do sleep 1; done",
                         tags=[{TEST_TAG!r}, {tag!r}])
        sb.wait()
        # RUNNING is the supervisor's word; the shell may not have set its trap yet (a SIGTERM
        # before it ends the sandbox at once, as it should).
        while sb.exec(["test", "-e", "/tmp/trapped"]).result().returncode != 0:
            time.sleep(0.02)
        print(sb.sandbox_id, time.time(), flush=True)
        sb.stop(graceful_shutdown_seconds={grace})
        """
    )
    assert elapsed < 10 + 8, f"the exit took {elapsed:.1f}s"
    sandbox_id, stop_sent_at = proc.stdout.split()
    sandbox = wait_until(
        lambda: (
            (sb := Sandbox.from_id(sandbox_id).result(timeout=60)).status
            and sb.status.is_terminal
            and sb
        ),
        "the service to complete the stop it received",
        timeout=grace + 40,
    )
    assert sandbox.status == SandboxStatus.TERMINATED
    assert sandbox.ended_at is not None
    # The stop was the service's, with its whole grace: nothing ended the sandbox at the exit.
    assert sandbox.ended_at.timestamp() >= float(stop_sent_at) + grace - 1
