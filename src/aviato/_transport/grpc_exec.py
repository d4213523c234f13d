"""Exec over gRPC: one command's call, for `aviato._transport.grpc.GrpcTransport`.

A command without interactive stdin runs over RunCommand (one request, then output frames); one
with stdin or a tty over an Exec stream (init, stdin frames, ``stdin_eof``, ``resize``,
``signal``). A service older than RunCommand answers UNIMPLEMENTED before the command started:
the call is then made again over Exec (input sent as stdin frames), and so are all later ones
(the transport's `run_command` goes False).
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import Coroutine
from typing import Any, Protocol

import grpc
import grpc.aio

from aviato._transport.base import ExecCall, ExecFrame
from aviato._transport.errors import from_status
from aviato._transport.grpc_errors import mapped as _mapped
from aviato.exceptions import AviatoError, SandboxExecutionError
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc

__all__ = ["STDIN_CHUNK_BYTES", "ExecChannel", "GrpcExecCall"]

STDIN_CHUNK_BYTES = 64 * 1024
EXEC_ID_METADATA = "aviato-exec-id"  # RunCommand's initial metadata: the command's id
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


class ExecChannel(Protocol):
    """What an exec call needs of its transport: the stub, the call metadata, and whether the
    service has RunCommand (set False for good when it answers UNIMPLEMENTED)."""

    _stub: sandbox_pb2_grpc.SandboxServiceStub
    metadata: tuple[tuple[str, str], ...]
    run_command: bool


class GrpcExecCall(ExecCall):
    """RunCommand when stdin is not interactive, else an Exec stream (see the module). With
    `attach`, an Exec stream whose first frame attaches to a command started earlier."""

    def __init__(
        self,
        transport: ExecChannel,
        init: pb.ExecInit,
        call_timeout: float | None,
        attach: pb.ExecAttach | None = None,
    ) -> None:
        self._transport = transport
        self._init = init
        self._attach = attach
        self._timeout = call_timeout
        self._command = list(init.argv)
        self._write_lock = asyncio.Lock()
        self._pending: asyncio.Future[Any] | None = None
        self._exited = False
        self._streaming = init.stdin or init.tty or not transport.run_command or bool(attach)
        self._opened: asyncio.Task[None] | None = None
        self._started: asyncio.Future[pb.ExecStarted | None] = (
            asyncio.get_running_loop().create_future()
        )
        if self._streaming:
            self._call: Any = self._open_stream()
        else:
            self._call = transport._stub.RunCommand(
                init, metadata=transport.metadata, timeout=call_timeout
            )

    def _open_stream(self) -> Any:
        call = self._transport._stub.Exec(metadata=self._transport.metadata, timeout=self._timeout)
        self._opened = asyncio.ensure_future(self._send_init(call))
        return call

    async def _send_init(self, call: Any) -> None:
        """Sends the init (and, for an older service, the input as stdin frames). A failure
        here is the call's: its reader reports it."""
        with contextlib.suppress(Exception):
            await self._write_init(call)

    async def _write_init(self, call: Any) -> None:
        init = self._init
        async with self._write_lock:
            if self._attach is not None:
                await call.write(pb.ExecRequest(attach=self._attach))
                return
            data = init.input if not init.stdin else b""
            if data:  # Exec takes input in frames (an older service ignores init.input)
                first = pb.ExecInit()
                first.CopyFrom(init)
                first.input = b""
                first.stdin = True
                await call.write(pb.ExecRequest(init=first))
                for i in range(0, len(data), STDIN_CHUNK_BYTES):
                    await call.write(pb.ExecRequest(stdin=data[i : i + STDIN_CHUNK_BYTES]))
                await call.write(pb.ExecRequest(stdin_eof=True))
            else:
                await call.write(pb.ExecRequest(init=init))

    def _error(self, err: grpc.RpcError) -> BaseException:
        return _mapped(err, "exec", self._init.sandbox_id)

    async def _read_call(self) -> Any:
        """The call's next message. On grpc.aio the read runs as a future of its own,
        shielded: cancelling the caller must not cancel it (grpc would end the call before
        `kill` could signal the command); the lean channel's reads survive cancellation as
        they are, and skip the task and its two turns of the loop."""
        if getattr(self._call, "reads_survive_cancellation", False):
            return await self._call.read()
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._call.read())
        msg = await asyncio.shield(self._pending)
        self._pending = None
        return msg

    async def read(self) -> ExecFrame:
        while True:
            try:
                msg = await self._read_call()
            except grpc.RpcError as err:
                self._pending = None
                if not self._streaming and err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    # A service older than RunCommand: the command never started.
                    self._transport.run_command = False
                    self._streaming = True
                    self._call = self._open_stream()
                    continue
                self._exited = True
                self._identified(None)
                raise self._error(err) from None
            if msg is _EOF:
                self._exited = True
                self._identified(None)
                raise SandboxExecutionError(
                    f"the output stream of {shlex.join(self._command)!r} ended without an exit "
                    "status (connection to the service lost?)",
                    sandbox_id=self._init.sandbox_id,
                )
            kind = msg.WhichOneof("msg")
            if kind == "output":
                output: pb.ExecOutput = msg.output
                if output.exec_id:  # RunCommand names its command in its first frame
                    self._identified(pb.ExecStarted(exec_id=output.exec_id))
                return output
            if kind == "exit":
                self._exited = True
                exit_frame: pb.ExecExit = msg.exit
                if exit_frame.exec_id:
                    self._identified(pb.ExecStarted(exec_id=exit_frame.exec_id))
                self._identified(None)
                return exit_frame
            if kind == "error":
                self._exited = True
                self._identified(None)
                error: pb.ExecError = msg.error
                raise from_status(
                    error.code,
                    error.message,
                    error.detail if error.HasField("detail") else None,
                    op="exec",
                    sandbox_id=self._init.sandbox_id,
                )
            if kind == "started":
                self._identified(msg.started)
            # frames of a newer service: skip

    def _identified(self, started: pb.ExecStarted | None) -> None:
        if not self._started.done():
            self._started.set_result(started)

    def known(self) -> pb.ExecStarted | None:
        return self._started.result() if self._started.done() else None

    async def identify(self) -> pb.ExecStarted | None:
        """The service's `started` frame (Exec) or initial metadata (RunCommand); None when the
        command never started or the service gives no ids."""
        if not self._streaming and not self._started.done():
            # RunCommand: ahead of the frames as initial metadata (a command silent at first),
            # else in the first frame, which `read` takes.
            try:
                metadata = await self._call.initial_metadata()
            except Exception:
                metadata = None
            exec_id = dict(metadata or ()).get(EXEC_ID_METADATA, "")
            if exec_id:
                self._identified(pb.ExecStarted(exec_id=exec_id))
        return await asyncio.shield(self._started)

    async def _write(self, request: pb.ExecRequest) -> None:
        if not self._streaming:
            raise SandboxExecutionError("this command was started without stdin")
        if self._opened is not None:
            await self._opened
        control = request.WhichOneof("msg") != "stdin"
        try:
            async with self._write_lock:
                if self._call.done() and control:
                    # The command is over: an end-of-file, resize or signal has nothing left to
                    # reach, and writing to a finished call can fail it after the fact.
                    return
                await self._call.write(request)
        except grpc.RpcError as err:
            raise self._error(err) from None
        except AviatoError:
            raise
        except Exception as err:  # e.g. writing to a call that already ended
            raise SandboxExecutionError(f"the stdin stream broke: {err}") from None

    async def write_stdin(self, data: bytes) -> None:
        for i in range(0, len(data), STDIN_CHUNK_BYTES):
            await self._write(pb.ExecRequest(stdin=data[i : i + STDIN_CHUNK_BYTES]))

    async def close_stdin(self) -> None:
        await self._write(pb.ExecRequest(stdin_eof=True))

    async def resize(self, rows: int, cols: int) -> None:
        await self._write(pb.ExecRequest(resize=pb.TerminalSize(rows=rows, cols=cols)))

    async def send_signal(self, signum: int) -> None:
        await self._write(pb.ExecRequest(signal=signum))

    async def kill(self) -> None:
        call = self._call
        if not self._exited:
            # A command with a request id outlives its call: end it by its id.
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(2.0):
                    if self._streaming and not self._started.done():
                        # Nobody reads any more (kill is the reader's last act): take the
                        # `started` frame that names the command, if it is on its way.
                        taking = asyncio.ensure_future(self.read())
                        taking.add_done_callback(lambda t: t.cancelled() or t.exception())
                        try:
                            await asyncio.shield(self._started)  # read() resolves it
                        finally:
                            taking.cancel()
                    started = await self.identify()
                    if started is not None and started.exec_id:
                        request = pb.SignalExecRequest(
                            sandbox_id=self._init.sandbox_id, exec_id=started.exec_id, signal=9
                        )
                        await self._transport._stub.SignalExec(
                            request, metadata=self._transport.metadata, timeout=2.0
                        )
        if self._streaming and not self._exited:
            # RunCommand: cancelling the call kills the command; Exec: signal it first
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(1.0), self._write_lock:
                    await call.write(pb.ExecRequest(signal=9))
        call.cancel()
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()

    def abandon(self) -> None:
        self._call.cancel()
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()

    def release(self) -> None:
        if self._streaming:
            # The exit frame is final: the stream's trailers are collected in the background.
            _spawn(self._end_stream())

    async def _end_stream(self) -> None:
        # After the exit frame: half-close, let the server end the stream, else cancel it.
        call = self._call
        try:
            async with asyncio.timeout(5.0):
                if self._opened is not None:
                    await self._opened
                async with self._write_lock:
                    await call.done_writing()
                while await call.read() is not _EOF:
                    pass
        except BaseException:
            call.cancel()


_background: set[asyncio.Task[None]] = set()


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    """Runs `coro` as a task that is kept alive until it ends (asyncio holds tasks weakly)."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
