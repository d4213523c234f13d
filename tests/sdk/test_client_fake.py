"""Client behaviour that a real service rarely shows on demand, against a scriptable fake.

Lost create responses (idempotency), transient UNAVAILABLE, an exec stream without an exit frame,
error frames, credentials, remote kill on cancel, leases.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from _wait import wait_until

import aviato
from aviato import Sandbox, SandboxStatus, Session, _client

from .fake_service import FakeServer


def test_create_is_idempotent_across_retries(fake_server: FakeServer) -> None:
    fake_server.service.script.create_unavailable_after_commit = 2
    sb = Sandbox.run(base_url=fake_server.url)
    state = fake_server.service.state
    assert state.calls["CreateSandbox"] == 3  # two lost responses, then success
    assert len(state.sandboxes) == 1  # ...and exactly one sandbox
    assert sb.sandbox_id == "fake-1" and sb.status == SandboxStatus.RUNNING
    assert len(state.by_request) == 1


def test_unary_calls_retry_unavailable(fake_server: FakeServer) -> None:
    fake_server.service.script.unary_unavailable = 3
    assert Sandbox.list(base_url=fake_server.url).result(timeout=30) == []
    assert fake_server.service.state.calls["ListSandboxes"] == 4


def test_unreachable_service_is_a_typed_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setattr(_client, "RETRY_BUDGET_SECONDS", 0.5)
    with pytest.raises(aviato.AviatoConnectionError):
        Sandbox.list(base_url="unix:///tmp/avt-nothing-here.sock").result(timeout=30)


def test_real_exit_codes_and_check(fake_server: FakeServer) -> None:
    sb = Sandbox.run(base_url=fake_server.url)
    r = sb.exec(["exit", "7"]).result(timeout=10)
    assert (r.returncode, r.stderr, r.command) == (7, "bye\n", ["exit", "7"])
    assert r.usage is not None and r.usage.wall_seconds == 0.01
    with pytest.raises(aviato.SandboxExecutionError) as info:
        sb.exec(["exit", "3"], check=True).result(timeout=10)
    assert info.value.exec_result is not None and info.value.exec_result.returncode == 3


def test_missing_exit_frame_raises_never_zero(fake_server: FakeServer) -> None:
    fake_server.service.script.exec_drop_exit_frame = True
    sb = Sandbox.run(base_url=fake_server.url)
    process = sb.exec(["echo", "hi"])
    with pytest.raises(aviato.SandboxExecutionError, match="without an exit status"):
        process.result(timeout=10)
    assert process.returncode is None
    chunks = []
    with pytest.raises(aviato.SandboxExecutionError):
        for chunk in process.stdout:
            chunks.append(chunk)
    assert "".join(chunks) == "hi\n"  # what arrived is still delivered first


def test_error_frame_is_translated(fake_server: FakeServer) -> None:
    fake_server.service.script.exec_error_frame = (9, "sandbox fake-1 is TERMINATED")
    sb = Sandbox.run(base_url=fake_server.url)
    with pytest.raises(aviato.SandboxNotRunningError, match="TERMINATED"):
        sb.exec(["echo", "x"]).result(timeout=10)


def test_api_key_is_sent(fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVIATO_API_KEY", "k-123")
    url = fake_server.url + "/"  # a distinct address: a fresh client with the key
    Sandbox.list(base_url=url).result(timeout=10)
    assert fake_server.service.state.metadata[-1].get("authorization") == "Bearer k-123"


def test_cancel_kills_the_remote_command(fake_server: FakeServer) -> None:
    sb = Sandbox.run(base_url=fake_server.url)
    process = sb.exec(["sleep", "30"])
    wait_until(lambda: fake_server.service.state.calls["Exec"], "the exec to reach the service", 10)
    assert process.cancel()
    deadline = time.monotonic() + 5
    while not fake_server.service.state.signals and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake_server.service.state.signals == [9]
    with pytest.raises(aviato.SandboxExecutionError, match="cancelled"):
        list(process.stdout)


def test_stdin_round_trip(fake_server: FakeServer) -> None:
    sb = Sandbox.run(base_url=fake_server.url)
    process = sb.exec(["cat"], stdin=True)
    assert process.stdin is not None
    process.stdin.writeline("hello")
    process.stdin.write(b"world")
    process.stdin.close()
    assert process.result(timeout=10).stdout == "hello\nworld"


def test_a_service_without_run_command_gets_exec_streams(fake_server: FakeServer) -> None:
    """The fake has no RunCommand, like a service older than the SDK (the local one outlives
    upgrades): commands, with their input, go over Exec instead."""
    sb = Sandbox.run(base_url=fake_server.url)
    assert sb.exec(["echo", "hi"]).result(timeout=10).stdout == "hi\n"
    assert sb.exec(["cat"], input=b"a" * 100_000 + b"z").result(timeout=10).stdout.endswith("az")
    assert fake_server.service.state.calls["Exec"] == 2


def test_stop_is_terminal_and_wait_until_complete(fake_server: FakeServer) -> None:
    sb = Sandbox.run(base_url=fake_server.url)
    assert sb.stop().result(timeout=10) is None
    assert sb.status == SandboxStatus.TERMINATED and sb.returncode == 143
    assert sb.stop().result(timeout=10) is None  # idempotent
    with pytest.raises(aviato.SandboxTerminatedError):
        sb.wait_until_complete().result(timeout=10)
    assert sb.wait_until_complete(raise_on_termination=False).result(timeout=10) is sb
    with pytest.raises(aviato.SandboxNotRunningError):
        sb.exec(["echo"]).result(timeout=10)


@pytest.mark.slow
def test_session_lease_is_passed_renewed_and_released(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVIATO_LEASE_TTL", "1.5")
    state = fake_server.service.state
    with Session(aviato.SandboxDefaults(base_url=fake_server.url)) as session:
        sb = session.sandbox()
        assert sb.sandbox_id is None and session.sandbox_count == 1
        sb.start().result(timeout=10)
        record = state.sandboxes[sb.sandbox_id or ""]
        assert record.lease_id == session._lease_id
        time.sleep(1.3)
        assert state.calls["RenewLease"] >= 2  # every ttl/3
    assert state.calls["ReleaseLease"] == 1
    assert sb.status == SandboxStatus.TERMINATED and session.sandbox_count == 0


def test_a_service_that_sends_more_than_it_announced_cannot_outgrow_the_cap(
    fake_server: FakeServer,
) -> None:
    """The size announced by the service is not trusted: the cap counts what arrives."""
    fake_server.service.script.read_file_size = 10
    fake_server.service.script.read_file_data = 50 * 1024 * 1024
    sb = Sandbox.run(base_url=fake_server.url)
    with pytest.raises(aviato.SandboxFileError, match="more arrived") as info:
        sb.read_file("/f", max_bytes=1024 * 1024).result(timeout=30)
    assert info.value.filepath == "/f"
    fake_server.service.script.read_file_data = 3 * 1024 * 1024
    chunks = []
    with pytest.raises(aviato.SandboxFileError, match="3145728 of 10 bytes"):
        for chunk in sb.read_file_streaming("/f"):
            chunks.append(len(chunk))
    assert sum(chunks) == 3 * 1024 * 1024  # handed out as it came, then the mismatch is an error
