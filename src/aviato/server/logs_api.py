"""The log stream of aviato.v1.SandboxService: StreamLogs, from a sandbox's main log.

The servicer reads no log format: the records come from `log_stream` (the runtime's handle
while the sandbox runs, the kept copy after its end) and are only encoded here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aviato.runtime.base import SandboxRuntimeError
from aviato.server import errors
from aviato.server.errors import ServiceError
from aviato.server.log_stream import log_entry, sandbox_log_records
from aviato.server.servicer import ServicerBase
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato.server.servicer import Ctx

__all__ = ["LogStreams"]


class LogStreams(ServicerBase):
    """StreamLogs."""

    async def StreamLogs(
        self, request: pb.StreamLogsRequest, context: Ctx
    ) -> AsyncIterator[pb.LogEntry]:
        owner = await self._owner_or_abort(context)
        since_ns = request.since.ToNanoseconds() if request.HasField("since") else 0
        records = sandbox_log_records(
            self._lifecycle, owner, request.sandbox_id, request.tail, request.follow, since_ns
        )
        try:
            async for record in records:
                yield log_entry(record)
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=request.sandbox_id)
