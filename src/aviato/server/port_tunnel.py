"""ForwardPort: one TCP connection to an exposed port of a sandbox, carried by a gRPC stream.

The exposed ports' listeners (`port_forward`) are on the service host's 127.0.0.1, which a
client of a remote service cannot reach. ForwardPort is the same relay with the caller's gRPC
call in place of the accepted socket, so it has the call's authentication (the API key, and TLS
when the service has it) and its owner check: the first message names a sandbox of the caller's
(another owner's is NOT_FOUND, as everywhere) and one of its exposed ports; the service asks the
sandbox's handle for a connection to that port (`SandboxHandle.connect_port`, as the listeners
do; under Ray the handle relays it from the sandbox's node) and relays bytes both ways.

Wire rules (`aviato.v1.PortData`): `data` at most `CHUNK` bytes a message; `eof` is a half-close
of the sender's direction; `consumed` gives credit back. Each side keeps at most `WINDOW` bytes
of its data in flight, so the service reads from the sandbox only what the client has taken
(delivered to its own socket), and writes to the sandbox before it reads the client's next
message. The call ends OK once both directions ended (and the client half-closed its request
stream, for which it is given `HALF_CLOSE_LINGER_SECONDS`); a reset on the sandbox's side ends
it with UNAVAILABLE, a client that breaks these rules with INVALID_ARGUMENT, and a client that
goes away (the call cancelled) closes the sandbox's side.

Bounds: per call, one chunk read from the sandbox and the socket's send buffer (asyncio's
high-water mark); a sandbox has at most `MAX_TUNNELS` forwarded connections at once (more are
refused with RESOURCE_EXHAUSTED), apart from the `MAX_CONNECTIONS` of its listeners; the first
message must come within `FIRST_MESSAGE_SECONDS`.

What this cannot do: tell the sandbox who connects (the sandbox sees a connection from its own
loopback, as with the listeners), or carry UDP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aviato.runtime.base import SandboxRuntimeError
from aviato.server import errors
from aviato.server.errors import (
    CapacityExceeded,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from aviato.server.servicer import ServicerBase
from aviato.server.streams import Resumable
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.port_window import CHUNK, WINDOW, ReceiveWindow, SendWindow, WindowClosed

if TYPE_CHECKING:
    from aviato.server.servicer import Ctx

__all__ = [
    "CHUNK",
    "FIRST_MESSAGE_SECONDS",
    "MAX_TUNNELS",
    "WINDOW",
    "PortTunnels",
]

log = logging.getLogger("aviato.server.port_tunnel")

MAX_TUNNELS = 64
FIRST_MESSAGE_SECONDS = 30.0
HALF_CLOSE_LINGER_SECONDS = 2.0


class _Reset(Exception):
    """The sandbox's side of the connection broke (reset, broken pipe)."""


class _Misbehaved(Exception):
    """The client broke the wire rules (data past its window or after its eof, a message over
    CHUNK bytes)."""


class _ClientGone(Exception):
    """The client's request stream ended or broke before its direction was over."""


class PortTunnels(ServicerBase):
    """ForwardPort (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tunnels: Counter[str] = Counter()  # open ForwardPort calls per sandbox

    async def ForwardPort(self, request_iterator: AsyncIterator[pb.PortData], context: Ctx) -> None:
        owner = await self._owner_or_abort(context)
        # Reads that survive a cancelled reader (a pump stopped mid-read, a drain's timeout):
        # a read cancelled inside grpc ends the call without the status we are about to send.
        requests = Resumable(aiter(request_iterator))
        sandbox_id = ""
        try:
            first = await _first_message(requests)
            sandbox_id, port = first.sandbox_id, first.port
            self._check_port(owner, sandbox_id, port)
            handle = await self._lifecycle.running_handle(owner, sandbox_id)
            if self._tunnels[sandbox_id] >= MAX_TUNNELS:
                raise CapacityExceeded(
                    f"sandbox {sandbox_id} has {MAX_TUNNELS} forwarded connections open already; "
                    "close one and try again",
                    sandbox_id=sandbox_id,
                )
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=sandbox_id)
        self._tunnels[sandbox_id] += 1
        try:
            try:
                sock = await handle.connect_port(port)
            except (ServiceError, SandboxRuntimeError) as e:
                await errors.abort(context, e, sandbox_id=sandbox_id)
            except OSError as e:
                await errors.abort(
                    context,
                    Unavailable(f"sandbox {sandbox_id} port {port}: {e}", sandbox_id=sandbox_id),
                )
            try:
                await _Tunnel(sock, requests, context.write, first.data).run()
            except _Reset as e:
                where = f"sandbox {sandbox_id} port {port}"
                await errors.abort(context, Unavailable(f"{where}: {e}", sandbox_id=sandbox_id))
            except _Misbehaved as e:
                await _drain(requests)
                await errors.abort(context, InvalidArgument("data", str(e)))
        finally:
            self._tunnels[sandbox_id] -= 1
            if self._tunnels[sandbox_id] <= 0:
                del self._tunnels[sandbox_id]

    def _check_port(self, owner: str, sandbox_id: str, port: int) -> None:
        """NotFound for a sandbox the caller does not own; InvalidArgument for a port it does
        not expose."""
        if not sandbox_id:
            raise InvalidArgument("sandbox_id", "the first message must name the sandbox")
        rec = self._lifecycle.record(owner, sandbox_id)
        if not 1 <= port <= 65535:
            raise InvalidArgument("port", f"{port} is not a TCP port (1 to 65535)")
        exposed = rec.config.exposed_ports
        if port not in exposed:
            asked = ", ".join(str(p) for p in exposed) or "none"
            raise InvalidArgument(
                "port",
                f"sandbox {sandbox_id} does not expose port {port} (it exposes: {asked}); "
                "ports are chosen when the sandbox is made (exposed_ports)",
            )


async def _drain(requests: AsyncIterator[pb.PortData]) -> None:
    """Reads and drops what the client still sends, until it ends its stream or for at most
    HALF_CLOSE_LINGER_SECONDS: a status sent while the client is still writing reaches it as
    gRPC's own INTERNAL error in place of ours (as `streams.drain_upload` explains)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(HALF_CLOSE_LINGER_SECONDS):
            async for _ in requests:
                pass


async def _first_message(requests: AsyncIterator[pb.PortData]) -> pb.PortData:
    try:
        async with asyncio.timeout(FIRST_MESSAGE_SECONDS):
            first = await anext(requests)
    except StopAsyncIteration:
        raise InvalidArgument(
            "sandbox_id", "the stream ended before its first message named a sandbox and port"
        ) from None
    except TimeoutError:
        raise InvalidArgument(
            "sandbox_id",
            f"no first message naming a sandbox and port in {FIRST_MESSAGE_SECONDS:g} s",
        ) from None
    if len(first.data) > CHUNK or first.eof or first.consumed:
        raise InvalidArgument("data", f"the first message carries at most {CHUNK} bytes of data")
    return first


class _Tunnel:
    """The relay of one ForwardPort call between the client's stream and the sandbox's socket:
    three pumps (the client's messages; their data to the sandbox; the sandbox's data to the
    client), so that credit keeps flowing while a socket holds a direction back."""

    def __init__(
        self,
        sock: socket.socket,
        requests: AsyncIterator[pb.PortData],
        write: Callable[[pb.PortData], Awaitable[None]],
        first_data: bytes,
    ) -> None:
        self._sock = sock
        self._requests = requests
        self._write = write
        self._write_lock = asyncio.Lock()
        self._sending = SendWindow()  # our data to the client
        self._receiving = ReceiveWindow()  # the client's data to us
        # The client's data, in order; None is its eof. At most WINDOW bytes (checked).
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        if first_data:
            self._receiving.received(len(first_data))
            self._inbox.put_nowait(first_data)
        self._client_eof = asyncio.Event()

    async def run(self) -> None:
        """Relays until both directions ended, or the client went away (nobody to tell).
        Raises _Reset when the sandbox's side broke, _Misbehaved when the client broke the
        rules. Closes the socket."""
        self._sock.setblocking(False)
        try:
            reader, writer = await asyncio.open_connection(sock=self._sock, limit=CHUNK)
        except OSError as e:
            self._sock.close()
            raise _Reset(f"cannot relay: {e}") from None
        messages = asyncio.ensure_future(self._client_messages())
        up = asyncio.ensure_future(self._client_to_sandbox(writer))
        down = asyncio.ensure_future(self._sandbox_to_client(reader))
        try:
            pending: set[asyncio.Future[None]] = {messages, up, down}
            while not (up.done() and down.done()):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if _client_gone(done):
                    return
            # Both directions are over: the client half-closes its stream once it has read our
            # eof; until then it may still be sending credit (which is dropped).
            if not messages.done():
                await asyncio.wait({messages}, timeout=HALF_CLOSE_LINGER_SECONDS)
        finally:
            for task in (messages, up, down):
                task.cancel()
            await asyncio.gather(messages, up, down, return_exceptions=True)
            writer.transport.abort()

    async def _send(self, message: pb.PortData) -> None:
        async with self._write_lock:
            await self._write(message)

    async def _client_messages(self) -> None:
        """Takes the client's messages: credit for our direction, data and eof for its own.
        Returns when the client ends its request stream (after its eof)."""
        try:
            async for message in self._requests:
                self._sending.credited(message.consumed)
                if message.data:
                    if self._client_eof.is_set() or len(message.data) > CHUNK:
                        raise _Misbehaved(f"data after eof, or over {CHUNK} bytes in one message")
                    try:
                        self._receiving.received(len(message.data))
                    except ValueError as e:
                        raise _Misbehaved(str(e)) from None
                    self._inbox.put_nowait(message.data)
                if message.eof and not self._client_eof.is_set():
                    self._client_eof.set()
                    self._inbox.put_nowait(None)
        except (_ClientGone, _Misbehaved, asyncio.CancelledError):
            raise
        except Exception as e:  # the request stream broke (the client went away), or a bad peer
            raise _ClientGone(str(e)) from None
        finally:
            self._sending.close()
        if not self._client_eof.is_set():
            raise _ClientGone("the request stream ended before its eof")

    async def _client_to_sandbox(self, writer: asyncio.StreamWriter) -> None:
        """Writes the client's data to the sandbox, gives credit back once the socket took it,
        and passes the client's half-close on."""
        try:
            while (data := await self._inbox.get()) is not None:
                writer.write(data)
                await writer.drain()
                if credit := self._receiving.delivered(len(data), flush=self._inbox.empty()):
                    await self._send(pb.PortData(consumed=credit))
            if writer.can_write_eof() and not writer.transport.is_closing():
                writer.write_eof()
        except (ConnectionError, OSError) as e:
            raise _Reset(f"the connection in the sandbox broke: {e}") from None

    async def _sandbox_to_client(self, reader: asyncio.StreamReader) -> None:
        """Reads from the sandbox only what the client's window allows, and ends with eof."""
        while True:
            try:
                room = await self._sending.room()
            except WindowClosed as e:
                raise _ClientGone(str(e)) from None
            try:
                data = await reader.read(min(CHUNK, room))
            except (ConnectionError, OSError) as e:
                raise _Reset(f"the connection in the sandbox broke: {e}") from None
            if not data:
                await self._send(pb.PortData(eof=True))
                return
            self._sending.sent(len(data))
            await self._send(pb.PortData(data=data))


def _client_gone(done: set[asyncio.Future[None]]) -> bool:
    """True when a finished pump found the client gone; a pump's other error is raised."""
    for task in done:
        error = task.exception()
        if isinstance(error, _ClientGone):
            return True
        if error is not None:
            raise error
    return False
