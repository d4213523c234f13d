"""The lean local channel: grpc.aio's channel surface over the local service's lean socket.

`LeanChannel` offers what the generated stubs use of a `grpc.aio.Channel`
(`unary_unary`, `unary_stream`, `stream_unary`, `stream_stream`, `close`), so `GrpcTransport`
and its helpers run unchanged on it; its calls are `aviato._transport.lean_call.LeanCall`s,
carried as frames of `aviato.v1.local_frames` over the unix socket. One connection carries one
call at a time; a connection whose call ended cleanly waits in a small pool for the next call
(a connection is opened when none is idle). Bound to the event loop that first uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from typing import Any

from aviato._transport.lean_call import LeanCall
from aviato.v1 import local_frames as lf

__all__ = ["MAX_IDLE_CONNECTIONS", "MAX_RECEIVE_BYTES", "LeanChannel"]

# The largest message the client takes, as the gRPC channel's receive limit.
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
MAX_IDLE_CONNECTIONS = 64
# How long a connect is tried again while the service's accept queue is full.
CONNECT_RETRY_SECONDS = 10.0
# How long a dropped call's connection waits for the call's status before it is ended.
SETTLE_SECONDS = 1.0


class _ClientConnection(lf.FrameConnection):
    def __init__(self, channel: LeanChannel) -> None:
        super().__init__(MAX_RECEIVE_BYTES)
        self._channel = weakref.ref(channel)

    def lost(self) -> None:
        channel = self._channel()
        if channel is not None:
            channel.forget(self)


class _MultiCallable:
    """One method of the channel, called as a grpc.aio multi-callable is."""

    __slots__ = ("_channel", "_deserialize", "_method", "_serialize", "_streaming")

    def __init__(
        self,
        channel: LeanChannel,
        method: str,
        serialize: Callable[[Any], bytes] | None,
        deserialize: Callable[[bytes], Any] | None,
        request_streaming: bool,
    ) -> None:
        self._channel = channel
        self._method = method
        self._serialize = serialize
        self._deserialize = deserialize
        self._streaming = request_streaming

    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        **_ignored: Any,
    ) -> LeanCall:
        if self._streaming:
            return LeanCall(
                self._channel, self._method, self._serialize, self._deserialize,
                request_streaming=True, request_iterator=request, timeout=timeout,
                metadata=metadata,
            )  # fmt: skip
        return LeanCall(
            self._channel, self._method, self._serialize, self._deserialize,
            request=request, request_streaming=False, timeout=timeout, metadata=metadata,
        )  # fmt: skip


class LeanChannel:
    """See the module docstring. `path` is the lean socket's path. Made on its event loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls: weakref.WeakSet[LeanCall] = weakref.WeakSet()
        self._idle: list[lf.FrameConnection] = []
        self._settling: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # that of its first connection

    def __repr__(self) -> str:
        return f"<LeanChannel {self.path}>"

    def _method(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        *,
        streaming: bool,
    ) -> _MultiCallable:
        return _MultiCallable(self, method, request_serializer, response_deserializer, streaming)

    def unary_unary(self, method: str, request_serializer: Any = None,
                    response_deserializer: Any = None, **_: Any) -> _MultiCallable:  # fmt: skip
        return self._method(method, request_serializer, response_deserializer, streaming=False)

    def unary_stream(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **_: Any) -> _MultiCallable:  # fmt: skip
        return self._method(method, request_serializer, response_deserializer, streaming=False)

    def stream_unary(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, **_: Any) -> _MultiCallable:  # fmt: skip
        return self._method(method, request_serializer, response_deserializer, streaming=True)

    def stream_stream(self, method: str, request_serializer: Any = None,
                      response_deserializer: Any = None, **_: Any) -> _MultiCallable:  # fmt: skip
        return self._method(method, request_serializer, response_deserializer, streaming=True)

    # --- connections --------------------------------------------------------------------------

    def idle_connection(self) -> lf.FrameConnection | None:
        """A pooled connection ready for a call, or None (then `connect`)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not conn.frames:
                return conn
            conn.fail(lf.ConnectionLost("not reusable"))
        return None

    async def connect(self) -> lf.FrameConnection:
        """A new connection (OSError when the service does not answer).

        With the service's accept queue full, asyncio reports a unix socket connected that is
        not (the kernel said EAGAIN): such a socket is closed and the connect tried again, for
        up to `CONNECT_RETRY_SECONDS`."""
        if self._closed:
            raise ConnectionRefusedError("the channel is closed")
        loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_RETRY_SECONDS
        delay = 0.001
        while True:
            try:
                transport, conn = await loop.create_unix_connection(
                    lambda: _ClientConnection(self), self.path
                )
                try:
                    transport.get_extra_info("socket").getpeername()
                    return conn
                except OSError:
                    transport.abort()
                    raise BlockingIOError("the service's accept queue is full") from None
            except BlockingIOError as e:
                if loop.time() + delay > deadline:
                    raise ConnectionRefusedError(f"the service accepts no connection: {e}") from e
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def give_back(self, conn: lf.FrameConnection) -> None:
        """Keeps `conn`, whose call ended cleanly, for the next call."""
        if self._closed or conn.closed or len(self._idle) >= MAX_IDLE_CONNECTIONS:
            conn.fail(lf.ConnectionLost("not kept"))
            return
        self._idle.append(conn)

    def settle(self, conn: lf.FrameConnection) -> None:
        """Takes over `conn`, whose call was dropped after its requests ended: kept if the next
        frame, within `SETTLE_SECONDS`, is the call's status; else ended (which the service
        takes as a cancellation). Safe from any thread (a call's finalizer)."""
        if self._loop is None:
            conn.fail(lf.ConnectionLost("the call was dropped"))
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            self._loop.call_soon_threadsafe(self._settle_soon, conn)

    def _settle_soon(self, conn: lf.FrameConnection) -> None:
        task = asyncio.ensure_future(self._settle(conn))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, conn: lf.FrameConnection) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_SECONDS):
                await conn.wait()
        if conn.frames and conn.frames[0][0] == lf.STATUS:
            conn.take()
            if not conn.frames:
                self.give_back(conn)
                return
        conn.fail(lf.ConnectionLost("the call was dropped"))

    def forget(self, conn: lf.FrameConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    async def close(self, grace: float | None = None) -> None:
        """Cancels the calls in flight and closes every connection."""
        self._closed = True
        for call in list(self.calls):
            call.cancel()
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.fail(lf.ConnectionLost("the channel is closed"))
