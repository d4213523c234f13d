"""`egress_listen`: the sandbox's egress listening socket, from its supervisor.

The supervisor listens on 127.0.0.1:<ephemeral> inside the sandbox's network namespace (made
once, kept for its life, never accepted on there) and sends a duplicate of that socket riding on
EGRESS_LISTENER (SCM_RIGHTS) with its port; from the first request on (or from start-up, with
`--egress`) every process it starts has HTTP_PROXY and the rest pointing at it. The caller
accepts on the socket and serves the connections as the sandbox's proxy. The request goes over a
control connection of its own (descriptor_request.py says why).

What this cannot check: that the socket is the only one the sandbox's programs are told about
(a program may set its own HTTP_PROXY; the exec's env wins over the supervisor's).
"""

from __future__ import annotations

import socket

from aviato.runtime.base import SandboxRuntimeError
from aviato.runtime.supervisor import frames
from aviato.runtime.supervisor.descriptor_request import REQUEST_ID, request_descriptor
from aviato.runtime.supervisor.frames import F_EGRESS_LISTEN, F_EGRESS_LISTENER

# The supervisor answers at once (socket, bind, listen, dup: no waiting); this bounds a
# supervisor that stopped answering.
REPLY_TIMEOUT = 10.0


async def egress_listen(ctl_path: str, sandbox: str) -> socket.socket:
    """Asks the supervisor listening at `ctl_path` (sandbox `sandbox`, for messages) for the
    sandbox's egress listening socket; returns it in blocking mode, the caller's to close (the
    supervisor keeps its own copy, so closing this one does not close the sandbox's proxy port).
    The same port on every call. Raises SandboxGone (no answer, unreachable, or a supervisor
    that predates EGRESS_LISTEN) or SandboxRuntimeError (the supervisor could not open it, or
    sent something that is not a listening TCP socket on 127.0.0.1)."""

    def refusal(code: int, message: str) -> SandboxRuntimeError:
        return SandboxRuntimeError(f"sandbox {sandbox}: {message}")

    fd, body = await request_descriptor(
        ctl_path,
        frames.header(F_EGRESS_LISTEN, REQUEST_ID, 0),
        F_EGRESS_LISTENER,
        sandbox=sandbox,
        what="a request for its egress listener",
        answer_within=REPLY_TIMEOUT,
        refusal=refusal,
        too_old="a supervisor started before this service's version has no egress listener",
    )
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:  # ENOTSOCK
        socket.close(fd)
        raise SandboxRuntimeError(
            f"sandbox {sandbox}: its supervisor's egress listener is not a socket: {e}"
        ) from e
    try:
        _check_listener(sock, body, sandbox)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(True)
    return sock


def _check_listener(sock: socket.socket, body: bytes, sandbox: str) -> None:
    """Refuses anything but a listening TCP socket on 127.0.0.1 whose port the frame names."""
    port = None
    listening = 0
    address = None
    if len(body) == frames.EGRESS_LISTENER_SIZE:
        port = frames.decode_egress_listener(memoryview(body))
    if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        address = sock.getsockname()
    if port is None or not listening or address != ("127.0.0.1", port):
        raise SandboxRuntimeError(
            f"sandbox {sandbox}: its supervisor sent an egress listener that is not a listening "
            f"TCP socket on 127.0.0.1 at the port it named ({port}; family {sock.family!r}, "
            f"address {address!r})"
        )
