"""`Sandbox.stream_logs` against the real service: all, tailed, followed to the end, async."""

from __future__ import annotations

import asyncio

from aviato import Sandbox

from .conftest import TEST_TAG


def test_logs_whole_tailed_and_followed() -> None:
    script = "echo first; echo oops >&2; read line </dev/stdin || sleep 1; echo second"
    with Sandbox.run("sh", "-c", script, tags=[TEST_TAG]) as sb:
        with sb.stream_logs(follow=True) as records:
            seen = [(r.stream, r.data) for r in records]  # ends when the sandbox ends
        assert ("stdout", b"first\n") in seen and ("stderr", b"oops\n") in seen
        assert seen[-1] == ("stdout", b"second\n")
        sb.wait_until_complete().result()
        assert [r.text for r in sb.stream_logs()] == [r.decode() for _, r in seen]
        assert [r.text for r in sb.stream_logs(tail=1)] == ["second\n"]

        async def first_async() -> str:
            async for record in sb.stream_logs():
                assert record.time is not None
                return record.text
            return ""

        assert asyncio.run(first_async()) == "first\n"
