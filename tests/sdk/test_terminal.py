"""A terminal driven from Python (`exec(..., tty=True)`) against the real service: prompt,
input, resize, Ctrl-C; and raw output relayed undecoded."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

from _wait import wait_until

from aviato import Process, Sandbox


def _read_until(chunks: Iterator[bytes], marker: bytes, seen: bytearray) -> bytes:
    """Appends chunks to `seen` until `marker` appears in it; returns everything read."""
    while marker not in seen:
        seen += next(chunks)
    return bytes(seen)


def _shell(sandbox: Sandbox, size: tuple[int, int]) -> Process:
    # A known prompt, so that the test waits on the shell instead of sleeping.
    return sandbox.exec(
        ["bash", "--norc", "--noprofile", "-i"], tty=True, tty_size=size, env={"PS1": "READY> "}
    )


def test_a_shell_on_a_terminal_follows_input_resize_and_ctrl_c(sandbox: Sandbox) -> None:
    process = _shell(sandbox, (30, 100))
    assert process.stdin is not None
    chunks = iter(process.stdout.iter_bytes())
    seen = bytearray()
    _read_until(chunks, b"READY> ", seen)

    seen.clear()
    process.stdin.write(b"stty size; tty\r")
    out = _read_until(chunks, b"READY> ", seen)
    assert b"30 100" in out and b"/dev/pts/" in out  # a real pseudo-terminal, echo included

    process.resize(45, 132).result(timeout=30)
    seen.clear()
    process.stdin.write(b"stty size\r")
    # bash redraws its prompt on SIGWINCH: skip to the command's echo, then to the next prompt
    seen = bytearray(_read_until(chunks, b"stty size\r\n", seen).partition(b"stty size\r\n")[2])
    assert b"45 132" in _read_until(chunks, b"READY> ", seen)

    seen.clear()
    process.stdin.write(b"sleep 61\r")
    probe = ["sh", "-c", "grep -l '^sleep' /proc/[0-9]*/cmdline 2>/dev/null; true"]
    wait_until(lambda: sandbox.exec(probe).result(timeout=30).stdout.strip(), "sleep to run")
    seen.clear()
    process.stdin.write(b"\x03")  # Ctrl-C, as a terminal sends it: interrupts sleep, not bash
    _read_until(chunks, b"READY> ", seen)
    seen.clear()
    process.stdin.write(b"echo status-$?\r")
    assert b"status-130\r\n" in _read_until(chunks, b"READY> ", seen)

    process.stdin.write(b"exit 3\r")
    assert process.wait(timeout=30) == 3
    assert process.result().stderr == ""  # a terminal has one output


def test_a_signal_and_async_raw_output(sandbox: Sandbox) -> None:
    process = sandbox.exec(
        ["sh", "-c", "trap 'printf \"\\377got INT\\n\"; exit 9' INT; echo ready; sleep 60 & wait"],
        stdin=True,
        max_output_bytes=0,
    )

    async def drive() -> bytes:
        seen = b""
        async for chunk in process.stdout.iter_bytes():
            seen += chunk
            if seen == b"ready\n":
                await process.send_signal(signal.SIGINT)
        return seen

    assert asyncio.run(drive()) == b"ready\n\xffgot INT\n"
    assert process.wait(timeout=30) == 9
