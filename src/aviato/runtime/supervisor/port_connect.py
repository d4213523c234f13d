"""`connect_port`: a TCP connection to a port inside a sandbox, made by its supervisor.

The supervisor connects to 127.0.0.1:PORT (or [::1]:PORT) in the sandbox's network namespace
and sends the connected socket back as a descriptor (SCM_RIGHTS) riding on PORT_CONNECTED; the
service then relays bytes over it without the supervisor in the path.

Each call uses a control connection of its own, opened and closed around the one request: the
shared `SupervisorConnection` is an asyncio transport, which reads with `recv_into` and so cannot
receive descriptors (the kernel would discard them), and a reply there would queue behind
whatever exec output is in flight. A dedicated connection costs one accept and one HELLO.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import socket

from aviato.runtime.base import (
    PortRefused,
    PortUnreachable,
    SandboxGone,
    SandboxRuntimeError,
)
from aviato.runtime.supervisor import frames
from aviato.runtime.supervisor.frames import (
    CONNECT_PORT_SIZE,
    F_CONNECT_PORT,
    F_ERROR,
    F_HELLO,
    F_PORT_CONNECTED,
    HDR,
    PORT_CONNECT_TIMEOUT_MS,
    PROTOCOL_VERSION,
)

# The supervisor gives up on a connect after PORT_CONNECT_TIMEOUT_MS; this is the service's own
# bound on the whole exchange (a supervisor that stopped answering).
REPLY_TIMEOUT = PORT_CONNECT_TIMEOUT_MS / 1000 + 5.0
# HELLO and one reply (an ERROR's message is at most 1 KiB): anything longer is not a supervisor.
_REPLY_MAX = 4096
_FDS_MAX = 4  # room for descriptors in one receive; more are closed by the kernel
_REQUEST_ID = 1


def check_port(port: object) -> int:
    """`port` if it is a port number a server can listen on; PortRefused otherwise."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 0xFFFF:
        raise PortRefused(f"port must be a number from 1 to 65535, not {port!r}")
    return port


async def connect_port(ctl_path: str, port: int, sandbox: str) -> socket.socket:
    """Asks the supervisor listening at `ctl_path` (sandbox `sandbox`, for messages) for a
    connection to `port` on the sandbox's loopback; returns it as a blocking socket. Raises
    PortRefused, PortUnreachable, SandboxGone (see SandboxHandle.connect_port)."""
    check_port(port)
    loop = asyncio.get_running_loop()
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    ctl.setblocking(False)
    try:
        async with asyncio.timeout(REPLY_TIMEOUT):
            await loop.sock_connect(ctl, ctl_path)
            request = frames.header(F_CONNECT_PORT, _REQUEST_ID, CONNECT_PORT_SIZE)
            await loop.sock_sendall(ctl, request + frames.encode_connect_port(port))
            fd = await _reply(loop, ctl, port, sandbox)
    except TimeoutError as e:
        raise SandboxGone(f"sandbox {sandbox}: its supervisor did not answer in time") from e
    except OSError as e:
        raise SandboxGone(f"sandbox {sandbox}: cannot reach its supervisor: {e}") from e
    finally:
        ctl.close()
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    return sock


async def _reply(
    loop: asyncio.AbstractEventLoop, ctl: socket.socket, port: int, sandbox: str
) -> int:
    """Reads HELLO and the reply to CONNECT_PORT; returns the descriptor it carried. Every
    other descriptor received is closed."""
    data = bytearray()
    fds: list[int] = []
    hello = False
    try:
        while True:
            while len(data) >= HDR:
                length, ftype, fid = frames.unpack_header(data, 0)
                if len(data) < 4 + length:
                    break
                body = memoryview(bytes(data[HDR : 4 + length]))
                del data[: 4 + length]
                if ftype == F_HELLO and fid == 0 and not hello:
                    version, _ = frames.decode_hello(body)
                    if version != PROTOCOL_VERSION:
                        raise SandboxRuntimeError(
                            f"sandbox {sandbox}: its supervisor speaks protocol {version}, "
                            f"this service speaks {PROTOCOL_VERSION}"
                        )
                    hello = True
                elif ftype == F_PORT_CONNECTED and fid == _REQUEST_ID and hello and fds:
                    return fds.pop(0)
                elif ftype == F_ERROR and fid == _REQUEST_ID and hello:
                    code, message = frames.decode_error(body)
                    raise _port_error(code, message, port)
                else:
                    raise SandboxRuntimeError(
                        f"sandbox {sandbox}: unexpected answer from its supervisor to a port "
                        f"connection (frame type {ftype}, id {fid})"
                    )
            if len(data) > _REPLY_MAX:
                raise SandboxRuntimeError(f"sandbox {sandbox}: its supervisor's answer is too long")
            chunk, received = await _receive(loop, ctl)
            fds.extend(received)
            if not chunk:
                raise SandboxGone(
                    f"sandbox {sandbox}: its supervisor closed the connection before answering "
                    "(a supervisor started before this service's version cannot connect to ports)"
                )
            data += chunk
    finally:
        for fd in fds:
            _close_fd(fd)


async def _receive(loop: asyncio.AbstractEventLoop, ctl: socket.socket) -> tuple[bytes, list[int]]:
    """One recvmsg on the non-blocking `ctl` once it is readable: (bytes, descriptors)."""
    space = socket.CMSG_SPACE(_FDS_MAX * array.array("i").itemsize)
    while True:
        try:
            chunk, ancillary, _, _ = ctl.recvmsg(_REPLY_MAX, space, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, ctl)
            continue
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                whole = len(payload) - len(payload) % fds.itemsize
                fds.frombytes(payload[:whole])
        return chunk, list(fds)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _port_error(code: int, message: str, port: int) -> SandboxRuntimeError:
    if code == errno.EINVAL:
        return PortRefused(message)
    if code in (errno.ECONNREFUSED, errno.ETIMEDOUT):
        return PortUnreachable(message)
    return PortUnreachable(f"cannot connect to port {port} in the sandbox: {message}")


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        socket.close(fd)
