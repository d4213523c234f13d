"""The states a sandbox goes through in the service, and what the service holds of a live one.

`classify_exit` turns how a main process ended into the sandbox's terminal status and reason;
`LiveSandbox` is the in-memory entry of a sandbox that is not terminal yet (its record, runtime,
handle once created, the task that drives it, its waiters' event).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aviato.runtime.base import MainExit, Runtime, SandboxConfig, SandboxHandle
from aviato.server.quotas import Charge
from aviato.server.records import SandboxRecord, SandboxStatus

__all__ = [
    "IDLE_REASON",
    "LEASE_REASON",
    "LIFETIME_REASON",
    "LeaseState",
    "LiveSandbox",
    "classify_exit",
    "status_name",
]

PENDING, CREATING, RUNNING = SandboxStatus.PENDING, SandboxStatus.CREATING, SandboxStatus.RUNNING
PAUSED = SandboxStatus.PAUSED
COMPLETED, FAILED = SandboxStatus.COMPLETED, SandboxStatus.FAILED
TERMINATED = SandboxStatus.TERMINATED
LIFETIME_REASON = "max lifetime exceeded"
IDLE_REASON = "idle"
LEASE_REASON = "lease expired"
_DEADLINE_REASONS = (LIFETIME_REASON, LEASE_REASON)


def status_name(status: SandboxStatus) -> str:
    return status.name


def classify_exit(exit: MainExit, stop_reason: str) -> tuple[SandboxStatus, str]:
    """The terminal (status, reason) of a sandbox whose main process ended with `exit`."""
    if stop_reason:
        return TERMINATED, stop_reason
    if exit.reason in _DEADLINE_REASONS:  # ended by the runtime at the deadline we gave it
        return TERMINATED, exit.reason
    if exit.reason == "OOMKilled":
        return FAILED, "OOMKilled"
    if exit.reason == "lost":
        return FAILED, "lost: the sandbox ended without an exit record"
    if exit.reason:
        return FAILED, exit.reason
    if exit.exit_code == 0:
        return COMPLETED, ""
    if exit.signal:
        return FAILED, f"killed by signal {exit.signal}"
    return FAILED, f"exited with code {exit.exit_code}"


@dataclass(slots=True)
class LeaseState:
    owner: str
    id: str
    ttl_seconds: float
    expires_ns: int
    sandbox_count: int = 0


class LiveSandbox:
    """A non-terminal sandbox: record, runtime, handle once created, and its waiters' event.

    `config` is the whole config (mounted file contents, credentials) until the sandbox is
    created; None for one re-attached after a restart (its record keeps what a record keeps)."""

    __slots__ = ("active_calls", "changed", "charge", "config", "deadline_dirty",
                 "deadline_pushing", "egress_deferred", "handle", "last_active_ns", "pause_lock",
                 "rec", "runtime", "stop_reason", "stop_task", "task")  # fmt: skip

    def __init__(
        self, rec: SandboxRecord, runtime: Runtime, config: SandboxConfig | None, charge: Charge
    ) -> None:
        self.rec = rec
        self.runtime = runtime
        self.config = config
        # What this sandbox counts against its owner's quota and the memory capacity.
        self.charge = charge
        self.handle: SandboxHandle | None = None
        self.changed = asyncio.Event()
        self.stop_reason = ""
        self.stop_task: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.deadline_dirty = False  # the runtime's copy of the deadline is out of date
        self.deadline_pushing = False
        # Pause and idle_timeout (see `pausing`): execs and file transfers in flight, when the
        # last one started or ended (or the sandbox started, resumed or was re-attached), one
        # pause or resume at a time, and an egress proxy left to open at resume (a sandbox
        # re-attached while paused: its frozen supervisor cannot hand over its listener).
        self.active_calls = 0
        self.last_active_ns = time.time_ns()
        self.pause_lock = asyncio.Lock()
        self.egress_deferred = False

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()
