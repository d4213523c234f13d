"""The log of a sandbox's main process: `LogRecord` (one entry) and `LogStream` (the entries, as
`Sandbox.stream_logs` returns them)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal, Self

from aviato._bridge import await_concurrent, get_bridge
from aviato._transport.base import LogReader
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["LogRecord", "LogStream"]


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One entry of a main process's output: what it wrote at once, to one stream.

    ``data`` is the raw bytes (usually one line); ``text`` decodes them as UTF-8."""

    time: datetime | None
    stream: Literal["stdout", "stderr"]
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    @classmethod
    def _of(cls, entry: pb.LogEntry) -> LogRecord:
        time = entry.time.ToDatetime().replace(tzinfo=UTC) if entry.HasField("time") else None
        stream: Literal["stdout", "stderr"] = (
            "stderr" if entry.stream == pb.STREAM_STDERR else "stdout"
        )
        return cls(time=time, stream=stream, data=entry.data)


class LogStream:
    """The records of a sandbox's main process log (`Sandbox.stream_logs`), in order.

    Iterate with ``for record in logs`` or ``async for record in logs`` (from any thread or event
    loop). Without ``follow`` the iteration ends with the records written so far; with it, it
    goes on as the process writes and ends when the sandbox ends. Each record is fetched when
    asked for, so a slow consumer holds the stream back and memory stays at one record.
    ``close()`` (or leaving ``with``/``async with``) ends it early. Iterate it once.
    """

    def __init__(self, open_: Callable[[], Awaitable[LogReader]]) -> None:
        self._opened = get_bridge().submit(self._open(open_))
        self._reader: LogReader | None = None
        self._closed = False

    @staticmethod
    async def _open(open_: Callable[[], Awaitable[LogReader]]) -> LogReader:
        return await open_()

    # loop-side
    async def _next(self) -> LogRecord | None:
        if self._closed:
            return None
        if self._reader is None:
            try:
                self._reader = await asyncio.wrap_future(self._opened)
            except BaseException:
                self._closed = True
                raise
        try:
            entry = await self._reader.next()
        except BaseException:
            self._closed = True
            raise
        if entry is None:
            self._closed = True
            return None
        return LogRecord._of(entry)

    def _cancel(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
        elif not self._opened.done():
            self._opened.cancel()
        else:
            with contextlib.suppress(BaseException):
                self._opened.result().cancel()

    def __iter__(self) -> Iterator[LogRecord]:
        return self

    def __next__(self) -> LogRecord:
        record = get_bridge().run(self._next())
        if record is None:
            raise StopIteration
        return record

    def __aiter__(self) -> AsyncIterator[LogRecord]:
        return self

    async def __anext__(self) -> LogRecord:
        record = await await_concurrent(get_bridge().submit(self._next()))
        if record is None:
            raise StopAsyncIteration
        return record

    def close(self) -> None:
        """Ends the stream (idempotent); iteration then stops."""
        bridge = get_bridge()
        if bridge.started:
            with contextlib.suppress(RuntimeError):
                bridge.call_soon(self._cancel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"<LogStream {'closed' if self._closed else 'open'}>"
