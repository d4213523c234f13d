"""The exec handles of a sandbox on another node: over the direct channel, or through Ray.

`DirectExec` is one `Exec` call of the node host's direct gRPC channel (execwire.py): the
command's input goes as `npb.ExecRequest` frames, its events come back as `npb.ExecEvent`s;
cancelling the call kills the command. `RayExec` is the fallback when the node host has no
channel: the `exec` streaming actor method, and one `exec_control` actor call per input frame.
Both convert with codec.py and race every read and write against the node's loss.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

from aviato.cluster import codec, execwire
from aviato.cluster.link import NodeLink
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import ExecEvent, ExecHandle, ExecSpec, SandboxGone, SandboxRuntimeError

__all__ = ["DirectExec", "RayExec", "start_exec"]

_EOF: Any = execwire.EOF


async def start_exec(link: NodeLink, sandbox_id: str, spec: ExecSpec) -> ExecHandle:
    """Starts a command on the node, over the direct channel when the node host has one."""
    channel = link.exec_channel()
    if channel is not None:
        call = execwire.open_exec(channel, link.exec_token)
        try:
            await link.race(call.write(execwire.start_frame(sandbox_id, spec)))
        except SandboxGone:
            link.channel_failed()
            raise
        return DirectExec(link, call)
    exec_id = secrets.token_hex(8)
    spec_message = codec.encode_spec(spec).SerializeToString()
    return RayExec(link, exec_id, link.stream("exec", sandbox_id, exec_id, spec_message))


class DirectExec(ExecHandle):
    """An exec over the direct channel; every read and write races against node loss."""

    def __init__(self, link: NodeLink, call: Any) -> None:
        self._link = link
        self._call = call

    async def events(self) -> AsyncIterator[ExecEvent]:
        while True:
            message = await self._link.race(self._call.read())
            if message is _EOF:
                return
            event = codec.decode_event(message)
            if event is not None:
                yield event

    async def _send(self, request: npb.ExecRequest) -> None:
        await self._link.race(self._call.write(request))

    async def write_stdin(self, data: bytes) -> None:
        await self._send(npb.ExecRequest(stdin=data))

    async def close_stdin(self) -> None:
        await self._send(npb.ExecRequest(stdin_eof=True))

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(npb.ExecRequest(resize=npb.TerminalSize(rows=rows, cols=cols)))

    async def signal(self, signo: int) -> None:
        await self._send(npb.ExecRequest(signal=signo))

    async def kill(self) -> None:
        self._call.cancel()  # the node host kills the command when its call is cancelled


class RayExec(ExecHandle):
    """An exec through Ray actor calls (the node host has no direct channel)."""

    def __init__(self, link: NodeLink, exec_id: str, items: AsyncIterator[Any]) -> None:
        self._link = link
        self._id = exec_id
        self._items = items

    async def events(self) -> AsyncIterator[ExecEvent]:
        async for item in self._items:
            event = codec.decode_event(npb.ExecEvent.FromString(item))
            if event is not None:
                yield event

    async def _control(self, op: str, arg: Any = None) -> None:
        await self._link.call("exec_control", self._id, op, arg)

    async def write_stdin(self, data: bytes) -> None:
        await self._control("stdin", data)

    async def close_stdin(self) -> None:
        await self._control("close_stdin")

    async def resize(self, rows: int, cols: int) -> None:
        await self._control("resize", (rows, cols))

    async def signal(self, signo: int) -> None:
        await self._control("signal", signo)

    async def kill(self) -> None:
        with contextlib.suppress(SandboxRuntimeError):
            await self._control("kill")
