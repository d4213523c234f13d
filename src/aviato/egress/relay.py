"""Relaying bytes between two stream connections, bounded (shared by the egress gateway and the
service's exposed ports, server/port_forward.py).

Bounds: each direction holds at most one read buffer (`CHUNK` bytes; a StreamReader made with
`limit=CHUNK` pauses reading above twice that) and one write buffer (writing waits while the
socket's send buffer is above asyncio's high-water mark, 64 KiB), so a relayed connection costs
under 0.5 MiB whatever the peers do: a peer that floods while the other never reads is slowed
to the reader's pace by TCP, not buffered.

An end-of-file from one side is passed on as a half-close (`write_eof`); an error on either side
(reset, broken pipe) ends both directions at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["CHUNK", "FLUSH_SECONDS", "close_side", "pump", "relay", "run_both"]

CHUNK = 64 * 1024
FLUSH_SECONDS = 10.0

Counter = Callable[[int], None]


async def relay(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    a_to_b: Counter | None = None,
    b_to_a: Counter | None = None,
) -> bool:
    """Copies a → b and b → a until both have ended (True); an error in either ends both
    (False). `a_to_b`/`b_to_a` are told the size of each chunk written in that direction."""
    return await run_both(pump(a_reader, b_writer, a_to_b), pump(b_reader, a_writer, b_to_a))


async def run_both(first: Coroutine[Any, Any, None], second: Coroutine[Any, Any, None]) -> bool:
    """Runs the two directions of a relay until both have returned (True); an exception in
    either cancels the other (False). Cancelling the caller cancels both."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                return False
        return True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def pump(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, count: Counter | None = None
) -> None:
    """Copies until end-of-file, which is passed on as a half-close; waits for the sink to
    drain after each chunk, so at most a chunk and the sink's buffer are held."""
    while True:
        data = await source.read(CHUNK)
        if not data:
            if sink.can_write_eof() and not sink.transport.is_closing():
                sink.write_eof()
            return
        sink.write(data)
        if count is not None:
            count(len(data))
        await sink.drain()


async def close_side(writer: asyncio.StreamWriter, flush: bool) -> None:
    """Closes a side: with `flush`, once what is still buffered for it has been sent (for at
    most FLUSH_SECONDS: a peer that stopped reading does not hold the connection longer);
    without, or when cancelled, at once."""
    try:
        if flush:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), FLUSH_SECONDS)
    finally:
        writer.transport.abort()
