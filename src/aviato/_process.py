"""A command in a sandbox: `Process` (its handle) and the driver that moves its frames between
a transport's `ExecCall` and the output buffers (its stdin, `StreamWriter`, is `aviato._stdin`).

A `Process`'s `stdout` and `stderr` are `StreamReader`s (`aviato._output`) that yield text as
the output arrives, with ``for`` or ``async for``, from any thread or loop; ``.lines()`` yields
whole lines. Its `stdin` is a `StreamWriter` (when ``exec(..., stdin=True)``). The first
``max_output_bytes`` (64 MiB by default) of each stream are also kept for the `ProcessResult`,
so reading the streams is optional; memory stays bounded whatever the command writes.

Nothing here knows the wire: frames come from `aviato._transport.base.ExecCall`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import shlex
from collections.abc import Awaitable, Callable
from typing import Any

from aviato._bridge import get_bridge
from aviato._client import Client
from aviato._defaults import DEFAULT_MAX_OUTPUT_BYTES
from aviato._operation import OperationRef
from aviato._output import OutputBuffer, StreamReader
from aviato._stdin import StreamWriter, pump_stdin
from aviato._transport.base import ExecCall, Transport
from aviato._transport.errors import is_transient
from aviato.exceptions import (
    AviatoConnectionError,
    ProcessResult,
    ResourceUsage,
    SandboxExecutionError,
    SandboxNotFoundError,
    SandboxTimeoutError,
)
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["ExecState", "Process", "StreamWriter"]  # StreamWriter: re-exported from _stdin

# How long an exec whose connection broke tries to attach again (`ExecState._resume`): a dropped
# network is back by then, and a service that died took its commands with it.
RESUME_BUDGET_SECONDS = 3.0


# --- the command driver -----------------------------------------------------------------------


class ExecState:
    """Everything a running command shares between its `Process` and its driver coroutine."""

    def __init__(
        self,
        command: list[str],
        *,
        stdin: bool,
        tty: bool = False,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        self.command = command
        self.tty = tty
        self.interactive = stdin or tty  # a stream that takes control frames
        self._call: ExecCall | None = None
        self._call_waiters: list[asyncio.Future[ExecCall | None]] = []
        self.stdout = OutputBuffer(max_output_bytes, "stdout")
        self.stderr = OutputBuffer(max_output_bytes, "stderr")
        self.writer = StreamWriter() if stdin else None
        self._finished = False
        # The service's name for the command (docs/interactive.md), once it started it.
        self.exec_id: str | None = None
        self.asked_offset = 0  # an attach's offset: output before it was not asked for
        self.output_offset = 0  # where the output this handle received begins
        self._id_waiters: list[asyncio.Future[None]] = []
        self._error: BaseException | None = None
        self.detached = False  # Process.detach(): end the call, leave the command running
        self.received = 0  # the offset after the last output byte received
        self._transport: Transport | None = None
        self._retry: Retry | None = None
        self._sandbox_id = ""
        self._learner: asyncio.Future[None] | None = None

    def finish(self, error: BaseException | None) -> None:
        """Ends both output streams (with `error` if the output was cut short). Idempotent."""
        if self._finished:
            return
        self._finished = True
        self._error = error
        self._set_call(None)
        self._identified(None)
        self.stdout.close(error)
        self.stderr.close(error)
        if self.writer is not None:
            self.writer._fail(error or SandboxExecutionError("the command has exited"))

    def _identified(self, started: pb.ExecStarted | None) -> None:
        """Takes what the service said of the command (None: it will say nothing more)."""
        if started is not None:
            self.exec_id = started.exec_id or self.exec_id
            self.output_offset = started.output_offset
            if started.argv and not self.command:
                self.command.extend(started.argv)
            self.tty = self.tty or started.tty
        self._wake_id_waiters()

    def _wake_id_waiters(self) -> None:
        waiters, self._id_waiters = self._id_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def known_exec_id(self) -> str | None:
        """The command's id if the service has said it (never waits; any thread)."""
        if self.exec_id is None:
            call = self._call
            started = call.known() if call is not None else None
            return started.exec_id or None if started is not None else None
        return self.exec_id

    async def wait_exec_id(self) -> str:
        """The command's id once the service started it; raises why it never did."""
        while self.exec_id is None and not self._finished:
            call = self._call
            if call is not None:
                await self._learn_id(call)  # what the service said first (its id)
                break
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._id_waiters.append(waiter)
            await waiter  # the call is opened, or the command ended
        if self.exec_id is not None:
            return self.exec_id
        if self._error is not None:
            raise self._error
        raise SandboxExecutionError(
            f"the service gave no id for {shlex.join(self.command)!r} (a service older than ids?)"
        )

    async def _learn_id(self, call: ExecCall) -> None:
        with contextlib.suppress(Exception):
            self._identified(await call.identify())

    def detach(self) -> None:
        """On the loop: ends the call, leaving the command running (see `Process.detach`)."""
        if self._finished:
            return
        self.detached = True
        if self._call is not None:
            self._call.abandon()

    def _set_call(self, call: ExecCall | None) -> None:
        self._call = call
        self._wake_id_waiters()
        waiters, self._call_waiters = self._call_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(call)

    async def control(self, what: str, send: Callable[[ExecCall], Awaitable[None]]) -> None:
        """Sends a control frame (resize, signal) once the call is open; one sent after the
        command ended is dropped (there is nothing left to resize or signal)."""
        call = self._call
        if call is None and not self._finished:
            waiter: asyncio.Future[ExecCall | None] = asyncio.get_running_loop().create_future()
            self._call_waiters.append(waiter)
            call = await waiter
        if call is not None:
            try:
                await send(call)
            except SandboxExecutionError:
                if not self._finished:
                    raise
                # the command exited meanwhile: nothing to {what}

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
        transport: Transport,
        init: pb.ExecInit,
        *,
        check: bool,
        attach: pb.ExecAttach | None = None,
        retry: Retry | None = None,
    ) -> ProcessResult:
        """Runs the command (or, with `attach`, follows one started earlier) and returns its
        result once its exit frame arrived.

        A stream that ends without an exit frame raises (never a silent exit code 0); an error
        frame raises the mapped exception; cancellation kills the command. Never retried: a
        command that started once must not run twice.
        """
        sandbox_id = init.sandbox_id
        call_timeout = init.timeout_seconds + 60.0 if init.timeout_seconds > 0 else None
        self._transport, self._retry, self._sandbox_id = transport, retry, sandbox_id
        try:
            if attach is not None:
                self.asked_offset = attach.offset
                call = await transport.attach(attach, call_timeout=None)
                # what was run and on a terminal or not, at once (for resize, `command`)
                self._learner = asyncio.ensure_future(self._learn_id(call))
            else:
                call = await transport.exec(init, call_timeout=call_timeout)
            exit_msg = await self._run(call)
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
        except BaseException as err:
            if self.detached:  # Process.detach: the call ended on purpose, the command runs on
                detached = SandboxExecutionError(
                    f"detached from {shlex.join(self.command)!r}, which runs on "
                    "(Sandbox.attach follows it again)",
                    sandbox_id=sandbox_id,
                )
                self.finish(detached)
                raise detached from None
            if isinstance(err, asyncio.CancelledError):
                self.finish(
                    SandboxExecutionError("the command was cancelled", sandbox_id=sandbox_id)
                )
            else:
                self.finish(err)
            raise

    async def _run(self, call: ExecCall) -> pb.ExecExit:
        """Reads output frames into the buffers until the exit frame.

        When a stream's reader has fallen a window behind, it stops reading until the reader
        catches up: the call's flow control then holds the command back."""
        self._set_call(call)
        pump: asyncio.Task[None] | None = None
        if self.writer is not None:
            pump = asyncio.create_task(pump_stdin(call, self.writer))
        try:
            while True:
                try:
                    frame = await call.read()
                except AviatoConnectionError as lost:
                    call, frame = await self._resume(call, lost)
                if isinstance(frame, pb.ExecExit):
                    call.release()
                    if self.exec_id is None:  # it arrived before the exit: no wait
                        await self._learn_id(call)
                    return frame
                self.received = frame.offset + len(frame.data)
                target = self.stderr if frame.stream == pb.STREAM_STDERR else self.stdout
                target.append(frame.data)
                if target.full():
                    await target.room()
        except BaseException as err:
            with contextlib.suppress(BaseException):
                if self.detached or is_transient(err):
                    call.abandon()  # the command runs on: `Sandbox.attach` follows it
                else:
                    await call.kill()
            raise
        finally:
            if pump is not None and not pump.done():
                pump.cancel()

    async def _resume(self, call: ExecCall, lost: AviatoConnectionError) -> tuple[ExecCall, Any]:
        """After a lost connection: attaches to the command again from the last byte received
        (retrying while the service is unreachable) and returns the new call and its first
        frame. Only a command with an id and no stdin of this handle (input in flight could be
        lost); otherwise, or when the service no longer knows the command, raises."""
        exec_id = self.known_exec_id()
        if exec_id is None:  # a command silent so far: its id came ahead, as metadata
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    exec_id = (await call.identify() or pb.ExecStarted()).exec_id or None
        transport, retry = self._transport, self._retry
        if exec_id is None or self.writer is not None or self.detached or not is_transient(lost):
            raise lost
        if transport is None or retry is None:
            raise lost
        call.abandon()
        request = pb.ExecAttach(sandbox_id=self._sandbox_id, exec_id=exec_id, offset=self.received)

        async def attempt() -> tuple[ExecCall, Any]:
            again = await transport.attach(request, call_timeout=None)
            try:
                return again, await again.read()
            except BaseException:
                again.abandon()
                raise

        try:
            again, first = await retry(attempt)
        except SandboxNotFoundError as gone:
            raise SandboxExecutionError(
                f"lost the connection to the service while {shlex.join(self.command)!r} ran, "
                f"and the service no longer knows the command ({gone})",
                sandbox_id=self._sandbox_id,
            ) from lost
        started = again.known()
        if started is not None and started.output_offset > self.received:
            again.abandon()
            raise SandboxExecutionError(
                f"lost the connection to the service while {shlex.join(self.command)!r} ran; "
                f"{started.output_offset - self.received} bytes of its output were dropped "
                f"meanwhile (it runs on: Sandbox.attach({exec_id!r}) follows it)",
                sandbox_id=self._sandbox_id,
            ) from lost
        self._set_call(again)
        return again, first


#: `Client.with_retry` bound to an operation: repeats an attempt while the service is unreachable.
Retry = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]


def resuming(client: Client, op: str) -> Retry | None:
    """How an exec of `client` attaches again after a lost connection, or None when it does
    not: on the local service's unix socket a broken connection means the service died, and
    its commands with it (its revival would only find them gone)."""
    if client.local_state_dir is not None:
        return None
    return functools.partial(client.with_retry, op=op, budget=RESUME_BUDGET_SECONDS)


class Process(OperationRef[ProcessResult]):
    """A command running in a sandbox (returned by `Sandbox.exec`); an `OperationRef` whose value
    is the `ProcessResult`.

    - ``stdout``/``stderr``: `StreamReader`s of the live output (sync or async iteration);
    - ``stdin``: a `StreamWriter` with ``exec(..., stdin=True)``, else None;
    - ``returncode``: None while running, then the exit code; ``poll()`` returns it without
      blocking; ``wait(timeout)`` blocks and returns it;
    - ``result()``/``await process``: the `ProcessResult` (raises `SandboxExecutionError` with
      ``exec_result`` when ``check=True`` and the exit code is not 0);
    - ``cancel()``: kills the command in the sandbox (SIGKILL to its process group);
    - ``send_signal(signum)``: signals its process group (with ``stdin=True`` or ``tty=True``);
    - ``resize(rows, cols)``: resizes its terminal (with ``tty=True``).

    With ``exec(..., tty=True)`` the command runs on a pseudo-terminal: ``stdin`` takes raw
    bytes (keys, control characters such as ``b"\\x03"`` for Ctrl-C), everything the terminal
    shows arrives on ``stdout`` (use ``stdout.iter_bytes()`` to relay it undecoded), ``stderr``
    stays empty.
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
    def tty(self) -> bool:
        """True when the command runs on a pseudo-terminal (``exec(..., tty=True)``)."""
        return self._state.tty

    @property
    def exec_id(self) -> str | None:
        """The command's id, given by the service once it started the command (None before;
        `started()` waits for it). With it, this or another process can `Sandbox.attach` to
        the command, which runs on when this handle's connection goes (docs/interactive.md)."""
        return self._state.known_exec_id()

    def started(self) -> OperationRef[str]:
        """Resolves to `exec_id` once the service started the command (raises the command's
        error if it never started)."""
        return OperationRef._of(self._state.wait_exec_id())

    def detach(self) -> None:
        """Stops following the command and leaves it running (only a command with an
        `exec_id`; `Sandbox.attach` follows it again). ``result()`` then raises
        `SandboxExecutionError` ("detached"). `cancel()`, by contrast, kills the command."""
        get_bridge().call_soon(self._state.detach)

    @property
    def dropped_bytes(self) -> int:
        """For `Sandbox.attach`: bytes of output between the offset asked for and the oldest
        the service still retained, which this handle could not receive (0: none lost)."""
        return max(0, self._state.output_offset - self._state.asked_offset)

    def resize(self, rows: int, cols: int) -> OperationRef[None]:
        """Resizes the command's terminal to `rows` x `cols` (each 1 to 65535); the command gets
        SIGWINCH. Only for ``exec(..., tty=True)``. After the command exited, does nothing.
        Safe to call from a signal handler (e.g. on the local terminal's SIGWINCH)."""
        if not self._state.tty:
            raise SandboxExecutionError("resize() needs a command started with tty=True")
        for name, value in (("rows", rows), ("cols", cols)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
                raise ValueError(f"{name} must be a whole number from 1 to 65535, not {value!r}")
        return OperationRef._of(self._state.control("resize", lambda call: call.resize(rows, cols)))

    def send_signal(self, signum: int) -> OperationRef[None]:
        """Sends signal `signum` (e.g. ``signal.SIGINT``) to the command's process group, so it
        can clean up (`cancel()` kills it outright). Only for a command started with
        ``stdin=True`` or ``tty=True``. After the command exited, does nothing."""
        if not self._state.interactive:
            raise SandboxExecutionError(
                "send_signal() needs a command started with stdin=True or tty=True"
            )
        if isinstance(signum, bool) or not isinstance(signum, int) or not 0 < signum < 65:
            raise ValueError(f"signum must be a signal number from 1 to 64, not {signum!r}")
        return OperationRef._of(
            self._state.control("signal", lambda call: call.send_signal(int(signum)))
        )

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
