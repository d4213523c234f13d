"""Receiving file descriptors (SCM_RIGHTS) on a non-blocking unix socket from asyncio code: the
service from a sandbox's supervisor (runtime/supervisor/descriptor_request.py), a local client
from the service (_transport/lean_descriptors.py). asyncio's own socket calls read with
`recv`, which would drop the descriptors."""

from __future__ import annotations

import array
import asyncio
import socket

__all__ = ["receive_with_descriptors"]


async def receive_with_descriptors(
    sock: socket.socket, size: int, max_descriptors: int
) -> tuple[bytes, list[int]]:
    """One `recvmsg` of up to `size` bytes once `sock` is readable: the bytes (empty: the peer
    closed) and the descriptors that came with them (close-on-exec, the caller's to close;
    beyond `max_descriptors` in one message the kernel closes them)."""
    space = socket.CMSG_SPACE(max_descriptors * array.array("i").itemsize)
    while True:
        try:
            chunk, ancillary, _, _ = sock.recvmsg(size, space, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            await _readable(sock)
            continue
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        return chunk, list(fds)


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
