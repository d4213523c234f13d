"""The stdin of a command: `StreamWriter` (what ``exec(..., stdin=True)`` gives as
``process.stdin``) and `pump_stdin`, which feeds what it queued to the command's call.

Nothing here knows the wire: chunks go to a transport's `ExecCall`.
"""

from __future__ import annotations

import asyncio
from collections import deque

from aviato._operation import OperationRef
from aviato._transport.base import ExecCall
from aviato.exceptions import SandboxExecutionError

__all__ = ["STDIN_CHUNK_BYTES", "STDIN_MAX_BUFFERED_BYTES", "StreamWriter", "pump_stdin"]

STDIN_CHUNK_BYTES = 64 * 1024
STDIN_MAX_BUFFERED_BYTES = 1024 * 1024


class StreamWriter:
    """The stdin of a command started with ``exec(..., stdin=True)``.

    ``write(data)`` and ``writeline(text)`` return an `OperationRef` that completes when the data
    is accepted; at most ~1 MiB is buffered in the SDK beyond what the service has taken, so a
    writer that outpaces the command waits (backpressure: block on, or await, the returned refs).
    Writes are delivered in the order they were made. ``close()`` sends end-of-file; it is
    idempotent. Writing after ``close()``, or after the command exited, raises
    `SandboxExecutionError`.
    """

    def __init__(self, *, max_buffered_bytes: int = STDIN_MAX_BUFFERED_BYTES) -> None:
        self._max_buffered = max_buffered_bytes
        self._closed = False
        self._close_ref: OperationRef[None] | None = None
        self._failed: BaseException | None = None
        # loop-side state
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._queued = 0
        self._sent = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        return self._closed

    def write(self, data: bytes | bytearray | memoryview) -> OperationRef[None]:
        """Queues `data` for the command's stdin (see the class docstring)."""
        if isinstance(data, str):
            raise TypeError("StreamWriter.write() takes bytes; use writeline() or encode the text")
        if self._closed:
            raise SandboxExecutionError("cannot write: the stdin stream is closed")
        if self._failed is not None:
            raise SandboxExecutionError(
                f"cannot write: the stdin stream has failed ({self._failed})"
            )
        return OperationRef._of(self._write(bytes(data)))

    def writeline(self, text: str, encoding: str = "utf-8") -> OperationRef[None]:
        """Writes `text` followed by a newline."""
        return self.write((text + "\n").encode(encoding))

    def close(self) -> OperationRef[None]:
        """Sends end-of-file after everything written so far. Idempotent."""
        if self._close_ref is None:
            self._closed = True
            self._close_ref = OperationRef._of(self._close())
        return self._close_ref

    # loop-side
    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    async def _write(self, data: bytes) -> None:
        # Ordering: this runs up to its first await in the order the writes were made.
        if self._failed is not None:
            raise SandboxExecutionError(
                f"cannot write: the stdin stream has failed ({self._failed})"
            )
        for i in range(0, len(data), STDIN_CHUNK_BYTES):
            self._chunks.append(data[i : i + STDIN_CHUNK_BYTES])
        self._queued += len(data)
        end = self._queued
        self._wake()
        while self._failed is None and end - self._sent > self._max_buffered:
            await self._wait()
        if self._failed is not None and end > self._sent:
            raise SandboxExecutionError(f"stdin stream has failed ({self._failed})")

    async def _close(self) -> None:
        self._eof = True
        self._wake()

    async def _next_item(self) -> bytes | None:
        """For the exec driver: the next chunk to send, or None for end-of-file."""
        while True:
            if self._chunks:
                return self._chunks.popleft()
            if self._eof:
                return None
            await self._wait()

    def _mark_sent(self, n: int) -> None:
        self._sent += n
        self._wake()

    def _fail(self, reason: BaseException) -> None:
        if self._failed is None:
            self._failed = reason
        self._chunks.clear()
        self._wake()

    def __repr__(self) -> str:
        return f"<StreamWriter {'closed' if self._closed else 'open'}>"


async def pump_stdin(call: ExecCall, writer: StreamWriter) -> None:
    """Feeds what the writer queued to the command, in order, then end-of-file."""
    try:
        while True:
            item = await writer._next_item()
            if item is None:
                await call.close_stdin()
                return
            await call.write_stdin(item)
            writer._mark_sent(len(item))
    except asyncio.CancelledError:
        raise
    except Exception as err:  # the stream broke; the reader reports why
        writer._fail(err)
