"""Session sandboxes do not outlive their process: exit, SIGTERM, SIGINT, and SIGKILL (lease).

Each test runs a small script in its own interpreter; the script makes a Session with two
sandboxes, prints their ids and then waits (or exits).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from aviato import Sandbox, SandboxStatus

from .conftest import TEST_TAG

SCRIPT = textwrap.dedent(
    f"""
    import sys, time
    from aviato import Session, SandboxDefaults
    session = Session(SandboxDefaults(tags=({TEST_TAG!r}, "cleanup")))
    sandboxes = [session.sandbox() for _ in range(2)]
    for sb in sandboxes:
        sb.start().result()
    sandboxes[0].exec(["true"]).result()
    print(" ".join(sb.sandbox_id for sb in sandboxes), flush=True)
    if sys.argv[1] == "wait":
        time.sleep(600)
    """
)


def _sigint_by_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_script(mode: str, **env: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **env},
        # A user's script at a terminal: pytest run in the background of a shell inherits an
        # ignored SIGINT, and Python would then not turn SIGINT into KeyboardInterrupt.
        preexec_fn=_sigint_by_default,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"script failed: {proc.stderr.read() if proc.stderr else ''}")
    ids = line.split()
    assert len(ids) == 2
    if mode == "wait":
        for sandbox_id in ids:
            assert Sandbox.from_id(sandbox_id).result().wait().status == SandboxStatus.RUNNING
    return proc, ids


def statuses(ids: list[str]) -> list[SandboxStatus | None]:
    return [Sandbox.from_id(i).result().status for i in ids]


def wait_terminal(ids: list[str], within: float) -> list[Sandbox]:
    deadline = time.monotonic() + within
    while True:
        found = [Sandbox.from_id(i).result() for i in ids]
        if all(sb.status is not None and sb.status.is_terminal for sb in found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not terminal after {within}s: {[sb.status for sb in found]}")
        time.sleep(0.2)


def test_normal_exit_without_close_stops_the_sandboxes() -> None:
    proc, ids = start_script("exit")
    assert proc.wait(60) == 0
    assert statuses(ids) == [SandboxStatus.TERMINATED] * 2


def test_sigterm_stops_the_sandboxes() -> None:
    proc, ids = start_script("wait")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == -signal.SIGTERM  # dies of the signal, as it would have
    assert statuses(ids) == [SandboxStatus.TERMINATED] * 2


@pytest.mark.slow
def test_sigint_stops_the_sandboxes() -> None:
    proc, ids = start_script("wait")
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    assert proc.stderr is not None and "KeyboardInterrupt" in proc.stderr.read()
    assert statuses(ids) == [SandboxStatus.TERMINATED] * 2


@pytest.mark.slow
def test_sigkill_leaves_cleanup_to_the_lease() -> None:
    ttl = 3.0
    proc, ids = start_script("wait", AVIATO_LEASE_TTL=str(ttl))
    time.sleep(ttl + 1)  # renewals keep them alive past one ttl
    assert statuses(ids) == [SandboxStatus.RUNNING] * 2
    t0 = time.monotonic()
    proc.kill()
    proc.wait(10)
    found = wait_terminal(ids, within=ttl + 10)
    assert time.monotonic() - t0 >= ttl * 0.5
    for sb in found:
        assert sb.status == SandboxStatus.TERMINATED
        assert sb.status_reason is not None and "lease" in sb.status_reason


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_handlers_are_not_installed_outside_the_main_thread() -> None:
    code = textwrap.dedent(
        """
        import signal, threading
        from aviato import Session
        before = signal.getsignal(signal.SIGTERM)
        t = threading.Thread(target=Session)
        t.start(); t.join()
        assert signal.getsignal(signal.SIGTERM) is before
        Session()
        assert signal.getsignal(signal.SIGTERM) is not before
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == "ok\n", out.stderr
