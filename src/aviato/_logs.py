"""The log of a sandbox's main process: `LogRecord` (one entry) and `LogStream` (the entries, as
`Sandbox.stream_logs` returns them)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from aviato._bridged_stream import BridgedStream
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
