"""One ForwardPort call of the gRPC transport: a forwarded connection to a sandbox's port.

A task of its own reads the service's messages as they come: credit for our direction is taken
at once (so a local socket that is slow to take the sandbox's bytes never holds back the other
direction), and the data waits in a queue that the service's window bounds (`aviato.v1.
port_window`). The final status ends that task: OK after the service's eof, else the mapped
error, raised by the next `read` (and by a `write` that can no longer go out).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import grpc.aio

from aviato._transport.base import PortStream
from aviato._transport.grpc_errors import mapped
from aviato.exceptions import AviatoConnectionError
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.port_window import CHUNK, ReceiveWindow, SendWindow, WindowClosed

__all__ = ["GrpcPortStream"]

_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
_OP = "forward port"
FINISH_SECONDS = 10.0


class GrpcPortStream(PortStream):
    """See the module docstring. `call` is a ForwardPort call whose first message is sent by
    `open`."""

    def __init__(self, call: Any, sandbox_id: str, port: int) -> None:
        self._call = call
        self._sandbox_id = sandbox_id
        self._port = port
        self._sending = SendWindow()
        self._receiving = ReceiveWindow()
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._error: BaseException | None = None
        self._last = 0  # the size of the chunk `read` returned last (not yet credited)
        self._write_lock = asyncio.Lock()
        self._reader = asyncio.ensure_future(self._take_messages())

    async def open(self) -> None:
        await self._send(pb.PortData(sandbox_id=self._sandbox_id, port=self._port))

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._inbox.put_nowait(None)  # wakes a reader, which then raises the error

    async def _take_messages(self) -> None:
        eof = False
        try:
            while True:
                message = await self._call.read()
                if message is _EOF:
                    if not eof:
                        self._fail(
                            AviatoConnectionError(
                                f"{_OP} failed: the service ended the connection to port "
                                f"{self._port} of sandbox {self._sandbox_id} before its end"
                            )
                        )
                    return
                self._sending.credited(message.consumed)
                if message.data and not eof:
                    self._receiving.received(len(message.data))
                    self._inbox.put_nowait(message.data)
                if message.eof and not eof:
                    eof = True
                    self._inbox.put_nowait(None)
        except grpc.RpcError as err:
            self._fail(mapped(err, _OP, self._sandbox_id))
        except ValueError as e:  # past the window: not a service that follows the protocol
            self._call.cancel()
            self._fail(AviatoConnectionError(f"{_OP} failed: {e}"))
        finally:
            self._sending.close()

    async def _send(self, message: pb.PortData) -> None:
        try:
            async with self._write_lock:
                await self._call.write(message)
        except grpc.RpcError as err:
            raise mapped(err, _OP, self._sandbox_id) from None
        except asyncio.CancelledError:
            raise
        except Exception:  # the call has ended: its status says why
            await self._settled()
            raise self._error or AviatoConnectionError(
                f"{_OP} failed: the connection to port {self._port} of sandbox "
                f"{self._sandbox_id} has ended"
            ) from None

    async def _settled(self) -> None:
        with contextlib.suppress(Exception, TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), FINISH_SECONDS)

    async def read(self) -> bytes | None:
        if self._last:
            credit = self._receiving.delivered(self._last, flush=self._inbox.empty())
            self._last = 0
            if credit and self._error is None:
                with contextlib.suppress(Exception):  # the call ended: credit is moot
                    await self._send(pb.PortData(consumed=credit))
        data = await self._inbox.get()
        if data is None:
            if self._error is not None:
                self._inbox.put_nowait(None)  # later reads raise it too
                raise self._error
            return None
        self._last = len(data)
        return data

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                room = await self._sending.room()
            except WindowClosed:
                await self._settled()
                raise self._error or AviatoConnectionError(
                    f"{_OP} failed: the service stopped taking data for port {self._port}"
                ) from None
            piece = bytes(view[: min(room, CHUNK)])
            view = view[len(piece) :]
            self._sending.sent(len(piece))
            await self._send(pb.PortData(data=piece))

    async def write_eof(self) -> None:
        await self._send(pb.PortData(eof=True))

    async def finish(self) -> None:
        with contextlib.suppress(Exception):
            async with self._write_lock:
                await self._call.done_writing()
        await self._settled()
        if not self._reader.done():
            self.cancel()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._call.cancel()
        self._reader.cancel()
