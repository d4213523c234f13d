"""Commands that outlive their call: each command's id, its retained output and how it ended.

Every command the service starts is a `Command` in the `CommandTable`: an id (``exec_id``, 128
random bits, meaningful only to the owner that started it), its argv, and a pump that reads the
runtime's events into a bounded retention of its output. Calls read from the retention (the
call that started the command, and any number of attaches), so a command whose call went away
keeps running and a later attach gets the output it missed, then the live rest, then the exit.

The retention, bounded by construction (docs/interactive.md):

- per command, the last `RETAINED_BYTES_PER_COMMAND` of output (stdout and stderr together);
  older bytes are dropped, except those a connected reader has not been sent yet: then the
  pump waits for the reader (a slow reader holds the command back, as the call's flow control
  did before), so a live exec still gets every byte;
- all commands together, `RETAINED_BYTES_TOTAL`: past it, the output of ended commands goes
  first (oldest first), then the older output of the command that is writing;
- ended commands stay `FINISHED_KEEP_SECONDS`, at most `FINISHED_KEPT_PER_SANDBOX` of them
  per sandbox and `FINISHED_KEPT_TOTAL` in all (the oldest go first); of each argv, the first
  `SHOWN_ARGV_BYTES` are kept;
- an ended command lets go of the runtime's handle (which holds the sandbox's supervisor
  connection and cgroup), and a deleted sandbox's commands are forgotten at once
  (`CommandTable.forget_sandbox`): before, each ended command pinned its sandbox's connection
  for 10 minutes, about 75 KiB of the service's memory per sandbox.

Nothing here survives a restart of the service: the table is in its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager

from aviato.runtime.base import (
    ExecEvent,
    ExecExit,
    ExecFailed,
    ExecHandle,
    ExecOutput,
    SandboxRuntimeError,
)
from aviato.server import codec, errors
from aviato.server.errors import NotFound, ServiceError
from aviato.v1 import errors_pb2 as epb
from aviato.v1 import sandbox_pb2 as pb

__all__ = [
    "FINISHED_KEEP_SECONDS",
    "FINISHED_KEPT_PER_SANDBOX",
    "FINISHED_KEPT_TOTAL",
    "RETAINED_BYTES_PER_COMMAND",
    "RETAINED_BYTES_TOTAL",
    "Command",
    "CommandTable",
    "ExecNotFound",
]

log = logging.getLogger("aviato.server.exec")

RETAINED_BYTES_PER_COMMAND = 2 << 20
RETAINED_BYTES_TOTAL = 256 << 20
FINISHED_KEPT_PER_SANDBOX = 32
# An ended command without output costs the service ~2 KiB; commands end at thousands a second.
FINISHED_KEPT_TOTAL = 1024
FINISHED_KEEP_SECONDS = 600.0
# What is kept of a command's argv (for listings and attaches): an argv may be 1 MiB.
SHOWN_ARGV_BYTES = 4096


class ExecNotFound(NotFound):
    """No command with this id in the sandbox (for this owner), or no longer kept."""

    reason = epb.EXEC_NOT_FOUND


#: Builds the terminal error frame of a command that failed: (code, message, detail) -> frame.
FailureFrame = Callable[[str, str, epb.ErrorDetail | None], pb.ExecResponse]


class _EndedExec(ExecHandle):
    """The handle of a command that ended: every operation is a no-op, as it is on the
    runtime's handle once its terminal event was delivered, but nothing of the sandbox is held."""

    def events(self) -> AsyncIterator[ExecEvent]:
        return self

    def __aiter__(self) -> _EndedExec:
        return self

    async def __anext__(self) -> ExecEvent:
        raise StopAsyncIteration

    async def write_stdin(self, data: bytes) -> None:
        pass

    async def close_stdin(self) -> None:
        pass

    async def resize(self, rows: int, cols: int) -> None:
        pass

    async def signal(self, signo: int) -> None:
        pass

    async def kill(self) -> None:
        pass


_ENDED = _EndedExec()


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Reader:
    """One call reading a command's output: the offset of the next byte it will be sent."""

    __slots__ = ("offset",)

    def __init__(self, offset: int) -> None:
        self.offset = offset


class Command:
    """One command: its identity, its retained output, its terminal frame once it ended."""

    __slots__ = (
        "_chunks",
        "_kept",
        "_pump",
        "_readers",
        "_table",
        "_waiters",
        "argv",
        "detachable",
        "end",
        "ended_ns",
        "exec_id",
        "handle",
        "owner",
        "request_id",
        "sandbox_id",
        "start",
        "started_ns",
        "stdin",
        "terminal",
        "tty",
    )

    def __init__(
        self,
        table: CommandTable,
        exec_id: str,
        owner: str,
        sandbox_id: str,
        request_id: str,
        argv: list[str],
        tty: bool,
        handle: ExecHandle,
    ) -> None:
        self._table = table
        self.exec_id = exec_id
        self.owner = owner
        self.sandbox_id = sandbox_id
        self.request_id = request_id
        self.argv = argv
        self.tty = tty
        self.handle = handle
        self.detachable = bool(request_id)  # kept running when its call goes away
        self.stdin = False  # it reads the stdin its calls send
        self.started_ns = time.time_ns()
        self.ended_ns = 0
        self.start = 0  # offset of the oldest retained byte
        self.end = 0  # offset after the newest byte: all output so far
        self.terminal: pb.ExecResponse | None = None  # the exit or error frame, once ended
        self._chunks: deque[tuple[int, int, bytes]] = deque()  # (offset, stream, data)
        self._readers: list[_Reader] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._pump: asyncio.Task[None] | None = None
        self._kept: set[asyncio.Task[None]] | None = None  # made by the first `keep`

    # -- state ----------------------------------------------------------------------------------

    @property
    def retained(self) -> int:
        return self.end - self.start

    @property
    def state(self) -> str:
        if self.terminal is None:
            return "running"
        return "exited" if self.terminal.WhichOneof("msg") == "exit" else "failed"

    @property
    def attached(self) -> int:
        return len(self._readers)

    def info(self) -> pb.ExecInfo:
        info = pb.ExecInfo(
            exec_id=self.exec_id,
            argv=self.argv,
            state=self.state,
            tty=self.tty,
            output_bytes=self.end,
            retained_from=self.start,
            attached=len(self._readers),
        )
        info.started_at.FromNanoseconds(self.started_ns)
        if self.terminal is not None:
            info.ended_at.FromNanoseconds(self.ended_ns)
            if self.terminal.WhichOneof("msg") == "exit":
                info.exit.CopyFrom(self.terminal.exit)
            else:
                info.error = self.terminal.error.message
        return info

    # -- waking ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _changed(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    async def first_news(self, seconds: float) -> bool:
        """Waits up to `seconds` for the command's first output or its end; whether it came."""
        if self.end == 0 and self.terminal is None:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            # A timer on the waiter, not `asyncio.wait_for` (a task per call).
            timer = loop.call_later(seconds, _settle, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
        return self.end > 0 or self.terminal is not None

    def keep(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """Holds `task` (its input being fed) until it ends: asyncio keeps tasks weakly."""
        if self._kept is None:
            self._kept = set()
        self._kept.add(task)
        task.add_done_callback(self._kept.discard)
        return task

    # -- the pump: runtime events into the retention --------------------------------------------

    def start_pump(self, activity: AbstractContextManager[None], failure: FailureFrame) -> None:
        self._pump = asyncio.create_task(self._run(activity, failure))

    async def _run(self, activity: AbstractContextManager[None], failure: FailureFrame) -> None:
        terminal: pb.ExecResponse | None = None
        try:
            with activity:  # a running command keeps its sandbox from idling out
                async for event in self.handle.events():
                    if type(event) is ExecOutput:
                        await self._append(event.stream, event.data)
                    elif type(event) is ExecExit:
                        terminal = codec.encode_exit(event)
                        break
                    elif isinstance(event, ExecFailed):
                        terminal = failure(event.code, event.message, None)
                        break
                if terminal is None:
                    terminal = failure("UNAVAILABLE", "", None)
        except (SandboxRuntimeError, ServiceError) as e:
            detail = errors.detail_of(e, sandbox_id=self.sandbox_id)
            terminal = failure(e.code, str(e), detail)
        except asyncio.CancelledError:
            terminal = errors.error_frame("UNAVAILABLE", "the service is shutting down")
            raise
        except Exception as e:
            log.exception("exec output failed")
            with contextlib.suppress(Exception):
                await asyncio.shield(self.handle.kill())
            terminal = errors.error_frame("INTERNAL", f"internal error: {e}")
        finally:
            self.terminal = terminal or errors.error_frame("UNAVAILABLE", "the command was lost")
            self.ended_ns = time.time_ns()
            self.handle = _ENDED  # let go of the sandbox's connection and cgroup
            self._pump = None
            self._wake()
            self._table._ended(self)

    async def _append(self, stream: int, data: bytes) -> None:
        if not data:
            return
        self._chunks.append((self.end, stream, data))
        self.end += len(data)
        self._table._grew(self, len(data))
        self._wake()
        while True:
            self._trim(RETAINED_BYTES_PER_COMMAND)
            if self.retained <= RETAINED_BYTES_PER_COMMAND or not self._readers:
                return
            # A reader has not been sent these bytes yet: wait for it (or for it to go).
            await self._changed()

    def _trim(self, keep: int) -> int:
        """Drops the oldest chunks until at most `keep` bytes remain, never one that a connected
        reader still needs. Returns the bytes dropped."""
        needed = min((r.offset for r in self._readers), default=self.end)
        dropped = 0
        while self._chunks and self.retained > keep:
            offset, _, data = self._chunks[0]
            if offset + len(data) > needed:
                break
            self._chunks.popleft()
            self.start = offset + len(data)
            dropped += len(data)
        if dropped:
            self._table._shrank(dropped)
        return dropped

    def drop_all(self) -> int:
        """Drops every retained byte no reader needs (the table's budget is exceeded)."""
        return self._trim(0)

    # -- readers --------------------------------------------------------------------------------

    async def frames(self, offset: int) -> AsyncIterator[pb.ExecResponse]:
        """The output from `offset` (from the oldest retained byte when that is later), then the
        terminal frame. The first frame is `ExecStarted` with the id and where output begins."""
        reader = _Reader(max(0, min(offset, self.end)))
        if reader.offset < self.start:
            reader.offset = self.start
        self._readers.append(reader)
        try:
            yield pb.ExecResponse(
                started=pb.ExecStarted(
                    exec_id=self.exec_id,
                    output_offset=reader.offset,
                    argv=self.argv,
                    tty=self.tty,
                )
            )
            while True:
                if reader.offset < self.start:  # cannot happen while registered; kept safe
                    reader.offset = self.start
                pending = self._after(reader.offset)
                for chunk_offset, stream, data in pending:
                    skip = reader.offset - chunk_offset
                    part = data[skip:] if skip > 0 else data
                    yield pb.ExecResponse(
                        output=pb.ExecOutput(
                            stream=stream,  # type: ignore[arg-type]
                            data=part,
                            offset=chunk_offset + max(skip, 0),
                        )
                    )
                    reader.offset = chunk_offset + len(data)
                    self._wake()  # the pump may be waiting for this reader
                if pending:
                    continue
                if self.terminal is not None and reader.offset >= self.end:
                    yield self.terminal
                    return
                await self._changed()
        finally:
            self._readers.remove(reader)
            self._wake()

    def _after(self, offset: int) -> list[tuple[int, int, bytes]]:
        """The retained chunks holding bytes at or after `offset`, oldest first."""
        found: list[tuple[int, int, bytes]] = []
        for chunk in reversed(self._chunks):
            if chunk[0] + len(chunk[2]) <= offset:
                break
            found.append(chunk)
        found.reverse()
        return found


def _shown(argv: list[str]) -> list[str]:
    """`argv` as kept: whole items up to SHOWN_ARGV_BYTES, then "…" if any were left out."""
    kept: list[str] = []
    size = 0
    for item in argv:
        size += len(item.encode()) + 1
        if size > SHOWN_ARGV_BYTES:
            return [*kept, "…"] if kept else [item[: SHOWN_ARGV_BYTES // 4] + "…"]
        kept.append(item)
    return kept


class CommandTable:
    """Every command the service knows, by id and by its caller's request id."""

    def __init__(self) -> None:
        self._by_id: dict[str, Command] = {}
        self._by_request: dict[tuple[str, str, str], Command] = {}
        self._by_sandbox: dict[str, dict[str, Command]] = {}  # in the order they started
        self._finished: OrderedDict[str, Command] = OrderedDict()  # in the order they ended
        self._finished_of: dict[str, OrderedDict[str, Command]] = {}  # the same, by sandbox
        self.retained_total = 0

    def add(
        self,
        owner: str,
        sandbox_id: str,
        request_id: str,
        argv: list[str],
        tty: bool,
        handle: ExecHandle,
    ) -> Command:
        self._expire()
        exec_id = "exec-" + secrets.token_hex(16)
        shown = _shown(argv)
        command = Command(self, exec_id, owner, sandbox_id, request_id, shown, tty, handle)
        self._by_id[exec_id] = command
        self._by_sandbox.setdefault(sandbox_id, {})[exec_id] = command
        if request_id:
            self._by_request[(owner, sandbox_id, request_id)] = command
        return command

    def by_request(self, owner: str, sandbox_id: str, request_id: str) -> Command | None:
        """The command this owner started in this sandbox with `request_id` (a retry's)."""
        if not request_id:
            return None
        return self._by_request.get((owner, sandbox_id, request_id))

    def get(self, owner: str, sandbox_id: str, exec_id: str) -> Command:
        """The owner's command `exec_id` of `sandbox_id`; NotFound otherwise (also for another
        owner's, which is indistinguishable from none)."""
        self._expire()
        command = self._by_id.get(exec_id)
        if command is None or command.owner != owner or command.sandbox_id != sandbox_id:
            raise ExecNotFound(
                f"no command {exec_id!r} in sandbox {sandbox_id!r} (commands are kept "
                f"{FINISHED_KEEP_SECONDS / 60:g} minutes after they end, and not across a "
                "restart of the service)",
                sandbox_id=sandbox_id,
            )
        return command

    def of_sandbox(self, owner: str, sandbox_id: str) -> list[Command]:
        """The owner's commands of `sandbox_id`, running and recently ended, oldest first."""
        self._expire()
        commands = self._by_sandbox.get(sandbox_id, {}).values()
        return [c for c in commands if c.owner == owner]

    def __iter__(self) -> Iterator[Command]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    # -- bookkeeping, called by the commands -----------------------------------------------------

    def _grew(self, command: Command, n: int) -> None:
        self.retained_total += n
        if self.retained_total <= RETAINED_BYTES_TOTAL:
            return
        for ended in list(self._finished.values()):
            ended.drop_all()
            if self.retained_total <= RETAINED_BYTES_TOTAL:
                return
        command.drop_all()

    def _shrank(self, n: int) -> None:
        self.retained_total -= n

    def _ended(self, command: Command) -> None:
        if command.exec_id not in self._by_id:  # forgotten while it ran: what came since goes
            self.retained_total -= command.retained
            command.start = command.end
            command._chunks.clear()
            return
        self._finished[command.exec_id] = command
        of_sandbox = self._finished_of.setdefault(command.sandbox_id, OrderedDict())
        of_sandbox[command.exec_id] = command
        while len(of_sandbox) > FINISHED_KEPT_PER_SANDBOX:
            self._forget(next(iter(of_sandbox.values())))
        while len(self._finished) > FINISHED_KEPT_TOTAL:
            self._forget(next(iter(self._finished.values())))

    def forget_sandbox(self, sandbox_id: str) -> None:
        """Forgets every command of `sandbox_id` (it was deleted: nobody can name them again).
        A command still running is forgotten too; its pump ends with the sandbox."""
        for command in list(self._by_sandbox.get(sandbox_id, {}).values()):
            self._forget(command)

    def sizes(self) -> dict[str, int]:
        """How many entries each index holds (what tests check stays bounded)."""
        return {
            "commands": len(self._by_id),
            "requests": len(self._by_request),
            "sandboxes": len(self._by_sandbox),
            "finished": len(self._finished),
            "sandboxes_with_finished": len(self._finished_of),
        }

    def _expire(self) -> None:
        horizon = time.time_ns() - int(FINISHED_KEEP_SECONDS * 1e9)
        while self._finished:
            oldest = next(iter(self._finished.values()))
            if oldest.ended_ns > horizon:
                return
            self._forget(oldest)

    def _forget(self, command: Command) -> None:
        self._finished.pop(command.exec_id, None)
        ended_of = self._finished_of.get(command.sandbox_id)
        if ended_of is not None:
            ended_of.pop(command.exec_id, None)
            if not ended_of:
                del self._finished_of[command.sandbox_id]
        self._by_id.pop(command.exec_id, None)
        of_sandbox = self._by_sandbox.get(command.sandbox_id, {})
        of_sandbox.pop(command.exec_id, None)
        if not of_sandbox:
            self._by_sandbox.pop(command.sandbox_id, None)
        if command.request_id:
            key = (command.owner, command.sandbox_id, command.request_id)
            if self._by_request.get(key) is command:
                del self._by_request[key]
        self.retained_total -= command.retained
        command.start = command.end
        command._chunks.clear()
