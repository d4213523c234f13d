"""The usage history of sandboxes: `Sandbox.usage()` and `Sandbox.list_usage()`.

The service samples each live sandbox's CPU time, memory and tasks every few seconds (`aviato
server --usage-interval`, default 5 s) and keeps its whole life at a step that grows as it ages
(docs/operations.md). `SandboxUsageQueries` is a base class of `aviato.Sandbox`; `SandboxCore`
provides the state it uses.
"""

from __future__ import annotations

import builtins
import math
from dataclasses import dataclass
from datetime import UTC, datetime

from aviato import _defaults
from aviato._client import Client, get_client
from aviato._operation import OperationRef
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["SandboxUsage", "SandboxUsageQueries", "UsageSample"]

_MAX_LAST = 100_000


@dataclass(frozen=True)
class UsageSample:
    """One reading of a whole sandbox: when, the CPU seconds its processes used so far (all
    of its life), the memory charged to it (bytes; its processes, writable layer and page
    cache) and its tasks. A figure the service could not read is -1 (-1.0 for CPU)."""

    time: datetime
    cpu_seconds: float
    memory_bytes: int
    pids: int


@dataclass(frozen=True)
class SandboxUsage:
    """The usage history of one sandbox, oldest sample first.

    `step_seconds` is the time between kept samples now (it doubles whenever the history of a
    long-lived sandbox fills); `active_calls` the commands and file transfers running in it;
    `unavailable` says why there are no samples when its node cannot read them (a node without
    cgroups), and is "" otherwise."""

    sandbox_id: str
    samples: tuple[UsageSample, ...]
    step_seconds: float
    active_calls: int
    unavailable: str = ""

    def cpu_percent(self) -> float | None:
        """The sandbox's CPU use between its last two samples, in percent of one core (200.0
        is two cores busy); None with fewer than two samples."""
        if len(self.samples) < 2:
            return None
        return _percent(self.samples[-2], self.samples[-1])

    def cpu_percents(self) -> builtins.list[tuple[datetime, float]]:
        """CPU use over the history: (time, percent of one core) between each two samples."""
        pairs = zip(self.samples, self.samples[1:], strict=False)
        return [(b.time, p) for a, b in pairs if (p := _percent(a, b)) is not None]


def _percent(a: UsageSample, b: UsageSample) -> float | None:
    seconds = (b.time - a.time).total_seconds()
    if seconds <= 0 or a.cpu_seconds < 0 or b.cpu_seconds < 0:
        return None
    return max(0.0, (b.cpu_seconds - a.cpu_seconds) / seconds * 100.0)


def _decode(history: pb.SandboxUsageHistory) -> SandboxUsage:
    return SandboxUsage(
        sandbox_id=history.sandbox_id,
        samples=tuple(
            UsageSample(
                time=datetime.fromtimestamp(s.time_ns / 1e9, UTC),
                cpu_seconds=s.cpu_ns / 1e9 if s.cpu_ns >= 0 else -1.0,
                memory_bytes=s.memory_bytes,
                pids=s.pids,
            )
            for s in history.samples
        ),
        step_seconds=history.step_ns / 1e9,
        active_calls=history.active_calls,
        unavailable=history.unavailable,
    )


def _check_last(last: int) -> int:
    if isinstance(last, bool) or not isinstance(last, int):
        raise TypeError(f"last must be a whole number, not {type(last).__name__}")
    if not 0 <= last <= _MAX_LAST:
        raise ValueError(f"last must be 0 (every sample) to {_MAX_LAST}, not {last}")
    return last


async def _ask(
    client: Client, sandbox_id: str, last: int, call_timeout: float
) -> pb.SandboxUsageResponse:
    request = pb.SandboxUsageRequest(sandbox_id=sandbox_id, last=last)
    transport = client.transport
    return await client.with_retry(
        lambda: transport.sandbox_usage(request, call_timeout=call_timeout), op="sandbox usage"
    )


class SandboxUsageQueries:
    """`usage` and `list_usage` (see the module docstring); `Sandbox` provides the state."""

    _request_timeout: float

    async def _ensure_started(self) -> None:
        raise NotImplementedError

    async def _client(self) -> Client:
        raise NotImplementedError

    def _require_id(self) -> str:
        raise NotImplementedError

    def usage(self, *, last: int = 0) -> OperationRef[SandboxUsage]:
        """The sandbox's usage history: every sample the service keeps, or its newest `last`.
        Also for an ended sandbox, while the service still holds its history (the 200 most
        recently ended ones); empty when sampling is off."""
        count = _check_last(last)
        return OperationRef._of(self._usage(count))

    async def _usage(self, last: int) -> SandboxUsage:
        await self._ensure_started()
        sandbox_id = self._require_id()
        answer = await _ask(await self._client(), sandbox_id, last, self._request_timeout)
        if not answer.sandboxes:  # pragma: no cover - the service answers one per id
            return SandboxUsage(sandbox_id, (), 0.0, 0)
        return _decode(answer.sandboxes[0])

    @classmethod
    def list_usage(
        cls,
        *,
        last: int = 2,
        base_url: str | None = None,
        timeout_seconds: float | None = None,
    ) -> OperationRef[builtins.list[SandboxUsage]]:
        """The usage of every live sandbox of the caller, each with its newest `last` samples
        (2 by default: enough for `cpu_percent`; 0: all). What `aviato top` shows."""
        count = _check_last(last)
        if timeout_seconds is not None and not (
            math.isfinite(timeout_seconds) and timeout_seconds > 0
        ):
            raise ValueError(f"timeout_seconds must be a positive number, not {timeout_seconds}")
        return OperationRef._of(_list_usage(count, base_url, timeout_seconds))


async def _list_usage(
    last: int, base_url: str | None, timeout_s: float | None
) -> builtins.list[SandboxUsage]:
    client = await get_client(_defaults.resolve_base_url(base_url, None))
    timeout = timeout_s or _defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
    answer = await _ask(client, "", last, timeout)
    return [_decode(h) for h in answer.sandboxes]
