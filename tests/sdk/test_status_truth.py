"""Status that tells the truth: every answer of the service corrects `Sandbox.status`, not only
`get_status()` (issue 18: a sandbox said "pending" after a command had already run in it)."""

from __future__ import annotations

import pytest

from aviato import Sandbox, SandboxStatus
from aviato.exceptions import SandboxNotRunningError, SandboxTerminatedError

from .conftest import TEST_TAG


def test_a_command_or_a_file_that_went_through_shows_the_sandbox_running() -> None:
    with Sandbox.run(tags=[TEST_TAG]) as sb:
        assert sb.status in (SandboxStatus.PENDING, SandboxStatus.CREATING)
        before = sb.status_updated_at
        sb.exec(["true"]).result(timeout=60)
        assert sb.status == SandboxStatus.RUNNING
        assert sb.status_updated_at is not None and before is not None
        assert sb.status_updated_at > before
    with Sandbox.run(tags=[TEST_TAG]) as sb:
        sb.write_file("/tmp/x", b"1").result(timeout=60)
        assert sb.status == SandboxStatus.RUNNING
    with Sandbox.run(tags=[TEST_TAG]) as sb:  # a command that fails has still run
        assert sb.exec(["sh", "-c", "exit 3"]).result(timeout=60).returncode == 3
        assert sb.status == SandboxStatus.RUNNING


def test_a_refusal_because_the_sandbox_ended_refreshes_the_status() -> None:
    sb = Sandbox.run(tags=[TEST_TAG])
    sb.exec(["true"]).result(timeout=60)
    assert sb.status == SandboxStatus.RUNNING
    # Stopped behind this object's back (another process, the CLI, a lease...).
    other = Sandbox.from_id(sb.sandbox_id or "").result(timeout=30)
    other.stop().result(timeout=60)
    assert sb.status == SandboxStatus.RUNNING  # nothing told it yet
    with pytest.raises((SandboxNotRunningError, SandboxTerminatedError)):
        sb.exec(["true"]).result(timeout=60)
    assert sb.status is not None and sb.status.is_terminal
    assert sb.status_reason == "stopped"
