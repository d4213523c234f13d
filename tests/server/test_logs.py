"""Logs of the main process: history, tail, follow, timestamps; kept after the end until delete."""

from __future__ import annotations

import threading
import time

import pytest
from _wait import wait_until
from server_helpers import ServerProcess

from aviato.v1 import sandbox_pb2 as pb


def test_tail_and_history(server: ServerProcess) -> None:
    c = server.client()
    sb = c.create(
        command=["/bin/sh", "-c", "for i in 1 2 3 4 5; do echo line$i; done; echo oops >&2"]
    )
    c.wait(sb.id, terminal=True)
    entries = c.logs(sb.id)
    text = b"".join(e.data for e in entries if e.stream == pb.STREAM_STDOUT)
    assert text == b"line1\nline2\nline3\nline4\nline5\n"
    assert b"oops" in b"".join(e.data for e in entries if e.stream == pb.STREAM_STDERR)
    assert all(e.time.ToNanoseconds() > 0 for e in entries)
    times = [e.time.ToNanoseconds() for e in entries]
    assert times == sorted(times)
    last = c.logs(sb.id, tail=1)
    assert len(last) == 1 and last[0].data == entries[-1].data
    assert c.logs(sb.id, tail=0) == []
    # Following a terminal sandbox returns the history and ends.
    assert len(c.logs(sb.id, follow=True, timeout=10)) == len(entries)
    c.delete(sb.id)


@pytest.mark.slow
def test_follow_until_end(server: ServerProcess) -> None:
    c = server.client()
    sb = c.running(command=["/bin/sh", "-c", "echo start; sleep 1; echo middle; sleep 1; echo end"])
    got: list[tuple[float, bytes]] = []

    def follow() -> None:
        for e in server.client().stub.StreamLogs(
            pb.StreamLogsRequest(sandbox_id=sb.id, tail=-1, follow=True), timeout=30
        ):
            got.append((time.monotonic(), e.data))

    t0 = time.monotonic()
    th = threading.Thread(target=follow)
    th.start()
    th.join(30)
    assert not th.is_alive()
    assert b"".join(d for _, d in got) == b"start\nmiddle\nend\n"
    # Output arrived live, not all at the end.
    assert got[0][0] - t0 < 1.0
    assert c.get(sb.id).status == pb.SANDBOX_STATUS_COMPLETED
    c.delete(sb.id)


def test_logs_survive_until_delete(server: ServerProcess) -> None:
    c = server.client()
    sb = c.create(command=["/bin/echo", "kept"])
    c.wait(sb.id, terminal=True)
    wait_until(
        lambda: not (server.state_dir / "sandboxes" / sb.id).exists(),
        "the runtime's cleanup of the ended sandbox's directory",
        timeout=10,
    )
    assert b"".join(e.data for e in c.logs(sb.id)) == b"kept\n"
    c.delete(sb.id)
    assert not (server.state_dir / "logs" / f"{sb.id}.log").exists()
