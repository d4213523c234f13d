"""Exec through a real service: exit codes, ordering, stdin, tty, timeouts, errors, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from _wait import wait_until
from server_helpers import ExecResult, S, ServerProcess, stdin_stream

from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT = 5, 9, 3


@pytest.fixture(scope="module")
def sandbox(server: ServerProcess) -> Iterator[str]:
    sb = server.client().running(tags=["exec-tests"])
    yield sb.id
    server.client().delete(sb.id)


@pytest.mark.slow
def test_exit_codes_and_usage(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    for code in (0, 1, 42, 255):
        r = c.sh(sandbox, f"exit {code}")
        assert r.exit_code == code
        assert r.frames[0].WhichOneof("msg") == "started"
    r = c.sh(sandbox, "kill -9 $$")
    assert r.exit_code == 137 and r.terminal.exit.signal == 9
    r = c.exec(sandbox, ["/bin/sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"])
    usage = r.terminal.exit.usage
    assert usage.wall_seconds > 0 and usage.cpu_user_seconds + usage.cpu_system_seconds > 0
    assert usage.peak_memory_bytes > 0


def test_output_order_and_streams(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    r = c.sh(sandbox, "for i in $(seq 1 200); do echo out$i; echo err$i >&2; done")
    assert r.exit_code == 0
    assert r.stdout == b"".join(b"out%d\n" % i for i in range(1, 201))
    assert r.stderr == b"".join(b"err%d\n" % i for i in range(1, 201))
    # Relative order across streams is kept for sequential writes with a pause between them.
    r = c.sh(sandbox, "echo a; sleep 0.05; echo b >&2; sleep 0.05; echo c")
    seq = [(f.output.stream, f.output.data) for f in r.frames if f.WhichOneof("msg") == "output"]
    assert seq == [(1, b"a\n"), (2, b"b\n"), (1, b"c\n")]


def test_large_output(server: ServerProcess, sandbox: str) -> None:
    r = server.client().sh(sandbox, "head -c 20000000 /dev/zero")
    assert r.exit_code == 0 and len(r.stdout) == 20_000_000


def test_stdin_env_cwd(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    data = bytes(range(256)) * 4000
    r = c.exec(sandbox, ["/bin/cat"], stdin=data)
    assert r.exit_code == 0 and r.stdout == data
    r = c.exec(sandbox, ["/bin/sh", "-c", 'echo "$FOO $(pwd)"'], env={"FOO": "bar"}, cwd="/tmp")
    assert r.stdout == b"bar /tmp\n"
    # Without stdin the command reads EOF at once.
    r = c.exec(sandbox, ["/bin/cat"])
    assert r.exit_code == 0 and r.stdout == b""


def test_interactive_stdin(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    q, reqs = stdin_stream(pb.ExecInit(sandbox_id=sandbox, argv=["/bin/cat"], stdin=True))
    it = c.stub.Exec(reqs, timeout=30)
    assert next(it).WhichOneof("msg") == "started"
    q.put(pb.ExecRequest(stdin=b"ping\n"))
    frame = next(it)
    assert frame.output.data == b"ping\n"
    q.put(pb.ExecRequest(stdin_eof=True))
    q.put(None)
    rest = list(it)
    assert rest[-1].exit.exit_code == 0


def test_tty(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    r = c.exec(sandbox, ["/bin/sh", "-c", "tty >/dev/null && echo yes; stty size; echo e >&2"],
               tty=True, rows=33, cols=99)  # fmt: skip
    assert r.exit_code == 0
    assert b"yes" in r.stdout and b"33 99" in r.stdout and b"e" in r.stdout
    assert r.stderr == b""
    r = c.exec(sandbox, ["/bin/sh", "-c", "sleep 0.3; stty size"], tty=True, rows=10, cols=20,
               extra=[pb.ExecRequest(resize=pb.TerminalSize(rows=40, cols=120))])  # fmt: skip
    assert b"40 120" in r.stdout


def test_timeout(server: ServerProcess, sandbox: str) -> None:
    t0 = time.monotonic()
    r = server.client().exec(sandbox, ["/bin/sleep", "30"], timeout=0.5)
    assert time.monotonic() - t0 < 5
    ex = r.terminal.exit
    assert ex.timed_out and ex.exit_code == 137


def test_signal_frame(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    q, reqs = stdin_stream(pb.ExecInit(sandbox_id=sandbox, argv=["/bin/sleep", "30"], stdin=True))
    it = c.stub.Exec(reqs, timeout=30)
    assert next(it).WhichOneof("msg") == "started"
    q.put(pb.ExecRequest(signal=2))
    q.put(pb.ExecRequest(stdin_eof=True))
    q.put(None)
    frames = list(it)
    assert frames[-1].exit.exit_code == 130 and frames[-1].exit.signal == 2


def test_errors_are_terminal_frames(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    r = c.exec(sandbox, ["/no/such/command"])
    # A missing program is the command's outcome, as in a shell: exit 127 and a message.
    assert r.terminal.exit.exit_code == 127
    assert b"/no/such/command" in r.stderr
    assert c.exec("sbx-unknown", ["true"]).error.code == NOT_FOUND
    assert c.exec(sandbox, [""]).error.code == INVALID_ARGUMENT
    assert "init.argv" in c.exec(sandbox, []).error.message
    assert c.exec(sandbox, ["ls"], cwd="relative").error.code == INVALID_ARGUMENT
    # The first frame must be init.
    frames = list(c.stub.Exec(iter([pb.ExecRequest(stdin=b"x")]), timeout=10))
    assert len(frames) == 1 and frames[0].error.code == INVALID_ARGUMENT
    frames = list(c.stub.Exec(iter([]), timeout=10))
    assert len(frames) == 1 and frames[0].error.code == INVALID_ARGUMENT


def test_exec_on_failed_and_stopped_sandbox(server: ServerProcess) -> None:
    c = server.client()
    failed = c.create(command=["/bin/sh", "-c", "exit 7"])
    c.wait(failed.id, terminal=True)
    r = c.exec(failed.id, ["true"])
    assert r.error.code == FAILED_PRECONDITION and "FAILED" in r.error.message
    c.delete(failed.id)


def test_exec_right_after_create_waits_for_running(server: ServerProcess) -> None:
    c = server.client()
    sb = c.create()
    r = c.exec(sb.id, ["/bin/echo", "hi"])
    assert r.stdout == b"hi\n" and r.exit_code == 0
    assert c.get(sb.id).status == S.SANDBOX_STATUS_RUNNING
    c.delete(sb.id)


def test_client_going_away_kills_the_command(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    marker = f"/tmp/gone-{time.monotonic_ns()}"
    q, reqs = stdin_stream(pb.ExecInit(
        sandbox_id=sandbox, argv=["/bin/sh", "-c", f"echo $$ > {marker}; exec sleep 300"],
        stdin=True))  # fmt: skip
    call = c.stub.Exec(reqs, timeout=30)
    assert next(call).WhichOneof("msg") == "started"
    pid = wait_until(
        lambda: c.exec(sandbox, ["/bin/cat", marker]).stdout.strip().decode(),
        "the command to write its pid",
        timeout=10,
    )
    call.cancel()
    q.put(None)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        alive = c.sh(sandbox, f"kill -0 {pid} 2>/dev/null").exit_code == 0
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, "the command outlived its client"


def test_parallel_execs(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    results: dict[int, bytes] = {}

    def run(i: int) -> None:
        results[i] = c.exec(sandbox, ["/bin/echo", str(i)]).stdout

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"{i}\n".encode() for i in range(32)}


def test_exec_deadline_from_client_side(server: ServerProcess, sandbox: str) -> None:
    with pytest.raises(grpc.RpcError):
        list(server.client().stub.Exec(
            iter([pb.ExecRequest(init=pb.ExecInit(sandbox_id=sandbox, argv=["/bin/sleep", "5"]))]),
            timeout=0.5))  # fmt: skip


# -- RunCommand and init.input -------------------------------------------------------------------


def _run(server: ServerProcess, init: pb.ExecInit) -> ExecResult:
    c = server.client()
    return ExecResult(list(c.stub.RunCommand(init, metadata=c.md, timeout=60)))


def test_run_command(server: ServerProcess, sandbox: str) -> None:
    r = _run(
        server,
        pb.ExecInit(sandbox_id=sandbox, argv=["/bin/sh", "-c", "echo o; echo e >&2; exit 3"]),
    )
    assert r.exit_code == 3 and r.stdout == b"o\n" and r.stderr == b"e\n"
    assert "started" not in [f.WhichOneof("msg") for f in r.frames]
    # No input: stdin is empty. Input: all of it, then EOF (also past the inline size).
    assert _run(server, pb.ExecInit(sandbox_id=sandbox, argv=["/bin/cat"])).stdout == b""
    for data in (b"hello\n", bytes(range(256)) * 3000):
        r = _run(server, pb.ExecInit(sandbox_id=sandbox, argv=["/bin/cat"], input=data))
        assert r.exit_code == 0 and r.stdout == data
    # A command that never reads a large input still finishes, and its output is relayed.
    argv = ["/bin/sh", "-c", "head -c 3000000 /dev/zero"]
    r = _run(server, pb.ExecInit(sandbox_id=sandbox, argv=argv, input=b"x" * 3_000_000))
    assert r.exit_code == 0 and len(r.stdout) == 3_000_000
    r = _run(
        server, pb.ExecInit(sandbox_id=sandbox, argv=["/bin/sleep", "30"], timeout_seconds=0.3)
    )
    assert r.terminal.exit.timed_out


def test_run_command_errors(server: ServerProcess, sandbox: str) -> None:
    assert (
        _run(server, pb.ExecInit(sandbox_id="sbx-unknown", argv=["true"])).error.code == NOT_FOUND
    )
    r = _run(server, pb.ExecInit(sandbox_id=sandbox, argv=["true"], tty=True))
    assert r.error.code == INVALID_ARGUMENT and "init.tty" in r.error.message
    r = _run(server, pb.ExecInit(sandbox_id=sandbox, argv=["/bin/cat"], input=b"x" * (4 << 20 | 1)))
    assert r.error.code == INVALID_ARGUMENT and "init.input" in r.error.message


def test_run_command_cancelled_kills_the_command(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    marker = f"/tmp/run-gone-{time.monotonic_ns()}"
    script = f"echo $$ > {marker}; echo up; exec sleep 300"
    init = pb.ExecInit(sandbox_id=sandbox, argv=["/bin/sh", "-c", script])
    call = c.stub.RunCommand(init, metadata=c.md, timeout=30)
    assert next(call).output.data == b"up\n"
    call.cancel()
    pid = c.exec(sandbox, ["/bin/cat", marker]).stdout.strip().decode()
    deadline = time.monotonic() + 5
    while (alive := c.sh(sandbox, f"kill -0 {pid} 2>/dev/null").exit_code == 0) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not alive, "the command outlived its cancelled call"


def test_exec_input_in_init(server: ServerProcess, sandbox: str) -> None:
    c = server.client()
    init = pb.ExecInit(sandbox_id=sandbox, argv=["/bin/cat"], stdin=True, input=b"first|")
    reqs = [
        pb.ExecRequest(init=init),
        pb.ExecRequest(stdin=b"second"),
        pb.ExecRequest(stdin_eof=True),
    ]
    r = ExecResult(list(c.stub.Exec(iter(reqs), metadata=c.md, timeout=30)))
    assert r.exit_code == 0 and r.stdout == b"first|second"
    init = pb.ExecInit(sandbox_id=sandbox, argv=["/bin/cat"], input=b"x")
    r = ExecResult(list(c.stub.Exec(iter([pb.ExecRequest(init=init)]), metadata=c.md, timeout=30)))
    assert r.error.code == INVALID_ARGUMENT and "init.input" in r.error.message


def test_stream_ending_without_stdin_eof_kills_the_command(
    server: ServerProcess, sandbox: str
) -> None:
    """Only stdin_eof ends a command's input: a request stream that just ends is a client that
    went away, and the command must not take what arrived for its whole input."""
    c = server.client()
    marker = f"/tmp/noeof-{time.monotonic_ns()}"
    script = f"cat >/dev/null && touch {marker}"
    init = pb.ExecInit(sandbox_id=sandbox, argv=["/bin/sh", "-c", script], stdin=True)
    reqs = [pb.ExecRequest(init=init), pb.ExecRequest(stdin=b"half of it")]
    r = ExecResult(list(c.stub.Exec(iter(reqs), metadata=c.md, timeout=30)))
    assert r.terminal.WhichOneof("msg") == "error" and "stdin_eof" in r.terminal.error.message
    assert c.exec(sandbox, ["/bin/ls", marker]).exit_code != 0, "the command saw a clean EOF"
    # Without stdin there is nothing to end: a half-close right after init is normal.
    r = c.exec(sandbox, ["/bin/echo", "ok"])
    assert r.exit_code == 0 and r.stdout == b"ok\n"


def test_a_frame_sent_as_the_command_ends_does_not_fail_the_call(
    server: ServerProcess, sandbox: str
) -> None:
    """A client's end-of-file that arrives after its command ended (here: failed to start) lands
    in an open stream: the service keeps a finished Exec stream until the client half-closes.
    Were the stream already over, the client's gRPC core would fail that write and, with it, the
    whole call ("Internal error from Core"), losing the status it had been sent."""

    async def body() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(f"unix://{server.socket_path}") as channel:
            call = pbg.SandboxServiceStub(channel).Exec(timeout=30)
            init = pb.ExecInit(sandbox_id=sandbox, argv=["no-such-program-here"], stdin=True)
            await call.write(pb.ExecRequest(init=init))
            while (await call.read()).WhichOneof("msg") not in ("exit", "error"):
                pass  # started, and the shell's "cannot start" on stderr
            await asyncio.sleep(0.3)  # a client slower than the service to send its end-of-file
            await call.write(pb.ExecRequest(stdin_eof=True))
            await call.done_writing()
            code: grpc.StatusCode = await call.code()
            return code

    assert asyncio.run(body()) == grpc.StatusCode.OK
