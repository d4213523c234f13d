"""The main log of a sandbox for StreamLogs: the runtime's records while it runs, the kept copy
after its end.

The service reads no log format here: a running sandbox's records come from its handle
(`SandboxHandle.logs`, whatever the runtime or placement), and an ended one's from the copy the
lifecycle kept (`logs/<id>.log`, read by runtime/logs.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from aviato.runtime.base import LogRecord, SandboxRuntimeError
from aviato.runtime.logs import read_log
from aviato.server.lifecycle import Lifecycle
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["log_entry", "sandbox_log_records"]

WAIT_POLL_SECONDS = 0.05
END_GRACE_SECONDS = 2.0


async def _ends_soon(ended: Callable[[], bool]) -> bool:
    """Whether `ended()` holds within END_GRACE_SECONDS."""
    for _ in range(int(END_GRACE_SECONDS / WAIT_POLL_SECONDS)):
        if ended():
            return True
        await asyncio.sleep(WAIT_POLL_SECONDS)
    return ended()


def log_entry(record: LogRecord) -> pb.LogEntry:
    entry = pb.LogEntry(stream=record.stream, data=record.data)  # type: ignore[arg-type]
    entry.time.FromNanoseconds(record.time_ns)
    return entry


async def sandbox_log_records(
    lifecycle: Lifecycle, owner: str, sandbox_id: str, tail: int, follow: bool, since_ns: int = 0
) -> AsyncIterator[LogRecord]:
    """The records of StreamLogs: of those stamped at or after `since_ns`, the last `tail`
    (negative: all), then with `follow` the new ones until the sandbox ends. While the sandbox
    starts there is no log yet: following waits for it, otherwise there is nothing. NotFound
    for a sandbox the owner does not have."""
    while True:
        handle, ended = lifecycle.log_source(owner, sandbox_id)
        if handle is not None:
            try:
                async for record in handle.logs(since_ns=since_ns, tail=tail, follow=follow):
                    yield record
            except SandboxRuntimeError:
                # A runtime that fails while its sandbox ends (its node lost): the stream ends
                # as the sandbox did; an error of a sandbox that goes on is the caller's.
                if not await _ends_soon(ended):
                    raise
            return
        try:
            kept = lifecycle.kept_log_path(sandbox_id)
            async for record in read_log(kept, since_ns=since_ns, tail=tail):
                yield record
            return
        except FileNotFoundError:
            pass
        if ended() or not follow:
            return
        await asyncio.sleep(WAIT_POLL_SECONDS)
