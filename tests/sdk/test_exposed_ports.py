"""Exposed ports (issue 16, ingress on the local service): a server in a sandbox, reached from the
test through the service's 127.0.0.1 address; isolation; refusals; bounded relays."""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato import NetworkOptions, Sandbox, SandboxStatus
from aviato.exceptions import SandboxValidationError

from .conftest import TEST_TAG, _server_pid, state_dir

HTTP_SERVER = ["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory"]


def _fetch(address: str, path: str = "/", timeout: float = 30.0) -> bytes:
    """The body of GET http://address/path, retried while the server in the sandbox starts
    (until then the forwarder closes each connection at once)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as answer:
                body: bytes = answer.read()
                return body
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _served(directory: str, *files: tuple[str, bytes]) -> Sandbox:
    return Sandbox.run(
        *HTTP_SERVER,
        directory,
        tags=[TEST_TAG],
        mounted_files=[{"path": f"{directory}/{name}", "content": body} for name, body in files],
        network=NetworkOptions(exposed_ports=[8080]),
    )


@pytest.fixture(scope="module")
def web() -> Iterator[Sandbox]:
    with _served("/srv", ("who.txt", b"first\n")) as sb:
        sb.wait()
        yield sb


def test_http_server_in_the_sandbox_is_reached_from_the_client(web: Sandbox) -> None:
    assert web.status == SandboxStatus.RUNNING
    ports = dict(web.exposed_ports)
    assert list(ports) == [8080]
    host, _, port = ports[8080].rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert web.service_address == ports[8080]
    assert web.applied_ingress_mode == "local" and web.applied_egress_mode == "isolated"
    listing = _fetch(ports[8080])
    assert b"who.txt" in listing
    assert _fetch(ports[8080], "/who.txt") == b"first\n"
    # the record of another handle (from_id, list) says the same
    again = Sandbox.from_id(web.sandbox_id or "").result()
    assert dict(again.exposed_ports) == ports


def test_two_sandboxes_with_the_same_port_reach_only_their_own(web: Sandbox) -> None:
    with _served("/srv", ("who.txt", b"second\n")) as other:
        other.wait()
        mine, theirs = dict(web.exposed_ports)[8080], dict(other.exposed_ports)[8080]
        assert mine != theirs
        assert _fetch(theirs, "/who.txt") == b"second\n"
        assert _fetch(mine, "/who.txt") == b"first\n"


def test_a_port_nothing_listens_on_closes_the_client_quickly() -> None:
    with Sandbox.run(tags=[TEST_TAG], network={"exposed_ports": [9099]}) as sb:
        sb.wait()
        address = dict(sb.exposed_ports)[9099]
        host, _, port = address.rpartition(":")
        started = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.settimeout(10)
            assert conn.recv(1) == b""  # closed, not hung
        assert time.monotonic() - started < 5


def test_after_stop_the_address_refuses_connections() -> None:
    sb = _served("/srv", ("who.txt", b"x\n"))
    sb.wait()
    address = dict(sb.exposed_ports)[8080]
    assert _fetch(address, "/who.txt") == b"x\n"
    sb.stop(graceful_shutdown_seconds=1).result()
    assert sb.exposed_ports == () and sb.service_address is None
    host, _, port = address.rpartition(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5).close()


@pytest.mark.parametrize(
    ("network", "words"),
    [
        ({"exposed_ports": [0]}, "network.exposed_ports: 0 is not a TCP port"),
        ({"exposed_ports": [70000]}, "70000 is not a TCP port (1 to 65535)"),
        ({"exposed_ports": [80, 80]}, "network.exposed_ports: port 80 is listed twice"),
        ({"exposed_ports": list(range(1, 18))}, "network.exposed_ports: at most 16 ports"),
        ({"ingress_mode": "world", "exposed_ports": [80]}, "ingress_mode='world' is not served"),
        ({"ingress_mode": "none", "exposed_ports": [80]}, "ingress_mode='none' cannot expose"),
        ({"egress_mode": "org"}, "egress_mode='org' is not served"),
    ],
)
def test_refusals_name_the_option(network: dict[str, object], words: str) -> None:
    with pytest.raises(SandboxValidationError) as err:
        Sandbox(network=network)
    assert words in str(err.value)


def test_wrong_types_are_refused() -> None:
    with pytest.raises(TypeError, match=r"network\.exposed_ports"):
        NetworkOptions(exposed_ports=8080)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"network\.exposed_ports"):
        NetworkOptions(exposed_ports=["8080"])  # type: ignore[list-item]
    assert NetworkOptions(ingress_mode="local", exposed_ports=[1]).to_spec_ports() == [1]


ANSWER_AFTER_EOF = """
import socket
s = socket.socket()
s.bind(("127.0.0.1", 7001))
s.listen()
conn, _ = s.accept()
asked = b""
while data := conn.recv(65536):
    asked += data
conn.sendall(asked * ((4 << 20) // len(asked)))
conn.close()
"""


def test_a_half_close_is_passed_on_and_the_answer_arrives_whole() -> None:
    with Sandbox.run(
        "python3", "-c", ANSWER_AFTER_EOF, tags=[TEST_TAG], network={"exposed_ports": [7001]}
    ) as sb:
        sb.wait()
        host, _, port = dict(sb.exposed_ports)[7001].rpartition(":")
        deadline = time.monotonic() + 30
        while True:  # until the server listens: the forwarder closes earlier connections
            conn = socket.create_connection((host, int(port)), timeout=10)
            conn.sendall(b"ping")
            conn.shutdown(socket.SHUT_WR)  # the server answers only after our end-of-file
            time.sleep(1)  # the answer waits in the relay's buffers meanwhile
            chunks = []
            with conn:
                while data := conn.recv(1 << 16):
                    chunks.append(data)
            if chunks or time.monotonic() > deadline:
                break
        answer = b"".join(chunks)
        assert len(answer) == 4 << 20 and answer[:8] == b"pingping"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


FLOOD_MIB = 200
FLOOD = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7000))
s.listen()
conn, _ = s.accept()
chunk = b"x" * (1 << 20)
for _ in range({FLOOD_MIB}):
    conn.sendall(chunk)
conn.close()
"""


@pytest.mark.slow
def test_a_flood_to_a_slow_reader_does_not_grow_the_service() -> None:
    pid = _server_pid(state_dir())
    assert pid is not None
    with Sandbox.run(
        "python3", "-c", FLOOD, tags=[TEST_TAG], network={"exposed_ports": [7000]}
    ) as sb:
        sb.wait()
        host, _, port = dict(sb.exposed_ports)[7000].rpartition(":")
        before = _rss_kib(pid)
        peak = before
        conn = None
        deadline = time.monotonic() + 30
        while conn is None:  # until the flooder listens
            with contextlib.suppress(OSError):
                candidate = socket.create_connection((host, int(port)), timeout=10)
                candidate.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                first = candidate.recv(1 << 16)
                if first:
                    conn, received = candidate, len(first)
                else:
                    candidate.close()
            assert time.monotonic() < deadline, "the flooder never answered"
            time.sleep(0.05)
        with conn:
            time.sleep(2)  # not reading at all: the service must hold, not buffer
            peak = max(peak, _rss_kib(pid))
            conn.settimeout(30)
            reads = 0
            while data := conn.recv(1 << 16):
                received += len(data)
                reads += 1
                if reads % 64 == 0:
                    peak = max(peak, _rss_kib(pid))
                    time.sleep(0.002)  # a slow reader
        assert received == FLOOD_MIB << 20
        grown_mib = (peak - before) / 1024
        print(f"service RSS before {before} KiB, peak {peak} KiB (+{grown_mib:.1f} MiB)")
        assert grown_mib < 40, f"the service grew by {grown_mib:.1f} MiB relaying a flood"
