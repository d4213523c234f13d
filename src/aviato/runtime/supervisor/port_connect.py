"""`connect_port`: a TCP connection to a port inside a sandbox, made by its supervisor.

The supervisor connects to 127.0.0.1:PORT (or [::1]:PORT) in the sandbox's network namespace
and sends the connected socket back as a descriptor (SCM_RIGHTS) riding on PORT_CONNECTED; the
service then relays bytes over it without the supervisor in the path. The request goes over a
control connection of its own (descriptor_request.py says why).
"""

from __future__ import annotations

import errno
import socket

from aviato.runtime.base import PortRefused, PortUnreachable, SandboxRuntimeError
from aviato.runtime.supervisor import frames
from aviato.runtime.supervisor.descriptor_request import REQUEST_ID, request_descriptor
from aviato.runtime.supervisor.frames import (
    CONNECT_PORT_SIZE,
    F_CONNECT_PORT,
    F_PORT_CONNECTED,
    PORT_CONNECT_TIMEOUT_MS,
)

# The supervisor gives up on a connect after PORT_CONNECT_TIMEOUT_MS; this is the service's own
# bound on the whole exchange (a supervisor that stopped answering).
REPLY_TIMEOUT = PORT_CONNECT_TIMEOUT_MS / 1000 + 5.0


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
    request = frames.header(F_CONNECT_PORT, REQUEST_ID, CONNECT_PORT_SIZE)
    fd, _ = await request_descriptor(
        ctl_path,
        request + frames.encode_connect_port(port),
        F_PORT_CONNECTED,
        sandbox=sandbox,
        what="a port connection",
        answer_within=REPLY_TIMEOUT,
        refusal=lambda code, message: _port_error(code, message, port),
        too_old="a supervisor started before this service's version cannot connect to ports",
    )
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    return sock


def _port_error(code: int, message: str, port: int) -> SandboxRuntimeError:
    if code == errno.EINVAL:
        return PortRefused(message)
    if code in (errno.ECONNREFUSED, errno.ETIMEDOUT):
        return PortUnreachable(message)
    return PortUnreachable(f"cannot connect to port {port} in the sandbox: {message}")
