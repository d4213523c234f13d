"""The warm pool's own rules, on the in-process fake runtime (pure logic: no sandbox starts):
a member is handed out once, only to the pool's exact shape; an ended member is replaced, never
handed out; the refill yields to user creates and to a full service; a failing start backs
off; close removes every member. Also `--warm-pool`'s command line. The real thing is
`test_warm_pool.py`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from _wait import async_wait_until
from fake_runtime import FakeRuntime, FakeSandbox

from aviato.server import warm_pool
from aviato.server.__main__ import parse_args
from aviato.server.codec import default_config
from aviato.server.config import ServerConfig
from aviato.server.record_json import config_json
from aviato.server.records import SandboxRecord, SandboxStatus
from aviato.server.registry import Registry
from aviato.server.warm_pool import WarmPool

SHAPE = default_config(ServerConfig(state_dir=Path("/nonexistent")).spec_defaults())


async def until(predicate: Callable[[], bool]) -> None:
    await async_wait_until(predicate, "the pool's state", timeout=5)


def run(tmp_path: Path, body: Callable[[WarmPool, FakeRuntime, dict[str, bool]], Awaitable[None]],
        size: int = 2) -> None:  # fmt: skip
    async def main() -> None:
        runtime = FakeRuntime(tmp_path)
        flags = {"busy": False, "room": True}
        pool = WarmPool(size, SHAPE, runtime, "local", busy=lambda: flags["busy"],
                        room=lambda: flags["room"], grace_seconds=1.0)  # fmt: skip
        pool.start()
        try:
            await body(pool, runtime, flags)
        finally:
            await pool.close()

    asyncio.run(main())


@pytest.fixture(autouse=True)
def no_quiet_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warm_pool, "QUIET_AFTER_CLAIM_SECONDS", 0.0)
    monkeypatch.setattr(warm_pool, "FIRST_BACKOFF_SECONDS", 0.01)


def test_members_are_handed_out_once_and_only_to_the_shape(tmp_path: Path) -> None:
    async def body(pool: WarmPool, runtime: FakeRuntime, flags: dict[str, bool]) -> None:
        await until(lambda: len(pool.ready_ids) == 2)
        other = replace(SHAPE, env={"A": "1"})
        assert pool.claim(other) is None and len(pool.ready_ids) == 2
        assert pool.claim(replace(SHAPE, memory_bytes=SHAPE.memory_bytes // 2)) is None
        # The idle timeout and the id are not the shape; everything else is.
        seen: set[str] = set()
        for _ in range(10):
            await until(lambda: len(pool.ready_ids) == 2)
            member = pool.claim(replace(SHAPE, sandbox_id="x", idle_timeout_seconds=60))
            assert member is not None and member.sandbox_id not in seen
            assert member.sandbox_id not in pool.ready_ids
            seen.add(member.sandbox_id)
        assert pool.claims == 10 and pool.misses == 0
        assert "2 of 2 ready" in pool.describe() or "starting" in pool.describe()

    run(tmp_path, body)


def test_an_empty_pool_is_a_miss(tmp_path: Path) -> None:
    async def body(pool: WarmPool, runtime: FakeRuntime, flags: dict[str, bool]) -> None:
        await until(lambda: len(pool.ready_ids) == 1)
        flags["room"] = False  # no refill
        assert pool.claim(SHAPE) is not None
        assert pool.claim(SHAPE) is None
        assert pool.misses == 1 and "1 missed" in pool.describe()

    run(tmp_path, body, size=1)


def test_an_ended_member_is_replaced_and_never_handed_out(tmp_path: Path) -> None:
    async def body(pool: WarmPool, runtime: FakeRuntime, flags: dict[str, bool]) -> None:
        await until(lambda: len(pool.ready_ids) == 1)
        (first,) = pool.ready_ids
        handle = runtime.handles[first]
        assert isinstance(handle, FakeSandbox)
        handle.end(0, 0, "deadline:lifetime")
        await until(lambda: first in runtime.cleaned)
        await until(lambda: len(pool.ready_ids) == 1)
        member = pool.claim(SHAPE)
        assert member is not None and member.sandbox_id != first

    run(tmp_path, body, size=1)


def test_the_refill_yields_to_user_creates_and_a_full_service(tmp_path: Path) -> None:
    async def body(pool: WarmPool, runtime: FakeRuntime, flags: dict[str, bool]) -> None:
        flags["busy"] = True
        await asyncio.sleep(0.1)
        assert runtime.created == []
        flags["busy"], flags["room"] = False, False
        await asyncio.sleep(0.1)
        assert runtime.created == []
        flags["room"] = True
        await until(lambda: len(pool.ready_ids) == 2)

    run(tmp_path, body)


def test_a_failing_start_backs_off_and_says_why(tmp_path: Path) -> None:
    async def body(pool: WarmPool, runtime: FakeRuntime, flags: dict[str, bool]) -> None:
        await until(lambda: len(pool.ready_ids) == 1)
        runtime.fail_next = "no bwrap here"
        assert pool.claim(SHAPE) is not None
        await until(lambda: pool.failures == 1)
        assert "last failure: no bwrap here" in pool.describe()
        await until(lambda: len(pool.ready_ids) == 1)  # the next start works

    run(tmp_path, body, size=1)


def test_close_removes_every_member(tmp_path: Path) -> None:
    async def body(pool: WarmPool, runtime: FakeRuntime, flags: dict[str, bool]) -> None:
        await until(lambda: len(pool.ready_ids) == 3)
        members = list(pool.ready_ids)
        await pool.close()
        assert sorted(runtime.cleaned) == sorted(members)
        assert runtime.list_present() == []
        assert pool.claim(SHAPE) is None

    run(tmp_path, body, size=3)


def test_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_args(["--state-dir", "/tmp/x"]).warm_pool == 0
    assert parse_args(["--state-dir", "/tmp/x", "--warm-pool", "4"]).warm_pool == 4
    monkeypatch.setenv("AVIATO_WARM_POOL", "3")
    assert parse_args(["--state-dir", "/tmp/x"]).warm_pool == 3
    for argv in (["--warm-pool", "-1"], ["--warm-pool", "many"],
                 ["--warm-pool", "2", "--placement", "ray"]):  # fmt: skip
        with pytest.raises(SystemExit) as err:
            parse_args(["--state-dir", "/tmp/x", *argv])
        assert err.value.code == 2
    monkeypatch.setenv("AVIATO_WARM_POOL", "lots")
    with pytest.raises(SystemExit):
        parse_args(["--state-dir", "/tmp/x"])


def test_a_member_carries_the_model_text_its_claims_record_keeps(tmp_path: Path) -> None:
    """Made while the member waits, the text must be exactly what the registry would write for
    the claim's config, and is not used for a config that is not the member's own."""

    async def body(pool: WarmPool, runtime: FakeRuntime, flags: dict[str, bool]) -> None:
        await until(lambda: len(pool.ready_ids) == 2)
        member = pool.claim(SHAPE)
        assert member is not None
        own = member.config_for(SHAPE)
        assert own is member.config and member.config_text_for(own) == config_json(own) != ""
        other = member.config_for(replace(SHAPE, idle_timeout_seconds=5.0))
        assert other.idle_timeout_seconds == 5.0 and member.config_text_for(other) == ""
        registry = Registry(tmp_path / "registry.db")
        rec = SandboxRecord(
            id=member.sandbox_id, owner="o", request_id="r", status=SandboxStatus.RUNNING,
            config=own, created_ns=1, tags=("t",), max_lifetime_seconds=60.0,
        )  # fmt: skip
        registry.insert_sandbox(rec, member.config_text_for(own))
        back = registry.get_sandbox(member.sandbox_id)
        assert back is not None and back.config == own and back.tags == ("t",)
        assert back.max_lifetime_seconds == 60.0
        registry.close()
        pool.discard(member)

    run(tmp_path, body)
