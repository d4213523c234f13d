"""The log stream of aviato.v1.SandboxService: StreamLogs, from a sandbox's main log."""

from __future__ import annotations

import asyncio
import collections
import os
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aviato.runtime.base import SandboxRuntimeError
from aviato.server.errors import ServiceError
from aviato.server.servicer import ServicerBase, grpc_status
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato.server.servicer import Ctx

__all__ = ["LogStreams", "parse_log_records"]

LOG_POLL_SECONDS = 0.05
_LOG_HEADER = struct.Struct("<QBI")


def parse_log_records(buf: bytes | bytearray) -> tuple[list[pb.LogEntry], int]:
    """Parses the whole main.log records at the start of buf; returns them and the bytes used."""
    entries: list[pb.LogEntry] = []
    pos = 0
    end = len(buf)
    size = _LOG_HEADER.size
    while end - pos >= size:
        time_ns, stream, length = _LOG_HEADER.unpack_from(buf, pos)
        if end - pos - size < length:
            break
        entry = pb.LogEntry(stream=stream if stream in (1, 2) else 0,  # type: ignore[arg-type]
                            data=bytes(buf[pos + size : pos + size + length]))  # fmt: skip
        entry.time.FromNanoseconds(time_ns)
        entries.append(entry)
        pos += size + length
    return entries, pos


async def _tail_offset(fd: int, tail: int) -> int:
    """The offset of the `tail`-th last whole record of a main log (its end for 0).

    Reads only the record headers, in 1 MiB chunks, yielding to the event loop between chunks:
    a 64 MiB log of tiny records must not stall the service.
    """
    starts: collections.deque[int] = collections.deque(maxlen=max(tail, 1))
    base = 0  # the file offset of buf[0], always the start of a record
    buf = b""
    size = _LOG_HEADER.size
    while data := os.pread(fd, 1 << 20, base + len(buf)):
        buf += data
        off = 0
        while len(buf) - off >= size:
            length = _LOG_HEADER.unpack_from(buf, off)[2]
            if len(buf) - off - size < length:
                break
            starts.append(base + off)
            off += size + length
        base += off
        buf = buf[off:]
        await asyncio.sleep(0)
    pos = base
    if tail == 0 or not starts:
        return pos
    return starts[0]


class LogStreams(ServicerBase):
    """StreamLogs."""

    async def StreamLogs(
        self, request: pb.StreamLogsRequest, context: Ctx
    ) -> AsyncIterator[pb.LogEntry]:
        owner = await self._owner_or_abort(context)
        try:
            fd = await self._open_log(owner, request.sandbox_id, request.follow)
        except (ServiceError, SandboxRuntimeError) as e:
            await context.abort(grpc_status(e.code), str(e))
            return
        if fd is None:
            return
        log_fd, ended = fd
        try:
            tail = request.tail
            pos = 0 if tail < 0 else await _tail_offset(log_fd, tail)
            buf = bytearray()
            while True:
                finished = ended()  # read before the data: nothing written after it is missed
                data = os.pread(log_fd, 1 << 20, pos)
                if data:
                    pos += len(data)
                    buf += data
                    entries, used = parse_log_records(buf)
                    del buf[:used]
                    for entry in entries:
                        yield entry
                    continue
                if finished or not request.follow:
                    return
                await asyncio.sleep(LOG_POLL_SECONDS)
        finally:
            os.close(log_fd)

    async def _open_log(
        self, owner: str, sandbox_id: str, follow: bool
    ) -> tuple[int, Callable[[], bool]] | None:
        """Opens the main log (waiting for it to appear while the sandbox starts)."""
        while True:
            path, ended = self._lifecycle.log_source(owner, sandbox_id)
            candidates: list[Path] = [p for p in (path,) if p is not None]
            candidates.append(self._lifecycle.kept_log_path(sandbox_id))
            for candidate in candidates:
                try:
                    return os.open(candidate, os.O_RDONLY | os.O_CLOEXEC), ended
                except FileNotFoundError:
                    continue
            if ended() or not follow:
                return None
            await asyncio.sleep(LOG_POLL_SECONDS)
