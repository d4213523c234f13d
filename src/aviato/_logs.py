"""The log of a sandbox's main process: `LogRecord` (one entry), `LogStream` (the entries, as
`Sandbox.stream_logs` returns them) and `ResumingLogReader` (the stream under it, which reopens
itself after a lost connection)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from aviato._bridged_stream import BridgedStream
from aviato._client import Client
from aviato._transport.base import LogReader
from aviato._transport.errors import is_transient
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["LogRecord", "LogStream", "ResumingLogReader"]


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


class LogStream(BridgedStream[LogReader, LogRecord]):
    """The records of a sandbox's main process log (`Sandbox.stream_logs`), in order.

    Iterate with ``for record in logs`` or ``async for record in logs`` (from any thread or event
    loop). Without ``follow`` the iteration ends with the records written so far; with it, it
    goes on as the process writes and ends when the sandbox ends. Each record is fetched when
    asked for, so a slow consumer holds the stream back and memory stays at one record.
    ``close()`` (or leaving ``with``/``async with``) ends it early. Iterate it once.
    """

    def _item(self, raw: pb.LogEntry) -> LogRecord:
        return LogRecord._of(raw)

    def __repr__(self) -> str:
        return f"<LogStream {'closed' if self._closed else 'open'}>"


class ResumingLogReader(LogReader):
    """A StreamLogs stream that survives a lost connection (a restart of the service, a network
    that dropped): when the stream breaks because the service could not be reached, it opens
    it again, within the client's retry budget, from the time of the last entry it gave
    (`StreamLogsRequest.since`), and drops the entries of that very time it already gave. So no
    entry is lost or given twice, as long as the log's times do not go backwards (they are
    stamped as the supervisor writes them).

    `client` must be the one whose transport opens the stream; `request` is the first opening
    (its `tail` and `since` apply to it; later ones take every entry since the last);
    `call_timeout` bounds the whole stream, reopenings included."""

    def __init__(
        self,
        client: Client,
        request: pb.StreamLogsRequest,
        call_timeout: float | None,
        open_: Callable[[pb.StreamLogsRequest, float | None], Awaitable[LogReader]] | None = None,
    ) -> None:
        self._client = client
        self._request = request
        self._deadline = None if call_timeout is None else time.monotonic() + call_timeout
        self._open = open_ or (lambda r, t: client.transport.open_logs(r, call_timeout=t))
        self._reader: LogReader | None = None
        self._cancelled = False
        self._last_ns: int | None = None  # time of the last entry given
        self._given_at_last = 0  # entries of that time given
        self._skip = 0  # entries of that time the current stream will repeat

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def next(self) -> pb.LogEntry | None:
        while True:
            if self._reader is None:
                self._reader = await self._open(self._request, self._remaining())
            try:
                entry = await self._reader.next()
            except Exception as err:
                if self._cancelled or not is_transient(err):
                    raise
                entry = await self._resume()
            if entry is None:
                return None
            if self._take(entry):
                return entry

    def _take(self, entry: pb.LogEntry) -> bool:
        """Whether `entry` is new (not one a reopened stream repeats); notes it if so."""
        stamp = entry.time.ToNanoseconds() if entry.HasField("time") else None
        if self._skip and stamp == self._last_ns:
            self._skip -= 1
            return False
        self._skip = 0
        if stamp is not None:
            if stamp == self._last_ns:
                self._given_at_last += 1
            else:
                self._last_ns, self._given_at_last = stamp, 1
        return True

    async def _resume(self) -> pb.LogEntry | None:
        """Reopens the stream from the last entry's time (retrying while the service is
        unreachable); returns its first entry."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        request = pb.StreamLogsRequest()
        request.CopyFrom(self._request)
        if self._last_ns is not None:
            request.tail = -1
            request.since.FromNanoseconds(self._last_ns)

        async def attempt() -> tuple[LogReader, pb.LogEntry | None]:
            reader = await self._open(request, self._remaining())
            try:
                return reader, await reader.next()
            except BaseException:
                reader.cancel()
                raise

        reader, first = await self._client.with_retry(attempt, op="stream logs")
        self._reader = reader
        self._request = request
        self._skip = self._given_at_last if self._last_ns is not None else 0
        return first

    def cancel(self) -> None:
        self._cancelled = True
        if self._reader is not None:
            self._reader.cancel()
