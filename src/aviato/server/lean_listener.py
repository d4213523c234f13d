"""The service's lean local listener: aviato.v1 over `aviato.v1.local_frames`, for local clients.

It listens on a second unix socket beside the gRPC one (`local_frames.local_socket_path`),
created like it (umask 077, mode 0600: only the service's own user may connect; a stale file
from a dead service is removed; the file is removed at shutdown), on the service's own event
loop. Each call runs the SAME handlers as gRPC, got from the generated
``add_*Servicer_to_server`` functions through `MethodTable`, through the SAME interceptors
(`CallMetrics`, `_MalformedRequests`: metrics, INVALID_ARGUMENT for a request that does not
parse, the confirmed end of a request stream), with a `LeanContext` as its servicer context.

How a call's semantics map (docs/internals/transport.md):
- one connection runs one call at a time, in the connection's task; the next CALL frame may
  follow on the same connection once the call's status is sent and its requests half-closed;
- the client goes away (its connection ends) → the call's task is cancelled, as grpc cancels
  a handler: an exec's command is killed, an upload is not committed (the request stream
  raises instead of ending);
- the call's timeout passes → the handler is cancelled and the status is DEADLINE_EXCEEDED;
- a frame of an unknown kind, larger than `MAX_FRAME_BYTES`, or out of place ends that one
  connection; nothing else of the service is touched.

What this cannot do: notice a lost client while a handler neither reads its request stream nor
writes, and the connection's reading is paused because the client sent more than the handler
took (over `local_frames.READ_HIGH_WATER`): the loss is seen at the handler's next read or
write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import grpc.aio

from aviato.server.lean_context import LeanContext, RequestStream
from aviato.v1 import local_frames as lf

__all__ = ["MAX_FRAME_BYTES", "LeanListener", "MethodTable"]

log = logging.getLogger("aviato.server.lean")

# The gRPC server's message limit (app.MAX_MESSAGE_BYTES), plus room for a call's header.
MAX_FRAME_BYTES = (8 << 20) + 64 * 1024


# One connection per call in flight: a client with a thousand calls in flight connects a
# thousand times at once (the kernel caps this at net.core.somaxconn).
ACCEPT_BACKLOG = 4096


class _CallDetails(NamedTuple):
    method: str
    invocation_metadata: lf.Metadata


class MethodTable:
    """Records the handlers that the generated ``add_*Servicer_to_server`` functions register
    (it stands in for the `grpc.aio.Server` they are given)."""

    def __init__(self) -> None:
        self.methods: dict[str, Any] = {}
        self.generic: list[Any] = []

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}"] = handler

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        self.generic.extend(handlers)

    async def lookup(self, details: Any) -> Any:
        handler = self.methods.get(details.method)
        if handler is None:
            for generic in self.generic:
                handler = generic.service(details)
                if handler is not None:
                    break
        return handler


class _ServerConnection(lf.FrameConnection):
    def __init__(self, listener: LeanListener) -> None:
        super().__init__(MAX_FRAME_BYTES)
        self._listener = listener
        self.task: asyncio.Task[None] | None = None
        self.in_call = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.task = asyncio.ensure_future(self._listener.serve_connection(self))
        self._listener.connections.add(self)

    def lost(self) -> None:
        self._listener.connections.discard(self)
        if self.in_call and self.task is not None:
            self.task.cancel()  # the client went away: its call ends as grpc's would


class LeanListener:
    """See the module docstring. `start` binds the socket; `close` ends every connection."""

    def __init__(self, path: Path, table: MethodTable, interceptors: Sequence[Any]) -> None:
        self.path = path
        self.peer = f"unix:{path}"
        self.connections: set[_ServerConnection] = set()
        self._table = table
        self._interceptors = list(interceptors)
        self._resolved: dict[str, Any] = {}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Binds the socket (the caller removed a stale file: it holds the pid lock)."""
        old_umask = os.umask(0o077)
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: _ServerConnection(self), str(self.path), backlog=ACCEPT_BACKLOG
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self, grace: float) -> None:
        """Stops accepting, gives the calls in flight `grace` seconds, then ends them."""
        if self._server is not None:
            self._server.close()
        running = [c.task for c in self.connections if c.in_call and c.task is not None]
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)
        tasks = []
        for conn in list(self.connections):
            conn.fail(lf.ConnectionLost("the service is stopping"))
            if conn.task is not None:
                conn.task.cancel()
                tasks.append(conn.task)
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if self._server is not None:
            self.path.unlink(missing_ok=True)

    async def _handler(self, method: str, metadata: lf.Metadata) -> Any:
        handler = self._resolved.get(method)
        if handler is None:
            continuation: Callable[[Any], Awaitable[Any]] = self._table.lookup
            for interceptor in reversed(self._interceptors):
                continuation = functools.partial(interceptor.intercept_service, continuation)
            handler = await continuation(_CallDetails(method, metadata))
            if handler is not None:  # unknown methods are not kept: a client names any
                self._resolved[method] = handler
        return handler

    async def serve_connection(self, conn: _ServerConnection) -> None:
        try:
            while True:
                kind, payload = await conn.next_frame()
                if kind != lf.CALL:
                    raise lf.FrameError(f"frame kind {kind} where a call must start")
                method, timeout, metadata = lf.decode_call(payload)
                handler = await self._handler(method, metadata)
                if handler is None:
                    conn.send(_status(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"))
                    break  # its requests may follow: this connection is not reused
                conn.in_call = True
                try:
                    reusable = await self._call(conn, handler, timeout, metadata)
                finally:
                    conn.in_call = False
                if not reusable:
                    break
        except (lf.ConnectionLost, asyncio.CancelledError):
            pass
        except lf.FrameError as e:
            log.debug("lean socket: a client broke the protocol: %s", e)
        except Exception:
            log.exception("lean socket: a connection failed")
        finally:
            conn.close()  # what was sent (a status) is delivered first

    async def _call(
        self,
        conn: _ServerConnection,
        handler: Any,
        call_timeout: float | None,
        metadata: lf.Metadata,
    ) -> bool:
        """Runs one call to its status; True when the connection may carry another."""
        parse = handler.request_deserializer
        requests = RequestStream(conn, parse) if handler.request_streaming else None
        ctx = LeanContext(
            conn, self.peer, metadata, call_timeout, handler.response_serializer, requests
        )
        task = asyncio.current_task()
        assert task is not None
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            task.cancel()

        loop = asyncio.get_running_loop()
        timer = None if call_timeout is None else loop.call_later(call_timeout, expire)
        try:
            status = await self._run(handler, ctx, requests, conn, parse)
        except grpc.aio.AbortError:
            status = ctx.status_frame()
        except asyncio.CancelledError:
            if conn.closed:
                ctx.finish(cancelled=True)
                raise
            if expired:
                task.uncancel()
                status = ctx.status_frame(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
                _send_final(conn, status, ctx)
                return False
            if ctx.code() not in (None, grpc.StatusCode.OK):
                task.uncancel()  # an interceptor ended the handler after its abort
                status = ctx.status_frame()
            else:
                ctx.finish(cancelled=True)
                raise
        except lf.FrameError:
            ctx.finish(cancelled=True)
            raise
        except Exception as e:
            if conn.closed:
                ctx.finish(cancelled=True)
                raise lf.ConnectionLost("the client went away") from e
            log.exception("lean socket: a handler failed")
            status = ctx.status_frame(grpc.StatusCode.UNKNOWN, f"Unexpected {type(e).__name__}")
        finally:
            if timer is not None:
                timer.cancel()
        _send_final(conn, status, ctx)
        if requests is not None and not requests.ended:
            # The client may still be sending: its frames are dropped until it half-closes.
            while (await requests.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
        return True

    @staticmethod
    async def _run(
        handler: Any,
        ctx: LeanContext,
        requests: RequestStream | None,
        conn: _ServerConnection,
        parse: Callable[[bytes], Any] | None,
    ) -> bytes:
        """The handler, to its OK status (with its response, for a single one)."""
        if requests is None:
            kind, payload = await conn.next_frame()
            if kind != lf.MESSAGE:
                raise lf.FrameError(f"frame kind {kind} where the request must be")
            request: Any = payload if parse is None else parse(payload)
        else:
            request = requests
        if not handler.response_streaming:
            behavior = handler.stream_unary if requests is not None else handler.unary_unary
            response = await behavior(request, ctx)
            serialize = handler.response_serializer
            data = serialize(response) if serialize is not None else response
            return lf.frame(lf.MESSAGE, data) + ctx.status_frame(grpc.StatusCode.OK)
        behavior = handler.stream_stream if requests is not None else handler.unary_stream
        if inspect.isasyncgenfunction(behavior):
            async for response in behavior(request, ctx):
                await ctx.write(response)
        else:
            await behavior(request, ctx)
        return ctx.status_frame(grpc.StatusCode.OK)


def _send_final(conn: lf.FrameConnection, status: bytes, ctx: LeanContext) -> None:
    with contextlib.suppress(lf.ConnectionLost):
        conn.send(status)
    ctx.finish()


def _status(code: grpc.StatusCode, details: str) -> bytes:
    number: int = code.value[0]
    return lf.frame(lf.STATUS, lf.encode_status(number, details, ()))
