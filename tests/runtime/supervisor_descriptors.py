"""The descriptors a sandbox's supervisor holds, seen from the host: for tests that a request
handing a descriptor over (CONNECT_PORT, EGRESS_LISTEN) leaves none behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from aviato.runtime.bubblewrap import BubblewrapSandbox
from aviato.runtime.bubblewrap.host_processes import children


def supervisor_pid(h: BubblewrapSandbox) -> int:
    """Host pid of the sandbox's supervisor: the descendant of bwrap that is pid 1 inside."""
    todo = [h.pid]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("NSpid:") and len(line.split()) > 2 and line.split()[-1] == "1":
                    return pid
        todo.extend(children(pid))
    raise AssertionError("no supervisor found under bwrap")


def open_fds(pid: int | str) -> list[str]:
    return sorted(os.listdir(f"/proc/{pid}/fd"))


async def settled_fds(pid: int) -> list[str]:
    """The descriptors of `pid` once they stay the same for 0.2 s: the supervisor closes its
    end of a control connection when it reads the service's close, a moment after it."""
    previous = open_fds(pid)
    while True:
        await asyncio.sleep(0.2)
        now = open_fds(pid)
        if now == previous:
            return now
        previous = now
