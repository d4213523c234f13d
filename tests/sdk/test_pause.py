"""`Sandbox.pause`, `resume`, `extend` and `idle_timeout_seconds` through the SDK (sync and
async), against the autostarted local service."""

from __future__ import annotations

import asyncio

import pytest

from aviato import Sandbox, SandboxNotRunningError, SandboxStatus

from .conftest import TEST_TAG


def test_pause_resume_extend_sync() -> None:
    with Sandbox.run(tags=[TEST_TAG], max_lifetime_seconds=600) as sb:
        sb.wait()
        expires = sb.expires_at
        assert sb.pause().result() is None
        assert sb.status == SandboxStatus.PAUSED
        assert sb.get_status() == SandboxStatus.PAUSED
        with pytest.raises(SandboxNotRunningError, match="paused"):
            sb.exec(["/bin/true"]).result()
        sb.resume().result()
        assert sb.status == SandboxStatus.RUNNING
        assert sb.exec(["/bin/echo", "hi"]).result().stdout == "hi\n"
        sb.extend(120).result()
        assert expires is not None and sb.expires_at is not None
        assert (sb.expires_at - expires).total_seconds() == pytest.approx(120, abs=0.01)
        with pytest.raises(ValueError, match="positive"):
            sb.extend(0)
        with pytest.raises(TypeError):
            sb.extend("1h")  # type: ignore[arg-type]


def test_pause_resume_async_and_idle_timeout() -> None:
    async def main() -> None:
        sb = Sandbox.run(tags=[TEST_TAG], idle_timeout_seconds=1.0)
        await sb.wait()
        await sb.pause()
        assert sb.status == SandboxStatus.PAUSED
        await asyncio.sleep(1.6)  # never idle while paused
        await sb.resume()
        assert sb.status == SandboxStatus.RUNNING
        await sb.wait_until_complete(timeout=20, raise_on_termination=False)
        assert sb.status == SandboxStatus.TERMINATED
        assert sb.status_reason == "idle"

    asyncio.run(main())
