"""Exposed ports across a restart of the service: a re-attached sandbox gets its listeners back,
at the same address when it is free, else at a new one that the record then gives."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest
from server_helpers import S, ServerProcess

from aviato.server.registry import Registry

SERVER = ["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", "/srv"]


def _fetch(address: str, path: str, timeout: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as answer:
                body: bytes = answer.read()
                return body
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _address(sandbox: object) -> str:
    ports = {item.port: item.address for item in sandbox.exposed_ports}  # type: ignore[attr-defined]
    assert list(ports) == [8080]
    return ports[8080]


@pytest.mark.slow
def test_restart_gives_the_listeners_back(fresh_server: ServerProcess) -> None:
    c = fresh_server.start().client()
    sb = c.running(command=SERVER, exposed_ports=[8080], mounted=[("/srv/a.txt", b"kept\n")])
    first = _address(sb)
    assert _fetch(first, "/a.txt") == b"kept\n"

    assert fresh_server.stop() == 0
    host, _, port = first.rpartition(":")
    with pytest.raises(ConnectionRefusedError):  # no service, no listener
        socket.create_connection((host, int(port)), timeout=5).close()
    c = fresh_server.start().client()
    assert _address(c.get(sb.id)) == first  # bound again at the same address
    assert _fetch(first, "/a.txt") == b"kept\n"

    assert fresh_server.stop() == 0
    squatter = socket.socket()  # the old port is taken while the service is down
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
    squatter.bind((host, int(port)))
    squatter.listen()
    try:
        c = fresh_server.start().client()
        second = _address(c.get(sb.id))
        assert second != first and second.startswith("127.0.0.1:")
        assert _fetch(second, "/a.txt") == b"kept\n"
        recorded = Registry(fresh_server.state_dir / "registry.db").port_addresses(sb.id)
        assert recorded == {8080: second}
    finally:
        squatter.close()

    stopped = c.stop(sb.id)
    assert stopped.status == S.SANDBOX_STATUS_TERMINATED and not stopped.exposed_ports
    with pytest.raises(ConnectionRefusedError):
        host2, _, port2 = second.rpartition(":")
        socket.create_connection((host2, int(port2)), timeout=5).close()
    c.delete(sb.id)


def test_the_codec_refuses_bad_ports_in_its_own_words(fresh_server: ServerProcess) -> None:
    c = fresh_server.start().client()
    for ports, words in (
        ([0], "spec.exposed_ports[0]: 0 is not a TCP port (1 to 65535)"),
        ([80, 80], "spec.exposed_ports[1]: port 80 is listed twice"),
        (list(range(1, 18)), "spec.exposed_ports: more than 16 ports"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            c.create(exposed_ports=ports)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in (err.value.details() or "")
