"""Commands: streaming, stdin, exit codes, timeouts, cancellation, concurrency (real service)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import aviato
from aviato import Sandbox

from .conftest import TEST_TAG

TEN_LINES = "for i in 0 1 2 3 4 5 6 7 8 9; do echo line$i; sleep 0.2; done"


def test_result_fields(sandbox: Sandbox) -> None:
    r = sandbox.exec(["sh", "-c", "echo out; echo err >&2; exit 5"]).result()
    assert (r.stdout, r.stderr, r.returncode) == ("out\n", "err\n", 5)
    assert (r.stdout_bytes, r.stderr_bytes) == (b"out\n", b"err\n")
    assert r.command == ["sh", "-c", "echo out; echo err >&2; exit 5"]
    assert r.usage is not None and r.usage.wall_seconds > 0 and not r.timed_out


def test_check_raises_with_exec_result_after_the_output(sandbox: Sandbox) -> None:
    process = sandbox.exec(["sh", "-c", "echo partial; exit 42"], check=True)
    assert "".join(process.stdout) == "partial\n"  # the stream ends cleanly
    with pytest.raises(aviato.SandboxExecutionError) as info:
        process.result()
    assert info.value.exec_result is not None
    assert info.value.exec_result.returncode == 42
    assert info.value.exec_result.stdout == "partial\n"
    assert process.returncode == 42 and process.wait() == 42
    assert sandbox.exec(["false"]).result().returncode == 1  # check=False returns


def test_returncode_lifecycle(sandbox: Sandbox) -> None:
    process = sandbox.exec(["sleep", "0.5"])
    assert process.returncode is None and process.poll() is None
    assert process.wait(timeout=10) == 0
    assert process.poll() == 0 and process.returncode == 0


def test_signal_exit_code(sandbox: Sandbox) -> None:
    r = sandbox.exec(["sh", "-c", "kill -9 $$"]).result()
    assert r.returncode == 137 and r.signal == 9


def _assert_spread(stamps: list[float], lines: list[str]) -> None:
    assert lines == [f"line{i}\n" for i in range(10)]
    assert stamps[-1] - stamps[0] > 1.2, "output arrived all at once: not streamed"


@pytest.mark.slow
def test_streaming_is_live_sync(sandbox: Sandbox) -> None:
    process = sandbox.exec(["sh", "-c", TEN_LINES])
    stamps, lines = [], []
    for line in process.stdout.lines():
        stamps.append(time.monotonic())
        lines.append(line)
    _assert_spread(stamps, lines)
    assert process.result().stdout == "".join(lines)


@pytest.mark.slow
def test_streaming_is_live_async(sandbox: Sandbox) -> None:
    async def main() -> tuple[list[float], list[str]]:
        process = sandbox.exec(["sh", "-c", TEN_LINES])
        stamps, chunks = [], []
        async for chunk in process.stdout:
            stamps.append(time.monotonic())
            chunks.append(chunk)
        result = await process
        assert result.stdout == "".join(chunks)
        return stamps, "".join(chunks).splitlines(keepends=True)

    stamps, lines = asyncio.run(main())
    _assert_spread(stamps, lines)


def test_async_for_from_other_threads_and_loops(sandbox: Sandbox) -> None:
    process = sandbox.exec(
        ["sh", "-c", "for i in 1 2 3; do echo $i; echo e$i >&2; sleep 0.1; done"]
    )
    out: dict[str, str] = {}

    def consume(name: str, reader: Any) -> None:
        async def run() -> str:
            return "".join([c async for c in reader])

        out[name] = asyncio.run(run())

    threads = [
        threading.Thread(target=consume, args=("stdout", process.stdout)),
        threading.Thread(target=consume, args=("stderr", process.stderr)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert out == {"stdout": "1\n2\n3\n", "stderr": "e1\ne2\ne3\n"}


@pytest.mark.slow
def test_large_output_in_order(sandbox: Sandbox) -> None:
    process = sandbox.exec(["sh", "-c", "seq 1 20000"])
    lines = list(process.stdout.lines())
    assert lines == [f"{i}\n" for i in range(1, 20001)]
    assert process.result().stdout.count("\n") == 20000


def test_stdin_round_trip(sandbox: Sandbox) -> None:
    process = sandbox.exec(["cat"], stdin=True)
    assert process.stdin is not None
    process.stdin.writeline("hello")
    process.stdin.write(b"\x00binary\xff")
    assert not process.stdin.closed
    process.stdin.close()
    process.stdin.close()  # idempotent
    assert process.stdin.closed
    r = process.result(timeout=30)
    assert r.stdout_bytes == b"hello\n\x00binary\xff"
    with pytest.raises(aviato.SandboxExecutionError, match="closed"):
        process.stdin.write(b"late")
    assert sandbox.exec(["true"]).stdin is None


def test_input_is_the_whole_stdin(sandbox: Sandbox) -> None:
    r = sandbox.exec(["cat"], input=b"\x00bytes\xff").result(timeout=30)
    assert r.stdout_bytes == b"\x00bytes\xff"
    process = sandbox.exec(["python3", "-c", "import sys; print(sys.stdin.read().upper())"],
                           input="text é")  # fmt: skip
    assert process.stdin is None
    assert process.result(timeout=30).stdout == "TEXT É\n"
    big = bytes(range(256)) * 4096  # 1 MiB: past what the service writes before relaying output
    assert sandbox.exec(["cat"], input=big).result(timeout=30).stdout_bytes == big
    with pytest.raises(ValueError, match="not both"):
        sandbox.exec(["cat"], stdin=True, input=b"x")

    async def main() -> str:
        return (await sandbox.exec(["wc", "-c"], input=b"12345")).stdout.strip()

    assert asyncio.run(main()) == "5"


def test_stdin_eof_and_interaction(sandbox: Sandbox) -> None:
    process = sandbox.exec(["sort"], stdin=True)
    assert process.stdin is not None
    for word in ["pear", "apple", "fig"]:
        process.stdin.writeline(word)
    time.sleep(0.2)
    assert process.poll() is None  # sort waits for EOF
    process.stdin.close()
    assert process.result(timeout=30).stdout == "apple\nfig\npear\n"

    shell = sandbox.exec(["sh"], stdin=True)
    assert shell.stdin is not None
    lines = shell.stdout.lines()
    shell.stdin.writeline("echo first")
    assert next(lines) == "first\n"  # answered before stdin is closed
    shell.stdin.writeline("echo second; exit 7")
    assert next(lines) == "second\n"
    assert shell.wait(timeout=30) == 7
    with pytest.raises(aviato.SandboxExecutionError):
        shell.stdin.write(b"echo after exit\n")


@pytest.mark.slow
def test_stdin_backpressure_and_large_input(sandbox: Sandbox) -> None:
    # `sleep` first: nothing reads stdin for a while, so the writer must wait, not buffer 64 MiB.
    process = sandbox.exec(["sh", "-c", "sleep 1; wc -c"], stdin=True)
    assert process.stdin is not None
    block = b"z" * (1024 * 1024)
    t0 = time.monotonic()
    refs = [process.stdin.write(block) for _ in range(64)]
    time.sleep(0.3)
    assert sum(r.done() for r in refs) < 64  # bounded buffering
    for ref in refs:
        ref.result(timeout=60)
    process.stdin.close()
    assert time.monotonic() - t0 > 0.5
    assert process.result(timeout=60).stdout.strip() == str(64 * 1024 * 1024)


def test_stdin_async(sandbox: Sandbox) -> None:
    async def main() -> str:
        process = sandbox.exec(["cat"], stdin=True)
        assert process.stdin is not None
        await process.stdin.writeline("from async")
        await process.stdin.close()
        return (await process).stdout

    assert asyncio.run(main()) == "from async\n"


@pytest.mark.slow
def test_exec_timeout_kills_the_command(sandbox: Sandbox) -> None:
    t0 = time.monotonic()
    process = sandbox.exec(["sh", "-c", "echo started; sleep 30"], timeout_seconds=1)
    with pytest.raises(aviato.SandboxTimeoutError) as info:
        process.result(timeout=30)
    assert time.monotonic() - t0 < 10
    assert info.value.exec_result is not None and info.value.exec_result.timed_out
    assert info.value.exec_result.stdout == "started\n"


def test_result_timeout_is_standard_and_retriable(sandbox: Sandbox) -> None:
    process = sandbox.exec(["cat"], stdin=True)
    with pytest.raises(TimeoutError):
        process.result(timeout=0.3)
    assert process.stdin is not None
    process.stdin.close()
    assert process.result(timeout=30).returncode == 0


@pytest.mark.slow
def test_cancel_kills_the_remote_command(sandbox: Sandbox) -> None:
    marker = f"/tmp/cancel-{time.monotonic_ns()}"
    process = sandbox.exec(["sh", "-c", f"sleep 2 && touch {marker}"])
    time.sleep(0.3)
    assert process.cancel()
    time.sleep(2.5)
    check = sandbox.exec(["sh", "-c", f"test -e {marker} && echo exists || echo absent"])
    assert check.result().stdout == "absent\n"
    ps = sandbox.exec(["sh", "-c", "ps -eo args 2>/dev/null || ls /proc"]).result()
    assert "sleep 2" not in ps.stdout


def test_argument_validation(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError):
        sandbox.exec([])
    with pytest.raises(TypeError):
        sandbox.exec("echo hi")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sandbox.exec(["pwd"], cwd="relative")


def test_missing_executable_exits_127_like_a_shell(sandbox: Sandbox) -> None:
    result = sandbox.exec(["/no/such/binary"]).result(timeout=30)
    assert result.returncode == 127
    assert "/no/such/binary: command not found" in result.stderr
    with pytest.raises(aviato.SandboxExecutionError) as caught:
        sandbox.exec(["no-such-program"], check=True).result(timeout=30)
    assert caught.value.exec_result is not None
    assert caught.value.exec_result.returncode == 127


def test_exec_on_unstarted_sandbox_starts_and_waits() -> None:
    sb = Sandbox(tags=[TEST_TAG])
    try:
        assert sb.exec(["echo", "auto"]).result(timeout=60).stdout == "auto\n"
        assert sb.sandbox_id is not None
    finally:
        sb.stop().result(timeout=30)


def test_100_execs_over_10_sandboxes_run_concurrently() -> None:
    sandboxes = [Sandbox.run(tags=[TEST_TAG]) for _ in range(10)]
    try:
        for sb in sandboxes:
            sb.wait()
        t0 = time.monotonic()
        processes = [
            sb.exec(["sh", "-c", f"sleep 0.3; echo {i}"]) for i in range(10) for sb in sandboxes
        ]
        fired = time.monotonic() - t0
        results = [p.result(timeout=60) for p in processes]
        total = time.monotonic() - t0
        assert fired < 1.0  # exec() returns at once
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(10) for _ in sandboxes]
        assert total < 3.0, f"100 x 0.3 s took {total:.1f} s: not concurrent"
    finally:
        for ref in [sb.stop() for sb in sandboxes]:
            ref.result(timeout=60)


@pytest.mark.slow
def test_aviato_wait_and_results(sandbox: Sandbox) -> None:
    fast = sandbox.exec(["echo", "fast"])
    slow = sandbox.exec(["sleep", "3"])
    done, pending = aviato.wait([slow, fast], num_returns=1, timeout=10)
    assert done == [fast] and pending == [slow]
    assert aviato.results(fast).stdout == "fast\n"
    assert [r.returncode for r in aviato.results([fast, slow])] == [0, 0]
    done, pending = aviato.wait([sandbox, fast])
    assert len(done) == 2 and pending == []
    with pytest.raises(ValueError):
        aviato.wait([fast], num_returns=0)


def test_protected_exec_runs_out_of_reach_of_other_commands(sandbox: Sandbox) -> None:
    """`protected=True` through the SDK, sync and async: a uid of its own, the same files."""
    import os

    if os.geteuid() != 0:
        with pytest.raises(aviato.SandboxError, match="protected"):
            sandbox.exec(["true"], protected=True).result()
        return
    sandbox.exec(["sh", "-c", "echo data > /workspace/p; chmod 600 /workspace/p"]).result()
    r = sandbox.exec(["sh", "-c", "id -u; cat /workspace/p"], protected=True).result()
    assert r.stdout.split() == ["65536", "data"]

    async def run() -> str:
        result = await sandbox.exec(["id", "-u"], protected=True)
        return result.stdout

    assert asyncio.run(run()).strip() == "65536"
