"""Pause, resume, extend and idle_timeout against the real service and real sandboxes.

A paused sandbox's processes are frozen (no CPU used, read from its cpuacct cgroup) and continue
where they were at resume (the same process, its counter going on); commands and files are
refused in words while it is paused; it stays paused across a kill -9 of the service (the
kernel's freezer is the truth); its lifetime keeps running; extend moves the deadline the
sandbox enforces itself; idle_timeout ends an idle sandbox and not a busy one.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from _wait import wait_until
from server_helpers import Client, S, ServerProcess, code_of, free_port

from aviato.server import auth
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

COUNTER = ["/bin/sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; done"]
FAILED_PRECONDITION = 9


def pause(c: Client, sandbox_id: str) -> pb.Sandbox:
    req = pb.PauseSandboxRequest(sandbox_id=sandbox_id)
    return c.stub.PauseSandbox(req, metadata=c.md, timeout=30)  # type: ignore[no-any-return]


def resume(c: Client, sandbox_id: str) -> pb.Sandbox:
    req = pb.ResumeSandboxRequest(sandbox_id=sandbox_id)
    return c.stub.ResumeSandbox(req, metadata=c.md, timeout=30)  # type: ignore[no-any-return]


def extend(c: Client, sandbox_id: str, seconds: float) -> pb.Sandbox:
    req = pb.ExtendSandboxRequest(sandbox_id=sandbox_id, seconds=seconds)
    return c.stub.ExtendSandbox(req, metadata=c.md, timeout=30)  # type: ignore[no-any-return]


def cgroup_dir(server: ServerProcess, controller: str, sandbox_id: str) -> Path:
    return Path("/sys/fs/cgroup", controller, server.cgroup_parent, sandbox_id)


def cpu_used_ns(server: ServerProcess, sandbox_id: str) -> int:
    return int((cgroup_dir(server, "cpuacct", sandbox_id) / "cpuacct.usage").read_text())


def counter_pid(server: ServerProcess, sandbox_id: str) -> int:
    """The host pid of the sandbox's counting shell."""
    procs = (cgroup_dir(server, "pids", sandbox_id) / "cgroup.procs").read_text().split()
    for pid in procs:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if cmdline.startswith(b"/bin/sh\0-c\0i=0"):
            return int(pid)
    raise AssertionError(f"no counting shell among {procs}")


def count(pid: int) -> int:
    """The counter as the sandbox wrote it, read from the host through its root."""
    try:
        text = Path(f"/proc/{pid}/root/tmp/count").read_text().strip()
    except FileNotFoundError:  # not written yet
        return 0
    return int(text) if text.isdigit() else 0  # read between its truncation and its write


def test_paused_sandbox_uses_no_cpu_and_resumes_where_it_was(server: ServerProcess) -> None:
    c = server.client()
    sb = c.running(command=COUNTER)
    pid = counter_pid(server, sb.id)
    wait_until(lambda: count(pid) > 100, "the counter to count")

    paused = pause(c, sb.id)
    assert paused.status == S.SANDBOX_STATUS_PAUSED
    assert pause(c, sb.id).status == S.SANDBOX_STATUS_PAUSED  # idempotent
    assert c.get(sb.id).status == S.SANDBOX_STATUS_PAUSED
    assert sb.id in [s.id for s in c.list().sandboxes]  # a live status
    cpu_before, counted = cpu_used_ns(server, sb.id), count(pid)
    time.sleep(2.0)
    assert cpu_used_ns(server, sb.id) == cpu_before, "a paused sandbox used CPU"
    assert count(pid) == counted, "a paused sandbox went on counting"

    # Commands and files are refused in words while it is paused, never queued.
    refused = c.exec(sb.id, ["/bin/true"], deadline=10).error
    assert refused.code == FAILED_PRECONDITION and "paused" in refused.message, refused
    with pytest.raises(grpc.RpcError) as err:
        c.read_file(sb.id, "/tmp/count")
    assert code_of(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "resume it first" in (err.value.details() or "")  # type: ignore[attr-defined]

    assert resume(c, sb.id).status == S.SANDBOX_STATUS_RUNNING
    assert resume(c, sb.id).status == S.SANDBOX_STATUS_RUNNING  # idempotent
    wait_until(lambda: count(pid) > counted + 100, "the counter to count on")
    assert counter_pid(server, sb.id) == pid  # the same process: continued, not restarted
    assert cpu_used_ns(server, sb.id) > cpu_before
    assert c.exec(sb.id, ["/bin/echo", "back"]).stdout == b"back\n"
    c.delete(sb.id)


def test_exec_in_flight_when_paused_continues_at_resume(server: ServerProcess) -> None:
    c = server.client()
    sb = c.running()
    import threading

    result: list[object] = []
    runner = threading.Thread(
        target=lambda: result.append(c.sh(sb.id, "sleep 1; echo done", deadline=60))
    )
    runner.start()
    time.sleep(0.3)
    pause(c, sb.id)
    time.sleep(2.0)
    assert not result, "a frozen command finished"
    resume(c, sb.id)
    runner.join(30)
    assert result and result[0].stdout == b"done\n"  # type: ignore[attr-defined]
    c.delete(sb.id)


def test_pause_of_an_ended_sandbox_is_refused_in_words(server: ServerProcess) -> None:
    c = server.client()
    sb = c.running()
    c.stop(sb.id)
    for call in (lambda: pause(c, sb.id), lambda: resume(c, sb.id), lambda: extend(c, sb.id, 5)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert code_of(err.value) == grpc.StatusCode.FAILED_PRECONDITION
        assert "has ended" in (err.value.details() or "")  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as err:
        pause(c, "sbx-000000000000")
    assert code_of(err.value) == grpc.StatusCode.NOT_FOUND
    c.delete(sb.id)


def test_a_paused_sandbox_s_lifetime_keeps_running(server: ServerProcess) -> None:
    c = server.client()
    sb = c.running(max_lifetime_seconds=2)
    pause(c, sb.id)
    end = c.wait(sb.id, terminal=True, timeout=20)
    assert end.status == S.SANDBOX_STATUS_TERMINATED, end
    assert end.status_reason == "max lifetime exceeded"
    c.delete(sb.id)


def test_extend_moves_the_deadline(server: ServerProcess) -> None:
    c = server.client()
    sb = c.running(max_lifetime_seconds=2)
    first = sb.expires_at.ToNanoseconds()
    longer = extend(c, sb.id, 4)
    assert longer.expires_at.ToNanoseconds() == first + 4_000_000_000
    assert c.get(sb.id).expires_at.ToNanoseconds() == first + 4_000_000_000
    time.sleep(max(0.0, (first - time.time_ns()) / 1e9) + 2.0)  # well past the first deadline
    assert c.get(sb.id).status == S.SANDBOX_STATUS_RUNNING
    assert c.exec(sb.id, ["/bin/true"]).exit_code == 0
    end = c.wait(sb.id, terminal=True, timeout=20)
    assert end.status_reason == "max lifetime exceeded"
    assert end.ended_at.ToNanoseconds() >= first + 4_000_000_000

    # Past the service's maximum lifetime: refused, saying how much is left.
    other = c.running()
    with pytest.raises(grpc.RpcError) as err:
        extend(c, other.id, 8 * 24 * 3600)
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "can still be added" in (err.value.details() or "")  # type: ignore[attr-defined]
    for bad in (0, -1, float("nan")):
        with pytest.raises(grpc.RpcError) as err:
            extend(c, other.id, bad)
        assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert c.get(other.id).expires_at == other.expires_at
    c.delete(sb.id)
    c.delete(other.id)


def test_idle_timeout_stops_an_idle_sandbox_and_not_a_busy_one(server: ServerProcess) -> None:
    c = server.client()
    idle = c.running(idle_timeout_seconds=1.5)
    busy = c.running(idle_timeout_seconds=1.5)
    # One long command in flight (3 s, twice the timeout), then a file transfer and a
    # command every half second for 3 s: it never becomes idle.
    assert c.sh(busy.id, "sleep 3; echo ok").stdout == b"ok\n"
    for _ in range(6):
        c.write_file(busy.id, "/tmp/f", b"x")
        c.exec(busy.id, ["/bin/true"])
        time.sleep(0.5)
    end = c.wait(idle.id, terminal=True, timeout=20)
    assert end.status == S.SANDBOX_STATUS_TERMINATED and end.status_reason == "idle", end
    assert c.get(busy.id).status == S.SANDBOX_STATUS_RUNNING
    # A paused sandbox is never idle; resumed, its clock starts afresh and runs out.
    pause(c, busy.id)
    time.sleep(2.5)
    assert c.get(busy.id).status == S.SANDBOX_STATUS_PAUSED
    resume(c, busy.id)
    end = c.wait(busy.id, terminal=True, timeout=20)
    assert end.status_reason == "idle"
    with pytest.raises(grpc.RpcError) as err:
        c.create(idle_timeout_seconds=-1)
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "idle_timeout_seconds" in (err.value.details() or "")  # type: ignore[attr-defined]
    c.delete(idle.id)
    c.delete(busy.id)


@pytest.mark.slow
def test_paused_sandbox_stays_paused_across_a_kill9_of_the_service(
    fresh_server: ServerProcess,
) -> None:
    c = fresh_server.start().client()
    sb = c.running(command=COUNTER)
    pid = counter_pid(fresh_server, sb.id)
    wait_until(lambda: count(pid) > 100, "the counter to count")
    pause(c, sb.id)
    counted = count(pid)

    fresh_server.kill9()
    c = fresh_server.start().client()
    got = c.get(sb.id)
    assert got.status == S.SANDBOX_STATUS_PAUSED, got  # re-attached, not killed as hung
    assert count(pid) == counted
    refused = c.exec(sb.id, ["/bin/true"], deadline=10).error
    assert "paused" in refused.message
    extend(c, sb.id, 60)  # a deadline while paused and not connected: given at resume
    assert resume(c, sb.id).status == S.SANDBOX_STATUS_RUNNING
    wait_until(lambda: count(pid) > counted + 100, "the counter to count on")
    assert c.exec(sb.id, ["/bin/echo", "alive"]).stdout == b"alive\n"

    # And the other way: paused, the service stopped gracefully, still paused after.
    pause(c, sb.id)
    assert fresh_server.stop() == 0
    c = fresh_server.start().client()
    assert c.get(sb.id).status == S.SANDBOX_STATUS_PAUSED
    stopped = c.stop(sb.id, grace=5)  # a stop thaws it first: its SIGTERM is handled at once
    assert stopped.status == S.SANDBOX_STATUS_TERMINATED
    c.delete(sb.id)


def test_another_owner_cannot_pause_resume_or_extend(fresh_server: ServerProcess) -> None:
    port = free_port()
    fresh_server.state_dir.mkdir(parents=True)
    reg = Registry(fresh_server.state_dir / "registry.db")
    _, alice_key = auth.create_key(reg, "alice", "a")
    _, bob_key = auth.create_key(reg, "bob", "b")
    fresh_server.args += ["--listen", f"127.0.0.1:{port}"]
    fresh_server.start()
    stub = pbg.SandboxServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    alice = Client(stub, [("authorization", f"Bearer {alice_key}")])
    bob = Client(stub, [("authorization", f"Bearer {bob_key}")])
    sb = alice.running()
    for call in (lambda: pause(bob, sb.id), lambda: resume(bob, sb.id),
                 lambda: extend(bob, sb.id, 10)):  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert code_of(err.value) == grpc.StatusCode.NOT_FOUND
    pause(alice, sb.id)
    with pytest.raises(grpc.RpcError) as err:
        resume(bob, sb.id)
    assert code_of(err.value) == grpc.StatusCode.NOT_FOUND
    assert alice.get(sb.id).status == S.SANDBOX_STATUS_PAUSED
    assert alice.get(sb.id).expires_at == sb.expires_at
    alice.delete(sb.id)  # a paused sandbox is deleted like any other
