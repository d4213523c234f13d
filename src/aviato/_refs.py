"""Handles to work in progress: `OperationRef`, `Process` and its streams, `ProcessResult`.

Every SDK operation starts immediately on the background loop (`aviato._bridge`) and returns one
of these handles. A handle can be:

- blocked on from any thread: ``ref.result(timeout=None)`` (alias ``ref.get()``);
- awaited from any event loop: ``await ref`` (a cancelled awaiter does not cancel the operation;
  ``ref.cancel()`` does);
- polled: ``ref.done()``.

A `Process` is the handle of a command (`Sandbox.exec`). Its `stdout` and `stderr` are
`StreamReader`s that yield text as the output arrives, with ``for`` or ``async for``, from any
thread or loop; ``.lines()`` yields whole lines. Its `stdin` is a `StreamWriter` (when
``exec(..., stdin=True)``). The first ``max_output_bytes`` (64 MiB by default) of each stream are
also kept for `ProcessResult`, so reading the streams is optional; memory stays bounded whatever
the command writes (see `aviato._output`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import shlex
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
import grpc.aio

from aviato._bridge import await_concurrent as _await_concurrent
from aviato._bridge import get_bridge
from aviato._defaults import DEFAULT_MAX_OUTPUT_BYTES
from aviato._output import StreamReader, _OutputBuffer
from aviato.exceptions import SandboxExecutionError, SandboxTimeoutError
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato._client import Client

__all__ = [
    "OperationRef",
    "Process",
    "ProcessResult",
    "ResourceUsage",
    "StreamReader",
    "StreamWriter",
]

T = TypeVar("T")

STDIN_CHUNK_BYTES = 64 * 1024
STDIN_MAX_BUFFERED_BYTES = 1024 * 1024
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


class OperationRef(Generic[T]):
    """A lazy handle to an operation that has already started.

    ``result()``/``get()`` block for its value, ``await ref`` gives it in async code (from any
    event loop), ``done()`` polls and ``cancel()`` cancels it. If the value is never collected,
    errors are dropped silently.
    """

    __slots__ = ("_future",)

    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        self._future = future

    @classmethod
    def _of(cls, coro: Coroutine[Any, Any, T], *, finish_at_exit: bool = False) -> OperationRef[T]:
        """Schedules `coro` on the background loop and returns its handle (`finish_at_exit`:
        see `Bridge.submit`)."""
        return cls(get_bridge().submit(coro, finish_at_exit=finish_at_exit))

    @classmethod
    def completed(cls, value: T) -> OperationRef[T]:
        """A handle that is already done with `value`."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        future.set_result(value)
        return cls(future)

    def result(self, timeout: float | None = None) -> T:
        """Blocks until the operation finishes and returns its value (or raises its error).

        `timeout` in seconds (None: no limit); when it passes, `TimeoutError`
        (`concurrent.futures.TimeoutError`) is raised and the operation goes on. Raises
        `concurrent.futures.CancelledError` if it was cancelled. Calling this from the SDK's own
        loop thread on an unfinished operation raises RuntimeError (it would deadlock).
        """
        if not self._future.done() and get_bridge().in_loop_thread():
            raise RuntimeError(
                "OperationRef.result() would block the aviato event loop; use `await` instead"
            )
        return self._future.result(timeout)

    def get(self, timeout: float | None = None) -> T:
        """Same as `result()`."""
        return self.result(timeout)

    def done(self) -> bool:
        """True when the operation has finished (successfully, with an error, or cancelled)."""
        return self._future.done()

    def cancel(self) -> bool:
        """Cancels the operation if it has not finished; returns True if it was cancelled."""
        return self._future.cancel()

    def cancelled(self) -> bool:
        """True if the operation was cancelled."""
        return self._future.cancelled()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Blocks like `result()`, then returns the operation's exception (or None)."""
        return self._future.exception(timeout)

    def add_done_callback(self, fn: Callable[[OperationRef[T]], object]) -> None:
        """Calls `fn(self)` when the operation finishes (in an unspecified thread)."""
        self._future.add_done_callback(lambda _f: fn(self))

    def __await__(self) -> Generator[Any, None, T]:
        return _await_concurrent(self._future).__await__()

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "pending"
        return f"<{type(self).__name__} {state}>"


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceUsage:
    """What a command used: CPU seconds (user, system), peak memory and wall-clock time."""

    cpu_user_seconds: float = 0.0
    cpu_system_seconds: float = 0.0
    peak_memory_bytes: int = 0
    wall_seconds: float = 0.0


@dataclass(frozen=True)
class ProcessResult:
    """The outcome of a command run by `Sandbox.exec`.

    `stdout`/`stderr` are the output decoded as UTF-8 (invalid bytes replaced); `stdout_bytes`/
    `stderr_bytes` are exact. `returncode` is the real exit code (128+N when killed by signal N;
    `signal` is then N). `timed_out` is True when `exec(timeout_seconds=...)` killed it.
    `oom_killed` is True when the out-of-memory killer killed it at the sandbox's memory limit
    (the service's best attribution: the sandbox's OOM-kill count rose while the command ran and
    it died of SIGKILL without a timeout or a kill by the service; another process OOM-killed
    at the same time can make it True for a command killed by something else). `usage` is the
    command's resource usage as measured by the service.

    `stdout_truncated`/`stderr_truncated` are True when that stream was longer than
    ``max_output_bytes`` (64 MiB unless configured): the result then holds the stream's first
    ``max_output_bytes`` bytes only. The rest went to a reader of the live stream, or was dropped;
    the command itself ran to its end either way.
    """

    stdout: str
    stderr: str
    returncode: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    command: list[str] = field(default_factory=list)
    signal: int = 0
    timed_out: bool = False
    usage: ResourceUsage | None = None
    oom_killed: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.returncode == 0

    def check_returncode(self) -> ProcessResult:
        """Raises `SandboxExecutionError` (carrying this result) if the exit code is not 0."""
        if self.returncode != 0:
            raise SandboxExecutionError(
                f"command {shlex.join(self.command)!r} exited with code {self.returncode}"
                + (f"; stderr: {self.stderr.strip()[-500:]}" if self.stderr.strip() else ""),
                exec_result=self,
            )
        return self


# --- input stream -----------------------------------------------------------------------------


class StreamWriter:
    """The stdin of a command started with ``exec(..., stdin=True)``.

    ``write(data)`` and ``writeline(text)`` return an `OperationRef` that completes when the data
    is accepted; at most ~1 MiB is buffered in the SDK beyond what the service has taken, so a
    writer that outpaces the command waits (backpressure: block on, or await, the returned refs).
    Writes are delivered in the order they were made. ``close()`` sends end-of-file; it is
    idempotent. Writing after ``close()``, or after the command exited, raises
    `SandboxExecutionError`.
    """

    def __init__(self, *, max_buffered_bytes: int = STDIN_MAX_BUFFERED_BYTES) -> None:
        self._max_buffered = max_buffered_bytes
        self._closed = False
        self._close_ref: OperationRef[None] | None = None
        self._failed: BaseException | None = None
        # loop-side state
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._queued = 0
        self._sent = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        return self._closed

    def write(self, data: bytes | bytearray | memoryview) -> OperationRef[None]:
        """Queues `data` for the command's stdin (see the class docstring)."""
        if isinstance(data, str):
            raise TypeError("StreamWriter.write() takes bytes; use writeline() or encode the text")
        if self._closed:
            raise SandboxExecutionError("cannot write: the stdin stream is closed")
        if self._failed is not None:
            raise SandboxExecutionError(
                f"cannot write: the stdin stream has failed ({self._failed})"
            )
        return OperationRef._of(self._write(bytes(data)))

    def writeline(self, text: str, encoding: str = "utf-8") -> OperationRef[None]:
        """Writes `text` followed by a newline."""
        return self.write((text + "\n").encode(encoding))

    def close(self) -> OperationRef[None]:
        """Sends end-of-file after everything written so far. Idempotent."""
        if self._close_ref is None:
            self._closed = True
            self._close_ref = OperationRef._of(self._close())
        return self._close_ref

    # loop-side
    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    async def _write(self, data: bytes) -> None:
        # Ordering: this runs up to its first await in the order the writes were made.
        if self._failed is not None:
            raise SandboxExecutionError(
                f"cannot write: the stdin stream has failed ({self._failed})"
            )
        for i in range(0, len(data), STDIN_CHUNK_BYTES):
            self._chunks.append(data[i : i + STDIN_CHUNK_BYTES])
        self._queued += len(data)
        end = self._queued
        self._wake()
        while self._failed is None and end - self._sent > self._max_buffered:
            await self._wait()
        if self._failed is not None and end > self._sent:
            raise SandboxExecutionError(f"stdin stream has failed ({self._failed})")

    async def _close(self) -> None:
        self._eof = True
        self._wake()

    async def _next_item(self) -> bytes | None:
        """For the exec driver: the next chunk to send, or None for end-of-file."""
        while True:
            if self._chunks:
                return self._chunks.popleft()
            if self._eof:
                return None
            await self._wait()

    def _mark_sent(self, n: int) -> None:
        self._sent += n
        self._wake()

    def _fail(self, reason: BaseException) -> None:
        if self._failed is None:
            self._failed = reason
        self._chunks.clear()
        self._wake()

    def __repr__(self) -> str:
        return f"<StreamWriter {'closed' if self._closed else 'open'}>"


# --- the command driver -----------------------------------------------------------------------


class ExecState:
    """Everything a running command shares between its `Process` and its driver coroutine."""

    def __init__(
        self,
        command: list[str],
        *,
        stdin: bool,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        self.command = command
        self.stdout = _OutputBuffer(max_output_bytes, "stdout")
        self.stderr = _OutputBuffer(max_output_bytes, "stderr")
        self.writer = StreamWriter() if stdin else None
        self._finished = False

    def finish(self, error: BaseException | None) -> None:
        """Ends both output streams (with `error` if the output was cut short). Idempotent."""
        if self._finished:
            return
        self._finished = True
        self.stdout.close(error)
        self.stderr.close(error)
        if self.writer is not None:
            self.writer._fail(error or SandboxExecutionError("the command has exited"))

    def _result(self, exit_msg: pb.ExecExit) -> ProcessResult:
        out, err = self.stdout.freeze(), self.stderr.freeze()
        u = exit_msg.usage
        return ProcessResult(
            stdout=out.decode("utf-8", errors="replace"),
            stderr=err.decode("utf-8", errors="replace"),
            returncode=exit_msg.exit_code,
            stdout_bytes=out,
            stderr_bytes=err,
            command=list(self.command),
            signal=exit_msg.signal,
            timed_out=exit_msg.timed_out,
            oom_killed=exit_msg.oom_killed,
            usage=ResourceUsage(
                cpu_user_seconds=u.cpu_user_seconds,
                cpu_system_seconds=u.cpu_system_seconds,
                peak_memory_bytes=u.peak_memory_bytes,
                wall_seconds=u.wall_seconds,
            )
            if exit_msg.HasField("usage")
            else None,
            stdout_truncated=self.stdout.truncated,
            stderr_truncated=self.stderr.truncated,
        )

    async def drive(
        self,
        client: Client,
        init: pb.ExecInit,
        *,
        check: bool,
    ) -> ProcessResult:
        """Runs the command and returns its result once its terminal frame arrived.

        Without a stdin writer the command runs over RunCommand (one request message, then the
        output frames; `init.input` is its whole stdin); with one, over an Exec stream. A stream
        that ends without an exit frame raises (never a silent exit code 0); an error frame or a
        gRPC failure raises the translated exception; cancellation kills the command.
        """
        from aviato._client import translate_error

        sandbox_id = init.sandbox_id
        call_timeout = init.timeout_seconds + 60.0 if init.timeout_seconds > 0 else None
        try:
            if self.writer is None and client.run_command:
                try:
                    exit_msg = await self._run(client, init, call_timeout)
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    # A service older than RunCommand (the local one outlives SDK upgrades):
                    # the command never started, so run it over Exec, now and from now on.
                    client.run_command = False
                    exit_msg = await self._stream(client, init, call_timeout)
            else:
                exit_msg = await self._stream(client, init, call_timeout)
            result = self._result(exit_msg)
            self.finish(None)
            if result.timed_out:
                raise SandboxTimeoutError(
                    f"command {shlex.join(self.command)!r} timed out after "
                    f"{init.timeout_seconds:g}s",
                    sandbox_id=sandbox_id,
                    exec_result=result,
                )
            if check:
                result.check_returncode()
            return result
        except grpc.aio.AioRpcError as err:
            exc = translate_error(err, op="exec", sandbox_id=sandbox_id)
            self.finish(exc)
            raise exc from None
        except asyncio.CancelledError:
            self.finish(SandboxExecutionError("the command was cancelled", sandbox_id=sandbox_id))
            raise
        except BaseException as err:
            self.finish(err)
            raise

    async def _run(
        self, client: Client, init: pb.ExecInit, call_timeout: float | None
    ) -> pb.ExecExit:
        """One RunCommand call. Cancelling it (this coroutine) is what kills the command: the
        service ends a cancelled call's command. Its trailers are not awaited: the exit frame is
        final."""
        call = client.stub.RunCommand(init, metadata=client.metadata, timeout=call_timeout)
        try:
            return await self._read_frames(call, init.sandbox_id)
        except BaseException:
            call.cancel()
            raise

    async def _stream(
        self, client: Client, init: pb.ExecInit, call_timeout: float | None
    ) -> pb.ExecExit:
        """One Exec stream: init, then stdin frames from the writer (or `init.input` as frames,
        for a service without RunCommand), output frames, one terminal frame."""
        call = client.stub.Exec(metadata=client.metadata, timeout=call_timeout)
        write_lock = asyncio.Lock()
        pump: asyncio.Task[None] | None = None
        reader: asyncio.Future[pb.ExecExit] | None = None
        sandbox_id = init.sandbox_id
        try:
            async with write_lock:
                data = init.input if self.writer is None else b""
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
            if self.writer is not None:
                pump = asyncio.create_task(self._pump_stdin(call, self.writer, write_lock))
            # Frames are read by their own task: cancelling this coroutine must not cancel a
            # pending read (grpc would cancel the call before we could kill the command).
            reader = asyncio.ensure_future(self._read_frames(call, sandbox_id))
            exit_msg = await asyncio.shield(reader)
            if pump is not None:
                pump.cancel()
            # The exit frame is final: the result does not wait for the stream's trailers
            # (a round trip), which are collected in the background.
            _spawn(self._end_call(call, write_lock))
            return exit_msg
        except asyncio.CancelledError:
            if reader is not None and not reader.done():
                with contextlib.suppress(BaseException):
                    async with asyncio.timeout(1.0), write_lock:
                        await call.write(pb.ExecRequest(signal=9))
            call.cancel()
            raise
        except BaseException:
            call.cancel()
            raise
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
            if reader is not None and not reader.done():
                reader.cancel()

    async def _read_frames(self, call: Any, sandbox_id: str) -> pb.ExecExit:
        """Reads output frames into the buffers until the terminal frame; returns the exit.

        When a stream's reader has fallen a window behind, it stops reading until the reader
        catches up: the call's flow control then holds the command back."""
        from aviato._client import error_from_status

        while True:
            msg = await call.read()
            if msg is _EOF:
                raise SandboxExecutionError(
                    f"the output stream of {shlex.join(self.command)!r} ended without an exit "
                    "status (connection to the service lost?)",
                    sandbox_id=sandbox_id,
                )
            kind = msg.WhichOneof("msg")
            if kind == "output":
                target = self.stderr if msg.output.stream == pb.STREAM_STDERR else self.stdout
                target.append(msg.output.data)
                if target.full():
                    await target.room()
            elif kind == "exit":
                exit_msg: pb.ExecExit = msg.exit
                return exit_msg
            elif kind == "error":
                raise error_from_status(
                    msg.error.code, msg.error.message, op="exec", sandbox_id=sandbox_id
                )

    @staticmethod
    async def _pump_stdin(call: Any, writer: StreamWriter, write_lock: asyncio.Lock) -> None:
        try:
            while True:
                item = await writer._next_item()
                async with write_lock:
                    if item is None:
                        await call.write(pb.ExecRequest(stdin_eof=True))
                        return
                    await call.write(pb.ExecRequest(stdin=item))
                writer._mark_sent(len(item))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the stream broke; the reader reports why
            writer._fail(err)

    @staticmethod
    async def _end_call(call: Any, write_lock: asyncio.Lock) -> None:
        # After the exit frame: half-close, let the server end the stream, else cancel it.
        try:
            async with asyncio.timeout(5.0):
                async with write_lock:
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


class Process(OperationRef[ProcessResult]):
    """A command running in a sandbox (returned by `Sandbox.exec`); an `OperationRef` whose value
    is the `ProcessResult`.

    - ``stdout``/``stderr``: `StreamReader`s of the live output (sync or async iteration);
    - ``stdin``: a `StreamWriter` with ``exec(..., stdin=True)``, else None;
    - ``returncode``: None while running, then the exit code; ``poll()`` returns it without
      blocking; ``wait(timeout)`` blocks and returns it;
    - ``result()``/``await process``: the `ProcessResult` (raises `SandboxExecutionError` with
      ``exec_result`` when ``check=True`` and the exit code is not 0);
    - ``cancel()``: kills the command in the sandbox (SIGKILL to its process group).
    """

    __slots__ = ("_returncode", "_state", "command", "stderr", "stdin", "stdout")

    def __init__(self, future: concurrent.futures.Future[ProcessResult], state: ExecState) -> None:
        super().__init__(future)
        self._state = state
        self.command: list[str] = state.command
        self.stdout = StreamReader(state.stdout, "stdout")
        self.stderr = StreamReader(state.stderr, "stderr")
        self.stdin: StreamWriter | None = state.writer
        self._returncode: int | None = None
        future.add_done_callback(self._on_done)

    def _on_done(self, future: concurrent.futures.Future[ProcessResult]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self._returncode = future.result().returncode
        else:
            result = getattr(exc, "exec_result", None)
            if isinstance(result, ProcessResult):
                self._returncode = result.returncode

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while the command runs (or if it failed without one)."""
        return self._returncode

    def poll(self) -> int | None:
        """The exit code if the command has finished, else None (never blocks)."""
        return self._returncode if self._future.done() else None

    def wait(self, timeout: float | None = None) -> int:
        """Blocks until the command exits and returns its exit code (also when ``check=True``
        failed). Raises `TimeoutError` when `timeout` passes, and the command's error if it
        produced no exit code."""
        try:
            return self.result(timeout).returncode
        except (SandboxExecutionError, SandboxTimeoutError) as err:
            if err.exec_result is not None:
                return err.exec_result.returncode
            raise

    def __repr__(self) -> str:
        state = "running" if not self._future.done() else f"returncode={self._returncode}"
        return f"<Process {shlex.join(self.command)!r} {state}>"
