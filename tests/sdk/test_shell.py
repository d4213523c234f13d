"""`Sandbox.shell()`: the image's shell on a real pseudo-terminal, driven from Python as an agent
would: wait for the prompt, type, resize, Ctrl-C a running command (the shell stays), drive
`python3`'s REPL, pass raw bytes unchanged; sync and async; and reattach to a shell by its id."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from _wait import wait_until

from aviato import Process, Sandbox

PROMPT = b"READY> "


def _read_until(chunks: Iterator[bytes], marker: bytes, seen: bytearray) -> bytes:
    """Appends chunks to `seen` until `marker` appears in it; returns everything read."""
    while marker not in seen:
        seen += next(chunks)
    return bytes(seen)


def _type(process: Process, chunks: Iterator[bytes], line: bytes, marker: bytes) -> bytes:
    """Types `line` and Enter; returns what the terminal showed up to `marker`."""
    assert process.stdin is not None
    process.stdin.write(line + b"\r").result(timeout=30)
    return _read_until(chunks, marker, bytearray())


def _wait_for_program(sandbox: Sandbox, name: str) -> None:
    probe = ["sh", "-c", f"grep -l '^{name}' /proc/[0-9]*/cmdline 2>/dev/null; true"]
    wait_until(lambda: sandbox.exec(probe).result(timeout=30).stdout.strip(), f"{name} to run")


def _started_shell(
    sandbox: Sandbox, size: tuple[int, int] = (24, 80)
) -> tuple[Process, Iterator[bytes]]:
    process = sandbox.shell(tty_size=size)
    chunks = iter(process.stdout.iter_bytes())
    assert process.stdin is not None
    # The image's rc files may set their own prompt: set a known one, then wait for it.
    process.stdin.write(b"PS1='READY''> '\r").result(timeout=30)
    _read_until(chunks, PROMPT, bytearray())
    return process, chunks


@pytest.mark.slow
def test_a_shell_follows_input_resize_and_ctrl_c(sandbox: Sandbox) -> None:
    process, chunks = _started_shell(sandbox, (30, 100))
    assert process.tty and process.exec_id is not None
    out = _type(process, chunks, b"stty size; tty", PROMPT)
    assert b"30 100" in out and b"/dev/pts/" in out

    process.resize(50, 140).result(timeout=30)
    # bash redraws its prompt on SIGWINCH; the answer is in words that the echo has not
    _type(
        process, chunks, b'echo "size-$(stty size)-cols-$COLUMNS-end"', b"size-50 140-cols-140-end"
    )

    assert process.stdin is not None
    process.stdin.write(b"sleep 61; echo finished\r").result(timeout=30)
    _read_until(chunks, b"sleep 61; echo finished\r\n", bytearray())
    _wait_for_program(sandbox, "sleep")  # a Ctrl-C before it runs would reach the shell
    process.stdin.write(b"\x03").result(timeout=30)  # Ctrl-C: interrupts sleep, not the shell
    _read_until(chunks, PROMPT, bytearray())
    out = _type(process, chunks, b"echo status-$?", PROMPT)
    assert b"status-130" in out and b"finished" not in out

    # Raw input: with the terminal in raw mode, every byte reaches the program unchanged
    # (Ctrl-C included, as a byte rather than a signal).
    line = b"stty raw -echo; echo RAW''-ON; head -c 7 | od -An -tx1; stty sane\r"
    process.stdin.write(line).result(timeout=30)
    _read_until(chunks, b"RAW-ON", bytearray())
    process.stdin.write(b"\x01\x03\x1b[A\xff\x7f").result(timeout=30)
    out = _read_until(chunks, PROMPT, bytearray())
    assert b"01 03 1b 5b 41 ff 7f" in out

    process.stdin.write(b"exit 3\r").result(timeout=30)
    assert process.wait(timeout=30) == 3


@pytest.mark.slow
def test_python_in_the_shell(sandbox: Sandbox) -> None:
    process, chunks = _started_shell(sandbox)
    assert process.stdin is not None
    _type(process, chunks, b"python3 -q", b">>> ")
    assert b"42" in _type(process, chunks, b"6 * 7", b">>> ")
    process.stdin.write(b"import time; time.sleep(60)\r").result(timeout=30)
    _read_until(chunks, b"time.sleep(60)\r\n", bytearray())
    time.sleep(0.5)  # python runs the line at once; the sleep is well under way
    process.stdin.write(b"\x03").result(timeout=30)
    assert b"KeyboardInterrupt" in _read_until(chunks, b">>> ", bytearray())
    assert b"still here" in _type(process, chunks, b"print('still', 'here')", b">>> ")
    _type(process, chunks, b"exit()", PROMPT)  # back in the shell
    process.stdin.write(b"exit\r").result(timeout=30)
    assert process.wait(timeout=30) == 0


async def _until(chunks: AsyncIterator[bytes], marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        try:
            seen += await anext(chunks)
        except StopAsyncIteration:
            ended = f"the terminal ended before {marker!r}; it showed {seen!r}"
            raise AssertionError(ended) from None
    return seen


@pytest.mark.slow
def test_an_async_shell_and_reattaching_to_it(sandbox: Sandbox) -> None:
    """From async code; then the handle detaches (as a lost connection would) and a new one
    attaches by id: the screen so far, then the same shell, with its state."""

    async def body() -> tuple[bytes, bytes, int]:
        process = sandbox.shell()
        assert process.stdin is not None
        chunks = aiter(process.stdout.iter_bytes())
        await process.stdin.write(b"PS1='READY''> '; x=kept\r")
        await _until(chunks, PROMPT)
        exec_id = await process.started()
        process.detach()

        again = sandbox.attach(exec_id)
        assert again.stdin is not None
        replay = aiter(again.stdout.iter_bytes())
        screen = await _until(replay, PROMPT)  # what the shell showed before
        await again.stdin.write(b"echo value-$x\r")
        answer = await _until(replay, b"value-kept\r\n")
        await again.resize(40, 90)  # a terminal's size follows the new window
        await again.stdin.write(b"stty size; exit 4\r")
        rest = await _until(replay, b"40 90")
        return screen, answer + rest, (await again).returncode

    screen, answer, code = asyncio.run(body())
    assert PROMPT in screen and b"value-kept" in answer and code == 4
