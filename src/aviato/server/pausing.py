"""Pausing, resuming and extending sandboxes, and what counts as activity for `idle_timeout`.

Pause freezes every process of a RUNNING sandbox (the runtime's `SandboxHandle.pause`: the
cgroup freezer) and records it PAUSED; resume thaws it and records it RUNNING again. While it is
paused:

- commands, file transfers and port connections are refused in words (`running_handle` says
  "is paused: resume it first"), never queued: a queued call would hang its client for as long
  as the sandbox stays paused, which nobody bounds;
- execs already running stay frozen with it and continue at resume; their own timeouts count
  the paused time (the clock does not stop);
- its lifetime and its lease keep running (extend it, or renew the lease): the frozen
  supervisor cannot end it at its deadline, so the service's reaper does, resuming it first so
  that its main process gets SIGTERM and the grace; while the service is down too, it ends at
  the first of the service's return and its resume;
- it still holds its memory, so it keeps counting against its owner's quota and the capacity;
- its idle clock stands still: pausing is a deliberate act, and the idle clock starts afresh at
  resume.

The kernel keeps the freezer's state, so a paused sandbox survives a restart of the service as
paused: reconciliation asks the runtime (`SandboxHandle.paused`), which outranks the record.

Idle: a sandbox with `idle_timeout_seconds` is stopped (reason "idle") once it has been RUNNING
that long with no exec and no file transfer in flight and none started. Logs read and traffic
through its exposed ports are not activity: the timeout is about the commands a client gives
it; a sandbox that serves a port should rely on its lifetime instead. The clock is the
service's memory only: a restart of the service starts it afresh for every sandbox.

Extend moves `expires_ns` (and the deadline the runtime enforces) later, never past
MAX_LIFETIME_SECONDS after the sandbox was created: such a request is refused, saying how much
is left; a sandbox created without a lifetime has nothing to extend and is returned as is.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

from aviato.runtime.base import SandboxGone
from aviato.server.errors import FailedPrecondition, InvalidArgument
from aviato.server.leases import LeaseKeeping
from aviato.server.records import SandboxRecord, SandboxStatus
from aviato.server.sandbox_states import IDLE_REASON, LiveSandbox, status_name
from aviato.server.validation import MAX_LIFETIME_SECONDS
from aviato.v1.errors_pb2 import SANDBOX_NOT_RUNNING

__all__ = ["Pausing"]

RUNNING = SandboxStatus.RUNNING
PAUSED = SandboxStatus.PAUSED


class Pausing(LeaseKeeping):
    """Pause, resume, extend, and the activity that keeps `idle_timeout` from stopping one."""

    def _live_for_change(self, owner: str, sandbox_id: str, what: str) -> LiveSandbox:
        """The live entry of the owner's sandbox, or FailedPrecondition in words when it has
        ended or is stopping (NotFound for another owner's)."""
        rec = self._record(owner, sandbox_id)
        live = self._live.get(sandbox_id)
        if live is None or rec.terminal:
            raise FailedPrecondition(
                f"sandbox {sandbox_id} has ended ({status_name(rec.status)}"
                + (f": {rec.reason}" if rec.reason else "")
                + f"); only a live sandbox can be {what}",
                reason=SANDBOX_NOT_RUNNING,
                sandbox_id=sandbox_id,
            )
        if live.stop_task is not None:
            raise FailedPrecondition(
                f"sandbox {sandbox_id} is stopping; it cannot be {what}",
                reason=SANDBOX_NOT_RUNNING,
                sandbox_id=sandbox_id,
            )
        return live

    def _set_paused(self, live: LiveSandbox, paused: bool) -> None:
        live.rec.status = PAUSED if paused else RUNNING
        live.last_active_ns = time.time_ns()
        self._registry.update_sandbox(live.rec)
        live.notify()

    async def pause(self, owner: str, sandbox_id: str) -> SandboxRecord:
        """Freezes a RUNNING sandbox (see the module docstring); PAUSED already: as it is."""
        live = self._live_for_change(owner, sandbox_id, "paused")
        async with live.pause_lock:
            if live.rec.status == PAUSED:
                return live.rec
            if live.rec.status != RUNNING or live.handle is None:
                raise FailedPrecondition(
                    f"sandbox {sandbox_id} is {status_name(live.rec.status)}: it can be paused "
                    "once it runs",
                    reason=SANDBOX_NOT_RUNNING,
                    sandbox_id=sandbox_id,
                )
            try:
                await live.handle.pause()
            except SandboxGone as e:
                raise FailedPrecondition(
                    f"sandbox {sandbox_id} has ended: {e}",
                    reason=SANDBOX_NOT_RUNNING,
                    sandbox_id=sandbox_id,
                ) from e
            if not live.rec.terminal:
                self._set_paused(live, True)
        return live.rec

    async def resume(self, owner: str, sandbox_id: str) -> SandboxRecord:
        """Thaws a PAUSED sandbox; RUNNING already: as it is."""
        live = self._live_for_change(owner, sandbox_id, "resumed")
        async with live.pause_lock:
            if live.rec.status != PAUSED or live.handle is None:
                return live.rec
            try:
                await live.handle.resume()
            except SandboxGone as e:
                raise FailedPrecondition(
                    f"sandbox {sandbox_id} has ended: {e}",
                    reason=SANDBOX_NOT_RUNNING,
                    sandbox_id=sandbox_id,
                ) from e
            if live.rec.terminal:
                return live.rec
            self._set_paused(live, False)
            if live.egress_deferred:
                live.egress_deferred = False
                await self._serve_egress(live)
            self._push_deadline(live)
        return live.rec

    async def extend(self, owner: str, sandbox_id: str, seconds: float) -> SandboxRecord:
        """Moves the sandbox's lifetime's end `seconds` later (see the module docstring)."""
        if not math.isfinite(seconds) or seconds <= 0:
            raise InvalidArgument("seconds", f"{seconds!r} must be a positive number of seconds")
        live = self._live_for_change(owner, sandbox_id, "extended")
        rec = live.rec
        if rec.expires_ns is None:
            return rec  # no lifetime: nothing ends it but a stop or its lease
        new_expires = rec.expires_ns + int(seconds * 1e9)
        ceiling = rec.created_ns + int(MAX_LIFETIME_SECONDS * 1e9)
        if new_expires > ceiling:
            left = max(0.0, (ceiling - rec.expires_ns) / 1e9)
            raise InvalidArgument(
                "seconds",
                f"{seconds:.0f} more seconds would make the lifetime of sandbox {sandbox_id} "
                f"longer than the service's maximum of {MAX_LIFETIME_SECONDS:.0f} seconds "
                f"({left:.0f} seconds can still be added)",
            )
        rec.expires_ns = new_expires
        rec.max_lifetime_seconds = (new_expires - rec.created_ns) / 1e9
        self._registry.update_sandbox(rec)
        self._registry.update_config(rec)
        self._push_deadline(live)
        live.notify()
        return rec

    @contextlib.contextmanager
    def activity(self, sandbox_id: str) -> Iterator[None]:
        """Counts an exec or file transfer of the sandbox as in flight while inside: its
        idle_timeout cannot stop it meanwhile, and its idle clock restarts at the end. For
        calls that already passed `running_handle` (the owner checked)."""
        live = self._live.get(sandbox_id)
        if live is None:
            yield
            return
        live.active_calls += 1
        live.last_active_ns = time.time_ns()
        try:
            yield
        finally:
            live.active_calls -= 1
            live.last_active_ns = time.time_ns()

    def reap_once(self) -> None:
        """The reaper's pass (lifetimes and leases), and the stops idle_timeout calls for."""
        super().reap_once()
        grace = self._config.default_stop_grace_seconds
        for live in self._idle_due(time.time_ns()):
            self._spawn(self._stop_live(live, grace, IDLE_REASON))

    def _idle_due(self, now_ns: int) -> list[LiveSandbox]:
        """The RUNNING sandboxes whose idle_timeout has passed with nothing in flight."""
        due = []
        for live in self._live.values():
            idle = live.rec.config.idle_timeout_seconds
            if (
                idle > 0
                and live.rec.status == RUNNING
                and live.stop_task is None
                and live.active_calls == 0
                and now_ns - live.last_active_ns >= int(idle * 1e9)
            ):
                due.append(live)
        return due
