"""SandboxHandle.connect_port against real sandboxes: a TCP connection to a port of the sandbox's
own loopback, made by its supervisor and handed to the service as a descriptor (CONNECT_PORT)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import socket
import statistics
import struct
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from _wait import async_wait_until
from supervisor_descriptors import open_fds, settled_fds, supervisor_pid

from aviato.runtime.base import (
    ExecExit,
    ExecOutput,
    ExecSpec,
    PortRefused,
    PortUnreachable,
    SandboxConfig,
    SandboxHandle,
)
from aviato.runtime.bubblewrap import BubblewrapRuntime, BubblewrapSandbox
from aviato.runtime.supervisor import frames, supervisor_binary

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run sandboxes as root")
T = TypeVar("T")

HTTP_SERVER = ("python3", "-m", "http.server", "8080", "--bind", "127.0.0.1")
# A server that greets each connection with a fixed line (argv[1]: port, argv[2]: the line).
GREETER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[2].encode() + b"\n")
    c.close()
"""
# A listener whose accept queue is full after one connection: the next handshake is dropped.
FULL_BACKLOG = r"""
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(0)
time.sleep(3600)
"""


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="avpc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config(*command: str) -> SandboxConfig:
    sid = "t-" + uuid.uuid4().hex[:12]
    return SandboxConfig(sandbox_id=sid, image="host", command=command, env={}, working_dir="")


def run_with(state_dir: Path, body: Callable[[BubblewrapRuntime], Awaitable[T]]) -> T:
    async def main() -> T:
        rt = BubblewrapRuntime(state_dir, supervisor=supervisor_binary())
        try:
            return await asyncio.wait_for(body(rt), 120)
        finally:
            for sid in rt.list_present():
                await rt.cleanup(sid)
            await rt.close()

    return asyncio.run(main())


async def run_in(h: SandboxHandle, *argv: str) -> tuple[int, str]:
    """Runs `argv`; (exit code, stdout and stderr together)."""
    e = await h.exec(ExecSpec(argv=argv, timeout_seconds=60))
    out = bytearray()
    code = -1
    async for ev in e.events():
        if isinstance(ev, ExecOutput):
            out.extend(ev.data)
        elif isinstance(ev, ExecExit):
            code = ev.exit_code
    return code, out.decode(errors="replace")


async def start_background(h: SandboxHandle, *argv: str) -> None:
    """Starts `argv` in the sandbox, left running after its exec ends."""
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)
    code, out = await run_in(h, "sh", "-c", f"setsid {quoted} </dev/null >/dev/null 2>&1 &")
    assert code == 0, out


async def wait_listening(h: SandboxHandle, port: int) -> socket.socket:
    """The first connection to `port` that the sandbox accepts."""

    async def attempt() -> socket.socket | None:
        with contextlib.suppress(PortUnreachable):
            return await h.connect_port(port)
        return None

    return await async_wait_until(attempt, f"a server on port {port} in the sandbox")


def receive_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


# --- reaching a server --------------------------------------------------------------------


def test_http_get_through_the_connected_socket(state_dir: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> bytes:
        h = await rt.create(config(*HTTP_SERVER))
        assert isinstance(h, BubblewrapSandbox)

        async def chunks() -> AsyncIterator[bytes]:
            yield b"hello\n"

        await h.write_file("/workspace/listed-by-port-8080.txt", 0o644, False, chunks())
        sock = await wait_listening(h, 8080)
        with sock:
            assert sock.family == socket.AF_INET
            assert sock.getpeername() == ("127.0.0.1", 8080)
            assert sock.getblocking()
            sock.sendall(b"GET / HTTP/1.0\r\nHost: sandbox\r\n\r\n")
            return await asyncio.to_thread(receive_all, sock)

    reply = run_with(state_dir, body)
    assert reply.startswith(b"HTTP/1.0 200"), reply[:200]
    assert b"Directory listing for /" in reply
    assert b"listed-by-port-8080.txt" in reply


def test_a_server_on_ipv6_loopback_only_is_reached(state_dir: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[int, bytes]:
        h = await rt.create(config("python3", "-m", "http.server", "8080", "--bind", "::1"))
        sock = await wait_listening(h, 8080)
        with sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return sock.family, await asyncio.to_thread(receive_all, sock)

    family, reply = run_with(state_dir, body)
    assert family == socket.AF_INET6
    assert reply.startswith(b"HTTP/1.0 200"), reply[:200]


# --- refusals -----------------------------------------------------------------------------


def test_a_port_nobody_listens_on_fails_fast(state_dir: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[str, float]:
        h = await rt.create(config(*HTTP_SERVER))
        await wait_listening(h, 8080)  # the sandbox is up: only the port differs
        started = time.monotonic()
        with pytest.raises(PortUnreachable) as caught:
            await h.connect_port(8081)
        return str(caught.value), time.monotonic() - started

    message, elapsed = run_with(state_dir, body)
    assert "nothing listens on port 8081 in the sandbox" in message
    assert elapsed < 1.0, elapsed


def test_a_connect_that_does_not_complete_times_out(state_dir: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[str, float]:
        h = await rt.create(config("python3", "-c", FULL_BACKLOG, "9000"))
        first = await wait_listening(h, 9000)  # fills the accept queue: never accepted
        with first:
            started = time.monotonic()
            with pytest.raises(PortUnreachable) as caught:
                await h.connect_port(9000)
            return str(caught.value), time.monotonic() - started

    message, elapsed = run_with(state_dir, body)
    assert "port 9000 in the sandbox did not accept the connection within 5 seconds" in message
    bound = frames.PORT_CONNECT_TIMEOUT_MS / 1000
    assert bound - 0.1 <= elapsed < bound + 2, elapsed


@pytest.mark.parametrize("port", [0, 70000, -1, 65536, True])
def test_ports_outside_1_to_65535_are_refused(state_dir: Path, port: int) -> None:
    async def body(rt: BubblewrapRuntime) -> str:
        h = await rt.create(config("sleep", "600"))
        with pytest.raises(PortRefused) as caught:
            await h.connect_port(port)
        return str(caught.value)

    assert run_with(state_dir, body) == f"port must be a number from 1 to 65535, not {port!r}"


def test_the_supervisor_itself_refuses_port_0(state_dir: Path) -> None:
    """The frame as a client could send it, without the service's own check."""

    async def body(rt: BubblewrapRuntime) -> tuple[int, int, str]:
        h = await rt.create(config("sleep", "600"))
        ctl = state_dir / "sandboxes" / h.sandbox_id / "ctl.sock"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(ctl))
            request = frames.header(frames.F_CONNECT_PORT, 7, frames.CONNECT_PORT_SIZE)
            s.sendall(request + struct.pack("<H", 0))
            data = bytearray()
            while len(data) < 2 * frames.HDR + frames.HELLO_SIZE + 8:
                chunk = s.recv(4096)
                assert chunk, "the supervisor closed the connection"
                data += chunk
            hello_len = 4 + frames.unpack_header(data, 0)[0]
            length, ftype, fid = frames.unpack_header(data, hello_len)
            while len(data) < hello_len + 4 + length:
                data += s.recv(4096)
            body = memoryview(bytes(data[hello_len + frames.HDR : hello_len + 4 + length]))
            assert (ftype, fid) == (frames.F_ERROR, 7)
            code, message = frames.decode_error(body)
            return code, fid, message

    code, _, message = run_with(state_dir, body)
    assert code == errno.EINVAL
    assert message == "port 0 is not a port to connect to (ports are 1 to 65535)"


# --- whose loopback -------------------------------------------------------------------------


def test_the_socket_is_in_the_sandboxs_namespace_not_the_hosts(state_dir: Path) -> None:
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen(16)
    port = host.getsockname()[1]

    async def body(rt: BubblewrapRuntime) -> tuple[str, bytes]:
        h = await rt.create(config("sleep", "600"))
        with pytest.raises(PortUnreachable) as caught:  # the host's server is not reached
            await h.connect_port(port)
        await start_background(h, "python3", "-c", GREETER, str(port), "from the sandbox")
        sock = await wait_listening(h, port)
        with sock:
            return str(caught.value), await asyncio.to_thread(receive_all, sock)

    try:
        message, greeting = run_with(state_dir, body)
    finally:
        host.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            host.accept()[0].close()
            raise AssertionError("the host's server got a connection")
        host.close()
    assert f"nothing listens on port {port} in the sandbox" in message
    assert greeting == b"from the sandbox\n"


def test_a_sandbox_program_cannot_reach_the_control_socket(state_dir: Path) -> None:
    """CONNECT_PORT is the service's: code in the sandbox cannot see or reach ctl.sock."""
    probe = r"""
import os, socket, sys
ctl = sys.argv[1]
print("path", os.path.exists(ctl) or os.path.exists(os.path.dirname(ctl)))
opened = []  # the supervisor's listening socket is its fd 3
try:
    os.close(os.open("/proc/1/fd/3", os.O_RDONLY))
    opened.append("open")
except OSError:
    pass
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect("/proc/1/fd/3")
    opened.append("connect")
except OSError:
    pass
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(1)
    if libc.syscall(438, pidfd, 3, 0) >= 0:  # pidfd_getfd
        opened.append("pidfd_getfd")
except OSError:
    pass
print("opened", opened)
rows = [line.split() for line in open("/proc/net/unix").read().splitlines()[1:]]
names = [row[-1] for row in rows if len(row) > 7]
print("ctl", [n for n in names if "ctl" in n or n.startswith(sys.argv[2])])
reached = []
for n in names:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(n if n.startswith("/") else "\0" + n[1:])
        reached.append(n)
    except OSError:
        pass
    s.close()
print("reached", reached)
"""

    async def body(rt: BubblewrapRuntime) -> str:
        h = await rt.create(config("sleep", "600"))
        ctl = state_dir / "sandboxes" / h.sandbox_id / "ctl.sock"
        assert ctl.is_socket()
        code, out = await run_in(h, "python3", "-c", probe, str(ctl), str(state_dir))
        assert code == 0, out
        return out

    out = run_with(state_dir, body).splitlines()
    assert "path False" in out
    assert "opened []" in out
    assert "ctl []" in out
    assert "reached []" in out


# --- descriptors ----------------------------------------------------------------------------


def test_200_connects_leave_no_descriptor_behind(state_dir: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[list[str], list[str], list[float], int]:
        async def same_as_before() -> bool:
            return open_fds(sup) == before

        h = await rt.create(config("sleep", "600"))
        assert isinstance(h, BubblewrapSandbox)
        await start_background(h, "python3", "-c", GREETER, "7000", "hi")
        (await wait_listening(h, 7000)).close()
        with contextlib.suppress(PortUnreachable):  # a refusal leaves nothing behind either
            await h.connect_port(7001)
        sup = supervisor_pid(h)
        before = await settled_fds(sup)
        ours = len(open_fds("self"))
        times = []
        for _ in range(200):
            started = time.perf_counter()
            sock = await h.connect_port(7000)
            times.append(time.perf_counter() - started)
            with sock:
                assert await asyncio.to_thread(receive_all, sock) == b"hi\n"
            with contextlib.suppress(PortUnreachable):
                await h.connect_port(7001)
        leaked_here = len(open_fds("self")) - ours
        # A leak never settles back to `before`; a connection that closes late does, at once.
        with contextlib.suppress(AssertionError):
            await async_wait_until(same_as_before, "the supervisor's descriptors", timeout=5)
        return before, open_fds(sup), times, leaked_here

    before, after, times, leaked_here = run_with(state_dir, body)
    assert after == before
    assert leaked_here == 0
    times.sort()
    print(
        f"connect_port: p50 {statistics.median(times) * 1e3:.2f} ms, "
        f"p90 {times[int(len(times) * 0.9)] * 1e3:.2f} ms over {len(times)}"
    )
