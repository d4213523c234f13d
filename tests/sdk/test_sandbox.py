"""Sandbox lifecycle, discovery and errors against the real local service."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import pytest

import aviato
from aviato import Sandbox, SandboxStatus

from .conftest import TEST_TAG


def unique_tag() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def test_constructor_sends_nothing_and_start_is_idempotent() -> None:
    tag = unique_tag()
    sb = Sandbox(tags=[TEST_TAG, tag])
    assert sb.sandbox_id is None and sb.status is None
    assert Sandbox.list(tags=[tag]).result() == []
    with pytest.raises(aviato.SandboxNotRunningError):
        sb.get_status()  # does not start it
    refs = [sb.start() for _ in range(5)]
    for ref in refs:
        assert ref.result(timeout=30) is None
    assert sb.sandbox_id is not None
    assert [s.sandbox_id for s in Sandbox.list(tags=[tag]).result()] == [sb.sandbox_id]
    sb.stop().result(timeout=30)


def test_run_returns_once_accepted_then_wait_and_status() -> None:
    t0 = time.monotonic()
    sb = Sandbox.run(tags=[TEST_TAG])
    try:
        assert time.monotonic() - t0 < 5
        assert sb.sandbox_id and sb.status is not None
        assert sb.wait() is sb
        assert sb.status == SandboxStatus.RUNNING == "running"
        assert sb.get_status() == SandboxStatus.RUNNING
        assert sb.started_at is not None and sb.created_at is not None
        assert sb.status_updated_at is not None and sb.returncode is None
        assert sb.container_image == "host" and TEST_TAG in sb.tags
        assert repr(sb) == f"<Sandbox id={sb.sandbox_id} status=running>"
    finally:
        sb.stop().result(timeout=30)
    assert sb.status.is_terminal and sb.get_status() == sb.status


def test_stop_resolves_when_terminal_and_is_idempotent() -> None:
    sb = Sandbox.run(tags=[TEST_TAG])
    refs = [sb.stop(graceful_shutdown_seconds=2) for _ in range(3)]
    for ref in refs:
        ref.result(timeout=30)
    assert sb.status == SandboxStatus.TERMINATED
    assert sb.status_reason == "stopped" and sb.ended_at is not None
    assert Sandbox.from_id(sb.sandbox_id or "").result().status == SandboxStatus.TERMINATED
    sb.stop().result(timeout=5)  # a no-op now
    with pytest.raises(aviato.SandboxTerminatedError):
        sb.wait_until_complete().result(timeout=10)
    assert sb.wait_until_complete(raise_on_termination=False).result(timeout=10) is sb
    with pytest.raises(aviato.SandboxNotRunningError):
        sb.wait()


def test_stop_before_start_sends_nothing() -> None:
    sb = Sandbox(tags=[TEST_TAG])
    sb.stop().result(timeout=5)
    assert sb.sandbox_id is None
    with pytest.raises(aviato.SandboxNotRunningError):
        sb.exec(["true"]).result(timeout=5)


def test_main_process_exit_codes() -> None:
    ok = Sandbox.run("sh", "-c", "exit 0", tags=[TEST_TAG])
    failed = Sandbox.run("sh", "-c", "echo bye; exit 3", tags=[TEST_TAG])
    assert ok.wait_until_complete(timeout=60).result() is ok
    assert ok.status == SandboxStatus.COMPLETED and ok.returncode == 0
    with pytest.raises(aviato.SandboxFailedError) as info:
        failed.wait_until_complete(timeout=60).result()
    assert info.value.returncode == 3 and failed.returncode == 3
    assert failed.status == SandboxStatus.FAILED


@pytest.mark.slow
def test_wait_until_complete_timeout_and_unlimited() -> None:
    sb = Sandbox.run("sleep", "1.5", tags=[TEST_TAG])
    with pytest.raises(aviato.SandboxTimeoutError):
        sb.wait_until_complete(timeout=0.2).result()
    assert sb.wait_until_complete(timeout=math.inf).result(timeout=30) is sb
    assert sb.status == SandboxStatus.COMPLETED


def test_await_sandbox_and_async_context_manager() -> None:
    async def main() -> SandboxStatus | None:
        async with Sandbox.run(tags=[TEST_TAG]) as sb:
            same = await sb
            assert same is sb and sb.status == SandboxStatus.RUNNING
            await sb.write_file("/tmp/a.txt", b"async")
            assert await sb.read_file("/tmp/a.txt") == b"async"
            result = await sb.exec(["cat", "/tmp/a.txt"])
            assert result.stdout == "async"
        return sb.status

    assert asyncio.run(main()) == SandboxStatus.TERMINATED


def test_sync_context_manager_stops_and_does_not_mask_errors() -> None:
    with pytest.raises(ZeroDivisionError), Sandbox.run(tags=[TEST_TAG]) as sb:
        sb.exec(["true"]).result()
        1 / 0  # noqa: B018
    assert sb.status == SandboxStatus.TERMINATED


def test_list_filters() -> None:
    tag = unique_tag()
    running = Sandbox.run(tags=[TEST_TAG, tag])
    done = Sandbox.run("true", tags=[TEST_TAG, tag])
    done.wait_until_complete(timeout=60).result()
    running.wait()
    ids = lambda sbs: {s.sandbox_id for s in sbs}  # noqa: E731
    assert ids(Sandbox.list(tags=[tag]).result()) == {running.sandbox_id}
    assert ids(Sandbox.list(tags=[tag], include_stopped=True).result()) == {
        running.sandbox_id,
        done.sandbox_id,
    }
    assert ids(Sandbox.list(tags=[tag], status="completed").result()) == {done.sandbox_id}
    assert ids(Sandbox.list(tags=[tag], status=SandboxStatus.RUNNING).result()) == {
        running.sandbox_id
    }
    assert Sandbox.list(tags=[tag, "no-such-tag"]).result() == []  # all-of semantics
    with pytest.raises(ValueError):
        Sandbox.list(status="sleeping")
    # results are usable sandboxes
    (found,) = Sandbox.list(tags=[tag]).result()
    assert found.exec(["echo", "listed"]).result().stdout == "listed\n"
    found.stop().result(timeout=30)
    assert Sandbox.from_id(running.sandbox_id or "").result().status.is_terminal  # type: ignore[union-attr]


def test_from_id_and_delete() -> None:
    sb = Sandbox.run(tags=[TEST_TAG])
    attached = Sandbox.from_id(sb.sandbox_id or "").result(timeout=30)
    assert attached.sandbox_id == sb.sandbox_id and attached is not sb
    assert attached.exec(["echo", "attached"]).result().stdout == "attached\n"
    Sandbox.delete(sb.sandbox_id or "").result(timeout=30)
    with pytest.raises(aviato.SandboxNotFoundError) as info:
        Sandbox.from_id(sb.sandbox_id or "").result()
    assert info.value.sandbox_id == sb.sandbox_id
    Sandbox.delete(sb.sandbox_id or "", missing_ok=True).result(timeout=30)
    sb.stop(missing_ok=True).result(timeout=30)


def test_unknown_ids_raise_typed_errors() -> None:
    with pytest.raises(aviato.SandboxNotFoundError):
        Sandbox.from_id("sbx-does-not-exist").result(timeout=30)
    with pytest.raises(aviato.SandboxNotFoundError):
        Sandbox.delete("sbx-does-not-exist").result(timeout=30)
    Sandbox.delete("sbx-does-not-exist", missing_ok=True).result(timeout=30)


def test_invalid_options_are_rejected_by_the_service() -> None:
    with pytest.raises(aviato.SandboxValidationError, match="memory"):
        Sandbox.run(resources={"memory": "12Qi"}, tags=[TEST_TAG])


def test_mounted_files_and_environment() -> None:
    with Sandbox.run(
        tags=[TEST_TAG],
        mounted_files=[
            {"path": "/workspace/conf/a.txt", "content": "alpha"},
            {"mount_path": "/workspace/b.txt", "file_content": b"beta"},
        ],
        environment_variables={"GREETING": "hi"},
    ) as sb:
        r = sb.exec(["sh", "-c", "cat /workspace/conf/a.txt /workspace/b.txt; echo $GREETING"])
        assert r.result().stdout == "alphabetahi\n"
        r2 = sb.exec(["sh", "-c", "echo $GREETING $EXTRA; pwd"], env={"EXTRA": "x"}, cwd="/tmp")
        assert r2.result().stdout == "hi x\n/tmp\n"


def test_sync_api_from_many_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    def job(i: int) -> str:
        with Sandbox.run(tags=[TEST_TAG]) as sb:
            return sb.exec(["echo", f"job{i}"]).result().stdout

    with ThreadPoolExecutor(max_workers=8) as pool:
        outputs = list(pool.map(job, range(8)))
    assert outputs == [f"job{i}\n" for i in range(8)]


def test_sync_api_inside_a_running_event_loop() -> None:
    # As in a Jupyter cell: blocking calls made while this thread runs an event loop.
    async def cell() -> str:
        sb = Sandbox.run(tags=[TEST_TAG])
        sb.wait()
        out = sb.exec(["echo", "in-loop"]).result().stdout
        sb.stop().get()
        return out

    assert asyncio.run(cell()) == "in-loop\n"
