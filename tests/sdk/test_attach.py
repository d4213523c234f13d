"""Commands that outlive their connection, from the SDK: `Process.exec_id`, `Sandbox.attach`,
`Sandbox.processes`, `Process.detach`; a client killed mid-command and a new process that
attaches and gets every byte and the exit status."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from _wait import wait_until

from aviato import ProcessInfo, Sandbox
from aviato.exceptions import SandboxExecutionError, SandboxNotFoundError


def test_exec_id_attach_after_exit_and_processes(sandbox: Sandbox) -> None:
    process = sandbox.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    result = process.result(timeout=30)
    assert result.returncode == 7
    exec_id = process.exec_id
    assert exec_id is not None and exec_id.startswith("exec-")
    assert process.started().result(timeout=5) == exec_id

    again = sandbox.attach(exec_id)
    replay = again.result(timeout=30)
    assert (replay.stdout, replay.stderr, replay.returncode) == ("out\n", "err\n", 7)
    assert again.command == ["sh", "-c", "echo out; echo err >&2; exit 7"]
    assert again.dropped_bytes == 0 and again.exec_id == exec_id
    assert sandbox.attach(exec_id, offset=4).result(timeout=30).stderr == "err\n"

    listed = {p.exec_id: p for p in sandbox.processes().result(timeout=30)}
    info = listed[exec_id]
    assert isinstance(info, ProcessInfo)
    assert (info.state, info.returncode, info.output_bytes) == ("exited", 7, 8)
    assert info.started_at is not None and info.ended_at is not None

    with pytest.raises(SandboxNotFoundError, match="no command"):
        sandbox.attach("exec-" + "0" * 32).result(timeout=30)
    with pytest.raises(ValueError, match="exec_id"):
        sandbox.attach("")


def test_detach_leaves_the_command_running_and_cancel_kills_it(sandbox: Sandbox) -> None:
    process = sandbox.exec(["sh", "-c", "echo up; read x; echo got-$x; exit 5"], stdin=True)
    assert next(iter(process.stdout)) == "up\n"
    exec_id = process.started().result(timeout=10)
    process.detach()
    with pytest.raises(SandboxExecutionError, match="detached"):
        process.result(timeout=10)
    state = {p.exec_id: p.state for p in sandbox.processes().result(timeout=30)}
    assert state[exec_id] == "running"

    again = sandbox.attach(exec_id)
    assert again.stdin is not None
    again.stdin.write(b"it\n")
    again.stdin.close()
    assert again.result(timeout=30).stdout == "up\ngot-it\n" and again.returncode == 5

    # RunCommand (no stream): the id comes in the first frame, or ahead of it for a command
    # silent at first; either way cancel() kills the command by its id.
    talkative = sandbox.exec(["sh", "-c", "echo up; exec sleep 300"])
    assert next(iter(talkative.stdout)) == "up\n"
    silent = sandbox.exec(["sleep", "300"])
    for doomed in (talkative, silent):
        doomed_id = doomed.started().result(timeout=10)
        assert doomed.cancel()

        def ended(exec_id: str = doomed_id) -> bool:
            states = {p.exec_id: p.state for p in sandbox.processes().result(timeout=30)}
            return states[exec_id] != "running"

        wait_until(ended, "the cancelled command to be killed", timeout=10)


def test_attach_from_async_code(sandbox: Sandbox) -> None:
    async def body() -> tuple[str, int]:
        process = sandbox.exec(["sh", "-c", "echo a; sleep 0.2; echo b"])
        exec_id = await process.started()
        follower = sandbox.attach(exec_id)
        seen = "".join([chunk async for chunk in follower.stdout])
        result = await follower
        await process
        return seen, result.returncode

    assert asyncio.run(body()) == ("a\nb\n", 0)


CLIENT = """
import sys
from aviato import Sandbox
sb = Sandbox.from_id(sys.argv[1]).result()
p = sb.exec(["sh", "-c", "for i in $(seq 1 400); do echo line-$i; sleep 0.005; done; exit 5"])
print(p.started().result(), flush=True)
for chunk in p.stdout:
    if "line-3" in chunk:
        print("reading", flush=True)
        break
import time
time.sleep(600)
"""


@pytest.mark.slow
def test_a_client_killed_mid_command_and_a_new_process_attaching(sandbox: Sandbox) -> None:
    """SIGKILL the process that started a command while it streams; the command runs to its
    end, and a new process attaches and receives every byte and the exit status."""
    client = subprocess.Popen(
        [sys.executable, "-u", "-c", CLIENT, sandbox.sandbox_id or ""],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert client.stdout is not None
    exec_id = client.stdout.readline().strip()
    assert client.stdout.readline().strip() == "reading"
    os.kill(client.pid, signal.SIGKILL)
    client.wait(10)
    listed = {p.exec_id: p for p in sandbox.processes().result(timeout=30)}
    assert listed[exec_id].state == "running", "the command died with its client"

    attach = """
import sys
from aviato import Sandbox
p = Sandbox.from_id(sys.argv[1]).result().attach(sys.argv[2])
r = p.result(timeout=60)
sys.stdout.write(r.stdout)
print("exit", r.returncode, p.dropped_bytes)
"""
    out = subprocess.run(
        [sys.executable, "-c", attach, sandbox.sandbox_id or "", exec_id],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    expected = "".join(f"line-{i}\n" for i in range(1, 401))
    assert out.stdout == expected + "exit 5 0\n"


def test_a_command_cancelled_at_once_is_killed_not_left_running(sandbox: Sandbox) -> None:
    """Cancelled before its handle read anything (the id still on its way): killed anyway."""
    marker = f"sleep {os.getpid() % 1000 + 4000}"
    for stdin in (True, False):
        process = sandbox.exec(["sh", "-c", f"exec {marker}"], stdin=stdin)
        started = time.monotonic()
        process.cancel()
        with pytest.raises(BaseException):  # noqa: B017 - cancelled, whatever the type
            process.result(timeout=10)
        assert time.monotonic() - started < 1.5  # not a 2 s wait for the id

        def gone() -> bool:
            probe = sandbox.exec(["sh", "-c", f"ps -eo args | grep -c '^{marker}'"])
            return probe.result(timeout=30).stdout.strip() == "0"

        wait_until(gone, "the cancelled command to be killed", timeout=10)
