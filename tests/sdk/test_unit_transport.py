"""The SDK's own logic over the in-memory transport (`aviato._transport.memory`): no service,
no sockets. Error mapping from codes and details, retries and idempotent creates, Process and
OperationRef behaviour, bounded output, session cleanup."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import aviato
from aviato import Sandbox, SandboxDefaults, SandboxStatus, Session, _client
from aviato._transport.memory import MemoryService
from aviato.v1 import errors_pb2 as epb

_names = iter(range(1_000_000))


@pytest.fixture
def svc() -> Iterator[MemoryService]:
    service = MemoryService(f"unit-{next(_names)}")
    _client.register_transport(service.url, service.transport)
    yield service
    _client.register_transport(service.url, None)


# --- errors: mapped from status codes and details, in the user's words ----------------------


def test_a_missing_sandbox_is_not_found(svc: MemoryService) -> None:
    with pytest.raises(aviato.SandboxNotFoundError) as info:
        Sandbox.from_id("mem-404", base_url=svc.url).result(timeout=10)
    assert info.value.sandbox_id == "mem-404" and info.value.code == "NOT_FOUND"
    assert "mem-404" in str(info.value) and "NOT_FOUND" not in str(info.value)
    Sandbox.delete("mem-404", missing_ok=True, base_url=svc.url).result(timeout=10)


def test_a_missing_file_is_a_file_error_with_its_path(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    with pytest.raises(aviato.SandboxFileError) as info:
        sb.read_file("/nope").result(timeout=10)
    assert info.value.filepath == "/nope" and info.value.sandbox_id == sb.sandbox_id
    sb.write_file("/here", "hi").result(timeout=10)
    assert sb.read_file("/here").result(timeout=10) == b"hi"


def test_exec_error_frames_map_by_their_detail(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    svc.faults.exec_error = (
        "ABORTED",
        "the command was cut off",
        epb.ErrorDetail(reason=epb.SANDBOX_TERMINATED, sandbox_id=sb.sandbox_id),
    )
    with pytest.raises(aviato.SandboxTerminatedError):
        sb.exec(["echo", "x"]).result(timeout=10)
    svc.faults.exec_error = ("FAILED_PRECONDITION", "sandbox is TERMINATED", None)
    with pytest.raises(aviato.SandboxNotRunningError, match="TERMINATED"):
        sb.exec(["echo", "x"]).result(timeout=10)


# --- retries and idempotency ------------------------------------------------------------------


def test_a_create_whose_answer_was_lost_makes_one_sandbox(svc: MemoryService) -> None:
    svc.faults.create_answer_lost = 2
    sb = Sandbox.run(base_url=svc.url)
    assert svc.calls["CreateSandbox"] == 3 and len(svc.sandboxes) == 1
    assert sb.sandbox_id == "mem-1" and sb.status == SandboxStatus.RUNNING


def test_unreachable_calls_are_retried_within_the_budget(
    svc: MemoryService, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc.faults.unavailable = 3
    assert Sandbox.list(base_url=svc.url).result(timeout=30) == []
    assert svc.calls["ListSandboxes"] == 4
    monkeypatch.setattr(_client, "RETRY_BUDGET_SECONDS", 0.3)
    svc.faults.unavailable = 1000
    with pytest.raises(aviato.AviatoConnectionError):
        Sandbox.list(base_url=svc.url).result(timeout=30)


def test_a_command_is_never_sent_twice(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    svc.faults.unavailable = 1
    with pytest.raises(aviato.AviatoConnectionError):
        sb.exec(["echo", "once"]).result(timeout=10)
    assert svc.calls["Exec"] == 1


# --- Process and OperationRef -----------------------------------------------------------------


def test_exit_codes_output_and_check(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    result = sb.exec(["exit", "7"]).result(timeout=10)
    assert (result.returncode, result.stderr, result.command) == (7, "bye\n", ["exit", "7"])
    assert result.usage is not None and result.usage.wall_seconds == 0.01
    process = sb.exec(["exit", "3"], check=True)
    with pytest.raises(aviato.SandboxExecutionError) as info:
        process.result(timeout=10)
    assert info.value.exec_result is not None and info.value.exec_result.returncode == 3
    assert process.returncode == 3 and process.wait(timeout=1) == 3


def test_a_stream_without_exit_frame_raises_never_zero(svc: MemoryService) -> None:
    svc.faults.drop_exit_frame = True
    sb = Sandbox.run(base_url=svc.url)
    process = sb.exec(["echo", "hi"])
    with pytest.raises(aviato.SandboxExecutionError, match="without an exit status"):
        process.result(timeout=10)
    assert process.returncode is None


def test_stdin_and_input(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    process = sb.exec(["cat"], stdin=True)
    assert process.stdin is not None
    process.stdin.writeline("hello")
    process.stdin.write(b"world")
    process.stdin.close()
    assert process.result(timeout=10).stdout == "hello\nworld"
    assert sb.exec(["cat"], input="given").result(timeout=10).stdout == "given"


def test_cancel_kills_the_command(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    process = sb.exec(["sleep", "30"])
    time.sleep(0.2)
    assert process.cancel()
    deadline = time.monotonic() + 5
    while not svc.signals and time.monotonic() < deadline:
        time.sleep(0.02)
    assert svc.signals == [9]
    with pytest.raises(aviato.SandboxExecutionError, match="cancelled"):
        list(process.stdout)


def test_output_is_bounded_by_max_output_bytes(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url)
    result = sb.exec(["yes", "1000"], max_output_bytes=10).result(timeout=10)
    assert result.stdout_bytes == b"y\n" * 5 and result.stdout_truncated
    assert not result.stderr_truncated


# --- sessions ---------------------------------------------------------------------------------


def test_a_session_stops_its_sandboxes_and_releases_its_lease(svc: MemoryService) -> None:
    with Session(SandboxDefaults(base_url=svc.url, tags=("t",))) as session:
        sb = session.sandbox()
        sb.start().result(timeout=10)
        assert svc.sandboxes[sb.sandbox_id or ""].record.lease_id == session._lease_id
        assert list(svc.sandboxes[sb.sandbox_id or ""].record.spec.tags) == ["t"]
        assert session.sandbox_count == 1
    assert svc.calls["ReleaseLease"] == 1
    assert sb.status == SandboxStatus.TERMINATED and session.sandbox_count == 0
    with pytest.raises(aviato.SandboxError, match="closed"):
        session.sandbox()


def test_options_merge_once_with_the_defaults(svc: MemoryService) -> None:
    defaults = SandboxDefaults(
        base_url=svc.url,
        tags=("a",),
        environment_variables={"X": "1", "Y": "1"},
        node_selector={"pool": "cpu"},
    )
    sb = Sandbox.run(
        "sleep",
        "1",
        defaults=defaults,
        tags=["b"],
        environment_variables={"Y": "2"},
        node_selector={"zone": "z"},
    )
    spec = svc.sandboxes[sb.sandbox_id or ""].record.spec
    assert list(spec.command) == ["sleep", "1"]
    assert list(spec.tags) == ["a", "b"]
    assert dict(spec.env) == {"X": "1", "Y": "2"}
    assert dict(spec.node_selector) == {"pool": "cpu", "zone": "z"}
    with pytest.raises(TypeError, match="unexpected options: colour"):
        Sandbox(colour="red")  # type: ignore[call-arg]
    session = Session(defaults)
    with pytest.raises(TypeError, match=r"Session\.sandbox: unexpected options: base_url"):
        session.sandbox(base_url="unix:///elsewhere.sock")  # type: ignore[call-arg]

    def double(x: int) -> int:
        return 2 * x

    with pytest.raises(TypeError, match="unexpected options: colour"):
        session.function(colour="red")(double)  # type: ignore[call-overload]
    session.close().result(timeout=10)
