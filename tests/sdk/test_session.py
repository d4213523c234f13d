"""Session: deferred start, tracking, adoption, close, defaults (real service)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

import aviato
from aviato import Sandbox, SandboxDefaults, SandboxStatus, Session

from .conftest import TEST_TAG


def defaults(**kw: object) -> SandboxDefaults:
    tag = f"s-{uuid.uuid4().hex[:10]}"
    return SandboxDefaults(tags=(TEST_TAG, tag), **kw)  # type: ignore[arg-type]


def test_deferred_start_and_close_stops_everything_concurrently() -> None:
    with Session(defaults()) as session:
        sandboxes = [session.sandbox() for _ in range(4)]
        assert session.sandbox_count == 4
        assert all(sb.sandbox_id is None for sb in sandboxes)  # nothing sent yet
        results = [sb.exec(["echo", str(i)]) for i, sb in enumerate(sandboxes)]
        assert [r.result().stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
        assert all(sb.sandbox_id for sb in sandboxes)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5
    assert session.sandbox_count == 0 and session.closed
    assert all(sb.status == SandboxStatus.TERMINATED for sb in sandboxes)
    with pytest.raises(aviato.SandboxError, match="closed"):
        session.sandbox()
    assert session.close().result() is None  # idempotent


def test_stopped_sandboxes_leave_the_session() -> None:
    with Session(defaults()) as session:
        sb = session.sandbox()
        sb.start().result()
        assert session.sandbox_count == 1
        sb.stop().result()
        assert session.sandbox_count == 0


def test_list_adopt_and_from_id() -> None:
    d = defaults()
    outside = Sandbox.run(defaults=d)
    with Session(d) as session:
        found = session.list().result()
        assert [s.sandbox_id for s in found] == [outside.sandbox_id]
        assert session.sandbox_count == 0
        adopted = session.list(adopt=True).result()
        assert session.sandbox_count == 1
        assert session.list(tags=["other"]).result() == []  # session tags + extra tags
        again = session.from_id(outside.sandbox_id or "").result()
        assert session.sandbox_count == 2 and again.sandbox_id == outside.sandbox_id
        not_adopted = session.from_id(outside.sandbox_id or "", adopt=False).result()
        assert session.sandbox_count == 2 and not_adopted.sandbox_id == outside.sandbox_id
        with pytest.raises(ValueError):
            session.adopt(Sandbox())
        assert adopted
    assert Sandbox.from_id(outside.sandbox_id or "").result().status == SandboxStatus.TERMINATED
    with pytest.raises(aviato.SandboxError):
        session.adopt(outside)


def test_list_include_stopped_and_status_filter() -> None:
    with Session(defaults()) as session:
        done = session.sandbox(command="true")
        done.wait_until_complete(timeout=60).result()
        assert session.list().result() == []
        assert [s.sandbox_id for s in session.list(include_stopped=True).result()] == [
            done.sandbox_id
        ]
        assert [s.sandbox_id for s in session.list(status="completed").result()] == [
            done.sandbox_id
        ]


def test_environment_defaults_merge_in_the_sandbox() -> None:
    d = defaults(environment_variables={"A": "session", "B": "session"})
    with Session(d) as session:
        sb = session.sandbox(environment_variables={"B": "sandbox"})
        r = sb.exec(["sh", "-c", "echo $A $B $C"], env={"C": "exec"}).result()
        assert r.stdout == "session sandbox exec\n"


def test_async_session() -> None:
    async def main() -> Session:
        async with Session(defaults()) as session:
            sb = session.sandbox()
            assert (await sb.exec(["echo", "async"])).stdout == "async\n"
            assert len(await session.list()) == 1
        return session

    session = asyncio.run(main())
    assert session.sandbox_count == 0


def test_session_from_mapping_and_classmethod() -> None:
    session = Sandbox.session({"tags": [TEST_TAG]})
    assert isinstance(session, Session) and session.defaults.tags == (TEST_TAG,)
    session.close().result()
