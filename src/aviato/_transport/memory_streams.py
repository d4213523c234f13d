"""The streams of the in-memory transport (`aviato._transport.memory`): an exposed port that
echoes, pull progress, logs, a file being read, and a command of its tiny vocabulary."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from aviato._transport.base import (
    ExecCall,
    ExecFrame,
    FileReader,
    LogReader,
    PortStream,
    PullReader,
)
from aviato._transport.errors import from_status
from aviato.exceptions import AviatoError, SandboxExecutionError
from aviato.v1 import errors_pb2 as epb
from aviato.v1 import images_pb2 as ipb
from aviato.v1 import sandbox_pb2 as pb

__all__ = [
    "Faults",
    "MemoryEchoPort",
    "MemoryExecCall",
    "MemoryFileReader",
    "MemoryLogReader",
    "MemoryPullReader",
    "MemorySandbox",
    "ServiceState",
]

_CHUNK = 256 * 1024
_RUNNING = pb.SANDBOX_STATUS_RUNNING


@dataclass
class Faults:
    """Failures to inject; counters go down as they fire."""

    #: the next N calls find the service unreachable (before it did anything)
    unavailable: int = 0
    #: the next N creates are committed, then their answer is lost (UNAVAILABLE)
    create_answer_lost: int = 0
    #: exec streams end without an exit frame
    drop_exit_frame: bool = False
    #: exec answers with this error frame: (code, message, detail)
    exec_error: tuple[str, str, epb.ErrorDetail | None] | None = None


@dataclass
class MemorySandbox:
    """One sandbox of the in-memory service: its record, files and log entries."""

    record: pb.Sandbox
    files: dict[str, bytes] = field(default_factory=dict)
    logs: list[pb.LogEntry] = field(default_factory=list)


class ServiceState(Protocol):
    """What the streams use of the in-memory service (`memory.MemoryService`)."""

    faults: Faults
    resizes: list[tuple[int, int]]
    signals: list[int]

    def _sandbox(self, sandbox_id: str, op: str, *, running: bool = False) -> MemorySandbox: ...


class MemoryEchoPort(PortStream):
    """An echo server's connection: the bytes written are read back; eof answers eof."""

    def __init__(self) -> None:
        self._echo: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)

    async def read(self) -> bytes | None:
        return await self._echo.get()

    async def write(self, data: bytes) -> None:
        await self._echo.put(data)

    async def write_eof(self) -> None:
        await self._echo.put(None)

    async def finish(self) -> None:
        return None

    def cancel(self) -> None:
        return None


class MemoryPullReader(PullReader):
    def __init__(self, messages: list[ipb.PullImageProgress]) -> None:
        self._messages = messages

    async def next(self) -> ipb.PullImageProgress | None:
        return self._messages.pop(0) if self._messages else None

    def cancel(self) -> None:
        self._messages.clear()


class MemoryLogReader(LogReader):
    """The entries logged so far (the last `tail`); with `follow`, then those logged until the
    sandbox ends (checked every few milliseconds: a fake has no events to wait on)."""

    def __init__(self, service: ServiceState, request: pb.StreamLogsRequest) -> None:
        self._service = service
        self._request = request
        self._next: int | None = None
        self._ended = False

    async def next(self) -> pb.LogEntry | None:
        found = self._service._sandbox(self._request.sandbox_id, "stream logs")
        if self._next is None:
            tail = self._request.tail
            self._next = max(0, len(found.logs) - tail) if tail >= 0 else 0
        while not self._ended:
            if self._next < len(found.logs):
                self._next += 1
                return found.logs[self._next - 1]
            if not self._request.follow or found.record.status != _RUNNING:
                break
            await asyncio.sleep(0.005)
        self._ended = True
        return None

    def cancel(self) -> None:
        self._ended = True


class MemoryFileReader(FileReader):
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0
        self.size = len(data)
        self.mode = 0o644

    async def next(self) -> bytes | None:
        if self._offset >= len(self._data):
            return None
        chunk = self._data[self._offset : self._offset + _CHUNK]
        self._offset += len(chunk)
        return chunk

    def cancel(self) -> None:
        self._offset = len(self._data)


class MemoryExecCall(ExecCall):
    """Runs one command of the vocabulary as a task that queues its frames."""

    def __init__(self, service: ServiceState, init: pb.ExecInit) -> None:
        self._service = service
        self._init = init
        self._frames: asyncio.Queue[ExecFrame | AviatoError | None] = asyncio.Queue()
        self._stdin: asyncio.Queue[bytes | None] = asyncio.Queue()
        if init.input:
            self._stdin.put_nowait(init.input)
        if not init.stdin:
            self._stdin.put_nowait(None)
        self._size = (init.tty_size.rows, init.tty_size.cols)
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        svc, init = self._service, self._init
        out = self._frames.put_nowait
        try:
            svc._sandbox(init.sandbox_id, "exec", running=True)
        except AviatoError as err:
            out(err)
            return
        if svc.faults.exec_error is not None:
            status, message, detail = svc.faults.exec_error
            out(from_status(status, message, detail, op="exec", sandbox_id=init.sandbox_id))
            return
        argv = list(init.argv)
        name, args = argv[0], argv[1:]
        code = 0
        if name == "echo":
            out(pb.ExecOutput(stream=pb.STREAM_STDOUT, data=(" ".join(args) + "\n").encode()))
        elif name == "exit":
            out(pb.ExecOutput(stream=pb.STREAM_STDERR, data=b"bye\n"))
            code = int(args[0])
        elif name == "yes":
            for _ in range(int(args[0])):
                out(pb.ExecOutput(stream=pb.STREAM_STDOUT, data=b"y\n"))
        elif name == "cat":
            while (data := await self._stdin.get()) is not None:
                out(pb.ExecOutput(stream=pb.STREAM_STDOUT, data=data))
        elif name == "winsize":  # a terminal program: its window size for each input chunk
            while await self._stdin.get() is not None:
                out(pb.ExecOutput(stream=pb.STREAM_STDOUT, data=b"%d %d\r\n" % self._size))
        elif name == "sleep":
            await asyncio.sleep(float(args[0]))
        else:
            out(pb.ExecOutput(stream=pb.STREAM_STDERR, data=f"{name}: not found\n".encode()))
            code = 127
        if svc.faults.drop_exit_frame:
            out(None)
            return
        out(pb.ExecExit(exit_code=code, usage=pb.ResourceUsage(wall_seconds=0.01)))

    async def read(self) -> ExecFrame:
        frame = await self._frames.get()
        if frame is None:
            raise SandboxExecutionError(
                f"the output stream of {' '.join(self._init.argv)!r} ended without an exit "
                "status (connection to the service lost?)",
                sandbox_id=self._init.sandbox_id,
            )
        if isinstance(frame, AviatoError):
            raise frame
        return frame

    async def write_stdin(self, data: bytes) -> None:
        self._stdin.put_nowait(data)

    async def close_stdin(self) -> None:
        self._stdin.put_nowait(None)

    def _require_stream(self, what: str) -> None:
        if not (self._init.stdin or self._init.tty):
            raise SandboxExecutionError(f"cannot {what}: the command was started without stdin")

    async def resize(self, rows: int, cols: int) -> None:
        self._require_stream("resize")
        self._size = (rows, cols)
        self._service.resizes.append(self._size)

    async def send_signal(self, signum: int) -> None:
        """Records the signal; a command still running dies of it (exit 128 + signum)."""
        self._require_stream("signal")
        self._service.signals.append(signum)
        if not self._task.done():
            self._task.cancel()
            exit_frame = pb.ExecExit(exit_code=128 + signum, signal=signum)
            self._frames.put_nowait(exit_frame)

    async def kill(self) -> None:
        if not self._task.done():
            self._service.signals.append(9)
            self._task.cancel()

    def release(self) -> None:
        pass
