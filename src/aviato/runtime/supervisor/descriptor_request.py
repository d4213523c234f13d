"""One request to a supervisor whose answer carries a descriptor (SCM_RIGHTS), on a control
connection of its own: CONNECT_PORT (port_connect.py) and EGRESS_LISTEN (egress_listen.py).

Each request uses a connection of its own, opened and closed around it: the shared
`SupervisorConnection` is an asyncio transport, which reads with `recv_into` and so cannot
receive descriptors (the kernel would discard them), and a reply there would queue behind
whatever exec output is in flight. A dedicated connection costs one accept and one HELLO.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable

from aviato._fd_passing import receive_with_descriptors
from aviato.runtime.base import SandboxGone, SandboxRuntimeError
from aviato.runtime.supervisor import frames
from aviato.runtime.supervisor.frames import F_ERROR, F_HELLO, HDR, PROTOCOL_VERSION

REQUEST_ID = 1  # the id of the one request on such a connection
# HELLO and one reply (an ERROR's message is at most 1 KiB): anything longer is not a supervisor.
_REPLY_MAX = 4096
_FDS_MAX = 4  # room for descriptors in one receive; more are closed by the kernel


async def request_descriptor(
    ctl_path: str,
    request: bytes,
    reply_type: int,
    *,
    sandbox: str,
    what: str,
    answer_within: float,
    refusal: Callable[[int, str], SandboxRuntimeError],
    too_old: str,
) -> tuple[int, bytes]:
    """Sends `request` (a whole frame with id REQUEST_ID) to the supervisor listening at
    `ctl_path` and waits at most `answer_within` seconds for its `reply_type` frame; returns the
    descriptor that rode on it (close-on-exec, the caller's to close) and the frame's payload.

    An ERROR reply raises `refusal(errno, message)`. SandboxGone: no answer in time, the
    supervisor unreachable, or the connection closed before the answer (`too_old` then says why
    that may be: a supervisor older than the frame closes on an unknown frame type).
    SandboxRuntimeError: anything else a supervisor would not send. `sandbox` and `what` (e.g.
    "a port connection") are for messages.
    """
    exchange = DescriptorExchange(ctl_path, sandbox, refusal)
    try:
        return await exchange.request(
            request, reply_type, what=what, answer_within=answer_within, too_old=too_old
        )
    finally:
        exchange.close()


class DescriptorExchange:
    """A control connection of its own to one supervisor, for requests answered with a
    descriptor (`request`) and, on the same connection, later frames about what that request
    began (`send_and_wait`: a descriptor write's WRITE_END). Closing it ends whatever the
    supervisor holds for it (a write not yet ended is removed)."""

    def __init__(
        self, ctl_path: str, sandbox: str, refusal: Callable[[int, str], SandboxRuntimeError]
    ) -> None:
        self._path = ctl_path
        self._sandbox = sandbox
        self._refusal = refusal
        self._ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._ctl.setblocking(False)
        self._hello = False

    async def request(
        self, request: bytes, reply_type: int, *, what: str, answer_within: float, too_old: str
    ) -> tuple[int, bytes]:
        """Connects, sends `request` and returns (descriptor, payload) of the reply (see
        `request_descriptor`)."""
        loop = asyncio.get_running_loop()
        async with self._answered_within(answer_within):
            await loop.sock_connect(self._ctl, self._path)
            await loop.sock_sendall(self._ctl, request)
            fd, body = await self._reply(reply_type, True, what, too_old)
        assert fd is not None
        return fd, body

    async def send_and_wait(
        self, frame: bytes, reply_type: int, *, what: str, answer_within: float
    ) -> bytes:
        """Sends `frame` on the open connection and returns the payload of its `reply_type`
        answer (which carries no descriptor); errors as `request`."""
        async with self._answered_within(answer_within):
            await asyncio.get_running_loop().sock_sendall(self._ctl, frame)
            _, body = await self._reply(reply_type, False, what, "")
        return body

    def close(self) -> None:
        self._ctl.close()

    @contextlib.asynccontextmanager
    async def _answered_within(self, seconds: float) -> AsyncIterator[None]:
        """The exchange inside, bounded by `seconds`: SandboxGone when the supervisor does not
        answer in time or cannot be reached."""
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError as e:
            raise SandboxGone(
                f"sandbox {self._sandbox}: its supervisor did not answer in time"
            ) from e
        except OSError as e:
            raise SandboxGone(f"sandbox {self._sandbox}: cannot reach its supervisor: {e}") from e

    async def _reply(
        self,
        reply_type: int,
        with_fd: bool,
        what: str,
        too_old: str,
    ) -> tuple[int | None, bytes]:
        """Reads (HELLO and) the reply; returns the descriptor it carried (`with_fd`) and its
        payload. Every other descriptor received is closed."""
        sandbox = self._sandbox
        data = bytearray()
        fds: list[int] = []
        try:
            while True:
                while len(data) >= HDR:
                    length, ftype, fid = frames.unpack_header(data, 0)
                    if len(data) < 4 + length:
                        break
                    body = bytes(data[HDR : 4 + length])
                    del data[: 4 + length]
                    if ftype == F_HELLO and fid == 0 and not self._hello:
                        version, _ = frames.decode_hello(memoryview(body))
                        if version != PROTOCOL_VERSION:
                            raise SandboxRuntimeError(
                                f"sandbox {sandbox}: its supervisor speaks protocol {version}, "
                                f"this service speaks {PROTOCOL_VERSION}"
                            )
                        self._hello = True
                    elif ftype == reply_type and fid == REQUEST_ID and self._hello:
                        if not with_fd:
                            return None, body
                        if fds:
                            return fds.pop(0), body
                        raise SandboxRuntimeError(
                            f"sandbox {sandbox}: its supervisor answered {what} without the "
                            "descriptor"
                        )
                    elif ftype == F_ERROR and fid == REQUEST_ID and self._hello:
                        code, message = frames.decode_error(memoryview(body))
                        raise self._refusal(code, message)
                    else:
                        raise SandboxRuntimeError(
                            f"sandbox {sandbox}: unexpected answer from its supervisor to {what}"
                            f" (frame type {ftype}, id {fid})"
                        )
                if len(data) > _REPLY_MAX:
                    raise SandboxRuntimeError(
                        f"sandbox {sandbox}: its supervisor's answer is too long"
                    )
                chunk, received = await receive_with_descriptors(self._ctl, _REPLY_MAX, _FDS_MAX)
                fds.extend(received)
                if not chunk:
                    raise SandboxGone(
                        f"sandbox {sandbox}: its supervisor closed the connection before "
                        f"answering" + (f" ({too_old})" if too_old else "")
                    )
                data += chunk
        finally:
            for fd in fds:
                _close_fd(fd)


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        socket.close(fd)
