"""The output streams of a command, in bounded memory: `StreamReader` and what feeds it.

A command can write without end (``yes``), and its sandbox may be hostile: nothing here may grow
with the size of the output. Each stream (stdout, stderr) of a command has one `OutputBuffer`,
fed by the exec driver on the SDK's loop, and one `StreamReader`, read from any thread or loop:

- the first `limit` bytes (``max_output_bytes``, 64 MiB by default) are kept for the
  `ProcessResult`; the reader reads them from there too, without a copy of its own;
- the bytes after them go to the reader alone, through a window of `STREAM_WINDOW_BYTES`. While
  a read loop is open on the reader (a ``for``/``async for`` over it, or over its ``lines()``,
  that has not ended or been dropped), a full window makes the driver stop reading the call:
  gRPC's flow control then stops the service, whose supervisor stops reading the command's pipe,
  and the command waits (backpressure, as a pipe to a slow reader). With no read loop open,
  bytes that do not fit are dropped, so ``.result()`` never waits for a reader that stopped
  reading; a reader that reads on later gets what was kept, then `SandboxExecutionError` where
  the output was cut;
- dropped or not, every byte is counted: `truncated` tells whether the stream was longer than
  `limit`.

At most ``limit + STREAM_WINDOW_BYTES`` (plus one frame) per stream, whatever the command
writes. What this cannot bound: the text a caller keeps of what it read.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Generic, TypeVar

from aviato._bridge import await_concurrent, get_bridge
from aviato._defaults import DEFAULT_MAX_OUTPUT_BYTES
from aviato.exceptions import SandboxExecutionError

__all__ = ["MAX_LINE_CHARS", "STREAM_WINDOW_BYTES", "LineIterator", "OutputBuffer", "StreamReader"]

STREAM_WINDOW_BYTES = 4 * 1024 * 1024
MAX_LINE_CHARS = 1024 * 1024  # longer lines come out of `lines()` in pieces of this size
_MAX_READ_CHUNK = 1024 * 1024
T = TypeVar("T")
ItemT = TypeVar("ItemT", str, bytes)


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB"


async def _run_on_bridge(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine on the SDK's loop and awaits it from whatever loop is running."""
    return await await_concurrent(get_bridge().submit(coro))


class OutputBuffer:
    """One output stream of a command (see the module docstring). Loop-side only."""

    def __init__(self, limit: int = DEFAULT_MAX_OUTPUT_BYTES, name: str = "output") -> None:
        self.limit = limit
        self.name = name
        self.head: bytearray | bytes = bytearray()  # the first `limit` bytes
        self.total = 0  # every byte of the stream, kept or not
        self.closed = False
        self.error: BaseException | None = None
        self.loops = 0  # read loops open on the reader
        self.detached = False  # the reader was closed: nothing is kept for it
        self.lost_at: int | None = None  # the reader cannot be served from this offset on
        self._window: deque[bytes] = deque()
        self._window_bytes = 0
        self._taken = 0  # bytes the reader took from the window
        self._waiters: list[asyncio.Future[None]] = []

    # -- the driver's side --

    @property
    def truncated(self) -> bool:
        """True when the stream was longer than `limit` (the head is not all of it)."""
        return self.total > self.limit

    def append(self, chunk: bytes) -> None:
        n = len(chunk)
        if not n:
            return
        self.total += n
        view = memoryview(chunk)
        room = self.limit - len(self.head)
        if room > 0:
            assert isinstance(self.head, bytearray)  # frozen only once the stream has ended
            self.head += view[:room]
            view = view[room:]
        if view and not self.detached and self.lost_at is None:
            if self.loops == 0 and self._window_bytes + len(view) > STREAM_WINDOW_BYTES:
                # nobody reads: drop rather than wait (or grow)
                self.lost_at = self.limit + self._taken + self._window_bytes
            else:
                self._window.append(bytes(view))
                self._window_bytes += len(view)
        self.wake()

    def full(self) -> bool:
        """True while an open read loop has a full window: the driver must wait (`room()`)."""
        return self.loops > 0 and not self.detached and self._window_bytes >= STREAM_WINDOW_BYTES

    async def room(self) -> None:
        """Waits until `full()` is False."""
        while self.full() and not self.closed:
            await self.wait()

    def close(self, error: BaseException | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.error = error
            self.wake()

    def freeze(self) -> bytes:
        """The kept head as bytes (shared from then on with whoever holds the result)."""
        if isinstance(self.head, bytearray):
            self.head = bytes(self.head)
        return self.head

    # -- the reader's side --

    def open_loop(self) -> None:
        self.loops += 1

    def close_loop(self) -> None:
        self.loops -= 1
        self.wake()

    def detach(self) -> None:
        self.detached = True
        self._window.clear()
        self._window_bytes = 0
        self.wake()

    def take(self, limit: int) -> bytes:
        """Up to `limit` bytes from the window (the bytes after the head), in order."""
        parts: list[bytes] = []
        size = 0
        while self._window and size < limit:
            chunk = self._window.popleft()
            if size + len(chunk) > limit:
                cut = limit - size
                self._window.appendleft(chunk[cut:])
                chunk = chunk[:cut]
            parts.append(chunk)
            size += len(chunk)
        if size:
            self._window_bytes -= size
            self._taken += size
            self.wake()  # the driver may wait for room
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def lost_error(self) -> SandboxExecutionError:
        assert self.lost_at is not None
        return SandboxExecutionError(
            f"{self.name}: the output from byte {self.lost_at} on was not kept: no loop was "
            f"reading this stream when it arrived (the first max_output_bytes="
            f"{_mib(self.limit)} and a {_mib(STREAM_WINDOW_BYTES)} window are kept). Read it "
            "while the command runs, or raise max_output_bytes"
        )


class StreamReader:
    """The live output of a command (stdout or stderr), as text.

    Iterate with ``for chunk in reader`` or ``async for chunk in reader`` (from any thread or
    event loop): each item is the text that arrived since the previous one (chunks are not
    lines; use ``reader.lines()`` for lines). Iteration ends when the command's stream ends, and
    raises the command's error if the output was cut short (e.g. the connection was lost). A
    reader keeps its position: a second loop continues where the first stopped. Text is decoded as
    UTF-8 incrementally, so a character split across chunks is decoded correctly.

    Memory stays bounded, whatever the command writes: while a loop is reading (it has not ended
    and has not been dropped, e.g. by ``break``), a reader that falls 4 MiB behind holds the
    command back rather than buffering (backpressure); a stream nobody reads keeps only its first
    ``max_output_bytes`` (for the `ProcessResult`) and a 4 MiB window after them. A reader that
    starts, or goes on, after more than that was dropped gets what was kept, then
    `SandboxExecutionError`. ``close()`` a reader you will not read again.
    """

    def __init__(self, buffer: OutputBuffer, name: str) -> None:
        self._buffer = buffer
        self.name = name
        self._pos = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._closed = False
        self._finished = False

    # loop-side
    async def _next_bytes(self) -> bytes | None:
        """The next raw chunk as it arrived, or None at the end of the stream."""
        buf = self._buffer
        while True:
            if self._closed or self._finished:
                return None
            if self._pos < len(buf.head):
                end = min(len(buf.head), self._pos + _MAX_READ_CHUNK)
                with memoryview(buf.head) as view:  # one copy, and the view is released
                    raw = bytes(view[self._pos : end])
            elif len(buf.head) >= buf.limit:
                raw = buf.take(_MAX_READ_CHUNK)
            else:
                raw = b""
            if raw:
                self._pos += len(raw)
                return raw
            if buf.lost_at is not None and self._pos >= buf.lost_at:
                self._finished = True
                raise buf.lost_error()
            if buf.closed:
                self._finished = True
                if buf.error is not None:
                    raise buf.error
                return None
            await buf.wait()

    async def _next_chunk(self) -> str | None:
        if self._pending:
            text, self._pending = self._pending, ""
            return text
        while True:
            if self._finished or self._closed:
                return None
            raw = await self._next_bytes()
            if raw is None:
                return self._decoder.decode(b"", final=True) or None
            text = self._decoder.decode(raw)
            if text:
                return text

    async def _next_line(self) -> str | None:
        parts: list[str] = []
        size = 0
        while True:
            chunk = await self._next_chunk()
            if chunk is None:
                return "".join(parts) or None
            newline = chunk.find("\n", 0, MAX_LINE_CHARS - size)
            if newline >= 0:
                parts.append(chunk[: newline + 1])
                self._pending = chunk[newline + 1 :]
                return "".join(parts)
            if size + len(chunk) >= MAX_LINE_CHARS:
                # a line without end must not grow without end: hand it out in pieces
                cut = MAX_LINE_CHARS - size
                parts.append(chunk[:cut])
                self._pending = chunk[cut:]
                return "".join(parts)
            parts.append(chunk)
            size += len(chunk)

    # read loops: each holds the command back while it is open (see the class docstring)
    def _loop_opened(self) -> None:
        get_bridge().call_soon(self._buffer.open_loop)

    def _loop_closed(self) -> None:
        bridge = get_bridge()
        if bridge.started:
            with contextlib.suppress(RuntimeError):  # the loop has shut down
                bridge.call_soon(self._buffer.close_loop)

    # sync and async iteration
    def __iter__(self) -> Iterator[str]:
        return _ReadLoop(self, self._next_chunk)

    def __next__(self) -> str:
        """One chunk (a bare ``next(reader)`` is not a read loop: it does not hold the command
        back between calls)."""
        chunk = get_bridge().run(self._next_chunk())
        if chunk is None:
            raise StopIteration
        return chunk

    def __aiter__(self) -> AsyncIterator[str]:
        return _ReadLoop(self, self._next_chunk)

    async def __anext__(self) -> str:
        chunk = await _run_on_bridge(self._next_chunk())
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    def iter_bytes(self) -> _ReadLoop[bytes]:
        """Iterates (``for``/``async for``) over the raw bytes as they arrived, undecoded (for
        binary output, or a terminal's bytes relayed as they are). Do not mix with text
        iteration on the same reader: a character split across the switch would be lost."""
        return _ReadLoop(self, self._next_bytes)

    def lines(self) -> LineIterator:
        """Iterates (``for``/``async for``) over whole lines, each ending in ``"\\n"`` except
        possibly the last. A line longer than 1 MiB (of text) comes in pieces of 1 MiB, only
        the last of which ends in ``"\\n"``: a command cannot make a line that fills memory."""
        return LineIterator(self)

    def read(self) -> str:
        """Blocks until the stream ends and returns the rest of its text."""
        return "".join(self)

    def close(self) -> None:
        """Stops this reader: iteration ends, and nothing more is kept for it (the command is not
        affected; its `ProcessResult` still gets the first ``max_output_bytes``)."""
        self._closed = True
        bridge = get_bridge()
        if bridge.started:
            bridge.call_soon(self._buffer.detach)

    def __repr__(self) -> str:
        return f"<StreamReader {self.name}>"


class _ReadLoop(Generic[ItemT]):
    """One ``for``/``async for`` over a reader: open (holding the command back when it falls
    behind) from its creation until it ends or is dropped."""

    def __init__(
        self, reader: StreamReader, step: Callable[[], Coroutine[Any, Any, ItemT | None]]
    ) -> None:
        self._reader = reader
        self._step: Callable[[], Coroutine[Any, Any, ItemT | None]] = step
        self._open = True
        reader._loop_opened()

    def _end(self) -> None:
        if self._open:
            self._open = False
            self._reader._loop_closed()

    def __iter__(self) -> _ReadLoop[ItemT]:
        return self

    def __next__(self) -> ItemT:
        try:
            item = get_bridge().run(self._step())
        except BaseException:
            self._end()
            raise
        if item is None:
            self._end()
            raise StopIteration
        return item

    def __aiter__(self) -> _ReadLoop[ItemT]:
        return self

    async def __anext__(self) -> ItemT:
        try:
            item = await _run_on_bridge(self._step())
        except BaseException:
            self._end()
            raise
        if item is None:
            self._end()
            raise StopAsyncIteration
        return item

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._end()


class LineIterator(_ReadLoop[str]):
    """Lines of a `StreamReader`, sync or async (see `StreamReader.lines`)."""

    def __init__(self, reader: StreamReader) -> None:
        super().__init__(reader, reader._next_line)
