"""One call of the lean local channel, behaving as a grpc.aio call does for what the gRPC
transport's code uses of one.

- awaited: the response (a call with a single response), or `grpc.aio.AioRpcError`;
- `read()` and ``async for``: the next response, `grpc.aio.EOF` after an OK status;
- `write()`, `done_writing()`: the request stream (or a request iterator given at the call);
- `initial_metadata()`, `code()`, `details()`, `trailing_metadata()`, `done()`, `cancel()`.

A failure is a `grpc.aio.AioRpcError` with the status's code, details and trailing metadata,
so `grpc_errors.translate_error` maps it as it maps gRPC's own. A connection that ends before
the status is UNAVAILABLE (the service went away; `Client.with_retry` may repeat the call); a
call past its timeout is DEADLINE_EXCEEDED; a cancelled call raises `asyncio.CancelledError`
from then on, as grpc.aio's calls do. A call that ends cleanly (status received, requests
half-closed) gives its connection back to the channel's pool; any other ends it, which the
service takes as the client going away (its handler is cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, Protocol

import grpc
import grpc.aio

from aviato.v1 import local_frames as lf

__all__ = ["Connections", "LeanCall"]


class Connections(Protocol):
    """What a call needs of its channel (`lean_channel.LeanChannel`): connections to take,
    give back or hand over to settle, and the set of calls in flight."""

    path: str
    calls: weakref.WeakSet[LeanCall]

    def idle_connection(self) -> lf.FrameConnection | None: ...

    async def connect(self) -> lf.FrameConnection: ...

    def give_back(self, conn: lf.FrameConnection) -> None: ...

    def settle(self, conn: lf.FrameConnection) -> None: ...


_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_LOST = "the connection to the service was lost before the call's status"


class LeanCall:
    """See the module docstring. Made by `LeanChannel`'s multi-callables."""

    def __init__(
        self,
        channel: Connections,
        method: str,
        serialize: Callable[[Any], bytes] | None,
        deserialize: Callable[[bytes], Any] | None,
        *,
        request: Any = None,
        request_streaming: bool,
        request_iterator: Any = None,
        timeout: float | None,
        metadata: Any,
    ) -> None:
        self._channel = channel
        self._serialize = serialize or (lambda m: m)
        self._deserialize = deserialize or (lambda b: b)
        self._conn: lf.FrameConnection | None = None
        self._status: tuple[grpc.StatusCode, str, lf.Metadata] | None = None
        self._initial: lf.Metadata | None = None
        self._cancelled = False
        self._half_closed = not request_streaming
        self._write_lock = asyncio.Lock()
        self._feeder: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(timeout, self._expire) if timeout is not None else None
        head = lf.frame(lf.CALL, lf.encode_call(method, timeout, lf.pairs(metadata)))
        if not request_streaming:
            head += lf.frame(lf.MESSAGE, self._serialize(request))
        conn = channel.idle_connection()
        self._opening: asyncio.Future[None] | None = None
        if conn is not None:
            self._start(conn, head)
        else:
            self._opening = asyncio.ensure_future(self._open(head))
            self._opening.add_done_callback(_retrieve)
        channel.calls.add(self)
        if request_iterator is not None:
            self._feeder = asyncio.ensure_future(self._feed(request_iterator))
            self._feeder.add_done_callback(_retrieve)

    # --- opening ------------------------------------------------------------------------------

    def _start(self, conn: lf.FrameConnection, head: bytes) -> None:
        self._conn = conn
        try:
            conn.send(head)
            if self._half_closed:  # the whole request: nothing of this call would join it
                conn.flush()
        except lf.ConnectionLost:
            self._finish(grpc.StatusCode.UNAVAILABLE, _LOST)

    async def _open(self, head: bytes) -> None:
        try:
            conn = await self._channel.connect()
        except OSError as e:
            self._finish(
                grpc.StatusCode.UNAVAILABLE,
                f"failed to connect to the local service at {self._channel.path}: {e}",
            )
            return
        if self._status is not None:  # cancelled or expired meanwhile
            conn.fail(lf.ConnectionLost("the call ended before it started"))
            return
        self._start(conn, head)

    async def _connection(self) -> lf.FrameConnection | None:
        if self._opening is not None and not self._opening.done():
            await asyncio.shield(self._opening)
        return self._conn

    # --- ending -------------------------------------------------------------------------------

    def _finish(
        self,
        code: grpc.StatusCode,
        details: str,
        trailers: lf.Metadata = (),
        *,
        from_service: bool = False,
    ) -> None:
        """Records the call's status (the first one wins) and gives back the connection (a
        status the service sent, requests half-closed) or ends it."""
        if self._status is not None:
            return
        self._status = (code, details, trailers)
        if self._timer is not None:
            self._timer.cancel()
        self._channel.calls.discard(self)
        conn = self._conn
        if conn is None:
            return
        if from_service and self._half_closed and not conn.frames:
            self._channel.give_back(conn)
        elif not conn.closed:
            conn.fail(lf.ConnectionLost(f"the call ended: {code.name}"))

    def _expire(self) -> None:
        self._timer = None
        self._finish(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        if self._feeder is not None:
            self._feeder.cancel()

    def cancel(self) -> bool:
        if self._status is not None:
            return False
        self._cancelled = True
        self._finish(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        if self._feeder is not None:
            self._feeder.cancel()
        return True

    def __del__(self) -> None:
        conn = self._conn
        if self._status is None and conn is not None and not conn.closed:
            if self._half_closed:
                # Dropped after its last response (an exec after its exit frame): the channel
                # takes the status, if it comes at once, and keeps the connection.
                self._channel.settle(conn)
            else:
                conn.fail(lf.ConnectionLost("the call was dropped"))

    def _error(self) -> BaseException:
        assert self._status is not None
        if self._cancelled:
            return asyncio.CancelledError()
        code, details, trailers = self._status
        return grpc.aio.AioRpcError(
            code,
            grpc.aio.Metadata(*(self._initial or ())),
            grpc.aio.Metadata(*trailers),
            details,
            None,
        )

    # --- reading ------------------------------------------------------------------------------

    async def _next(self) -> Any:
        """The next response, or EOF after an OK status; raises the call's error."""
        while True:
            if self._status is not None:
                if self._status[0] == grpc.StatusCode.OK:
                    return _EOF
                raise self._error()
            conn = self._conn if self._opening is None else await self._connection()
            if conn is None:
                continue  # the opening failed: the status says why
            if not conn.frames:
                if conn.closed:
                    self._finish(grpc.StatusCode.UNAVAILABLE, _LOST)
                    continue
                await conn.wait()
                continue
            if self._status is not None:
                continue
            kind, payload = conn.take()
            if kind == lf.MESSAGE:
                if self._initial is None:
                    self._initial = ()
                if conn.frames and conn.frames[0][0] == lf.STATUS:
                    # Here already (sent with the last response): the call is over, and its
                    # connection free for the next call even if nobody reads on.
                    self._on_status(conn.take()[1])
                return self._deserialize(payload)
            if kind == lf.STATUS:
                self._on_status(payload)
            elif kind == lf.HEADERS and self._initial is None:
                self._initial = self._decoded(lf.decode_metadata, payload, ())
            else:
                self._finish(grpc.StatusCode.INTERNAL, f"the service sent frame kind {kind}")

    def _on_status(self, payload: bytes) -> None:
        if self._initial is None:
            self._initial = ()
        try:
            number, details, trailers = lf.decode_status(payload)
        except lf.FrameError as e:
            self._finish(grpc.StatusCode.INTERNAL, f"the service sent a bad status: {e}")
            return
        self._finish(
            _CODES.get(number, grpc.StatusCode.UNKNOWN), details, trailers, from_service=True
        )

    def _decoded(self, decode: Callable[[bytes], Any], payload: bytes, default: Any) -> Any:
        try:
            return decode(payload)
        except lf.FrameError:
            return default

    async def read(self) -> Any:
        return await self._next()

    #: A cancelled `read()` leaves the call as it was (grpc.aio's ends the call), so a reader
    #: that must survive its caller's cancellation needs no task of its own to read with.
    reads_survive_cancellation = True

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        while (message := await self._next()) is not _EOF:
            yield message

    async def _response(self) -> Any:
        try:
            message = await self._next()
            if message is _EOF:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.INTERNAL,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    "the service sent no response",
                    None,
                )
            if await self._next() is not _EOF:
                self._finish(grpc.StatusCode.INTERNAL, "the service sent two responses")
                raise self._error()
            return message
        except asyncio.CancelledError:
            self.cancel()  # the awaiting task was cancelled: so is the call, as in grpc.aio
            raise

    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()

    async def initial_metadata(self) -> grpc.aio.Metadata:
        while self._initial is None:
            conn = await self._connection()
            if conn is None or self._status is not None or (conn.closed and not conn.frames):
                self._initial = ()
                break
            if conn.frames:
                kind, payload = conn.frames[0]
                if kind == lf.HEADERS:
                    conn.take()
                    self._initial = self._decoded(lf.decode_metadata, payload, ())
                else:
                    self._initial = ()
                break
            await conn.wait()
        return grpc.aio.Metadata(*self._initial)

    # --- writing ------------------------------------------------------------------------------

    async def write(self, message: Any) -> None:
        if self._half_closed:
            raise asyncio.InvalidStateError("the request stream has already been half-closed")
        data = lf.frame(lf.MESSAGE, self._serialize(message))
        await self._send(data)

    async def done_writing(self) -> None:
        if self._half_closed:
            return
        await self._send(lf.frame(lf.HALF_CLOSE))
        self._half_closed = True

    async def _send(self, data: bytes) -> None:
        async with self._write_lock:
            conn = await self._connection()
            if self._status is not None or conn is None:
                self._raise_finished()
            assert conn is not None
            try:
                conn.send(data)
                await conn.drain()
            except lf.ConnectionLost:
                await self._settle(conn)
                self._raise_finished()

    async def _settle(self, conn: lf.FrameConnection) -> None:
        """After a failed send: the status the service sent before it closed, if it did."""
        with contextlib.suppress(BaseException):
            while self._status is None and conn.frames:
                await self._next()
        if self._status is None:
            self._finish(grpc.StatusCode.UNAVAILABLE, _LOST)

    def _raise_finished(self) -> None:
        assert self._status is not None
        if self._status[0] == grpc.StatusCode.OK:
            raise asyncio.InvalidStateError("the call has already finished")
        raise self._error()

    async def _feed(self, requests: Any) -> None:
        try:
            if hasattr(requests, "__aiter__"):
                async for message in requests:
                    await self.write(message)
            else:
                for message in requests:
                    await self.write(message)
            await self.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.CancelledError):
            pass  # the call's reader reports it
        except Exception as e:
            self._finish(grpc.StatusCode.UNKNOWN, f"the request iterator failed: {e!r}")

    # --- the status ---------------------------------------------------------------------------

    def done(self) -> bool:
        return self._status is not None

    def cancelled(self) -> bool:
        return self._cancelled

    async def code(self) -> grpc.StatusCode:
        await self._until_done()
        assert self._status is not None
        return self._status[0]

    async def details(self) -> str:
        await self._until_done()
        assert self._status is not None
        return self._status[1]

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        await self._until_done()
        assert self._status is not None
        return grpc.aio.Metadata(*self._status[2])

    async def wait_for_connection(self) -> None:
        await self._connection()

    async def _until_done(self) -> None:
        with contextlib.suppress(Exception):
            while await self._next() is not _EOF:
                pass


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
