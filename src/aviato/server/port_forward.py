"""Exposed ports: listeners of the local service that relay clients to ports inside sandboxes.

For each port a RUNNING sandbox exposes (`SandboxConfig.exposed_ports`), the service listens on
an ephemeral port of 127.0.0.1; each connection accepted there asks the sandbox's handle for a
connection to that port on the sandbox's own loopback (`SandboxHandle.connect_port`: the
supervisor connects inside the sandbox's network namespace and hands the socket back) and then
relays bytes both ways until both directions have ended. Nothing else is reachable through a
listener: the port is fixed when the listener opens, and the handle can reach only its sandbox.

Bounds (a sandbox that floods, or a client that never reads, must not grow the service): the
relay of aviato.egress.relay, under 0.5 MiB a connection whatever the peers do; a sandbox has
at most `MAX_CONNECTIONS` relayed connections at once (more are closed as soon as they are
accepted).

An end-of-file from one side is passed on as a half-close (`write_eof`), so request/response
protocols that half-close work; an error on either side (reset, broken pipe) closes both. A
refused connect (nothing listens in the sandbox, the sandbox is gone) closes the client's
connection at once. When the sandbox ends its listeners close at once; its connections get
`FLUSH_SECONDS` to deliver what the sandbox sent before it ended, then are closed.

Addresses: `open` may be given the addresses a previous run of the service used (after a
restart); each is bound again if it can be, else a new ephemeral port is taken.

What this cannot do: tell who connects. The listeners are on 127.0.0.1, so any process of any
user on the service's host can reach an exposed port (docs/networking.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aviato.egress.relay import CHUNK, FLUSH_SECONDS, close_side, relay
from aviato.runtime.base import SandboxHandle, SandboxRuntimeError

__all__ = ["CHUNK", "FLUSH_SECONDS", "HOST", "MAX_CONNECTIONS", "PortForwarder"]

log = logging.getLogger("aviato.server.port_forward")

HOST = "127.0.0.1"
MAX_CONNECTIONS = 64


@dataclass
class _Exposed:
    """The listeners and open connections of one sandbox."""

    sandbox_id: str
    handle: SandboxHandle
    servers: list[asyncio.Server] = field(default_factory=list)
    connections: set[asyncio.Task[None]] = field(default_factory=set)


class PortForwarder:
    """The exposed ports of the running sandboxes of one service (use from its event loop)."""

    def __init__(self, host: str = HOST, max_connections: int = MAX_CONNECTIONS) -> None:
        self._host = host
        self._max_connections = max_connections
        self._sandboxes: dict[str, _Exposed] = {}

    async def open(
        self,
        sandbox_id: str,
        handle: SandboxHandle,
        ports: Sequence[int],
        previous: Mapping[int, str] | None = None,
    ) -> tuple[tuple[int, str], ...]:
        """Listens for each of `ports` and returns (port, "127.0.0.1:N") pairs in their order.
        `previous`: the addresses an earlier run of the service used, bound again if free.
        Opening a sandbox that is open already closes its listeners first."""
        await self.close(sandbox_id)
        exposed = _Exposed(sandbox_id, handle)
        self._sandboxes[sandbox_id] = exposed
        pairs: list[tuple[int, str]] = []
        try:
            for port in ports:
                server = await self._listen(exposed, port, _port_of((previous or {}).get(port)))
                exposed.servers.append(server)
                bound = server.sockets[0].getsockname()
                pairs.append((port, f"{bound[0]}:{bound[1]}"))
        except BaseException:
            await self.close(sandbox_id)
            raise
        return tuple(pairs)

    async def close(self, sandbox_id: str, grace_seconds: float = 0.0) -> None:
        """Closes the listeners of `sandbox_id` at once (nothing if none are open) and its
        connections after at most `grace_seconds`: what the sandbox sent before it ended is
        still in the kernel's buffers and the relays' and reaches a client that reads it."""
        exposed = self._sandboxes.pop(sandbox_id, None)
        if exposed is None:
            return
        for server in exposed.servers:
            server.close()
        try:
            if exposed.connections and grace_seconds > 0:
                await asyncio.wait(set(exposed.connections), timeout=grace_seconds)
        finally:  # also when cancelled (the service shutting down)
            for task in list(exposed.connections):
                task.cancel()
            if exposed.connections:
                await asyncio.gather(*exposed.connections, return_exceptions=True)
        for server in exposed.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def close_all(self) -> None:
        for sandbox_id in list(self._sandboxes):
            await self.close(sandbox_id)

    async def _listen(self, exposed: _Exposed, port: int, wanted: int) -> asyncio.Server:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(exposed, port, reader, writer)

        if wanted:
            try:
                return await asyncio.start_server(accepted, self._host, wanted, limit=CHUNK)
            except OSError as e:
                log.info("sandbox %s port %d: %s:%d is taken (%s); using a new port",
                         exposed.sandbox_id, port, self._host, wanted, e)  # fmt: skip
        return await asyncio.start_server(accepted, self._host, 0, limit=CHUNK)

    async def _serve(
        self,
        exposed: _Exposed,
        port: int,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        task = asyncio.current_task()
        if (
            task is None
            or self._sandboxes.get(exposed.sandbox_id) is not exposed
            or len(exposed.connections) >= self._max_connections
        ):
            client_writer.transport.abort()
            return
        exposed.connections.add(task)
        inner_writer: asyncio.StreamWriter | None = None
        clean = False
        try:
            try:
                sock = await exposed.handle.connect_port(port)
            except (SandboxRuntimeError, OSError) as e:
                log.debug("sandbox %s port %d: %s", exposed.sandbox_id, port, e)
                return
            sock.setblocking(False)
            try:
                inner_reader, inner_writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
            except OSError:
                sock.close()
                return
            clean = await relay(client_reader, client_writer, inner_reader, inner_writer)
        finally:
            try:
                writers = [w for w in (inner_writer, client_writer) if w is not None]
                await asyncio.gather(*(close_side(writer, clean) for writer in writers))
            finally:
                exposed.connections.discard(task)


def _port_of(address: str | None) -> int:
    """The port of a recorded "host:port" address (0 when there is none or it is malformed)."""
    if not address:
        return 0
    _, _, text = address.rpartition(":")
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else 0
