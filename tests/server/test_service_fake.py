"""The control plane in-process on a fake runtime: fast, deterministic checks of its logic.

The same behaviours are checked end to end with real sandboxes in the other test files; these
cover the paths that are hard to provoke there (a runtime that fails or hangs, crash leftovers).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from _wait import async_wait_until
from fake_runtime import FakeRuntime

from aviato.runtime.base import MainExit
from aviato.server.app import serve
from aviato.server.config import ServerConfig
from aviato.server.placement import LocalPlacement
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

Body = Callable[[pbg.SandboxServiceStub, FakeRuntime], Awaitable[None]]
S = pb.SandboxStatus


def run_service(state: Path, runtime: FakeRuntime | None, body: Body, **kw: Any) -> FakeRuntime:
    state.mkdir(parents=True, exist_ok=True)
    rt = runtime or FakeRuntime(state)
    config = ServerConfig(state_dir=state, reaper_interval_seconds=0.05, **kw)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, stop, LocalPlacement(rt)))
        for _ in range(200):
            if config.socket_path.exists() or task.done():
                break
            await asyncio.sleep(0.01)
        try:
            async with grpc.aio.insecure_channel(f"unix://{config.socket_path}") as ch:
                await body(pbg.SandboxServiceStub(ch), rt)
        finally:
            stop.set()
            await task

    asyncio.run(main())
    return rt


async def create(stub: pbg.SandboxServiceStub, **kw: Any) -> pb.Sandbox:
    lease = kw.pop("lease_id", "")
    return await stub.CreateSandbox(pb.CreateSandboxRequest(
        spec=pb.SandboxSpec(**kw), request_id=str(uuid.uuid4()), lease_id=lease))  # fmt: skip


async def wait(stub: pbg.SandboxServiceStub, sid: str, terminal: bool = False) -> pb.Sandbox:
    cond = pb.WaitSandboxRequest.CONDITION_TERMINAL if terminal else (
        pb.WaitSandboxRequest.CONDITION_STARTED)  # fmt: skip
    return await stub.WaitSandbox(pb.WaitSandboxRequest(sandbox_id=sid, condition=cond,
                                                        timeout_seconds=10))  # fmt: skip


async def run_exec(
    stub: pbg.SandboxServiceStub, sid: str, argv: list[str]
) -> list[pb.ExecResponse]:
    req = pb.ExecRequest(init=pb.ExecInit(sandbox_id=sid, argv=argv))
    return [f async for f in stub.Exec(iter([req]))]


def test_lifecycle_basics(tmp_path: Path) -> None:
    async def body(stub: pbg.SandboxServiceStub, rt: FakeRuntime) -> None:
        sb = await create(stub, tags=["x"])
        assert sb.status == S.SANDBOX_STATUS_CREATING  # placed, image ready: no PENDING
        frames = await run_exec(stub, sb.id, ["echo", "hi"])
        assert [f.WhichOneof("msg") for f in frames] == ["started", "output", "exit"]
        assert frames[1].output.data == b"hi\n"
        got = await stub.GetSandbox(pb.GetSandboxRequest(sandbox_id=sb.id))
        assert got.status == S.SANDBOX_STATUS_RUNNING
        logs = [e async for e in stub.StreamLogs(pb.StreamLogsRequest(sandbox_id=sb.id, tail=-1))]
        assert logs[0].data == f"hello from {sb.id}\n".encode()
        stopped = await stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=sb.id))
        assert (stopped.status, stopped.status_reason) == (S.SANDBOX_STATUS_TERMINATED, "stopped")
        await async_wait_until(lambda: sb.id in rt.cleaned, "the runtime's cleanup", timeout=5)
        logs = [e async for e in stub.StreamLogs(pb.StreamLogsRequest(sandbox_id=sb.id, tail=-1))]
        assert logs and logs[0].data.startswith(b"hello")
        await stub.DeleteSandbox(pb.DeleteSandboxRequest(sandbox_id=sb.id))

    run_service(tmp_path / "s", None, body)


def test_delete_returns_after_the_one_cleanup_it_raced(tmp_path: Path) -> None:
    """Deleting a running sandbox stops it (which starts a cleanup) and then cleans up itself:
    the second must wait for the first, not run beside it and return while it still removes."""

    async def body(stub: pbg.SandboxServiceStub, rt: FakeRuntime) -> None:
        rt.cleanup_delay = 0.3
        sb = await create(stub)
        await wait(stub, sb.id)
        await stub.DeleteSandbox(pb.DeleteSandboxRequest(sandbox_id=sb.id))
        assert sb.id in rt.cleaned and sb.id not in rt.cleaning
        assert rt.overlapping_cleanups == 0

    run_service(tmp_path / "s", None, body)


def test_create_failure_and_exit_codes(tmp_path: Path) -> None:
    async def body(stub: pbg.SandboxServiceStub, rt: FakeRuntime) -> None:
        rt.fail_next = "no bwrap here"
        sb = await create(stub)
        end = await wait(stub, sb.id, terminal=True)
        assert end.status == S.SANDBOX_STATUS_FAILED
        assert end.status_reason == "create failed: no bwrap here"
        frames = await run_exec(stub, sb.id, ["true"])
        assert frames[-1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        bad = await create(stub, command=["exit", "3"])
        end = await wait(stub, bad.id, terminal=True)
        assert (end.status, end.exit_code, end.status_reason) == (
            S.SANDBOX_STATUS_FAILED, 3, "exited with code 3")  # fmt: skip
        ok = await create(stub, command=["exit", "0"])
        end = await wait(stub, ok.id, terminal=True)
        assert (end.status, end.exit_code) == (S.SANDBOX_STATUS_COMPLETED, 0)

    run_service(tmp_path / "s", None, body)


def test_exec_waits_while_creating_and_stop_while_creating(tmp_path: Path) -> None:
    async def body(stub: pbg.SandboxServiceStub, rt: FakeRuntime) -> None:
        rt.create_delay = 0.3
        sb = await create(stub)
        t0 = time.monotonic()
        frames = await run_exec(stub, sb.id, ["echo", "late"])
        assert time.monotonic() - t0 >= 0.25
        assert frames[-1].exit.exit_code == 0
        sb2 = await create(stub)
        stopped = await stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=sb2.id))
        assert stopped.status == S.SANDBOX_STATUS_TERMINATED
        assert sb2.id in rt.created  # created, then killed at once
        assert rt.handles.get(sb2.id) is None or rt.handles[sb2.id].ended.done()

    run_service(tmp_path / "s", None, body)


def test_stop_grace_and_coalescing(tmp_path: Path) -> None:
    async def body(stub: pbg.SandboxServiceStub, rt: FakeRuntime) -> None:
        sb = await create(stub, command=["ignore-term"])
        await wait(stub, sb.id)
        t0 = time.monotonic()
        results = await asyncio.gather(*(
            stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=sb.id, grace_seconds=0.3))
            for _ in range(5)))  # fmt: skip
        assert 0.25 <= time.monotonic() - t0 < 2
        assert {r.exit_code for r in results} == {137}
        assert len({r.ended_at.ToNanoseconds() for r in results}) == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=sb.id, grace_seconds=-1))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    run_service(tmp_path / "s", None, body)


def test_stop_returns_once_the_end_is_recorded_even_if_terminate_does_not(
    tmp_path: Path,
) -> None:
    # The sandbox ends (the watcher records it) but the runtime's terminate call never returns,
    # as when a remote node host's answer is lost: the stop must still complete.
    async def body(stub: pbg.SandboxServiceStub, rt: FakeRuntime) -> None:
        sb = await create(stub, command=["lose-terminate-answer"])
        await wait(stub, sb.id)
        stopped = await stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=sb.id), timeout=5)
        assert stopped.status == S.SANDBOX_STATUS_TERMINATED

    run_service(tmp_path / "s", None, body)


@pytest.mark.slow
def test_lifetime_and_lease_reaping(tmp_path: Path) -> None:
    async def body(stub: pbg.SandboxServiceStub, rt: FakeRuntime) -> None:
        short = await create(stub, max_lifetime_seconds=0.2)
        end = await wait(stub, short.id, terminal=True)
        assert end.status_reason == "max lifetime exceeded"
        await stub.RenewLease(pb.RenewLeaseRequest(lease_id="L1", ttl_seconds=1))
        leased = await create(stub, lease_id="L1")
        lease = await stub.RenewLease(pb.RenewLeaseRequest(lease_id="L1", ttl_seconds=1))
        assert lease.sandbox_count == 1
        end = await wait(stub, leased.id, terminal=True)
        assert end.status_reason == "lease expired"

    run_service(tmp_path / "s", None, body)


def test_capacity(tmp_path: Path) -> None:
    async def body(stub: pbg.SandboxServiceStub, rt: FakeRuntime) -> None:
        a = await create(stub)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create(stub)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=a.id))
        b = await create(stub, resources=pb.Resources(memory="100Mi"))
        await stub.StopSandbox(pb.StopSandboxRequest(sandbox_id=b.id))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create(stub, resources=pb.Resources(memory="200Mi"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "memory capacity exhausted" in (err.value.details() or "")

    run_service(
        tmp_path / "s", None, body, max_sandboxes=1, max_memory_bytes=150 << 20,
        default_memory_bytes=10 << 20,
    )  # fmt: skip


def test_restart_reconciliation(tmp_path: Path) -> None:
    ids: dict[str, str] = {}

    async def first(stub: pbg.SandboxServiceStub, rt: FakeRuntime) -> None:
        for name in ("alive", "lost", "exited", "creating"):
            sb = await create(stub)
            await wait(stub, sb.id)
            ids[name] = sb.id

    rt = run_service(tmp_path / "s", None, first)
    # While the service is down: one sandbox vanishes, one exits with 5, one record is left in
    # CREATING (as by a crash), and an orphan appears on disk.
    rt.attach_results[ids["lost"]] = MainExit(-1, 0, time.time_ns(), "lost")
    rt.attach_results[ids["exited"]] = MainExit(5, 0, time.time_ns(), "")
    import sqlite3

    with sqlite3.connect(tmp_path / "s" / "registry.db") as db:
        db.execute("UPDATE sandboxes SET status=2 WHERE id=?", (ids["creating"],))
    (rt.dir / "sbx-orphan").mkdir()

    async def second(stub: pbg.SandboxServiceStub, rt: FakeRuntime) -> None:
        async def get(name: str) -> pb.Sandbox:
            return await stub.GetSandbox(pb.GetSandboxRequest(sandbox_id=ids[name]))

        assert (await get("alive")).status == S.SANDBOX_STATUS_RUNNING
        frames = await run_exec(stub, ids["alive"], ["echo", "x"])
        assert frames[-1].exit.exit_code == 0
        lost = await get("lost")
        assert (lost.status, lost.status_reason) == (S.SANDBOX_STATUS_FAILED,
                                                     "lost during service restart")  # fmt: skip
        exited = await get("exited")
        assert (exited.status, exited.exit_code) == (S.SANDBOX_STATUS_FAILED, 5)
        creating = await get("creating")
        assert creating.status_reason == "interrupted by service restart"
        assert "sbx-orphan" in rt.cleaned and not (rt.dir / "sbx-orphan").exists()

    run_service(tmp_path / "s", rt, second)


def test_internal_errors_do_not_crash(tmp_path: Path) -> None:
    async def body(stub: pbg.SandboxServiceStub, rt: FakeRuntime) -> None:
        sb = await create(stub)
        await wait(stub, sb.id)

        async def broken(path: str) -> Any:
            raise ValueError("boom")

        rt.handles[sb.id].read_file = broken  # type: ignore[method-assign]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.ReadFile(pb.ReadFileRequest(sandbox_id=sb.id, path="/x")):
                pass
        assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        # Garbage never crashes it.
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ListSandboxes(pb.ListSandboxesRequest(statuses=[99]))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.WaitSandbox(pb.WaitSandboxRequest(sandbox_id=sb.id, condition=7))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.RenewLease(pb.RenewLeaseRequest(lease_id="", ttl_seconds=float("nan")))
        info = await stub.GetServerInfo(pb.GetServerInfoRequest())
        assert info.sandboxes_running == 1 and info.runtime == "fake"

    run_service(tmp_path / "s", None, body)
