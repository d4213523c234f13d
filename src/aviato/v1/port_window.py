"""The credit of ForwardPort (`aviato.v1.PortData`): shared by service and SDK.

Each side of a forwarded connection keeps at most `WINDOW` bytes of its data in flight: sent,
and not yet given back by the peer in `PortData.consumed`. A receiver gives bytes back once it
has delivered them to its own socket (which took them), in steps of `CREDIT_STEP` or at a
half-close. So a side never reads more from its socket than the other side's socket has taken,
and what either side holds for one connection is bounded by the window whatever the peers do.
`CHUNK` is the most `data` one message carries. Both sides use these two classes, so the rule
is defined once; they hold counters only (no I/O) and are used from one event loop.
"""

from __future__ import annotations

import asyncio

__all__ = ["CHUNK", "CREDIT_STEP", "WINDOW", "ReceiveWindow", "SendWindow", "WindowClosed"]

CHUNK = 64 * 1024
WINDOW = 256 * 1024
CREDIT_STEP = CHUNK


class WindowClosed(Exception):
    """No more credit can come (the peer's stream ended) while the sender needs some."""


class SendWindow:
    """The sender's account: what it may still send before the peer gives credit back."""

    def __init__(self, size: int = WINDOW) -> None:
        self._size = size
        self._in_flight = 0
        self._changed = asyncio.Event()
        self._closed = False

    async def room(self) -> int:
        """Waits until some of the window is free; returns how many bytes may be sent now.
        Raises WindowClosed when no credit can come any more."""
        while self._in_flight >= self._size:
            if self._closed:
                raise WindowClosed("the peer stopped giving credit back")
            self._changed.clear()
            await self._changed.wait()
        return self._size - self._in_flight

    def sent(self, count: int) -> None:
        self._in_flight += count

    def credited(self, count: int) -> None:
        """The peer delivered `count` more bytes (a `consumed` it sent)."""
        if count > 0:
            self._in_flight = max(0, self._in_flight - count)
            self._changed.set()

    def close(self) -> None:
        """No more credit will come (the peer's stream ended): a waiting `room` raises."""
        self._closed = True
        self._changed.set()


class ReceiveWindow:
    """The receiver's account: what the peer has in flight, and the credit it is owed."""

    def __init__(self, size: int = WINDOW, step: int = CREDIT_STEP) -> None:
        self._size = size
        self._step = step
        self._outstanding = 0  # received and not yet given back
        self._owed = 0  # delivered and not yet given back

    def received(self, count: int) -> None:
        """Counts `count` bytes the peer sent. Raises ValueError when the peer went past its
        window (it does not follow the protocol)."""
        self._outstanding += count
        if self._outstanding > self._size:
            raise ValueError(f"the peer sent more than its window of {self._size} bytes")

    def delivered(self, count: int, *, flush: bool = False) -> int:
        """Counts `count` bytes as delivered; returns the credit to give back now (0: not yet;
        with `flush`, all that is owed)."""
        self._owed += count
        if self._owed >= self._step or (flush and self._owed):
            owed, self._owed = self._owed, 0
            self._outstanding -= owed
            return owed
        return 0
