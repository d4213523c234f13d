"""Exposed ports of a sandbox on another node (issue 16, under `--placement ray`).

`RemoteSandbox.connect_port` relays over the node host's direct channel (`ConnectPort`,
cluster/port_relay.py); the service's listeners and ForwardPort use it unchanged. The first test
drives that channel alone (a real gRPC server and real sockets, no Ray: the handle is a stand-in
whose `connect_port` connects to a server of this test); the second runs on the Ray cluster of
network namespaces (conftest.py) with a sandbox placed on a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any

import grpc.aio
import pytest
from raycluster import RayCluster

from aviato import NetworkOptions, Sandbox
from aviato.cluster.execwire import ExecServer, open_connect_port
from aviato.cluster.port_relay import connect_remote_port
from aviato.runtime.base import PortUnreachable, SandboxRuntimeError

TAG = f"cluster-ports-{uuid.uuid4().hex[:8]}"


# --- the direct channel alone ------------------------------------------------------------------


@contextlib.contextmanager
def _answer_after_eof() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that reads until end-of-file, then answers 4 MiB of what it
    read, repeated; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                asked = b""
                while data := conn.recv(65536):
                    asked += data
                conn.sendall(asked * ((4 << 20) // len(asked)))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        server.close()


class _LoopbackHandle:
    """Stands in for a node's SandboxHandle: its "sandbox" is this machine's loopback."""

    async def connect_port(self, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
        except ConnectionRefusedError as e:
            sock.close()
            raise PortUnreachable(f"nothing listens on port {port}") from e
        sock.setblocking(True)
        return sock


async def _through_the_channel(port: int, closed_port: int) -> tuple[bytes, str, str]:
    async def handle_of(sandbox_id: str) -> Any:
        return _LoopbackHandle()

    server = ExecServer(handle_of)
    address = await server.start("127.0.0.1", 0)
    relays: set[asyncio.Task[None]] = set()

    async def race(awaitable: Awaitable[Any]) -> Any:
        return await awaitable

    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = open_connect_port(channel, server.token)
            sock = await connect_remote_port(call, "sbx-x", port, race, relays)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, b"ping")
            sock.shutdown(socket.SHUT_WR)  # the server answers only after our end-of-file
            await asyncio.sleep(0.5)  # the answer waits in the relays meanwhile, bounded
            answer = bytearray()
            while data := await loop.sock_recv(sock, 1 << 16):
                answer += data
            sock.close()

            refused = ""
            try:
                call = open_connect_port(channel, server.token)
                await connect_remote_port(call, "sbx-x", closed_port, race, relays)
            except PortUnreachable as e:
                refused = str(e)
            intruder = ""
            try:
                call = open_connect_port(channel, "not-the-token")
                await connect_remote_port(call, "sbx-x", port, race, relays)
            except SandboxRuntimeError as e:
                intruder = e.code
            return bytes(answer), refused, intruder
    finally:
        for task in relays:
            task.cancel()
        await server.stop()


def test_connect_port_over_the_direct_channel_passes_a_half_close_and_refusals() -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = int(closed.getsockname()[1])
    closed.close()  # nothing listens there now
    with _answer_after_eof() as port:
        answer, refused, intruder = asyncio.run(_through_the_channel(port, closed_port))
    assert len(answer) == 4 << 20 and answer[:8] == b"pingping"
    assert f"nothing listens on port {closed_port}" in refused
    assert intruder == "PERMISSION_DENIED"


# --- on the Ray cluster ------------------------------------------------------------------------


def _fetch(address: str, path: str, timeout: float = 60.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:  # until the server in the sandbox listens
        try:
            with urllib.request.urlopen(f"http://{address}{path}", timeout=20) as answer:
                body: bytes = answer.read()
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
def test_exposed_port_of_a_sandbox_on_a_worker_node(ray_cluster: RayCluster) -> None:
    big = os.urandom(3 << 20)  # past the credit window, many times over
    server = ["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", "/srv"]
    with Sandbox.run(
        *server,
        tags=[TAG],
        node_selector={"aviato-test": "w1"},
        mounted_files=[{"path": "/srv/who.txt", "content": b"on w1\n"}],
        network=NetworkOptions(exposed_ports=[8080]),
    ) as sb:
        sb.wait(timeout=60)
        assert sb.node and sb.node != "local"
        sb.write_file("/srv/big.bin", big).result()
        # From this machine, through the control plane (ForwardPort), then the node's channel.
        with sb.forward_port(8080) as fwd:
            assert _fetch(fwd.address, "/who.txt") == b"on w1\n"
            fetched = _fetch(fwd.address, "/big.bin")
            assert hashlib.sha256(fetched).digest() == hashlib.sha256(big).digest()
        # The control plane's own listener (on its host's 127.0.0.1, the head's namespace).
        address = dict(sb.exposed_ports)[8080]
        probe = (
            "import urllib.request, time\n"
            "for _ in range(100):\n"
            "    try:\n"
            f"        print(urllib.request.urlopen('http://{address}/who.txt', timeout=10)"
            ".read().decode(), end='')\n"
            "        break\n"
            "    except OSError:\n"
            "        time.sleep(0.2)\n"
        )
        out = subprocess.run(
            [*ray_cluster.enter("head"), sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.stdout == "on w1\n", out.stderr
