"""The main log's file format, read and written: a sequence of records as the supervisor
writes them (docs/internals/supervisor-protocol.md), each a little-endian header (unix time in
ns: u64, stream: u8, length: u32) and `length` bytes of output.

Who uses it: the local runtime's `SandboxHandle.logs` (the live `main.log` of a sandbox), the
service for the log it keeps after a sandbox ended (`logs/<id>.log`), and the cluster, which
copies a remote sandbox's records into such a file on the control plane. Nothing outside this
module knows the layout.
"""

from __future__ import annotations

import asyncio
import collections
import os
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aviato.runtime.base import LogRecord

__all__ = ["LOG_HEADER", "encode_record", "parse_records", "read_log"]

LOG_HEADER = struct.Struct("<QBI")  # time_ns, stream, length (supervisor-protocol.md)

READ_BYTES = 1 << 20
POLL_SECONDS = 0.05


def parse_records(buf: bytes | bytearray) -> tuple[list[LogRecord], int]:
    """The whole records at the start of `buf`, and how many bytes they took."""
    records: list[LogRecord] = []
    pos, end, size = 0, len(buf), LOG_HEADER.size
    while end - pos >= size:
        time_ns, stream, length = LOG_HEADER.unpack_from(buf, pos)
        if end - pos - size < length:
            break
        data = bytes(buf[pos + size : pos + size + length])
        records.append(LogRecord(stream if stream in (1, 2) else 0, time_ns, data))
        pos += size + length
    return records, pos


def encode_record(record: LogRecord) -> bytes:
    """A record in the file's format (for a copy of a log made elsewhere)."""
    return LOG_HEADER.pack(record.time_ns, record.stream, len(record.data)) + record.data


async def _start_offset(fd: int, since_ns: int, tail: int) -> int:
    """The offset of the first record to give: the `tail`-th last of those stamped at or after
    `since_ns` (the end of the file for tail 0).

    Reads only the record headers, in 1 MiB pieces, yielding to the event loop between them: a
    64 MiB log of tiny records must not stall the service."""
    if tail < 0 and since_ns <= 0:
        return 0
    starts: collections.deque[int] = collections.deque(maxlen=tail if tail > 0 else None)
    base = 0  # the file offset of buf[0], always the start of a record
    buf = b""
    size = LOG_HEADER.size
    while data := os.pread(fd, READ_BYTES, base + len(buf)):
        buf += data
        off = 0
        while len(buf) - off >= size:
            time_ns, _, length = LOG_HEADER.unpack_from(buf, off)
            if len(buf) - off - size < length:
                break
            if time_ns >= since_ns:
                if tail < 0:
                    return base + off
                starts.append(base + off)
            off += size + length
        base += off
        buf = buf[off:]
        await asyncio.sleep(0)
    if tail == 0 or not starts:
        return base
    return starts[0]


async def read_log(
    path: Path,
    since_ns: int = 0,
    tail: int = -1,
    follow: bool = False,
    ended: Callable[[], bool] = lambda: True,
) -> AsyncIterator[LogRecord]:
    """The records of the log file at `path`, as `SandboxHandle.logs` describes; following
    ends once `ended()` is true and the file holds nothing more. FileNotFoundError when there
    is no such file. The file is opened once: a log moved away meanwhile is read to its end."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pos = await _start_offset(fd, since_ns, tail)
        buf = bytearray()
        while True:
            finished = ended()  # asked before reading: nothing written after it is missed
            data = os.pread(fd, READ_BYTES, pos)
            if data:
                pos += len(data)
                buf += data
                records, used = parse_records(buf)
                del buf[:used]
                for record in records:
                    if record.time_ns >= since_ns:
                        yield record
                continue
            if finished or not follow:
                return
            await asyncio.sleep(POLL_SECONDS)
    finally:
        os.close(fd)
