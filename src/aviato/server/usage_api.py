"""SandboxUsage of aviato.v1.SandboxService: the usage history of the caller's sandboxes
(`server/usage_history.py` keeps it; the dashboard and `aviato top` read it)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from aviato.runtime.base import SandboxRuntimeError
from aviato.server import errors
from aviato.server.errors import InvalidArgument, ServiceError
from aviato.server.servicer import ServicerBase
from aviato.server.usage_history import History
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato.server.servicer import Ctx

__all__ = ["MAX_LAST", "UsageCalls", "encode_history"]

log = logging.getLogger("aviato.server.usage")

MAX_LAST = 100_000


def encode_history(history: History, active_calls: int) -> pb.SandboxUsageHistory:
    return pb.SandboxUsageHistory(
        sandbox_id=history.sandbox_id,
        samples=[
            pb.UsageSample(
                time_ns=p.time_ns, cpu_ns=p.cpu_ns, memory_bytes=p.memory_bytes, pids=p.pids
            )
            for p in history.points
        ],
        step_ns=history.step_ns,
        active_calls=active_calls,
        unavailable=history.unavailable,
    )


class UsageCalls(ServicerBase):
    """SandboxUsage."""

    def usage_of(self, owner: str, sandbox_id: str, last: int) -> pb.SandboxUsageResponse:
        """The answer of SandboxUsage for `owner` (also what the HTTP side serves)."""
        if not 0 <= last <= MAX_LAST:
            raise InvalidArgument("last", f"must be 0 (all) to {MAX_LAST}, not {last}")
        history = self._lifecycle.usage
        if sandbox_id:
            ids = [self._lifecycle.record(owner, sandbox_id).id]  # NOT_FOUND for another's
        else:
            ids = [r.id for r in self._lifecycle.live_records(owner)]
        return pb.SandboxUsageResponse(
            sandboxes=[
                encode_history(history.history(i, last), self._lifecycle.active_calls(i))
                for i in ids
            ],
            interval_seconds=history.interval,
        )

    async def SandboxUsage(
        self, request: pb.SandboxUsageRequest, context: Ctx
    ) -> pb.SandboxUsageResponse:
        owner = await self._owner_or_abort(context)
        try:
            return self.usage_of(owner, request.sandbox_id, request.last)
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=request.sandbox_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("SandboxUsage failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")
        raise AssertionError("abort returns only by raising")
