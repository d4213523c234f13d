"""The exec streams of aviato.v1.SandboxService: Exec (bidirectional) and RunCommand.

Exec reports every failure after the first frame as an `ExecError` frame (so that a stream always
ends with exactly one exit or error frame); only a missing or invalid credential ends it with a
gRPC status. Every command is a `exec_table.Command` (an id, a bounded retention of its
output); calls relay from there. When the client goes away mid-exec, a command started with a
request id runs on (a later attach reads it); one without is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aviato.runtime.base import ExecHandle, ExecSpec, SandboxRuntimeError
from aviato.server import codec, errors, validation
from aviato.server.auth import Authenticator
from aviato.server.errors import InvalidArgument, ServiceError
from aviato.server.exec_table import Command, CommandTable
from aviato.server.lifecycle import Lifecycle
from aviato.server.servicer import ServicerBase
from aviato.v1 import errors_pb2 as epb
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato.server.servicer import Ctx

__all__ = ["ExecStreams"]

log = logging.getLogger("aviato.server.api")

MAX_EXEC_INPUT_BYTES = 4 << 20  # ExecInit.input (a request message is at most 8 MiB)
_INLINE_INPUT_BYTES = 64 * 1024  # RunCommand writes input this small before relaying output
_refused = errors.error_frame  # a frame refusing the request
EXEC_ID_METADATA = "aviato-exec-id"  # RunCommand's initial metadata: the command's id
# RunCommand names its command in the first frame if the command answers this soon, else in
# initial metadata sent ahead (a message of its own). With many commands in flight a `true`
# takes 50-100 ms end to end; at 20 ms most took the extra message (~6% of the service's CPU
# per exec at 64 in flight). A silent command's id comes this late.
_ID_IN_FIRST_FRAME_SECONDS = 0.25
# What a started command fails with when its sandbox goes away under it (see `_cut_off`).
_CUT_OFF_CODES = frozenset({"UNAVAILABLE", "FAILED_PRECONDITION"})


# How long an Exec stream stays open after its terminal frame, for the client to half-close it.
HALF_CLOSE_LINGER_SECONDS = 2.0


async def _linger_until_half_close(
    requests: AsyncIterator[pb.ExecRequest], pump: asyncio.Task[str | None] | None = None
) -> None:
    """Keeps a finished Exec stream open until the client half-closes it (the SDK does as soon
    as it reads the terminal frame), for at most HALF_CLOSE_LINGER_SECONDS.

    A client may be writing an end-of-file, a resize or a signal just as its command ends (a
    command that fails to start while `aviato exec` forwards an empty stdin). Had the service
    already ended the call, the client's gRPC core would fail that write and with it the whole
    call ("Internal error from Core"), losing the exit status it had received. Frames that
    arrive now are read and dropped.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(HALF_CLOSE_LINGER_SECONDS):
            if pump is not None:
                with contextlib.suppress(Exception):
                    await pump  # it reads the requests until they end, unless it stopped early
            async for _ in requests:
                pass


class ExecStreams(ServicerBase):
    """Exec and RunCommand (and attaching, an Exec whose first frame is `attach`)."""

    def __init__(self, lifecycle: Lifecycle, auth: Authenticator) -> None:
        super().__init__(lifecycle, auth)
        self._commands = CommandTable()
        lifecycle.when_deleted(self._commands.forget_sandbox)
        # Commands being started, by (owner, sandbox, request id): a retry that arrives
        # meanwhile waits for the first rather than starting the command a second time.
        self._starting: dict[tuple[str, str, str], asyncio.Future[Command | None]] = {}

    async def Exec(self, request_iterator: AsyncIterator[pb.ExecRequest], context: Ctx) -> None:
        # A coroutine writing with context.write() rather than an async generator: grpc.aio
        # drives generators through an extra layer per frame, which costs ~0.2 ms per exec.
        write = context.write
        owner = await self._owner_or_abort(context)
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            await write(
                errors.error_frame(
                    "INVALID_ARGUMENT", "init: the stream ended before an init frame"
                )
            )
            return
        kind = first.WhichOneof("msg")
        if kind == "attach":
            command = await self._attached(owner, first.attach, write)
            offset, fresh, data = first.attach.offset, False, b""
        elif kind == "init":
            init = first.init
            if init.input and not init.stdin:
                await write(errors.error_frame("INVALID_ARGUMENT", "init.input: needs init.stdin"))
                return
            command, fresh = await self._command_for(owner, init, write, stdin=init.stdin)
            offset, data = 0, (init.input if fresh else b"")  # a retry's input is not fed twice
        else:
            await write(
                errors.error_frame("INVALID_ARGUMENT", "init: the first frame must be init")
            )
            return
        if command is None:
            await _linger_until_half_close(requests)
            return
        kill_on_loss = fresh and not command.detachable
        pump = asyncio.create_task(
            self._pump_exec(requests, command.handle, command.stdin, data, kill_on_loss)
        )
        try:
            await self._relay_exec(command, write, pump, offset, kill_on_loss, started=True)
            await _linger_until_half_close(requests, pump)
        finally:
            pump.cancel()

    async def RunCommand(self, init: pb.ExecInit, context: Ctx) -> None:
        """Exec without a request stream: stdin is `init.input` then EOF; no `started` frame
        (the command's id comes as the initial metadata `aviato-exec-id`).

        Half the messages of an Exec and no input task, for the common command that takes no
        interactive input. A cancelled call (the client gone) kills the command like Exec does,
        unless it has a request id (then it runs on, and its input is fed to its end).
        """
        write = context.write
        owner = await self._owner_or_abort(context)
        if init.tty:
            await write(
                errors.error_frame("INVALID_ARGUMENT", "init.tty: RunCommand has no terminal")
            )
            return
        command, fresh = await self._command_for(owner, init, write, stdin=bool(init.input))
        if command is None:
            return
        proc = command.handle
        feed: asyncio.Task[None] | None = None
        if fresh and init.input:
            if command.detachable:
                # Fed to its end whatever happens to the call: the command runs on.
                feed = command.keep(asyncio.ensure_future(self._feed_input(proc, init.input)))
                if len(init.input) <= _INLINE_INPUT_BYTES:
                    await asyncio.shield(feed)
            else:
                try:
                    if len(init.input) > _INLINE_INPUT_BYTES:
                        # In a task: a command that does not read its input must not stall
                        # its output.
                        feed = asyncio.create_task(self._feed_input(proc, init.input))
                    else:
                        await self._feed_input(proc, init.input)
                except BaseException:  # cancelled while feeding: nobody will read the command
                    with contextlib.suppress(Exception):
                        await asyncio.shield(proc.kill())
                    raise
        # The id goes in the first frame when one comes at once (most commands: no extra
        # message); a command silent at first gets it sent ahead, as initial metadata.
        named = await command.first_news(_ID_IN_FIRST_FRAME_SECONDS)
        if not named:
            await context.send_initial_metadata(((EXEC_ID_METADATA, command.exec_id),))
        try:
            await self._relay_exec(
                command, write, None, 0, fresh and not command.detachable, name_first=named
            )
        finally:
            if feed is not None and not command.detachable:
                feed.cancel()

    async def _attached(
        self, owner: str, attach: pb.ExecAttach, write: Callable[[Any], Awaitable[None]]
    ) -> Command | None:
        """The command an attach frame names; on failure writes the error frame, None."""
        try:
            if attach.offset < 0:
                raise InvalidArgument("attach.offset", "must be 0 or more")
            self._lifecycle.record(owner, attach.sandbox_id)  # NotFound for another's sandbox
            return self._commands.get(owner, attach.sandbox_id, attach.exec_id)
        except ServiceError as e:
            await write(
                errors.error_frame(
                    e.code, str(e), errors.detail_of(e, sandbox_id=attach.sandbox_id)
                )
            )
        return None

    async def _command_for(
        self, owner: str, init: pb.ExecInit, write: Callable[[Any], Awaitable[None]], *, stdin: bool
    ) -> tuple[Command | None, bool]:
        """The command of `init`: a new one, or the one a call with the same request id started
        (a retry runs nothing). Returns (command, whether it is new); (None, False) once the
        error frame is written."""
        key = (owner, init.sandbox_id, init.request_id)
        while init.request_id:
            try:
                validation.validate_request_id(init.request_id, "init.request_id")
            except ServiceError as e:
                await write(errors.error_frame(e.code, str(e), errors.detail_of(e)))
                return None, False
            earlier = self._commands.by_request(*key)
            if earlier is not None:
                return earlier, False
            starting = self._starting.get(key)
            if starting is None:
                break
            await asyncio.shield(starting)  # then look again (it may have failed to start)
        pending: asyncio.Future[Command | None] = asyncio.get_running_loop().create_future()
        if init.request_id:
            self._starting[key] = pending
        command: Command | None = None
        try:
            started = await self._start_exec(owner, init, write, stdin=stdin)
            if started is not None:
                spec, proc = started
                command = self._commands.add(
                    owner, init.sandbox_id, init.request_id, list(spec.argv), spec.tty, proc
                )
                command.stdin = spec.stdin
                sandbox_id = init.sandbox_id

                def failure(
                    code: str, message: str, detail: epb.ErrorDetail | None
                ) -> pb.ExecResponse:
                    return errors.error_frame(*self._cut_off(code, message, sandbox_id, detail))

                command.start_pump(self._lifecycle.activity(sandbox_id), failure)
        finally:
            pending.set_result(command)
            if self._starting.get(key) is pending:
                del self._starting[key]
        return command, command is not None

    async def _start_exec(
        self, owner: str, init: pb.ExecInit, write: Callable[[Any], Awaitable[None]], *, stdin: bool
    ) -> tuple[ExecSpec, ExecHandle] | None:
        """Validates `init` and starts its command; on failure writes the error frame and
        returns None. `stdin` overrides init.stdin (RunCommand derives it from init.input)."""
        try:
            if len(init.input) > MAX_EXEC_INPUT_BYTES:
                raise InvalidArgument(
                    "init.input", f"{len(init.input)} bytes is more than {MAX_EXEC_INPUT_BYTES}"
                )
            spec = codec.decode_exec_init(init)
            if spec.stdin != stdin:
                spec = dataclasses.replace(spec, stdin=stdin)
            handle = await self._lifecycle.running_handle(owner, init.sandbox_id)
            return spec, await handle.exec(spec)
        except (ServiceError, SandboxRuntimeError) as e:
            await write(
                errors.error_frame(e.code, str(e), errors.detail_of(e, sandbox_id=init.sandbox_id))
            )
        except Exception as e:
            log.exception("exec could not start")
            await write(errors.error_frame("INTERNAL", f"internal error: {e}"))
        return None

    def _cut_off(
        self, code: str, message: str, sandbox_id: str, detail: epb.ErrorDetail | None = None
    ) -> tuple[str, str, epb.ErrorDetail | None]:
        """A started command's failure as reported to the client.

        A command whose sandbox went away under it (stopped, its main process ended, its
        supervisor died, its node was lost) fails with UNAVAILABLE or FAILED_PRECONDITION inside
        the runtime. Reported as such, it reads as "try again", and a retry would run the command
        a second time: it is reported as ABORTED ("cut off; it may have partly run"), which the
        SDK raises as SandboxTerminatedError and never retries. This is the one place where that
        happens. Other codes pass unchanged.
        """
        if code not in _CUT_OFF_CODES:
            return code, message, detail
        how = self._lifecycle.how_it_ended(sandbox_id)
        cut = f"the command was cut off: sandbox {sandbox_id} {how} while it ran"
        terminated = epb.ErrorDetail(reason=epb.SANDBOX_TERMINATED, sandbox_id=sandbox_id)
        return "ABORTED", cut + (f" ({message})" if message else ""), terminated

    async def _relay_exec(
        self,
        command: Command,
        write: Callable[[Any], Awaitable[None]],
        pump: asyncio.Task[str | None] | None,
        offset: int,
        kill_on_loss: bool,
        *,
        started: bool = False,
        name_first: bool = False,
    ) -> None:
        """Writes the command's output frames from `offset` (its retention, see `exec_table`)
        and exactly one terminal frame (exit or error); with `started`, the `started` frame
        first; with `name_first`, the command's id in the first output or exit frame.

        When the client goes away (this coroutine is cancelled, or a write fails) the command
        runs on, unless `kill_on_loss` (the call that started a command without a request id):
        then it is killed, as nobody can read it. When the input pump killed it (the request
        stream ended without stdin_eof), the error frame says so.
        """
        done = False
        try:
            async for frame in command.frames(offset):
                kind = frame.WhichOneof("msg")
                if kind == "started":
                    if started:
                        await write(frame)
                    continue
                if kind == "error" and pump is not None and pump.done() and not pump.cancelled():
                    reason = pump.result()
                    if reason:
                        frame = pb.ExecResponse(error=pb.ExecError(code=frame.error.code))
                        frame.error.message = reason
                done = kind in ("exit", "error")
                if name_first and kind in ("output", "exit"):
                    name_first = False
                    named = pb.ExecResponse()
                    named.CopyFrom(frame)  # the terminal frame is shared by every reader
                    getattr(named, kind).exec_id = command.exec_id
                    frame = named
                await write(frame)
        finally:
            if not done and kill_on_loss:
                # The client went away (or the stream broke): nobody can read the command.
                with contextlib.suppress(Exception):
                    await asyncio.shield(command.handle.kill())

    @staticmethod
    async def _feed_input(proc: ExecHandle, data: bytes) -> None:
        try:
            await proc.write_stdin(data)
            await proc.close_stdin()
        except (SandboxRuntimeError, ServiceError) as e:
            log.debug("exec input ended: %s", e)  # the command is gone; its output side reports

    @staticmethod
    async def _pump_exec(
        requests: AsyncIterator[pb.ExecRequest],
        proc: ExecHandle,
        stdin_wanted: bool,
        first: bytes,
        kill_on_loss: bool,
    ) -> str | None:
        """Forwards `first` (init.input), then stdin, EOF, resizes and signals.

        The end of the command's input is explicit: only a stdin_eof frame closes its stdin. A
        request stream that ends (or breaks) before it, while the command reads stdin, is a lost
        client: the command is never handed a possibly truncated input followed by EOF as if it
        were complete. With `kill_on_loss` it is killed (returns the reason); otherwise its
        stdin stays open for a later attach (returns None).
        """
        eof_sent = False
        try:
            if first and stdin_wanted:
                await proc.write_stdin(first)
            async for req in requests:
                kind = req.WhichOneof("msg")
                if kind == "stdin":
                    if stdin_wanted and not eof_sent:
                        await proc.write_stdin(req.stdin)
                elif kind == "stdin_eof":
                    if stdin_wanted and not eof_sent:
                        eof_sent = True
                        await proc.close_stdin()
                elif kind == "resize":
                    rows, cols = codec.decode_resize(req.resize, "resize")
                    await proc.resize(rows, cols)
                elif kind == "signal" and 1 <= req.signal <= 64:
                    await proc.signal(req.signal)
            why = "the request stream ended before stdin_eof"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the handler is done with this exec
            # Raised by the interceptor's end-of-stream check: the client went away.
            why = "the client went away before stdin_eof"
        except (SandboxRuntimeError, ServiceError) as e:
            log.debug("exec input ended: %s", e)
            return None
        except Exception:
            log.debug("exec input pump ended", exc_info=True)
            why = "the request stream broke before stdin_eof"
        if not stdin_wanted or eof_sent or not kill_on_loss:
            return None
        with contextlib.suppress(Exception):
            await proc.kill()
        return f"{why}: the command was killed (its input may be incomplete)"
