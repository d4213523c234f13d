"""The egress gateway: an HTTP(S) forward proxy that enforces each sandbox's egress policy.

The service gives the gateway, per sandbox, a listening TCP socket (bound inside the sandbox's
network namespace, where the sandbox's programs find it through HTTP(S)_PROXY) and the
sandbox's `EgressPolicy`. Each connection accepted there carries one request:

- `CONNECT host:port` opens a tunnel (HTTPS, or any TCP). The destination is judged (a name by
  the name rules, then every address it resolves to; an IP literal by its address alone), the
  gateway connects by address (each allowed address in turn, within `connect_timeout`) and
  answers `200`. Then it reads what the client sends first: a TLS ClientHello whose server
  name differs from the CONNECT host, an invalid ClientHello, or a plain HTTP request whose
  Host differs, closes the tunnel (counted as refused); anything else is relayed both ways.
  The server's bytes flow from the start, so protocols where the server speaks first work.
- `GET http://host[:port]/path` (any method, absolute form): the same judgement; the Host
  header must name the URI's authority; the request is forwarded in origin form and its
  response relayed (forward.py). Then both connections close.
- Anything else, or a request that is refused: an HTTP error with `Proxy-Status` (RFC 9209)
  and one line in words (proxy_http.Refusal), then the connection closes. Never a hang: the
  request head must arrive within `head_timeout` seconds and `MAX_HEAD` bytes.

`update()` replaces a sandbox's policy: requests judged after it use the new one, and every open
connection that the new policy would not admit is closed at once. `usage()` counts, per
sandbox, the bytes relayed each way, the connections admitted and the requests refused.

Bounds: at most `max_connections_per_sandbox` connections per sandbox at once (more are
answered 503); a request head is at most 16 KiB; each relay holds under 0.5 MiB (relay.py).

What this cannot do: see inside TLS. After the ClientHello a tunnel is opaque: a second HTTP
request inside the same plain-HTTP tunnel, or a Host header inside TLS, is not checked (the
destination address was, and that is the wall: a sandbox reaches only the addresses its
policy admits). UDP (DNS, QUIC) does not pass at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import h11

from aviato.egress.forward import forward
from aviato.egress.host_addresses import HostAddresses
from aviato.egress.policy import IPAddress, address_text, address_verdict, allows_name
from aviato.egress.proxy_http import (
    MAX_HEAD,
    Destination,
    ProxyError,
    Refusal,
    absolute_destination,
    bad_request,
    connect_destination,
    same_authority,
)
from aviato.egress.relay import CHUNK, close_side, pump, run_both
from aviato.egress.resolver import ResolveError, Resolver
from aviato.egress.tunnel import TunnelMismatch, first_bytes_verdict
from aviato.runtime.model import EgressPolicy

__all__ = ["DISCARD_BYTES", "DISCARD_SECONDS", "EgressGateway", "EgressUsage"]

log = logging.getLogger("aviato.egress")

# After a refusal, what the client still sends is read and dropped for at most this long and
# this much, so that closing does not reset the connection before the client reads the answer.
DISCARD_SECONDS = 2.0
DISCARD_BYTES = 4 << 20
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


@dataclass(frozen=True)
class EgressUsage:
    """What a sandbox's egress has done since its gateway opened. `bytes_sent`: relayed from
    the sandbox to the world (request heads and bodies, tunnel bytes); `bytes_received`: from
    the world to the sandbox (responses, tunnel bytes; the gateway's own answers not counted);
    `connections`: requests admitted and connected; `refused`: requests answered with an error
    (policy, DNS, connect failure, malformed, over the limit) plus tunnels closed for a
    TLS server name or Host that differs from their destination."""

    bytes_sent: int = 0
    bytes_received: int = 0
    connections: int = 0
    refused: int = 0


@dataclass
class _Counters:
    bytes_sent: int = 0
    bytes_received: int = 0
    connections: int = 0
    refused: int = 0

    def sent(self, count: int) -> None:
        self.bytes_sent += count

    def received(self, count: int) -> None:
        self.bytes_received += count

    def frozen(self) -> EgressUsage:
        return EgressUsage(self.bytes_sent, self.bytes_received, self.connections, self.refused)


@dataclass(frozen=True)
class _Admitted:
    destination: Destination
    address: IPAddress


@dataclass
class _Sandbox:
    sandbox_id: str
    policy: EgressPolicy
    server: asyncio.Server | None = None
    counters: _Counters = field(default_factory=_Counters)
    connections: set[asyncio.Task[None]] = field(default_factory=set)
    admitted: dict[asyncio.Task[None], _Admitted] = field(default_factory=dict)
    # Connections the gateway itself ended (update, close): their cancellation is expected.
    ended: set[asyncio.Task[None]] = field(default_factory=set)

    def end(self, task: asyncio.Task[None]) -> None:
        self.ended.add(task)
        task.cancel()


class EgressGateway:
    """The egress proxies of the sandboxes of one service (use from its event loop)."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        host_addresses: Callable[[IPAddress], bool] | None = None,
        connect_timeout: float = 10.0,
        max_connections_per_sandbox: int = 256,
        head_timeout: float = 10.0,
    ) -> None:
        self._resolver = resolver
        self._is_host_address = host_addresses or HostAddresses()
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections_per_sandbox
        self._head_timeout = head_timeout
        self._sandboxes: dict[str, _Sandbox] = {}

    async def serve(self, sandbox_id: str, listener: socket.socket, policy: EgressPolicy) -> None:
        """Starts accepting on `listener` (a listening TCP socket; the gateway owns it from
        now on and closes it in `close`) under `policy`, and returns. Serving a sandbox that is
        served already closes its previous listener and connections first (usage restarts)."""
        await self.close(sandbox_id)
        sandbox = _Sandbox(sandbox_id, policy)
        self._sandboxes[sandbox_id] = sandbox

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_connection(sandbox, reader, writer)

        try:
            listener.setblocking(False)
            sandbox.server = await asyncio.start_server(accepted, sock=listener, limit=CHUNK)
        except BaseException:
            self._sandboxes.pop(sandbox_id, None)
            listener.close()
            raise

    def update(self, sandbox_id: str, policy: EgressPolicy) -> None:
        """Replaces the policy of a served sandbox: requests judged from now on use it, and
        every open connection it would not admit is closed at once. KeyError if not served."""
        sandbox = self._served(sandbox_id)
        sandbox.policy = policy
        for task, admitted in list(sandbox.admitted.items()):
            if not self._admits(policy, admitted.destination, admitted.address):
                log.info(
                    "sandbox %s: closing %s (no longer allowed)", sandbox_id, admitted.destination
                )
                sandbox.end(task)

    def usage(self, sandbox_id: str) -> EgressUsage:
        """The counters of a served sandbox. KeyError if not served."""
        return self._served(sandbox_id).counters.frozen()

    def policy(self, sandbox_id: str) -> EgressPolicy:
        """The policy a served sandbox is under. KeyError if not served."""
        return self._served(sandbox_id).policy

    async def close(self, sandbox_id: str) -> EgressUsage | None:
        """Stops serving a sandbox: closes its listener and every connection at once, and
        returns its final usage (None if it was not served)."""
        sandbox = self._sandboxes.pop(sandbox_id, None)
        if sandbox is None:
            return None
        if sandbox.server is not None:
            sandbox.server.close()
        for task in list(sandbox.connections):
            sandbox.end(task)
        if sandbox.connections:
            await asyncio.gather(*sandbox.connections, return_exceptions=True)
        if sandbox.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sandbox.server.wait_closed(), 1.0)
        return sandbox.counters.frozen()

    async def close_all(self) -> None:
        for sandbox_id in list(self._sandboxes):
            await self.close(sandbox_id)

    def _served(self, sandbox_id: str) -> _Sandbox:
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None:
            raise KeyError(f"sandbox {sandbox_id!r} has no egress gateway")
        return sandbox

    def _admits(self, policy: EgressPolicy, destination: Destination, ip: IPAddress) -> bool:
        if destination.by_name and not allows_name(policy, destination.host):
            return False
        return address_verdict(policy, ip, destination.by_name, self._is_host_address).allowed

    async def _serve_connection(
        self, sandbox: _Sandbox, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is None or self._sandboxes.get(sandbox.sandbox_id) is not sandbox:
            writer.transport.abort()
            return
        sandbox.connections.add(task)
        try:
            await self._handle(sandbox, task, reader, writer)
        except asyncio.CancelledError:
            if task not in sandbox.ended:
                raise
            task.uncancel()  # ended on purpose: finish quietly (asyncio logs a cancelled handler)
        finally:
            writer.transport.abort()  # nothing if closed already
            sandbox.connections.discard(task)
            sandbox.admitted.pop(task, None)
            sandbox.ended.discard(task)

    async def _handle(
        self,
        sandbox: _Sandbox,
        task: asyncio.Task[None],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """One request of one connection: refused in words, or connected and relayed."""
        upstream: asyncio.StreamWriter | None = None
        clean = False
        try:
            if len(sandbox.connections) > self._max_connections:
                raise Refusal(
                    ProxyError.CONNECTION_LIMIT_REACHED,
                    f"this sandbox has {self._max_connections} connections open already",
                )
            client, request = await self._read_request(reader)
            target = request.target.decode("latin-1")
            if request.method == b"CONNECT":
                destination = connect_destination(target)
                up_reader, upstream = await self._connect(sandbox, destination, task)
                writer.write(_ESTABLISHED)
                await writer.drain()
                first = client.trailing_data[0]
                clean = await run_both(
                    self._tunnel_up(sandbox, destination, first, reader, upstream),
                    pump(up_reader, writer, sandbox.counters.received),
                )
            else:
                destination, authority, path = absolute_destination(target)
                self._check_host_header(request, destination, authority)
                up_reader, upstream = await self._connect(sandbox, destination, task)
                clean = await forward(
                    client, request, path, authority, reader, writer, up_reader, upstream,
                    sandbox.counters.sent, sandbox.counters.received,
                )  # fmt: skip
        except Refusal as refusal:
            sandbox.counters.refused += 1
            log.info("sandbox %s: egress refused: %s", sandbox.sandbox_id, refusal.message)
            await _answer(writer, reader, refusal)
            clean = True
        except (OSError, h11.ProtocolError) as e:
            log.debug("sandbox %s: egress connection ended: %s", sandbox.sandbox_id, e)
        finally:
            sides = [w for w in (upstream, writer) if w is not None]
            await asyncio.gather(*(close_side(side, clean) for side in sides))

    async def _read_request(
        self, reader: asyncio.StreamReader
    ) -> tuple[h11.Connection, h11.Request]:
        client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            async with asyncio.timeout(self._head_timeout):
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        client.receive_data(await reader.read(CHUNK))
                        continue
                    if isinstance(event, h11.Request):
                        return client, event
                    raise bad_request("the connection ended before a request")
        except TimeoutError:
            raise Refusal(
                ProxyError.HEAD_TIMEOUT,
                f"no complete request head within {self._head_timeout:g} s",
            ) from None
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:
                raise Refusal(
                    ProxyError.HEAD_TOO_LARGE, f"the request head is larger than {MAX_HEAD} bytes"
                ) from None
            raise bad_request(f"not a valid HTTP request ({e})") from None

    def _check_host_header(
        self, request: h11.Request, destination: Destination, authority: str
    ) -> None:
        hosts = [value.decode("latin-1") for name, value in request.headers if name == b"host"]
        if len(hosts) > 1:
            raise bad_request("the request has more than one Host header")
        if hosts and not same_authority(hosts[0], destination, 80):
            raise bad_request(
                f"the Host header {hosts[0][:100]!r} differs from the URI's {authority[:100]!r}"
            )

    async def _connect(
        self, sandbox: _Sandbox, destination: Destination, task: asyncio.Task[None]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Judges `destination` under the sandbox's policy, connects to an allowed address of
        it, and records the connection as admitted (so `update` can close it)."""
        addresses = await self._allowed_addresses(sandbox, destination)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        error: Refusal | None = None
        for ip in addresses:
            try:
                async with asyncio.timeout_at(deadline):
                    up_reader, up_writer = await asyncio.open_connection(
                        str(ip), destination.port, limit=CHUNK
                    )
            except TimeoutError:
                error = Refusal(
                    ProxyError.CONNECTION_TIMEOUT,
                    f"{destination} did not answer within {self._connect_timeout:g} s",
                )
                break
            except OSError as e:
                error = _connect_refusal(destination, ip, e)
                continue
            # The policy may have changed while this connected: judge again, with no await
            # between the judgement and the record that `update` reads.
            if not self._admits(sandbox.policy, destination, ip):
                up_writer.transport.abort()
                raise Refusal(
                    ProxyError.DESTINATION_IP_PROHIBITED,
                    f"{destination.host} is no longer allowed by this sandbox's egress policy",
                )
            sandbox.admitted[task] = _Admitted(destination, ip)
            sandbox.counters.connections += 1
            return up_reader, up_writer
        assert error is not None
        raise error

    async def _allowed_addresses(
        self, sandbox: _Sandbox, destination: Destination
    ) -> list[IPAddress]:
        if destination.address is not None:
            verdict = address_verdict(
                sandbox.policy, destination.address, False, self._is_host_address
            )
            if not verdict.allowed:
                raise Refusal(ProxyError.DESTINATION_IP_PROHIBITED, verdict.reason)
            return [destination.address]
        if not allows_name(sandbox.policy, destination.host):
            raise Refusal(
                ProxyError.DESTINATION_IP_PROHIBITED,
                f"{destination.host} is not in this sandbox's allow-list",
            )
        try:
            addresses = await self._resolver.resolve(destination.host)
        except ResolveError as e:
            error = ProxyError.DNS_TIMEOUT if e.timed_out else ProxyError.DNS_ERROR
            raise Refusal(error, str(e)) from None
        for ip in addresses:
            verdict = address_verdict(sandbox.policy, ip, True, self._is_host_address)
            if not verdict.allowed:
                raise Refusal(
                    ProxyError.DESTINATION_IP_PROHIBITED,
                    f"{destination.host} resolves to {address_text(ip)}, refused: {verdict.reason}",
                )
        return addresses

    async def _tunnel_up(
        self,
        sandbox: _Sandbox,
        destination: Destination,
        first: bytes,
        reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> None:
        """The client's side of a tunnel: its first bytes are held until they show a TLS
        server name or HTTP Host that matches `destination` (or neither), then everything is
        relayed. A mismatch (or first bytes that do not complete in time) is counted as a
        refusal and raised, which ends the tunnel."""
        data = first
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                if data and first_bytes_verdict(destination, data):
                    break
            except TunnelMismatch as mismatch:
                sandbox.counters.refused += 1
                log.info("sandbox %s: tunnel closed: %s", sandbox.sandbox_id, mismatch)
                raise
            if data and deadline is None:
                deadline = loop.time() + self._head_timeout
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await reader.read(CHUNK)
            except TimeoutError:
                sandbox.counters.refused += 1
                log.info(
                    "sandbox %s: tunnel to %s closed: its first bytes did not complete in %g s",
                    sandbox.sandbox_id, destination, self._head_timeout,
                )  # fmt: skip
                raise
            if not chunk:
                break
            data += chunk
        if data:
            upstream.write(data)
            sandbox.counters.sent(len(data))
            await upstream.drain()
        await pump(reader, upstream, sandbox.counters.sent)


def _connect_refusal(destination: Destination, ip: IPAddress, error: OSError) -> Refusal:
    if isinstance(error, ConnectionRefusedError):
        return Refusal(
            ProxyError.CONNECTION_REFUSED, f"{destination} ({ip}) refused the connection"
        )
    if error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return Refusal(ProxyError.DESTINATION_IP_UNROUTABLE, f"{destination} ({ip}) is unreachable")
    return Refusal(
        ProxyError.CONNECTION_REFUSED, f"{destination} ({ip}): {error.strerror or error}"
    )


async def _answer(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, refusal: Refusal
) -> None:
    """Writes the refusal, half-closes, and drops what the client still sends (bounded), so
    that the client reads the answer instead of a reset."""
    with contextlib.suppress(OSError, RuntimeError):  # TimeoutError is an OSError
        writer.write(refusal.response())
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(DISCARD_SECONDS):
            await writer.drain()
            dropped = 0
            while dropped < DISCARD_BYTES:
                chunk = await reader.read(CHUNK)
                if not chunk:
                    break
                dropped += len(chunk)
