"""The command table's bounds, as pure logic (a scripted `ExecHandle`, no sandbox): the
per-command retention, a reader that holds the command back, the total budget, ended commands
per sandbox and their expiry, owners and request ids. The real path is
tests/server/test_exec_attach.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from aviato.runtime.base import ExecEvent, ExecExit, ExecHandle, ExecOutput
from aviato.server import errors, exec_table
from aviato.server.exec_table import Command, CommandTable, ExecNotFound
from aviato.v1 import sandbox_pb2 as pb

MiB = 1 << 20


class ScriptedExec(ExecHandle):
    """Yields what is put in its queue (None ends it with exit 0)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def events(self) -> AsyncIterator[ExecEvent]:
        while (data := await self.queue.get()) is not None:
            yield ExecOutput(1, data)
        yield ExecExit(0, 0, False, 0.0, 0.0, 0, 0.0)

    async def write_stdin(self, data: bytes) -> None: ...
    async def close_stdin(self) -> None: ...
    async def resize(self, rows: int, cols: int) -> None: ...
    async def signal(self, signo: int) -> None: ...

    async def kill(self) -> None:
        self.queue.put_nowait(None)


def _start(
    table: CommandTable, sandbox: str = "sbx-1", owner: str = "o", request: str = ""
) -> tuple[Command, ScriptedExec]:
    handle = ScriptedExec()
    command = table.add(owner, sandbox, request, ["x"], False, handle)
    command.start_pump(contextlib.nullcontext(), lambda c, m, d: errors.error_frame(c, m, d))
    return command, handle


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_no_reader_keeps_only_the_last_bytes_and_is_never_held_back() -> None:
    async def body() -> None:
        table = CommandTable()
        command, handle = _start(table)
        for i in range(40):  # 40 MiB with nobody reading
            handle.queue.put_nowait(bytes([i]) * MiB)
        handle.queue.put_nowait(None)
        await _settle()
        assert command.state == "exited" and command.end == 40 * MiB
        assert command.retained <= exec_table.RETAINED_BYTES_PER_COMMAND
        assert table.retained_total == command.retained
        frames = [f async for f in command.frames(0)]
        assert frames[0].started.output_offset == command.start > 0
        data = b"".join(f.output.data for f in frames if f.WhichOneof("msg") == "output")
        assert data == bytes([38]) * MiB + bytes([39]) * MiB  # the last 2 MiB, whole chunks
        assert frames[-1].WhichOneof("msg") == "exit"

    asyncio.run(body())


def test_a_reader_gets_every_byte_and_holds_the_command_back() -> None:
    async def body() -> None:
        table = CommandTable()
        command, handle = _start(table)
        frames = command.frames(0)
        assert (await anext(frames)).WhichOneof("msg") == "started"
        for i in range(8):
            handle.queue.put_nowait(bytes([i]) * MiB)
        handle.queue.put_nowait(None)
        await _settle()
        # the reader has taken nothing yet: the pump waits past the retention, drops nothing
        assert command.start == 0 and command.end <= exec_table.RETAINED_BYTES_PER_COMMAND + MiB
        received = b""
        async for frame in frames:
            if frame.WhichOneof("msg") == "output":
                assert frame.output.offset == len(received)
                received += frame.output.data
        assert received == b"".join(bytes([i]) * MiB for i in range(8))

    asyncio.run(body())


def test_the_total_budget_drops_ended_commands_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exec_table, "RETAINED_BYTES_TOTAL", 3 * MiB)

    async def body() -> None:
        table = CommandTable()
        ended, handle = _start(table)
        handle.queue.put_nowait(b"a" * (2 * MiB))
        handle.queue.put_nowait(None)
        await _settle()
        assert ended.retained == 2 * MiB
        running, flood = _start(table, "sbx-2")
        flood.queue.put_nowait(b"b" * (2 * MiB))
        await _settle()
        assert ended.retained == 0 and running.retained == 2 * MiB  # the ended one went
        flood.queue.put_nowait(b"c" * (2 * MiB))
        await _settle()
        assert table.retained_total <= 3 * MiB
        flood.queue.put_nowait(None)
        await _settle()

    asyncio.run(body())


def test_ended_commands_per_sandbox_and_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        table = CommandTable()
        ids = []
        for _ in range(exec_table.FINISHED_KEPT_PER_SANDBOX + 5):
            command, handle = _start(table)
            handle.queue.put_nowait(None)
            await _settle()
            ids.append(command.exec_id)
        kept = [c.exec_id for c in table.of_sandbox("o", "sbx-1")]
        assert kept == ids[5:]
        with pytest.raises(ExecNotFound):
            table.get("o", "sbx-1", ids[0])
        monkeypatch.setattr(exec_table, "FINISHED_KEEP_SECONDS", 0.0)
        assert table.of_sandbox("o", "sbx-1") == [] and len(table) == 0

    asyncio.run(body())


def test_ended_commands_in_all_and_a_deleted_sandboxes(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most FINISHED_KEPT_TOTAL ended commands over all sandboxes (the oldest go); an ended
    command no longer holds the runtime's handle; a deleted sandbox's commands all go, a
    running one's too, and its pump still ends cleanly."""
    monkeypatch.setattr(exec_table, "FINISHED_KEPT_TOTAL", 4)

    async def body() -> None:
        table = CommandTable()
        ended = []
        for i in range(6):
            command, handle = _start(table, sandbox=f"sbx-{i}")
            handle.queue.put_nowait(None)
            await _settle()
            assert command.handle is not handle
            ended.append(command)
        assert [c.sandbox_id for c in table] == ["sbx-2", "sbx-3", "sbx-4", "sbx-5"]
        running, handle = _start(table, sandbox="sbx-5", request="r1")
        table.forget_sandbox("sbx-5")
        assert table.of_sandbox("o", "sbx-5") == [] and table.by_request("o", "sbx-5", "r1") is None
        handle.queue.put_nowait(b"late")  # the sandbox's end reaches the forgotten command
        handle.queue.put_nowait(None)
        await _settle()
        assert running.state == "exited" and len(table) == 3 and table.retained_total == 0
        for sandbox in ("sbx-2", "sbx-3", "sbx-4"):
            table.forget_sandbox(sandbox)
        assert set(table.sizes().values()) == {0}

    asyncio.run(body())


def test_owners_sandboxes_and_request_ids_are_separate() -> None:
    async def body() -> None:
        table = CommandTable()
        command, handle = _start(table, request="r-1")
        assert table.get("o", "sbx-1", command.exec_id) is command
        for owner, sandbox in (("other", "sbx-1"), ("o", "sbx-2")):
            with pytest.raises(ExecNotFound):
                table.get(owner, sandbox, command.exec_id)
            assert table.by_request(owner, sandbox, "r-1") is None
        assert table.by_request("o", "sbx-1", "r-1") is command
        assert table.by_request("o", "sbx-1", "") is None
        handle.queue.put_nowait(None)
        await _settle()
        info = command.info()
        assert info.state == "exited" and info.exit == pb.ExecExit(
            exit_code=0, usage=info.exit.usage
        )

    asyncio.run(body())


def test_a_huge_argv_is_kept_short() -> None:
    async def body() -> None:
        table = CommandTable()
        handle = ScriptedExec()
        argv = ["sh", "-c", "x" * 500_000, "more"]
        command = table.add("o", "sbx-1", "", argv, False, handle)
        assert command.argv == ["sh", "-c", "…"]
        single = table.add("o", "sbx-1", "", ["y" * 100_000], False, handle)
        assert len(single.argv) == 1 and len(single.argv[0]) <= exec_table.SHOWN_ARGV_BYTES

    asyncio.run(body())
