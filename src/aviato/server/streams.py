"""Request streams that outlive an interrupted reader: what an upload needs to fail cleanly.

`Resumable` wraps a request stream so that a reader cancelled mid-read (the runtime stops reading
an upload's frames when the write fails) does not close it; `drain_upload` then reads and drops
the rest, so that the call's status is sent only once the client has finished sending.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aviato.v1 import sandbox_pb2 as pb

__all__ = ["Resumable", "drain_upload"]

log = logging.getLogger("aviato.server.streams")


class Resumable:
    """An async iterator whose reads survive the cancellation of a reader.

    The runtime cancels its pending read of an upload's frames when the write ends early (the
    disk is full); a plain iterator would then be closed mid-read. Here the read goes on in its
    own task, and the next reader gets its frame: the rest of the stream can still be drained.
    """

    __slots__ = ("_it", "_next")

    def __init__(self, it: AsyncIterator[Any]) -> None:
        self._it = it
        self._next: asyncio.Future[Any] | None = None

    def __aiter__(self) -> Resumable:
        return self

    async def __anext__(self) -> Any:
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._it))
            # Retrieved even when nobody reads again (the call ended meanwhile).
            self._next.add_done_callback(lambda f: f.cancelled() or f.exception())
        pending = self._next
        try:
            return await asyncio.shield(pending)
        finally:
            if pending.done():
                self._next = None


async def drain_upload(requests: AsyncIterator[pb.WriteFileRequest], limit_bytes: int) -> None:
    """Reads and drops what the client still sends of an upload that has failed.

    The status must wait for the end of the client's stream: grpc's asyncio client reports a
    send that fails on an already ended call as its own INTERNAL error ("Internal error from
    Core"), in place of the status the service sent; whichever comes first wins. Bounded as an
    upload is: it stops when the client ends its stream, after `limit_bytes`, or when the
    stream breaks (then the status is sent at once, as before).
    """
    total = 0
    try:
        async for req in requests:
            if req.WhichOneof("msg") != "data":
                continue
            total += len(req.data)
            if total > limit_bytes:
                return
    except asyncio.CancelledError:
        raise
    except Exception:
        log.debug("WriteFile: draining the rest of a failed upload stopped", exc_info=True)
