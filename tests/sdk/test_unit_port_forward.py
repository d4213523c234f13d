"""`Sandbox.forward_port` over the in-memory transport (whose exposed ports echo): the local
listener, the relay of each connection and its half-close, the refusals, the end."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from aviato import PortForward, Sandbox, SandboxValidationError, _client
from aviato._transport.memory import MemoryService

_names = iter(range(1_000_000))


@pytest.fixture
def svc() -> Iterator[MemoryService]:
    service = MemoryService(f"unit-forward-{next(_names)}")
    _client.register_transport(service.url, service.transport)
    yield service
    _client.register_transport(service.url, None)


def _echo(address: str, payload: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)  # the echo answers our end-of-file with its own
        answer = bytearray()
        while data := conn.recv(1 << 16):
            answer += data
        return bytes(answer)


def test_each_connection_is_relayed_and_a_half_close_passed_on(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url, network={"exposed_ports": [8080]})
    with sb.forward_port(8080) as fwd:
        assert isinstance(fwd, PortForward) and fwd.address.startswith("127.0.0.1:")
        payload = bytes(range(256)) * 4096  # 1 MiB: many chunks, past the window
        assert _echo(fwd.address, payload) == payload
        assert _echo(fwd.address, b"again") == b"again"
        assert svc.calls["ForwardPort"] == 2
    assert fwd.closed
    host, _, port = fwd.address.rpartition(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5).close()
    fwd.wait_closed().result(timeout=10)  # closed by us: no error


def test_async_use_and_the_refusals(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url, network={"exposed_ports": [8080]})

    async def main() -> bytes:
        async with sb.forward_port(8080) as fwd:
            return await asyncio.to_thread(_echo, fwd.address, b"async")

    assert asyncio.run(main()) == b"async"
    with pytest.raises(
        SandboxValidationError, match=r"does not expose port 9090 \(it exposes: 8080\)"
    ):
        sb.forward_port(9090).wait_closed().result(timeout=10)  # it never opened: the reason
    with pytest.raises(SandboxValidationError, match="local_port"):
        sb.forward_port(8080, local_port=70000)
    with pytest.raises(SandboxValidationError, match="is not a TCP port"):
        sb.forward_port(0)


def test_the_forward_ends_when_the_sandbox_ends(svc: MemoryService) -> None:
    sb = Sandbox.run(base_url=svc.url, network={"exposed_ports": [8080]})
    fwd = sb.forward_port(8080)
    assert _echo(fwd.address, b"x") == b"x"
    svc.stop(sb.sandbox_id or "")
    with pytest.raises(Exception, match="forwarding of port 8080 stopped"):
        fwd.wait_closed().result(timeout=10)
    assert fwd.closed
