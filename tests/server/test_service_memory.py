"""The service keeps nothing of a sandbox it no longer needs: checked on the real service (real
sandboxes, the real registry), run in this process so that its live objects can be counted.

Before, every ended command kept the runtime's handle for 10 minutes, and with it its
sandbox's supervisor connection (a 64 KiB receive buffer, a socket, a transport) and cgroup:
the service grew by ~75 KiB per sandbox created, exec'd and deleted. No memory size or timing
is asserted here (this machine is shared): the objects are counted after a `gc.collect()`.
"""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from _wait import async_wait_until
from server_helpers import ServerProcess

from aviato.runtime.cgroups.sandbox import SandboxCgroup
from aviato.runtime.supervisor.connection import SupervisorConnection
from aviato.runtime.supervisor.exec_handle import SupervisorExec
from aviato.server import exec_table
from aviato.server.app import serve
from aviato.server.config import ServerConfig
from aviato.server.exec_table import Command, CommandTable
from aviato.server.sandbox_states import LiveSandbox
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

SANDBOXES = 24
PARALLEL = 6

Body = Callable[[pbg.SandboxServiceStub], Awaitable[None]]
T = TypeVar("T")


def _run_in_process(server: ServerProcess, body: Body) -> None:
    """`serve()` on `server`'s state directory and cgroup parent (the fixture's teardown
    removes whatever it leaves), with `body` given a stub on its socket."""
    server.state_dir.mkdir(parents=True)
    config = ServerConfig(state_dir=server.state_dir, cgroup_parent=server.cgroup_parent)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, stop))
        await async_wait_until(
            lambda: config.socket_path.exists() or task.done(), "the service's socket"
        )
        try:
            async with grpc.aio.insecure_channel(f"unix://{config.socket_path}") as channel:
                await body(pbg.SandboxServiceStub(channel))
        finally:
            stop.set()
            await task

    asyncio.run(main())


async def _one(stub: pbg.SandboxServiceStub, delete: bool) -> str:
    """Creates a sandbox, runs a command in it, stops it and (with `delete`) deletes it."""
    sandbox = await stub.CreateSandbox(
        pb.CreateSandboxRequest(spec=pb.SandboxSpec(), request_id=str(uuid.uuid4()))
    )
    init = pb.ExecInit(sandbox_id=sandbox.id, argv=["echo", "x"])
    frames = [f async for f in stub.RunCommand(init)]
    assert frames[-1].WhichOneof("msg") == "exit", frames[-1]
    assert frames[-1].exit.exit_code == 0
    await stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=sandbox.id, grace_seconds=0))
    if delete:
        await stub.DeleteSandbox(pb.DeleteSandboxRequest(sandbox_id=sandbox.id))
    return str(sandbox.id)


async def _many(stub: pbg.SandboxServiceStub, count: int, delete: bool) -> set[str]:
    slots = asyncio.Semaphore(PARALLEL)

    async def one() -> str:
        async with slots:
            return await _one(stub, delete)

    return set(await asyncio.gather(*(one() for _ in range(count))))


def _live(kind: type[T]) -> list[T]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, kind)]


class _Census:
    """What this process holds of the runtime's objects, against what it held before the
    service started (objects of other tests in this process are not ours to count)."""

    def __init__(self) -> None:
        self.before = {kind: len(_live(kind)) for kind in (SupervisorConnection, SupervisorExec)}
        self.tables = {id(t) for t in _live(CommandTable)}

    def sandboxes_gone(self, ids: set[str]) -> bool:
        """No connection or exec handle more than before; no cgroup or live entry of `ids`."""
        if any(len(_live(kind)) > n for kind, n in self.before.items()):
            return False
        if any(os.path.basename(d) in ids for c in _live(SandboxCgroup) for d in c.unique_dirs):
            return False
        return not any(live.rec.id in ids for live in _live(LiveSandbox))

    def table(self) -> CommandTable:
        """The command table of the service started since."""
        (table,) = [t for t in _live(CommandTable) if id(t) not in self.tables]
        return table


def _commands_of(ids: set[str]) -> list[Command]:
    return [c for c in _live(Command) if c.sandbox_id in ids]


def test_deleted_sandboxes_leave_nothing_in_the_service(fresh_server: ServerProcess) -> None:
    census = _Census()

    async def body(stub: pbg.SandboxServiceStub) -> None:
        ids = await _many(stub, SANDBOXES, delete=True)
        await async_wait_until(lambda: census.sandboxes_gone(ids), "the sandboxes' objects to go")
        assert _commands_of(ids) == []
        sizes = census.table().sizes()
        assert set(sizes.values()) == {0}, sizes

    _run_in_process(fresh_server, body)


def test_stopped_sandboxes_keep_their_commands_but_not_their_connections(
    fresh_server: ServerProcess,
) -> None:
    """A stopped (not deleted) sandbox's commands stay listable (their retention), without
    holding the sandbox's runtime objects; all ended commands together stay bounded."""
    census = _Census()
    kept_total = exec_table.FINISHED_KEPT_TOTAL
    exec_table.FINISHED_KEPT_TOTAL = SANDBOXES // 2
    try:

        async def body(stub: pbg.SandboxServiceStub) -> None:
            ids = await _many(stub, SANDBOXES, delete=False)
            await async_wait_until(
                lambda: census.sandboxes_gone(ids), "the sandboxes' objects to go"
            )
            assert census.table().sizes()["finished"] == SANDBOXES // 2
            kept = _commands_of(ids)
            assert len(kept) == SANDBOXES // 2
            assert all(c.state == "exited" for c in kept)

        _run_in_process(fresh_server, body)
    finally:
        exec_table.FINISHED_KEPT_TOTAL = kept_total
