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
import uuid
from collections.abc import Awaitable, Callable

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


async def _one(stub: pbg.SandboxServiceStub, delete: bool) -> None:
    """Creates a sandbox, runs a command in it, stops it and (with `delete`) deletes it."""
    sandbox = await stub.CreateSandbox(
        pb.CreateSandboxRequest(spec=pb.SandboxSpec(), request_id=str(uuid.uuid4()))
    )
    frames = [f async for f in stub.RunCommand(pb.ExecInit(sandbox_id=sandbox.id,
                                                           argv=["echo", "x"]))]  # fmt: skip
    assert frames[-1].WhichOneof("msg") == "exit", frames[-1]
    assert frames[-1].exit.exit_code == 0
    await stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=sandbox.id, grace_seconds=0))
    if delete:
        await stub.DeleteSandbox(pb.DeleteSandboxRequest(sandbox_id=sandbox.id))


async def _many(stub: pbg.SandboxServiceStub, count: int, delete: bool) -> None:
    slots = asyncio.Semaphore(PARALLEL)

    async def one() -> None:
        async with slots:
            await _one(stub, delete)

    await asyncio.gather(*(one() for _ in range(count)))


def _live(kind: type) -> list[object]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, kind)]


def _nothing_of_the_sandboxes() -> bool:
    """No connection, exec handle, cgroup or live entry of any sandbox is left."""
    return not any(_live(kind) for kind in (SupervisorConnection, SupervisorExec, SandboxCgroup,
                                            LiveSandbox))  # fmt: skip


def test_deleted_sandboxes_leave_nothing_in_the_service(fresh_server: ServerProcess) -> None:
    async def body(stub: pbg.SandboxServiceStub) -> None:
        await _many(stub, SANDBOXES, delete=True)
        await async_wait_until(_nothing_of_the_sandboxes, "the sandboxes' objects to go")
        assert _live(Command) == []
        (table,) = _live(CommandTable)
        assert table.sizes() == {"commands": 0, "requests": 0, "sandboxes": 0, "finished": 0}

    _run_in_process(fresh_server, body)


def test_stopped_sandboxes_keep_their_commands_but_not_their_connections(
    fresh_server: ServerProcess,
) -> None:
    """A stopped (not deleted) sandbox's commands stay listable (their retention), without
    holding the sandbox's runtime objects; all ended commands together stay bounded."""
    kept_total = exec_table.FINISHED_KEPT_TOTAL
    exec_table.FINISHED_KEPT_TOTAL = SANDBOXES // 2
    try:

        async def body(stub: pbg.SandboxServiceStub) -> None:
            await _many(stub, SANDBOXES, delete=False)
            await async_wait_until(_nothing_of_the_sandboxes, "the sandboxes' objects to go")
            (table,) = _live(CommandTable)
            assert table.sizes()["finished"] == SANDBOXES // 2
            assert len(_live(Command)) == SANDBOXES // 2
            for command in _live(Command):
                assert isinstance(command, Command) and command.state == "exited"

        _run_in_process(fresh_server, body)
    finally:
        exec_table.FINISHED_KEPT_TOTAL = kept_total
