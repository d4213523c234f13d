"""`ResumingLogReader`'s bookkeeping, with fake streams: after a break it reopens from the last
entry's time and drops exactly the entries of that time it already gave (several entries may
share one time), and it does not resume after errors other than an unreachable service."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aviato._client import Client
from aviato._logs import ResumingLogReader
from aviato._transport.base import LogReader
from aviato.exceptions import AviatoConnectionError, SandboxNotFoundError
from aviato.v1 import sandbox_pb2 as pb


def _entry(ns: int, text: str) -> pb.LogEntry:
    entry = pb.LogEntry(data=text.encode())
    entry.time.FromNanoseconds(ns)
    return entry


LOG = [_entry(1, "a"), _entry(2, "b"), _entry(2, "c"), _entry(2, "d"), _entry(3, "e")]


class _Stream(LogReader):
    def __init__(self, entries: list[pb.LogEntry], fail_after: int | None, error: Exception):
        self._entries, self._fail_after, self._error = entries, fail_after, error

    async def next(self) -> pb.LogEntry | None:
        if self._fail_after == 0:
            raise self._error
        if self._fail_after is not None:
            self._fail_after -= 1
        return self._entries.pop(0) if self._entries else None

    def cancel(self) -> None:
        pass


def _reader(breaks: list[int], error: Exception) -> tuple[ResumingLogReader, list[Any]]:
    """A reader over LOG whose streams break after the given numbers of entries."""
    opened: list[Any] = []

    async def open_(request: pb.StreamLogsRequest, call_timeout: float | None) -> LogReader:
        since = request.since.ToNanoseconds() if request.HasField("since") else None
        opened.append(since)
        entries = [e for e in LOG if since is None or e.time.ToNanoseconds() >= since]
        return _Stream(entries, breaks.pop(0) if breaks else None, error)

    client = Client(object())  # type: ignore[arg-type]
    return ResumingLogReader(client, pb.StreamLogsRequest(tail=-1), None, open_), opened


async def _all(reader: ResumingLogReader) -> str:
    text = ""
    while (entry := await reader.next()) is not None:
        text += entry.data.decode()
    return text


@pytest.mark.parametrize("breaks", [[1], [2], [3], [2, 1], [4], [0, 3, 0]])
def test_no_entry_lost_or_repeated_across_breaks(breaks: list[int]) -> None:
    unreachable = AviatoConnectionError("down", code="UNAVAILABLE")
    reader, opened = _reader(list(breaks), unreachable)
    assert asyncio.run(_all(reader)) == "abcde"
    assert len(opened) == len(breaks) + 1


def test_other_errors_are_raised() -> None:
    reader, opened = _reader([1], SandboxNotFoundError("gone"))
    with pytest.raises(SandboxNotFoundError):
        asyncio.run(_all(reader))
    assert len(opened) == 1
