"""Port connections to a sandbox on another node: `ConnectPort` of the direct channel.

The service's exposed ports (its listeners, and ForwardPort) ask a sandbox's handle for a
connected socket (`SandboxHandle.connect_port`). Under Ray the sandbox's supervisor is on
another node, so `RemoteSandbox.connect_port` makes one of its own: a socketpair, whose one end
it returns and whose other end it relays over a `ConnectPort` call of the node host's direct
channel (execwire.py); on the node, the host calls its local handle's `connect_port` and relays
that socket over the same call. Both sides run the same `relay`, under the credit of
`aviato.v1.port_window` (at most 256 KiB in flight each way, 64 KiB a frame), so neither reads
more from its socket than the other side's socket has taken.

The node host's first frame says whether the connection was made (node.proto, `PortFrame`): a
refusal travels as `error_code`, so that a status of the channel itself (the node host does not
answer) is never mistaken for "nothing listens". A connection needs the direct channel; without
it (it failed to start on that node) `RemoteSandbox.connect_port` raises `Unsupported`.

When either socket breaks or the call fails, both ends are closed (the service's client sees the
connection end); a half-close is passed on as `eof`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import (
    PortRefused,
    PortUnreachable,
    SandboxGone,
    SandboxHandle,
    SandboxRuntimeError,
    Unsupported,
)
from aviato.v1.port_window import CHUNK, ReceiveWindow, SendWindow, WindowClosed

__all__ = ["CONNECT_SECONDS", "connect_remote_port", "relay", "serve_connect_port"]

log = logging.getLogger("aviato.cluster.port_relay")

EOF: Any = getattr(grpc.aio, "EOF", None)  # what a call's read() returns after its last frame
#: The node host's answer to a connect (its supervisor gives up on a connect sooner).
CONNECT_SECONDS = 20.0
#: After both directions ended: how long the last frames (the peer's end) may take.
END_SECONDS = 5.0

Receive = Callable[[], Awaitable["npb.PortFrame | None"]]
Send = Callable[[npb.PortFrame], Awaitable[None]]

_REFUSALS: dict[str, type[SandboxRuntimeError]] = {
    "UNAVAILABLE": PortUnreachable,
    "FAILED_PRECONDITION": SandboxGone,
    "INVALID_ARGUMENT": PortRefused,
}


class RelayBroken(Exception):
    """The peer broke the rules (past its window, data after its eof)."""


async def relay(
    sock: socket.socket,
    receive: Receive,
    send: Send,
    finish: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Relays `sock` (non-blocking) and a frame stream until both directions have ended.
    `receive` returns the peer's next frame, None at the end of its stream; `send` sends one;
    `finish` (the side that opened the call: its half-close) runs once both directions ended,
    before the peer's end of stream is awaited. Raises what broke it (OSError: the socket;
    RelayBroken; the stream's own errors)."""
    reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
    sending, receiving = SendWindow(), ReceiveWindow()
    inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
    lock = asyncio.Lock()
    peer_eof = False

    async def send_frame(frame: npb.PortFrame) -> None:
        async with lock:
            await send(frame)

    async def frames() -> None:
        nonlocal peer_eof
        try:
            while (frame := await receive()) is not None:
                sending.credited(frame.consumed)
                if frame.data:
                    if peer_eof or len(frame.data) > CHUNK:
                        raise RelayBroken("data after eof, or a frame over 64 KiB")
                    try:
                        receiving.received(len(frame.data))
                    except ValueError as e:
                        raise RelayBroken(str(e)) from None
                    inbox.put_nowait(frame.data)
                if frame.eof and not peer_eof:
                    peer_eof = True
                    inbox.put_nowait(None)
        finally:
            sending.close()
        if not peer_eof:
            raise RelayBroken("the stream ended before its eof")

    async def to_socket() -> None:
        while (data := await inbox.get()) is not None:
            writer.write(data)
            await writer.drain()
            if credit := receiving.delivered(len(data), flush=inbox.empty()):
                await send_frame(npb.PortFrame(consumed=credit))
        if writer.can_write_eof() and not writer.transport.is_closing():
            writer.write_eof()

    async def from_socket() -> None:
        while True:
            try:
                room = await sending.room()
            except WindowClosed as e:
                raise RelayBroken(str(e)) from None
            data = await reader.read(min(CHUNK, room))
            if not data:
                await send_frame(npb.PortFrame(eof=True))
                return
            sending.sent(len(data))
            await send_frame(npb.PortFrame(data=data))

    receiver = asyncio.ensure_future(frames())
    pumps = [asyncio.ensure_future(to_socket()), asyncio.ensure_future(from_socket())]
    try:
        pending: set[asyncio.Future[None]] = {receiver, *pumps}
        while not all(p.done() for p in pumps):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if (error := task.exception()) is not None:
                    raise error
        if finish is not None:
            await finish()
        if not receiver.done():  # the peer's end of its stream (or its credit, dropped)
            await asyncio.wait({receiver}, timeout=END_SECONDS)
    finally:
        for task in (receiver, *pumps):
            task.cancel()
        await asyncio.gather(receiver, *pumps, return_exceptions=True)
        writer.transport.abort()


# --- the node host's side ----------------------------------------------------------------------


async def serve_connect_port(
    handle_of: Callable[[str], Awaitable[SandboxHandle]],
    requests: AsyncIterator[npb.PortFrame],
    context: Any,
) -> None:
    """ConnectPort on the node host (the caller has checked the token)."""
    requests = aiter(requests)
    try:
        async with asyncio.timeout(CONNECT_SECONDS):
            first = await anext(requests)
    except (StopAsyncIteration, TimeoutError):
        return
    try:
        handle = await handle_of(first.sandbox_id)
        sock = await handle.connect_port(first.port)
    except SandboxRuntimeError as e:
        await context.write(npb.PortFrame(error_code=e.code, error_message=str(e)))
        return
    sock.setblocking(False)
    await context.write(npb.PortFrame())  # connected

    async def receive() -> npb.PortFrame | None:
        try:
            frame: npb.PortFrame = await anext(requests)
        except StopAsyncIteration:
            return None
        return frame

    try:
        await relay(sock, receive, context.write)
    except (OSError, RelayBroken) as e:
        log.debug("port %d of %s: %s", first.port, first.sandbox_id, e)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"the connection broke: {e}")
    finally:
        sock.close()


# --- the control plane's side ------------------------------------------------------------------


async def connect_remote_port(
    call: Any,
    sandbox_id: str,
    port: int,
    race: Callable[[Awaitable[Any]], Awaitable[Any]],
    relays: set[asyncio.Task[None]],
) -> socket.socket:
    """A connected socket (blocking mode, the caller's) whose peer is relayed to `port` in
    sandbox `sandbox_id` over `call`, a new ConnectPort call (execwire.open_connect_port).
    `race` bounds waits by the node's loss (NodeLink.race); the relay task is kept in `relays`
    until it ends (cancel them to close). Raises PortUnreachable, PortRefused, SandboxGone as
    SandboxHandle.connect_port does."""
    try:
        await race(call.write(npb.PortFrame(sandbox_id=sandbox_id, port=port)))
        answer = await race(asyncio.wait_for(_first_answer(call), CONNECT_SECONDS))
    except TimeoutError:
        call.cancel()
        raise SandboxGone(f"sandbox {sandbox_id}: its node did not answer in time") from None
    except BaseException:
        call.cancel()
        raise
    if isinstance(answer, BaseException):
        call.cancel()
        raise answer
    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    task = asyncio.ensure_future(_relay_call(call, mine, sandbox_id, port))
    relays.add(task)
    task.add_done_callback(relays.discard)
    return theirs


async def _first_answer(call: Any) -> npb.PortFrame | SandboxRuntimeError:
    """The node host's first frame, or the error it stands for (returned, not raised, so that
    NodeLink.race does not take a sandbox's refusal for a node that does not answer)."""
    try:
        frame = await call.read()
    except grpc.aio.AioRpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return SandboxGone(f"the node host does not answer: {e.code().name}")
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:
            return Unsupported("the sandbox's node host cannot connect ports (an older release)")
        error = SandboxRuntimeError(f"node host: {e.details()}")
        error.code = e.code().name
        return error
    if frame is EOF:
        return SandboxGone("the node host ended the port connection before answering")
    if frame.error_code:
        refusal = _REFUSALS.get(frame.error_code, SandboxRuntimeError)(frame.error_message)
        refusal.code = frame.error_code
        return refusal
    return frame  # type: ignore[no-any-return]


async def _relay_call(call: Any, sock: socket.socket, sandbox_id: str, port: int) -> None:
    async def receive() -> npb.PortFrame | None:
        frame = await call.read()
        return None if frame is EOF else frame

    try:
        await relay(sock, receive, call.write, call.done_writing)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # the socket, the rules or the call: the connection ends either way
        log.debug("port %d of %s on its node: %s", port, sandbox_id, e)
    finally:
        call.cancel()
        sock.close()
