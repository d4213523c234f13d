"""What every id of a supervisor connection shares: the `Stream` base of execs and file
transfers, the output window (`Credits`), and the connection's side of them (`StreamOwner`).

Flow control is per exec and per transfer, never per connection, so that one command that does
not read its stdin, or whose output nobody reads, cannot hold up the others:
- Output (STDOUT/STDERR/FILE_DATA): the supervisor sends at most `OUT_WINDOW` bytes of one id
  that this side has not credited; the consumer credits (CREDIT) what it takes off the id's
  queue. So the socket is always read, and each id queues at most about a window here.
- Stdin: at most `STDIN_WINDOW` bytes of one exec are sent and not yet acknowledged (STDIN_ACK,
  sent as the command takes them); `write_stdin` waits for acknowledgements beyond that.
- File writes go out as fast as the supervisor writes them to disk (the transport's drain).
A consumer that stops iterating an exec's `events()` or a file read therefore stalls only that
exec or read: iterate to the end, `kill()` the exec, or `aclose()` the read.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from aviato.runtime.supervisor import frames
from aviato.runtime.supervisor.frames import DRAIN_MAX, F_CREDIT, OUT_WINDOW, STDIN_WINDOW

DATA_CHUNK = 1024 * 1024  # stdin / file bytes per frame
CREDIT_STEP = OUT_WINDOW // 4  # credit once this much was consumed
STDIN_STEP = STDIN_WINDOW // 4  # a waiting writer resumes once this much room is free
# What one id may queue here before it is a protocol error: its window, plus what the supervisor
# drains from a finished command's pipes regardless of credit (per stream), plus slack.
STREAM_QUEUE_MAX = OUT_WINDOW + 2 * DRAIN_MAX + (1 << 20)

LOST = "sandbox supervisor connection lost"


class StreamOwner(Protocol):
    """The connection, as its execs and transfers see it (`SupervisorConnection`)."""

    _loop: asyncio.AbstractEventLoop
    _streams: dict[int, Stream]
    _queued: int

    @property
    def is_closed(self) -> bool: ...

    def _send(self, ftype: int, fid: int, payload: bytes | memoryview) -> None: ...

    async def _drain(self) -> None: ...

    def _protocol_error(self, why: str) -> None: ...


class Stream:
    """Something the supervisor sends frames for: an exec or a file transfer."""

    __slots__ = ()

    def _frame(self, ftype: int, view: memoryview) -> None:
        raise NotImplementedError

    def _lost(self) -> None:
        raise NotImplementedError


class Credits:
    """The output window of one id: bytes queued here, and consumed but not yet credited."""

    __slots__ = ("held", "owed")

    def __init__(self) -> None:
        self.held = 0
        self.owed = 0

    def arrived(self, conn: StreamOwner, n: int) -> None:
        self.held += n
        conn._queued += n
        if self.held > STREAM_QUEUE_MAX:
            conn._protocol_error(f"an id queued {self.held} bytes, beyond its window")

    def taken(self, conn: StreamOwner, fid: int, n: int, live: bool) -> None:
        """`n` bytes left the queue; credited in steps while the id is `live`."""
        self.held -= n
        conn._queued -= n
        self.owed += n
        if live and self.owed >= CREDIT_STEP and not conn.is_closed:
            conn._send(F_CREDIT, fid, frames.u32(self.owed))
            self.owed = 0
