"""Commands that outlive their call, on the wire: ids, attach, retention, retries, owners.

Against a real service and real sandboxes, through the raw stubs (the SDK's side is
tests/sdk/test_attach.py).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from _wait import wait_until
from server_helpers import Client, ExecResult, ServerProcess, code_of, free_port, stdin_stream

from aviato.server import auth
from aviato.server.exec_table import RETAINED_BYTES_PER_COMMAND
from aviato.server.registry import Registry
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

NOT_FOUND = 5


@pytest.fixture(scope="module")
def sandbox(server: ServerProcess) -> Iterator[str]:
    sb = server.client().running(tags=["attach-tests"])
    yield sb.id
    server.client().delete(sb.id)


def _run(stub: pbg.SandboxServiceStub, init: pb.ExecInit) -> tuple[ExecResult, str]:
    """A whole RunCommand: its frames and the command's id (in the first frame, or in the
    initial metadata for a command silent at first)."""
    call = stub.RunCommand(init, timeout=60)
    frames = list(call)
    return ExecResult(frames), _id_of(call, frames[0])


def _id_of(call: grpc.Call, first: pb.ExecResponse) -> str:
    named = dict(call.initial_metadata()).get("aviato-exec-id", "")
    if first.WhichOneof("msg") == "error" and not named:
        return ""  # refused: no command
    in_frame = first.output.exec_id or first.exit.exec_id
    assert bool(named) != bool(in_frame), "the id comes exactly once"
    return str(named or in_frame)


def _attach(
    stub: pbg.SandboxServiceStub, sandbox_id: str, exec_id: str, offset: int = 0, **kw: object
) -> ExecResult:
    first = pb.ExecRequest(
        attach=pb.ExecAttach(sandbox_id=sandbox_id, exec_id=exec_id, offset=offset)
    )
    return ExecResult(list(stub.Exec(iter([first]), timeout=60, **kw)))  # type: ignore[arg-type]


def _execs(stub: pbg.SandboxServiceStub, sandbox_id: str) -> dict[str, pb.ExecInfo]:
    answer = stub.ListExecs(pb.ListExecsRequest(sandbox_id=sandbox_id), timeout=10)
    return {e.exec_id: e for e in answer.execs}


def test_every_command_has_an_id_and_is_kept_after_it_ended(
    server: ServerProcess, sandbox: str
) -> None:
    stub = server.stub()
    init = pb.ExecInit(sandbox_id=sandbox, argv=["sh", "-c", "echo out; echo err >&2; exit 7"])
    first, exec_id = _run(stub, init)
    assert first.exit_code == 7 and exec_id.startswith("exec-") and len(exec_id) >= 32
    again = _attach(stub, sandbox, exec_id)
    started = again.frames[0].started
    assert started.exec_id == exec_id and list(started.argv) == list(init.argv)
    assert started.output_offset == 0
    assert (again.stdout, again.stderr, again.exit_code) == (b"out\n", b"err\n", 7)
    # from an offset: bytes of both streams together, in the order they came
    tail = _attach(stub, sandbox, exec_id, offset=2)
    assert tail.stdout + tail.stderr == b"t\nerr\n" and tail.exit_code == 7
    info = _execs(stub, sandbox)[exec_id]
    assert info.state == "exited" and info.exit.exit_code == 7 and info.output_bytes == 8
    assert info.HasField("started_at") and info.HasField("ended_at")
    # Exec streams say the id in their started frame
    q, reqs = stdin_stream(pb.ExecInit(sandbox_id=sandbox, argv=["cat"], stdin=True))
    call = stub.Exec(reqs, timeout=30)
    started_frame = next(call)
    assert started_frame.started.exec_id.startswith("exec-")
    q.put(pb.ExecRequest(stdin=b"hi"))
    q.put(pb.ExecRequest(stdin_eof=True))
    q.put(None)
    assert ExecResult(list(call)).stdout == b"hi"


def test_unknown_ids_and_bad_requests(server: ServerProcess, sandbox: str) -> None:
    stub = server.stub()
    missing = _attach(stub, sandbox, "exec-" + "0" * 32)
    assert missing.error.code == NOT_FOUND and "no command" in missing.error.message
    with pytest.raises(grpc.RpcError) as err:
        stub.SignalExec(pb.SignalExecRequest(sandbox_id=sandbox, exec_id="x", signal=99))
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    init = pb.ExecInit(sandbox_id=sandbox, argv=["true"], request_id="bad id with spaces")
    bad, _ = _run(stub, init)
    assert "init.request_id" in bad.error.message


def test_a_retry_with_the_same_request_id_does_not_run_twice(
    server: ServerProcess, sandbox: str
) -> None:
    stub = server.stub()
    marker = f"/tmp/runs-{uuid.uuid4().hex}"
    script = f"echo run >> {marker}; sleep 0.3; echo done; exit 3"
    init = pb.ExecInit(sandbox_id=sandbox, argv=["sh", "-c", script], request_id=uuid.uuid4().hex)
    results: list[tuple[ExecResult, str]] = []
    threads = [threading.Thread(target=lambda: results.append(_run(stub, init))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    results.append(_run(stub, init))  # after the end, too
    assert {exec_id for _, exec_id in results} == {results[0][1]}
    for r, _ in results:
        assert r.stdout == b"done\n" and r.exit_code == 3
    count = server.client().exec(sandbox, ["cat", marker]).stdout
    assert count == b"run\n", "the command ran more than once"


def test_a_retried_exec_stream_feeds_its_input_once(server: ServerProcess, sandbox: str) -> None:
    stub = server.stub()
    init = pb.ExecInit(
        sandbox_id=sandbox, argv=["cat"], stdin=True, input=b"once|", request_id=uuid.uuid4().hex
    )
    q, reqs = stdin_stream(init)
    call = stub.Exec(reqs, timeout=30)
    exec_id = next(call).started.exec_id
    assert next(call).output.data == b"once|"
    call.cancel()  # the connection is lost before stdin_eof: the client retries the call
    q.put(None)
    frames = [pb.ExecRequest(init=init), pb.ExecRequest(stdin_eof=True)]
    retry = ExecResult(list(stub.Exec(iter(frames), timeout=30)))
    assert retry.frames[0].started.exec_id == exec_id
    assert retry.stdout == b"once|" and retry.exit_code == 0


def test_a_command_with_a_request_id_outlives_its_call(server: ServerProcess, sandbox: str) -> None:
    """The call goes (cancelled, as a killed client's does); the command runs to its end, and
    an attach gets every byte and the exit status. Its stdin stays open, never closed for it."""
    stub = server.stub()
    script = "read line; echo got-$line; for i in 1 2 3; do echo n$i; done; exit 4"
    init = pb.ExecInit(
        sandbox_id=sandbox, argv=["sh", "-c", script], stdin=True, request_id=uuid.uuid4().hex
    )
    q, reqs = stdin_stream(init)
    call = stub.Exec(reqs, timeout=30)
    exec_id = next(call).started.exec_id
    q.put(pb.ExecRequest(stdin=b"par"))  # half a line, then the client is gone
    time.sleep(0.3)
    call.cancel()
    q.put(None)
    time.sleep(0.3)
    assert _execs(stub, sandbox)[exec_id].state == "running", "the command died with its call"
    # A new call attaches, finishes the input and gets every byte.
    frames = [
        pb.ExecRequest(attach=pb.ExecAttach(sandbox_id=sandbox, exec_id=exec_id)),
        pb.ExecRequest(stdin=b"tial\n"),
        pb.ExecRequest(stdin_eof=True),
    ]
    r = ExecResult(list(stub.Exec(iter(frames), timeout=30)))
    assert r.stdout == b"got-partial\nn1\nn2\nn3\n" and r.exit_code == 4


def test_signal_exec_kills_a_detached_command(server: ServerProcess, sandbox: str) -> None:
    stub = server.stub()
    init = pb.ExecInit(
        sandbox_id=sandbox, argv=["sh", "-c", "echo up; exec sleep 300"], request_id="k-1"
    )
    call = stub.RunCommand(init, timeout=30)
    first = next(call)
    assert first.output.data == b"up\n"
    exec_id = _id_of(call, first)
    call.cancel()
    info = stub.SignalExec(pb.SignalExecRequest(sandbox_id=sandbox, exec_id=exec_id, signal=9))
    assert info.exec_id == exec_id
    r = _attach(stub, sandbox, exec_id)
    assert r.stdout == b"up\n" and "killed" in r.error.message  # with everything it started
    assert _execs(stub, sandbox)[exec_id].state == "failed"


@pytest.mark.slow
def test_a_flood_without_a_reader_stays_within_the_retention(
    server: ServerProcess, sandbox: str
) -> None:
    """64 MiB written with nobody reading: the command is not held back, the service keeps
    only the last RETAINED_BYTES_PER_COMMAND, and its memory does not grow with the flood."""
    stub = server.stub()
    assert server.proc is not None
    rss_before = _rss(server.proc.pid)
    size = 64 << 20
    init = pb.ExecInit(
        sandbox_id=sandbox,
        argv=["sh", "-c", f"sleep 1; head -c {size} /dev/zero | tr '\\0' x; echo; echo end"],
        request_id=uuid.uuid4().hex,
    )
    call = stub.RunCommand(init, timeout=60)
    exec_id = dict(call.initial_metadata())["aviato-exec-id"]  # silent at first: sent ahead
    call.cancel()  # nobody reads
    info = wait_until(
        lambda: (e := _execs(stub, sandbox)[exec_id]).state == "exited" and e,
        "the flood to end",
        timeout=60,
    )
    assert info.output_bytes == size + 5
    assert info.output_bytes - info.retained_from <= RETAINED_BYTES_PER_COMMAND
    grew = _rss(server.proc.pid) - rss_before
    assert grew < 48 << 20, f"the service grew by {grew >> 20} MiB"
    r = _attach(stub, sandbox, exec_id)
    offset = r.frames[0].started.output_offset
    assert offset == info.retained_from > 0  # says where it starts: the bytes before are gone
    assert r.stdout.endswith(b"x\nend\n") and len(r.stdout) == size + 5 - offset
    assert r.exit_code == 0


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_another_owner_can_neither_attach_nor_list_nor_signal(
    fresh_server: ServerProcess,
) -> None:
    port = free_port()
    fresh_server.state_dir.mkdir(parents=True)
    reg = Registry(fresh_server.state_dir / "registry.db")
    _, alice_key = auth.create_key(reg, "alice", "a")
    _, bob_key = auth.create_key(reg, "bob", "b")
    fresh_server.args += ["--listen", f"127.0.0.1:{port}"]
    fresh_server.start()
    stub = pbg.SandboxServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    alice = [("authorization", f"Bearer {alice_key}")]
    bob = [("authorization", f"Bearer {bob_key}")]
    sb = Client(stub, alice).running()
    init = pb.ExecInit(sandbox_id=sb.id, argv=["sh", "-c", "echo secret; sleep 30"])
    call = stub.RunCommand(init, metadata=alice, timeout=30)
    first = next(call)
    assert first.output.data == b"secret\n"
    exec_id = _id_of(call, first)
    stolen = _attach(stub, sb.id, exec_id, metadata=bob)
    assert stolen.error.code == NOT_FOUND and stolen.stdout == b""
    for rpc, request in (
        (stub.ListExecs, pb.ListExecsRequest(sandbox_id=sb.id)),
        (stub.SignalExec, pb.SignalExecRequest(sandbox_id=sb.id, exec_id=exec_id, signal=9)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            rpc(request, metadata=bob, timeout=10)
        assert code_of(err.value) == grpc.StatusCode.NOT_FOUND
    listed = stub.ListExecs(pb.ListExecsRequest(sandbox_id=sb.id), metadata=alice, timeout=10)
    assert [e.exec_id for e in listed.execs] == [exec_id]
    assert listed.execs[0].state == "running"
    call.cancel()
