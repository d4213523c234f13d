"""The servicer context of a call on the lean local socket (`server/lean_listener.py`).

It offers what the servicers and the interceptors use of a `grpc.aio.ServicerContext`:
`abort` (raises `grpc.aio.AbortError`, with trailing metadata: `server/errors.py`), `write`
(waits while the client's socket is full: the backpressure), `read`, `peer` ("unix:<socket>",
so the owner is "local" as on the gRPC unix socket; a key in the metadata still selects its
owner), `invocation_metadata`, `send_initial_metadata`, `set_trailing_metadata`, `set_code`,
`set_details`, `add_done_callback`, `time_remaining`, `code`, `details`, `cancelled`, `done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio

from aviato.v1 import local_frames as lf

__all__ = ["LeanContext", "RequestStream"]

_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


class RequestStream:
    """A call's request messages from its connection: ends at the client's HALF_CLOSE; a
    connection lost first raises `asyncio.CancelledError` (the client went away: never the end
    of its input), a frame out of place `FrameError`."""

    def __init__(self, conn: lf.FrameConnection, parse: Callable[[bytes], Any] | None) -> None:
        self._conn = conn
        self._parse = parse
        self.ended = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not _EOF:
            yield message

    async def read(self) -> Any:
        if self.ended:
            return _EOF
        try:
            kind, payload = await self._conn.next_frame()
        except lf.ConnectionLost as e:
            raise asyncio.CancelledError(
                f"the client went away before ending its stream: {e}"
            ) from e
        if kind == lf.HALF_CLOSE:
            self.ended = True
            return _EOF
        if kind != lf.MESSAGE:
            self._conn.fail(lf.FrameError(f"frame kind {kind} in a request stream"))
            raise lf.FrameError(f"frame kind {kind} in a request stream")
        return payload if self._parse is None else self._parse(payload)


class LeanContext:
    """See the module docstring. `finish` sends the status and runs the done callbacks."""

    def __init__(
        self,
        conn: lf.FrameConnection,
        peer: str,
        metadata: lf.Metadata,
        timeout: float | None,
        serialize: Callable[[Any], bytes] | None,
        requests: RequestStream | None,
    ) -> None:
        self._conn = conn
        self._peer = peer
        self._metadata = metadata
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._serialize = serialize or (lambda m: m)
        self._requests = requests
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailers: lf.Metadata = ()
        self._headers_sent = False
        self._done = False
        self._cancelled = False
        self._callbacks: list[Callable[[Any], None]] = []

    # --- what servicers use -------------------------------------------------------------------

    def peer(self) -> str:
        return self._peer

    async def send_descriptor(self, fd: int) -> None:
        """Hands `fd` to the client (a local-only method's; not a servicer context's)."""
        await self._conn.send_descriptor(fd)

    def invocation_metadata(self) -> lf.Metadata:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        if self._code is None or self._code == grpc.StatusCode.OK:
            self._code = code
            self._details = details
            self._trailers = lf.pairs(trailing_metadata) or self._trailers
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._trailers = lf.pairs(trailing_metadata)

    async def send_initial_metadata(self, metadata: Any) -> None:
        if self._headers_sent:
            raise grpc.aio.UsageError("initial metadata was already sent")
        self._headers_sent = True
        self._conn.send(lf.frame(lf.HEADERS, lf.encode_metadata(lf.pairs(metadata))))

    async def write(self, message: Any) -> None:
        if self._done:
            raise asyncio.InvalidStateError("the call has already finished")
        self._headers_sent = True
        self._conn.send(lf.frame(lf.MESSAGE, self._serialize(message)))
        await self._conn.drain()

    async def read(self) -> Any:
        if self._requests is None:
            raise grpc.aio.UsageError("this call has no request stream")
        return await self._requests.read()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(callback)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> lf.Metadata:
        return self._trailers

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._done

    # --- for the listener ---------------------------------------------------------------------

    def status_frame(self, code: grpc.StatusCode | None = None, details: str = "") -> bytes:
        """The STATUS frame: `code` unless the handler set its own (an abort)."""
        if self._code is None or (self._code == grpc.StatusCode.OK and code is not None):
            self._code = code or grpc.StatusCode.OK
            self._details = details or self._details
        number: int = self._code.value[0]
        return lf.frame(lf.STATUS, lf.encode_status(number, self._details, self._trailers))

    def finish(self, *, cancelled: bool = False) -> None:
        """Marks the call over and runs the done callbacks (as grpc does when a call ends)."""
        if self._done:
            return
        self._done = True
        self._cancelled = cancelled
        if cancelled and self._code is None:
            self._code = grpc.StatusCode.CANCELLED
        for callback in self._callbacks:
            with contextlib.suppress(Exception):  # it must not end the connection
                callback(self)
