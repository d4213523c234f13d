"""Relaying a command's bytes between this process's file descriptors and an SDK `Process`, for
`exec` and `sh`.

The SDK runs the command's stream on its own background loop; these helpers are the blocking
ends a command line needs: `OutputRelay` copies a stream's raw bytes (`iter_bytes`, undecoded)
to a descriptor on a thread of its own, `pump_fd` copies a descriptor into the command's stdin
and waits on each write, so that a fast local producer (`cat big.iso | aviato exec ...`) is held
back by the SDK's bounded stdin buffer instead of filling memory.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

from aviato import AviatoError, Process, StreamReader

STDIN_CHUNK_BYTES = 64 * 1024


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (a pipe or terminal may take less at a time)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class OutputRelay:
    """A thread that writes a stream's bytes to a descriptor as they arrive, until it ends.

    When the descriptor is closed under it (``aviato exec ... | head``), the copy stops,
    `on_broken` runs (the command line kills the command: nobody reads its output any more) and
    `broken` keeps the error. `join()` to know every byte is out."""

    def __init__(self, reader: StreamReader, fd: int, on_broken: Callable[[], object]) -> None:
        self.broken: OSError | None = None
        self._reader = reader
        self._fd = fd
        self._on_broken = on_broken
        self._thread = threading.Thread(target=self._copy, name=f"aviato-relay-{fd}", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        # A cut stream, or the SDK shutting down as we exit: the command's result says what
        # matters, never a thread's traceback.
        with contextlib.suppress(Exception):
            for chunk in self._reader.iter_bytes():
                try:
                    write_all(self._fd, chunk)
                except OSError as exc:
                    self.broken = exc
                    self._reader.close()
                    self._on_broken()
                    return

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def send_stdin(process: Process, data: bytes) -> bool:
    """Writes `data` to the command's stdin and waits until the SDK took it; False once the
    command no longer takes input."""
    assert process.stdin is not None
    try:
        process.stdin.write(data).result()
    except AviatoError:
        return False
    return True


def pump_fd(fd: int, process: Process) -> None:
    """Copies `fd` into the command's stdin until EOF (then closes its stdin) or until the
    command stops taking input. Meant for a daemon thread: a read that never returns (a pipe
    nobody closes) only keeps the thread waiting, never the command's exit."""
    assert process.stdin is not None
    while True:
        try:
            data = os.read(fd, STDIN_CHUNK_BYTES)
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(AviatoError):
                process.stdin.close()
            return
        if not send_stdin(process, data):
            return
