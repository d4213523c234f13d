"""`PortForward`: a sandbox's exposed port, reached on this machine's 127.0.0.1 through the service.

`Sandbox.forward_port(8080)` listens on 127.0.0.1:local_port (0: a free port) of the client's
machine, as `kubectl port-forward` does; each connection accepted there gets a ForwardPort call
of its own (the service relays it into the sandbox), so it works wherever the service is: the
local one, or a remote one over TLS with an API key. Everything runs on the SDK's background
loop; the object is used from any thread or event loop.

Bounds: each connection holds at most the protocol's window (256 KiB) and one chunk each way
(`aviato.v1.port_window`): the local socket is read only as fast as the service takes the bytes,
and the service's bytes only as fast as the local socket takes them. At most `MAX_CONNECTIONS`
connections at once (more are closed as soon as they are accepted).

A half-close is passed on both ways. A connection the service refuses (nothing listens in the
sandbox yet, ...) is closed at once and its reason logged (logger "aviato", WARNING). When the
sandbox ends, the forward ends by itself: its listener closes at once, its open connections get
up to 10 s to deliver what the sandbox sent before it ended, and `wait_closed()` raises
`SandboxNotRunningError` saying so.

What this cannot do: keep other users of this machine out. The listener is on 127.0.0.1, so any
local process can use it while it is open, with the caller's credentials (as with
`kubectl port-forward`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, Self

from aviato._client import Client
from aviato._operation import OperationRef
from aviato._status import SandboxStatus
from aviato._transport.base import PortStream
from aviato.exceptions import (
    AviatoError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxValidationError,
)
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.port_window import CHUNK

__all__ = ["MAX_CONNECTIONS", "PortForward"]

logger = logging.getLogger("aviato")

HOST = "127.0.0.1"
MAX_CONNECTIONS = 64
_WATCH_SLICE_SECONDS = 60.0
_FLUSH_SECONDS = 10.0
_MIN_POLL_SECONDS = 1.0

#: Resolves the sandbox's client and id (starting the sandbox if it was not).
Resolver = Callable[[], Awaitable[tuple[Client, str]]]


class PortForward:
    """A listener on this machine's 127.0.0.1 that relays each connection to one exposed port
    of a sandbox through the service (see the module docstring). Made by
    `Sandbox.forward_port`; it starts opening at once.

    ``with sb.forward_port(8080) as fwd:`` / ``async with ...`` wait until it listens and close
    it at the end; ``fwd.address`` is ``"127.0.0.1:N"`` (blocks until it listens: in async code
    use ``async with`` or ``await fwd`` first); ``fwd.close()`` ends it and its connections.
    """

    def __init__(self, resolve: Resolver, port: int, local_port: int) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise SandboxValidationError(f"port: {port!r} is not a TCP port (1 to 65535)")
        if (
            isinstance(local_port, bool)
            or not isinstance(local_port, int)
            or not 0 <= local_port <= 65535
        ):
            raise SandboxValidationError(
                f"local_port: {local_port!r} is not a TCP port (0 for any free one, or 1 to 65535)"
            )
        self._resolve = resolve
        self._port = port
        self._local_port = 0
        self._sandbox_id: str | None = None
        self._server: asyncio.Server | None = None
        self._watch: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._ended: asyncio.Future[None] | None = None
        self._closed = False
        self._opened: OperationRef[None] = OperationRef._of(self._open(local_port))

    # -- what it is -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port inside the sandbox."""
        return self._port

    @property
    def local_port(self) -> int:
        """The port this machine listens on (blocks until it listens)."""
        self._opened.result()
        return self._local_port

    @property
    def address(self) -> str:
        """``"127.0.0.1:N"``, where a client on this machine connects (blocks until it listens;
        raises what prevented it)."""
        return f"{HOST}:{self.local_port}"

    @property
    def sandbox_id(self) -> str | None:
        return self._sandbox_id

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        where = f"{HOST}:{self._local_port}" if self._local_port else "not listening"
        state = "closed" if self._closed else where
        return f"<PortForward {state} -> {self._sandbox_id}:{self._port}>"

    # -- lifecycle ------------------------------------------------------------------------------

    async def _open(self, local_port: int) -> None:
        client, sandbox_id = await self._resolve()
        self._sandbox_id = sandbox_id
        record = await client.with_retry(
            lambda: client.transport.get_sandbox(sandbox_id, call_timeout=60.0), op="forward port"
        )
        status = SandboxStatus.from_proto(record.status)
        if status.is_terminal:
            raise SandboxNotRunningError(
                f"forward port failed: sandbox {sandbox_id} is {status.value}: its ports are "
                "reachable only while it runs",
                sandbox_id=sandbox_id,
            )
        exposed = list(record.spec.exposed_ports)
        if self._port not in exposed:
            asked = ", ".join(str(p) for p in exposed) or "none"
            raise SandboxValidationError(
                f"forward port failed: sandbox {sandbox_id} does not expose port {self._port} "
                f"(it exposes: {asked}); ports are chosen when the sandbox is made "
                "(network=NetworkOptions(exposed_ports=[...]))",
                sandbox_id=sandbox_id,
            )
        if self._closed:
            return

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(client, sandbox_id, reader, writer)

        try:
            self._server = await asyncio.start_server(accepted, HOST, local_port, limit=CHUNK)
        except OSError as e:
            raise SandboxValidationError(
                f"forward port failed: cannot listen on {HOST}:{local_port}: {e.strerror or e}",
                sandbox_id=sandbox_id,
            ) from None
        self._local_port = int(self._server.sockets[0].getsockname()[1])
        if self._closed:  # closed while it started to listen
            self._server.close()
            return
        self._ended = asyncio.get_running_loop().create_future()
        self._watch = asyncio.ensure_future(self._watch_sandbox(client, sandbox_id))

    def close(self) -> OperationRef[None]:
        """Stops listening and closes the open connections. Idempotent."""
        return OperationRef._of(self._close(None))

    def wait_closed(self) -> OperationRef[None]:
        """Resolves when the forward has ended: by `close()` (None), or because the sandbox
        ended (raises `SandboxNotRunningError`) or could not be reached any more."""

        async def ended() -> None:
            with contextlib.suppress(AviatoError):
                await self._opened
            if self._ended is None:  # it never opened: the same error again
                await self._opened
                return
            await asyncio.shield(self._ended)

        return OperationRef._of(ended())

    async def _close(self, reason: BaseException | None, grace_seconds: float = 0.0) -> None:
        """Stops listening at once; the open connections get `grace_seconds` to deliver what
        they carry (what a sandbox sent just before it ended), then are closed."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
        try:
            if self._connections and grace_seconds > 0:
                await asyncio.wait(set(self._connections), timeout=grace_seconds)
        finally:
            for task in list(self._connections):
                task.cancel()
            if self._connections:
                await asyncio.gather(*self._connections, return_exceptions=True)
        if self._ended is not None and not self._ended.done():
            if reason is None:
                self._ended.set_result(None)
            else:
                self._ended.set_exception(reason)
                self._ended.add_done_callback(lambda f: f.exception())  # read, even if unasked

    async def _watch_sandbox(self, client: Client, sandbox_id: str) -> None:
        """Ends the forward when the sandbox ends (one long poll at a time)."""
        request = pb.WaitSandboxRequest(
            sandbox_id=sandbox_id,
            condition=pb.WaitSandboxRequest.CONDITION_TERMINAL,
            timeout_seconds=_WATCH_SLICE_SECONDS,
        )
        while True:
            asked = time.monotonic()
            try:
                record = await client.with_retry(
                    lambda: client.transport.wait_sandbox(
                        request, call_timeout=_WATCH_SLICE_SECONDS + 30.0
                    ),
                    op="forward port",
                )
            except (SandboxNotFoundError, SandboxNotRunningError) as e:
                await self._close(e)
                return
            except AviatoError as e:
                logger.debug("forward port: watching sandbox %s: %s", sandbox_id, e)
                await asyncio.sleep(5.0)
                continue
            status = SandboxStatus.from_proto(record.status)
            if not status.is_terminal:
                # A service that answers before its timeout must not make this a busy loop.
                await asyncio.sleep(max(0.0, _MIN_POLL_SECONDS - (time.monotonic() - asked)))
                continue
            await self._close(
                SandboxNotRunningError(
                    f"sandbox {sandbox_id} is {status.value}: forwarding of port "
                    f"{self._port} stopped",
                    sandbox_id=sandbox_id,
                ),
                grace_seconds=_FLUSH_SECONDS,
            )
            return

    # -- one connection -------------------------------------------------------------------------

    async def _serve(
        self,
        client: Client,
        sandbox_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        task = asyncio.current_task()
        if task is None or self._closed or len(self._connections) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._connections.add(task)
        stream: PortStream | None = None
        clean = False
        try:
            stream = await client.transport.forward_port(sandbox_id, self._port, call_timeout=None)
            clean = await _relay(reader, writer, stream)
        except AviatoError as e:
            logger.warning("forward port %d of sandbox %s: %s", self._port, sandbox_id, e)
        except asyncio.CancelledError:
            pass  # closed by `close()`: asyncio's server would log a cancelled handler
        finally:
            if stream is not None and not clean:
                stream.cancel()
            await _close_local(writer, clean)
            self._connections.discard(task)

    # -- the hybrid surface ---------------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, Self]:
        async def opened() -> Self:
            await self._opened
            return self

        return opened().__await__()

    def __enter__(self) -> Self:
        try:
            self._opened.result()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close().result()

    async def __aenter__(self) -> Self:
        try:
            await self._opened
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def _relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: PortStream
) -> bool:
    """Copies the local socket to the stream and back until both directions ended (True); a
    failure of either side raises or returns False."""
    up = asyncio.ensure_future(_local_to_sandbox(reader, stream))
    down = asyncio.ensure_future(_sandbox_to_local(stream, writer))
    try:
        pending: set[asyncio.Future[None]] = {up, down}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if isinstance(error, AviatoError):
                    raise error
                if error is not None:
                    return False  # the local socket broke
        await stream.finish()
        return True
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)


async def _local_to_sandbox(reader: asyncio.StreamReader, stream: PortStream) -> None:
    while data := await reader.read(CHUNK):
        await stream.write(data)
    await stream.write_eof()


async def _sandbox_to_local(stream: PortStream, writer: asyncio.StreamWriter) -> None:
    while (data := await stream.read()) is not None:
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.transport.is_closing():
        writer.write_eof()


async def _close_local(writer: asyncio.StreamWriter, flush: bool) -> None:
    """Closes the local side: with `flush`, once what is buffered was sent (bounded)."""
    try:
        if flush:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), _FLUSH_SECONDS)
    finally:
        writer.transport.abort()
