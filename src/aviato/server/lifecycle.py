"""The lifecycle of sandboxes: states, creation, stops, waits, lifetimes, leases and restarts.

States: PENDING → CREATING → RUNNING → COMPLETED | FAILED | TERMINATED. Each sandbox that is not
terminal has one `_Live` entry in memory (its record, its runtime handle, one task that drives it
from creation to its end) and is mirrored in the registry at every state change. Terminal records
live only in the registry. The hot paths (exec, files) read only the in-memory map.

Guarantees:
- A create is idempotent per (owner, request_id): the check and the insert happen without an
  `await` between them, so two concurrent identical creates yield one sandbox.
- No sandbox process exists without a record: the record is written (PENDING) before the runtime
  is asked to create anything; on start, runtime state without a record is killed and removed.
- A service restart does not stop sandboxes: `close()` only cancels the service's own tasks, and
  `start()` re-attaches every RUNNING record (or records how it ended meanwhile). Records left in
  PENDING/CREATING by a crash become FAILED "interrupted by service restart".
- Concurrent stops of one sandbox share one stop; a stop returns once the sandbox is terminal.
- Leases are stored in the registry; after a restart every lease gets at least one full TTL,
  since clients could not renew while the service was down.
- Lifetimes and leases hold also while the service is down: every running sandbox knows its
  deadline (the earlier of its lifetime's end and its lease's expiry; `SandboxHandle.
  set_deadline`), given before it is recorded RUNNING and again whenever a renewal, a release or
  a restart moves it, and ends itself then, saying why (recorded as if the reaper had stopped it).

What it cannot do: bound how long a runtime takes (a hung `runtime.create` leaves the sandbox
CREATING until it returns), or know why a sandbox died while the service was down beyond what the
runtime's exit record says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from aviato._private import private_dir
from aviato.runtime.base import (
    MainExit,
    Runtime,
    SandboxConfig,
    SandboxGone,
    SandboxHandle,
    SandboxRuntimeError,
)
from aviato.server import quantities
from aviato.server import registry as reg
from aviato.server.auth import LOCAL_OWNER
from aviato.server.config import ServerConfig, available_memory_bytes, free_disk_bytes
from aviato.server.errors import (
    CapacityExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SandboxNotFound,
)
from aviato.server.placement import Placement, UnknownNode
from aviato.server.quotas import Charge, OwnerQuotas, format_bytes, host_cpu_millis
from aviato.server.registry import LeaseRecord, Registry, SandboxRecord
from aviato.server.validation import ValidSpec
from aviato.v1.errors_pb2 import LEASE_NOT_FOUND, SANDBOX_NOT_RUNNING, SERVICE_SHUTTING_DOWN

__all__ = ["LeaseState", "Lifecycle", "classify_exit", "format_bytes", "status_name"]
# format_bytes is re-exported from `quotas`, where it lives.

log = logging.getLogger("aviato.server.lifecycle")

PENDING, CREATING, RUNNING = reg.PENDING, reg.CREATING, reg.RUNNING
COMPLETED, FAILED, TERMINATED = reg.COMPLETED, reg.FAILED, reg.TERMINATED
_NAMES = {
    PENDING: "PENDING",
    CREATING: "CREATING",
    RUNNING: "RUNNING",
    COMPLETED: "COMPLETED",
    FAILED: "FAILED",
    TERMINATED: "TERMINATED",
}
_STARTING = (PENDING, CREATING)
_LEASE_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
DEFAULT_LEASE_TTL = 30.0
MAX_LEASE_TTL = 3600.0
DEFAULT_WAIT = 60.0
MAX_WAIT = 3600.0
_CREATE_DRAIN_SECONDS = 10.0
_LIFETIME_REASON = "max lifetime exceeded"
_LEASE_REASON = "lease expired"
_DEADLINE_REASONS = (_LIFETIME_REASON, _LEASE_REASON)


def status_name(status: int) -> str:
    return _NAMES.get(status, str(status))


def classify_exit(exit: MainExit, stop_reason: str) -> tuple[int, str]:
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


class _Live:
    """A non-terminal sandbox: record, runtime, handle once created, and its waiters' event."""

    __slots__ = ("changed", "charge", "config", "deadline_dirty", "deadline_pushing", "handle",
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

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class Lifecycle:
    """All sandbox operations of the service. Use from the event loop thread only."""

    def __init__(self, registry: Registry, placement: Placement, config: ServerConfig) -> None:
        self._registry = registry
        self._placement = placement
        self._config = config
        self._live: dict[str, _Live] = {}
        self._by_request: dict[tuple[str, str], _Live] = {}
        self._leases: dict[tuple[str, str], LeaseState] = {}
        self._memory_reserved = 0
        self._quotas = OwnerQuotas(config.owner_quota, registry)
        self._background: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        private_dir(config.logs_dir)

    # -- start and close ----------------------------------------------------------------------

    async def start(self) -> None:
        """Reconciles the registry with the runtimes, then starts the reaper."""
        await self._reconcile()
        self._reaper = asyncio.create_task(self._reap_forever(), name="aviato-reaper")

    async def close(self) -> None:
        """Stops the service's tasks; sandboxes keep running. In-flight creates may finish."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        creating = [
            live.task
            for live in self._live.values()
            if live.handle is None and live.task is not None and not live.task.done()
        ]
        if creating:
            await asyncio.wait(creating, timeout=_CREATE_DRAIN_SECONDS)
        tasks: list[asyncio.Task[None]] = list(self._background)
        for live in self._live.values():
            tasks.extend(t for t in (live.task, live.stop_task) if t is not None)
        if self._reaper is not None:
            tasks.append(self._reaper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- queries ------------------------------------------------------------------------------

    def _record(self, owner: str, sandbox_id: str) -> SandboxRecord:
        live = self._live.get(sandbox_id)
        if live is not None and live.rec.owner == owner:
            return live.rec
        rec = self._registry.get_sandbox(sandbox_id) if sandbox_id else None
        if rec is None or rec.owner != owner:
            raise SandboxNotFound(sandbox_id)
        live = self._live.get(sandbox_id)
        return live.rec if live is not None else rec

    def how_it_ended(self, sandbox_id: str) -> str:
        """How a sandbox is ending or ended, for the message of a command it cut off: "was
        stopped (lease expired)", "ended (exited with code 1)", or, while its end is not yet
        recorded, "ended (its main process exited or its supervisor died)"."""
        live = self._live.get(sandbox_id)
        rec = live.rec if live is not None else self._registry.get_sandbox(sandbox_id)
        stop_reason = live.stop_reason if live is not None else ""
        if not stop_reason and rec is not None and rec.status == TERMINATED:
            stop_reason = rec.reason or "stopped"
        if stop_reason:
            return "was stopped" + ("" if stop_reason == "stopped" else f" ({stop_reason})")
        if rec is not None and rec.terminal:
            return f"ended ({rec.reason or 'its main process exited'})"
        return "ended (its main process exited or its supervisor died)"

    def get(self, owner: str, sandbox_id: str) -> SandboxRecord:
        return self._record(owner, sandbox_id)

    def list(
        self,
        owner: str,
        *,
        tags: Sequence[str],
        statuses: Sequence[int],
        include_terminated: bool,
        page_size: int,
        page_token: str,
    ) -> tuple[list[SandboxRecord], str]:
        """A page of records. No statuses: the non-terminal ones (all with include_terminated)."""
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = 100 if page_size == 0 else min(page_size, 1000)
        for i, s in enumerate(statuses):
            if s not in reg.ALL_STATUSES:
                raise InvalidArgument(f"statuses[{i}]", f"{s} is not a sandbox status")
        if statuses:
            wanted = set(statuses)
        elif include_terminated:
            wanted = set(reg.ALL_STATUSES)
        else:
            wanted = {PENDING, CREATING, RUNNING}
        records, token = self._registry.list_sandboxes(
            owner, statuses=wanted, tags=tags, limit=size, page_token=page_token
        )
        # Live entries are fresher than rows only in identity, but keep one object per sandbox.
        return [self._live[r.id].rec if r.id in self._live else r for r in records], token

    def running_count(self, owner: str | None = None) -> int:
        """RUNNING sandboxes: all of them, or only `owner`'s."""
        return sum(
            1
            for live in self._live.values()
            if live.rec.status == RUNNING and (owner is None or live.rec.owner == owner)
        )

    def quota_text(self, owner: str) -> str:
        """The owner's quota and what its live sandboxes hold, in words."""
        return self._quotas.describe(owner)

    # -- create -------------------------------------------------------------------------------

    def create(
        self,
        owner: str,
        request_id: str,
        valid: ValidSpec,
        *,
        lease_id: str = "",
        lease_ttl_seconds: float = 0.0,
    ) -> SandboxRecord:
        """Records a new PENDING sandbox and starts creating it; or returns the earlier one.

        Deliberately synchronous: nothing can interleave between the idempotency check, the
        capacity check and the insert.
        """
        if self._closing:
            raise FailedPrecondition("the service is shutting down", reason=SERVICE_SHUTTING_DOWN)
        live = self._by_request.get((owner, request_id))
        if live is not None:
            return live.rec
        earlier = self._registry.get_by_request(owner, request_id)
        if earlier is not None:
            live = self._live.get(earlier.id)
            return live.rec if live is not None else earlier
        if lease_id:
            self._check_lease_args(lease_id, lease_ttl_seconds, "lease_id", "lease_ttl_seconds")
        cfg = valid.config
        charge = self._charge(cfg.cpu_millis, cfg.memory_bytes, cfg.disk_bytes)
        self._quotas.check(owner, charge)
        self._check_capacity(owner, charge.memory_bytes)

        sandbox_id = "sbx-" + secrets.token_hex(6)
        config = replace(valid.config, sandbox_id=sandbox_id)
        node, runtime = self._placement.runtime_for_new(config)
        runtime.check(config)  # refused here, not accepted and then FAILED
        now = time.time_ns()
        lifetime = valid.max_lifetime_seconds or self._config.default_max_lifetime_seconds
        stored = type(valid.spec)()
        stored.CopyFrom(valid.spec)
        for mounted in stored.mounted_files:
            mounted.content = b""  # not kept: a record must stay small; see api.sandbox_message
        stored.ClearField("registry_auth")  # secrets are never stored or returned
        rec = SandboxRecord(
            id=sandbox_id,
            owner=owner,
            request_id=request_id,
            status=PENDING,
            spec=stored.SerializeToString(),
            created_ns=now,
            tags=valid.tags,
            lease_id=lease_id,
            node=node,
            expires_ns=now + int(lifetime * 1e9) if lifetime > 0 else None,
        )
        if lease_id:
            self.renew_lease(owner, lease_id, lease_ttl_seconds)
        self._registry.insert_sandbox(rec)
        live = _Live(rec, runtime, config, charge)
        self._adopt(live)
        live.task = asyncio.create_task(self._run_new(live), name=f"sandbox-{sandbox_id}")
        log.info("sandbox created id=%s owner=%s image=%s", sandbox_id, owner, config.image)
        return rec

    def _charge(self, cpu_millis: int | None, memory: int | None, disk: int | None) -> Charge:
        """What a sandbox with these limits (None: none asked for) counts as."""
        return Charge(
            cpu_millis=host_cpu_millis() if cpu_millis is None else cpu_millis,
            memory_bytes=self._config.default_memory_bytes if memory is None else memory,
            disk_bytes=self._config.default_disk_bytes if disk is None else disk,
            cpu_default=cpu_millis is None,
            memory_default=memory is None,
            disk_default=disk is None,
        )

    def _check_capacity(self, owner: str, memory: int) -> None:
        """Refuses a create the service as a whole has no room for.

        Only the service's own user (owner "local") is told the service's figures; any other
        owner learns that the service is full, never how many sandboxes or how much memory
        other owners hold, nor the host's free memory or paths.
        """
        operator = owner == LOCAL_OWNER
        limit = self._config.max_sandboxes
        if limit and len(self._live) >= limit:
            raise CapacityExceeded(
                f"capacity exhausted: {len(self._live)} of {limit} sandboxes are live "
                "(server --max-sandboxes); stop or delete some first"
                if operator
                else "capacity exhausted: the service runs as many sandboxes as it may "
                "(server --max-sandboxes); try again later"
            )
        mem_limit = self._config.max_memory_bytes
        if mem_limit and self._memory_reserved + memory > mem_limit:
            raise CapacityExceeded(
                f"memory capacity exhausted: requested {format_bytes(memory)}, "
                f"{format_bytes(self._memory_reserved)} of {format_bytes(mem_limit)} "
                "already reserved by live sandboxes (server --max-memory)"
                if operator
                else "memory capacity exhausted: the service cannot reserve the "
                f"{format_bytes(memory)} this sandbox asks for (server --max-memory); ask for "
                "less (resources.memory), or try again later"
            )

        floor = self._config.min_free_memory_bytes
        if floor:
            available = available_memory_bytes()
            if available is not None and available < floor:
                raise CapacityExceeded(
                    f"host memory low: {format_bytes(available)} available, below the floor of "
                    f"{format_bytes(floor)} (server --min-free-memory); stop some sandboxes first"
                    if operator
                    else "host memory low (server --min-free-memory); try again later"
                )
        floor = self._config.min_free_disk_bytes
        if floor:
            free = free_disk_bytes(self._config.state_dir)
            if free is not None and free < floor:
                raise CapacityExceeded(
                    f"host disk low: {format_bytes(free)} free for the state directory "
                    f"{self._config.state_dir}, below the floor of {format_bytes(floor)} "
                    "(server --min-free-disk); delete ended sandboxes or unused images first"
                    if operator
                    else "host disk low (server --min-free-disk); try again later"
                )

    def _adopt(self, live: _Live) -> None:
        self._live[live.rec.id] = live
        self._memory_reserved += live.charge.memory_bytes
        self._quotas.charge(live.rec.owner, live.charge)
        self._by_request[(live.rec.owner, live.rec.request_id)] = live
        if live.rec.lease_id:
            lease = self._leases.get((live.rec.owner, live.rec.lease_id))
            if lease is not None:
                lease.sandbox_count += 1

    def _set_status(self, live: _Live, status: int) -> None:
        rec = live.rec
        rec.status = status
        if status == RUNNING:
            rec.started_ns = time.time_ns()
        self._registry.update_sandbox(rec)
        live.notify()

    async def _run_new(self, live: _Live) -> None:
        """Drives a new sandbox: CREATING, runtime.create, RUNNING, then watches its end."""
        if live.stop_reason:  # stopped before it was created: nothing to create
            self._finish(live, TERMINATED, live.stop_reason, None, time.time_ns())
            return
        if not live.rec.node and not await self._place(live):
            return
        if not await self._pull_image(live):
            return
        self._set_status(live, CREATING)
        assert live.config is not None
        try:
            handle = await live.runtime.create(live.config)
        except asyncio.CancelledError:
            raise
        except SandboxRuntimeError as e:
            self._finish(live, FAILED, f"create failed: {e}", None, time.time_ns())
            return
        except Exception as e:
            log.exception("runtime.create crashed for %s", live.rec.id)
            self._finish(live, FAILED, f"create failed: internal error: {e}", None, time.time_ns())
            return
        live.handle = handle
        if live.stop_reason:
            try:
                exit = await handle.kill()
            except SandboxRuntimeError:
                exit = MainExit(137, 9, time.time_ns(), "killed")
            self._finish(live, TERMINATED, live.stop_reason, exit.exit_code, exit.ended_at_ns)
            return
        await self._send_deadline(live)  # before RUNNING: a crash before it leaves CREATING
        self._set_status(live, RUNNING)
        await self._watch(live)

    async def _place(self, live: _Live) -> bool:
        """Waits, PENDING with the placement's reason, until a node takes the sandbox.

        Only for placements that defer the choice (`runtime_for_new` gave no node). False when
        the sandbox ended meanwhile (stopped, or the placement gave up: FAILED with its reason).
        """
        assert live.config is not None

        def waiting(reason: str) -> None:
            if live.rec.reason != reason:
                live.rec.reason = reason
                self._registry.update_sandbox(live.rec)
                live.notify()

        try:
            placed = await self._placement.place(
                live.config, waiting, lambda: bool(live.stop_reason)
            )
        except SandboxRuntimeError as e:
            self._finish(live, FAILED, str(e), None, time.time_ns())
            return False
        if placed is None:
            self._finish(live, TERMINATED, live.stop_reason or "stopped", None, time.time_ns())
            return False
        live.rec.node, live.runtime = placed
        live.rec.reason = ""
        return True

    async def _pull_image(self, live: _Live) -> bool:
        """Waits, PENDING with reason "pulling image X", while the node pulls the sandbox's image.

        False when the sandbox ended meanwhile (the pull failed: FAILED naming the image; or it
        was stopped: the pull goes on for other users of the image, the sandbox does not wait).
        """
        config = live.config
        assert config is not None
        if live.runtime.image_ready(config.image):
            return True
        rec = live.rec
        rec.reason = f"pulling image {config.image}"
        self._registry.update_sandbox(rec)
        live.notify()
        pull = asyncio.ensure_future(
            live.runtime.prepare_image(config.image, config.registry_credentials)
        )
        try:
            while not pull.done():
                await asyncio.wait({pull}, timeout=0.2)
                if live.stop_reason and not pull.done():
                    pull.cancel()
                    self._finish(live, TERMINATED, live.stop_reason, None, time.time_ns())
                    return False
            pull.result()
        except asyncio.CancelledError:
            pull.cancel()
            raise
        except SandboxRuntimeError as e:
            self._finish(live, FAILED, f"pulling image {config.image} failed: {e}", None,
                         time.time_ns())  # fmt: skip
            return False
        except Exception as e:
            log.exception("pulling image %s crashed for %s", config.image, rec.id)
            self._finish(live, FAILED, f"pulling image {config.image} failed: internal error: {e}",
                         None, time.time_ns())  # fmt: skip
            return False
        rec.reason = ""
        return True

    async def _watch(self, live: _Live) -> None:
        assert live.handle is not None
        try:
            exit = await live.handle.wait_exit()
        except asyncio.CancelledError:
            raise
        except SandboxRuntimeError as e:
            exit = MainExit(-1, 0, time.time_ns(), f"lost: {e}")
        except Exception as e:
            log.exception("wait_exit crashed for %s", live.rec.id)
            exit = MainExit(-1, 0, time.time_ns(), f"lost: internal error: {e}")
        status, reason = classify_exit(exit, live.stop_reason)
        code = exit.exit_code if exit.exit_code >= 0 else None
        self._finish(live, status, reason, code, exit.ended_at_ns)

    def _finish(
        self, live: _Live, status: int, reason: str, exit_code: int | None, ended_ns: int
    ) -> None:
        """Makes the sandbox terminal: record, waiters, log kept aside, runtime cleanup."""
        rec = live.rec
        if rec.terminal:
            return
        rec.status, rec.reason, rec.exit_code = status, reason, exit_code
        rec.ended_ns = ended_ns or time.time_ns()
        self._registry.update_sandbox(rec)
        self._forget(live)
        live.notify()
        log.info(
            "sandbox ended id=%s status=%s reason=%r exit_code=%s",
            rec.id, status_name(status), reason, exit_code,
        )  # fmt: skip
        handle_log = live.handle.log_path if live.handle is not None else None
        self._keep_log(rec, handle_log)
        self._spawn(self._cleanup(live.runtime, rec.id))

    def _forget(self, live: _Live) -> None:
        rec = live.rec
        if self._live.get(rec.id) is live:
            del self._live[rec.id]
            self._memory_reserved -= live.charge.memory_bytes
            self._quotas.release(rec.owner, live.charge)
        self._by_request.pop((rec.owner, rec.request_id), None)
        if rec.lease_id:
            lease = self._leases.get((rec.owner, rec.lease_id))
            if lease is not None and lease.sandbox_count > 0:
                lease.sandbox_count -= 1

    def _kept_log(self, sandbox_id: str) -> Path:
        return self._config.logs_dir / f"{sandbox_id}.log"

    def _keep_log(self, rec: SandboxRecord, path: Path | None) -> None:
        """Moves the main log out of the runtime's directory so that cleanup cannot remove it."""
        if path is None:
            path = self._placement.main_log_path(rec.node, rec.id)
        if path is None:
            return
        try:
            os.replace(path, self._kept_log(rec.id))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not keep the log of %s: %s", rec.id, e)

    async def _cleanup(self, runtime: Runtime, sandbox_id: str) -> None:
        try:
            await runtime.cleanup(sandbox_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("runtime.cleanup failed for %s", sandbox_id)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- wait, stop, delete -------------------------------------------------------------------

    async def wait(
        self, owner: str, sandbox_id: str, terminal: bool, wait_seconds: float
    ) -> SandboxRecord:
        """Waits until the sandbox is started (RUNNING or terminal) or terminal; or the time."""
        if not math.isfinite(wait_seconds) or wait_seconds < 0:
            raise InvalidArgument("timeout_seconds", f"{wait_seconds!r} must be finite and >= 0")
        limit = DEFAULT_WAIT if wait_seconds == 0 else min(wait_seconds, MAX_WAIT)
        rec = self._record(owner, sandbox_id)
        live = self._live.get(sandbox_id)
        if live is None:
            return rec

        def reached() -> bool:
            status = live.rec.status
            return status in reg.TERMINAL_STATUSES or (not terminal and status == RUNNING)

        await self._wait_until(live, reached, limit)
        return live.rec

    @staticmethod
    async def _wait_until(live: _Live, predicate: Callable[[], bool], limit_seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_seconds
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.changed.wait(), remaining)
        return True

    async def stop(
        self, owner: str, sandbox_id: str, grace_seconds: float, reason: str = "stopped"
    ) -> SandboxRecord:
        """Stops the sandbox (see StopSandbox) and returns its terminal record."""
        if not math.isfinite(grace_seconds) or grace_seconds < 0:
            raise InvalidArgument("grace_seconds", f"{grace_seconds!r} must be finite and >= 0")
        grace = grace_seconds or self._config.default_stop_grace_seconds
        rec = self._record(owner, sandbox_id)
        live = self._live.get(sandbox_id)
        if live is None or rec.terminal:
            return rec
        await self._stop_live(live, min(grace, 3600.0), reason)
        return live.rec

    async def _stop_live(self, live: _Live, grace: float, reason: str) -> None:
        if live.stop_task is None:
            live.stop_reason = reason
            live.stop_task = asyncio.create_task(self._do_stop(live, grace))
        await asyncio.shield(live.stop_task)

    async def _do_stop(self, live: _Live, grace: float) -> None:
        """Ends the sandbox; returns once its end is recorded.

        The end is recorded by the watcher (or by _run_new, for a sandbox still being created),
        not by the terminate call: once the record is terminal the stop is complete even if
        that call has not returned (a remote node host's answer can come after the watcher's,
        or not at all), and the call is then abandoned.
        """
        rec = live.rec
        log.info("stopping sandbox id=%s reason=%r grace=%.1fs", rec.id, live.stop_reason, grace)
        ending = None
        if live.handle is not None:
            ending = asyncio.create_task(self._terminate(live.handle, rec.id, grace))
        try:
            await self._wait_until(live, lambda: live.rec.terminal, math.inf)
        finally:
            if ending is not None and not ending.done():
                ending.cancel()

    @staticmethod
    async def _terminate(handle: SandboxHandle, sandbox_id: str, grace: float) -> None:
        try:
            await handle.terminate(grace)
        except SandboxGone:
            pass
        except SandboxRuntimeError as e:
            log.warning("terminate failed for %s: %s; killing", sandbox_id, e)
            with contextlib.suppress(SandboxRuntimeError):
                await handle.kill()
        except Exception:
            log.exception("terminate crashed for %s", sandbox_id)

    async def delete(self, owner: str, sandbox_id: str) -> None:
        """Stops the sandbox if needed, then removes its record, its kept log and its state."""
        rec = self._record(owner, sandbox_id)
        if not rec.terminal:
            rec = await self.stop(owner, sandbox_id, 0.0)
        if not self._registry.delete_sandbox(sandbox_id):
            raise SandboxNotFound(sandbox_id)
        with contextlib.suppress(FileNotFoundError):
            self._kept_log(sandbox_id).unlink()
        with contextlib.suppress(UnknownNode):
            await self._cleanup(self._placement.runtime_of(rec.node), sandbox_id)
        log.info("sandbox deleted id=%s", sandbox_id)

    # -- the hot path -------------------------------------------------------------------------

    async def running_handle(
        self, owner: str, sandbox_id: str, wait_seconds: float = DEFAULT_WAIT
    ) -> SandboxHandle:
        """The handle of a RUNNING sandbox, waiting while it is PENDING or CREATING.

        NotFound for unknown ids; FailedPrecondition when it is not (or no longer) running.
        """
        live = self._live.get(sandbox_id)
        if live is None or live.rec.owner != owner:
            rec = self._record(owner, sandbox_id)
            raise FailedPrecondition(
                f"sandbox {sandbox_id} is {status_name(rec.status)}"
                + (f" ({rec.reason})" if rec.reason else ""),
                reason=SANDBOX_NOT_RUNNING,
                sandbox_id=sandbox_id,
            )
        if live.rec.status != RUNNING:
            await self._wait_until(live, lambda: live.rec.status not in _STARTING, wait_seconds)
        if live.rec.status != RUNNING or live.handle is None:
            raise FailedPrecondition(
                f"sandbox {sandbox_id} is {status_name(live.rec.status)}"
                + (f" ({live.rec.reason})" if live.rec.reason else ""),
                reason=SANDBOX_NOT_RUNNING,
                sandbox_id=sandbox_id,
            )
        if live.stop_task is not None:
            raise FailedPrecondition(
                f"sandbox {sandbox_id} is stopping",
                reason=SANDBOX_NOT_RUNNING,
                sandbox_id=sandbox_id,
            )
        return live.handle

    def log_source(self, owner: str, sandbox_id: str) -> tuple[Path | None, Callable[[], bool]]:
        """Where the main log is now, and a function telling whether the sandbox has ended."""
        rec = self._record(owner, sandbox_id)
        live = self._live.get(sandbox_id)
        if live is None or rec.terminal:
            kept = self._kept_log(sandbox_id)
            if kept.exists():
                return kept, lambda: True
            return self._placement.main_log_path(rec.node, sandbox_id), lambda: True
        path = (
            live.handle.log_path
            if live.handle is not None
            else (self._placement.main_log_path(rec.node, sandbox_id))
        )
        return path, lambda: live.rec.terminal

    def kept_log_path(self, sandbox_id: str) -> Path:
        """Where the log of a terminal sandbox is kept (it moves there when the sandbox ends)."""
        return self._kept_log(sandbox_id)

    # -- leases -------------------------------------------------------------------------------

    @staticmethod
    def _check_lease_args(lease_id: str, ttl: float, id_field: str, ttl_field: str) -> float:
        if not _LEASE_ID.fullmatch(lease_id):
            raise InvalidArgument(id_field, "must be 1 to 128 characters of [A-Za-z0-9_.:-]")
        if not math.isfinite(ttl) or ttl < 0 or (ttl and not 1 <= ttl <= MAX_LEASE_TTL):
            raise InvalidArgument(ttl_field, f"{ttl!r} is outside [1, {MAX_LEASE_TTL:g}] seconds")
        return ttl or DEFAULT_LEASE_TTL

    def renew_lease(self, owner: str, lease_id: str, ttl_seconds: float) -> LeaseState:
        """Creates or renews a lease: it now expires ttl seconds from now."""
        ttl = self._check_lease_args(lease_id, ttl_seconds, "lease_id", "ttl_seconds")
        expires = time.time_ns() + int(ttl * 1e9)
        lease = self._leases.get((owner, lease_id))
        if lease is None:
            count = sum(
                1
                for live in self._live.values()
                if live.rec.owner == owner and live.rec.lease_id == lease_id
            )
            lease = LeaseState(owner, lease_id, ttl, expires, count)
            self._leases[(owner, lease_id)] = lease
        lease.ttl_seconds, lease.expires_ns = ttl, expires
        self._registry.upsert_lease(LeaseRecord(owner, lease_id, ttl, expires))
        self._push_lease_deadlines(owner, lease_id)
        return lease

    async def release_lease(self, owner: str, lease_id: str, stop_sandboxes: bool) -> LeaseState:
        """Ends a lease; with stop_sandboxes its sandboxes are stopped (reason "lease released")."""
        self._check_lease_args(lease_id, 0.0, "lease_id", "ttl_seconds")
        lease = self._leases.pop((owner, lease_id), None)
        if lease is None:
            raise NotFound(
                f"lease {lease_id!r} not found", reason=LEASE_NOT_FOUND, lease_id=lease_id
            )
        self._registry.delete_lease(owner, lease_id)
        lease.expires_ns = time.time_ns()
        if stop_sandboxes:
            await self._stop_lease_sandboxes(lease, "lease released")
        else:
            self._push_lease_deadlines(owner, lease_id)  # their lifetime alone bounds them now
        return lease

    async def _stop_lease_sandboxes(self, lease: LeaseState, reason: str) -> None:
        members = [
            live
            for live in self._live.values()
            if live.rec.owner == lease.owner and live.rec.lease_id == lease.id
        ]
        grace = self._config.default_stop_grace_seconds
        await asyncio.gather(
            *(self._stop_live(live, grace, reason) for live in members), return_exceptions=True
        )

    # -- deadlines the runtime enforces ------------------------------------------------------

    def _deadline_of(self, live: _Live) -> tuple[int, str]:
        """(unix ns, why) at which the sandbox must end without the service: the earlier of its
        lifetime's end ("lifetime") and its lease's expiry ("lease"); 0 for never."""
        at, why = live.rec.expires_ns or 0, "lifetime"
        if live.rec.lease_id:
            lease = self._leases.get((live.rec.owner, live.rec.lease_id))
            if lease is not None and (not at or lease.expires_ns < at):
                at, why = lease.expires_ns, "lease"
        return at, why

    async def _send_deadline(self, live: _Live) -> None:
        if live.handle is None or live.rec.terminal:
            return
        at, why = self._deadline_of(live)
        try:
            await live.handle.set_deadline(at, why, self._config.default_stop_grace_seconds)
        except asyncio.CancelledError:
            raise
        except SandboxRuntimeError as e:  # gone or unreachable: its watcher will tell
            log.debug("deadline not given to %s: %s", live.rec.id, e)
        except Exception:
            log.exception("set_deadline crashed for %s", live.rec.id)

    def _push_deadline(self, live: _Live) -> None:
        """Sends the sandbox's current deadline in the background: one sender per sandbox at a
        time, which sends again while it changed meanwhile (so a late send never wins)."""
        if live.handle is None or self._closing:
            return
        live.deadline_dirty = True
        if live.deadline_pushing:
            return
        live.deadline_pushing = True

        async def push() -> None:
            try:
                while live.deadline_dirty and not live.rec.terminal:
                    live.deadline_dirty = False
                    await self._send_deadline(live)
            finally:
                live.deadline_pushing = False

        self._spawn(push())

    def _push_lease_deadlines(self, owner: str, lease_id: str) -> None:
        for live in self._live.values():
            if live.rec.lease_id == lease_id and live.rec.owner == owner:
                self._push_deadline(live)

    # -- the reaper ---------------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.reaper_interval_seconds)
            try:
                self.reap_once()
            except Exception:
                log.exception("reaper pass failed")

    def reap_once(self) -> None:
        """Starts the stops that lifetimes and leases call for (without waiting for them)."""
        now = time.time_ns()
        grace = self._config.default_stop_grace_seconds
        for live in list(self._live.values()):
            expires = live.rec.expires_ns
            if expires is not None and now >= expires and live.stop_task is None:
                self._spawn(self._stop_live(live, grace, _LIFETIME_REASON))
        for key, lease in list(self._leases.items()):
            if now >= lease.expires_ns:
                del self._leases[key]
                self._registry.delete_lease(lease.owner, lease.id)
                log.info("lease expired id=%s owner=%s", lease.id, lease.owner)
                self._spawn(self._stop_lease_sandboxes(lease, _LEASE_REASON))

    # -- restart reconciliation ---------------------------------------------------------------

    async def _reconcile(self) -> None:
        now = time.time_ns()
        for lease in self._registry.all_leases():
            expires = max(lease.expires_ns, now + int(lease.ttl_seconds * 1e9))
            self._leases[(lease.owner, lease.id)] = LeaseState(
                lease.owner, lease.id, lease.ttl_seconds, expires
            )
        records = self._registry.sandboxes_with_status((PENDING, CREATING, RUNNING))
        await asyncio.gather(*(self._reconcile_one(rec) for rec in records))
        known = self._registry.all_sandbox_ids()
        for node, runtime in self._placement.nodes().items():
            try:
                present = runtime.list_present()
            except Exception:
                log.exception("list_present failed on node %s", node)
                continue
            for sandbox_id in present:
                if sandbox_id in self._live:
                    continue
                if sandbox_id in known:
                    # A terminal record whose runtime state was not cleaned up yet.
                    rec = self._registry.get_sandbox(sandbox_id)
                    if rec is not None:
                        self._keep_log(rec, None)
                    await self._cleanup(runtime, sandbox_id)
                else:
                    log.warning("sandbox %s on node %s has no record: killing it", sandbox_id, node)
                    await self._kill_and_cleanup(runtime, sandbox_id)
        log.info(
            "reconciled: %d sandboxes re-attached, %d leases", len(self._live), len(self._leases)
        )

    async def _kill_and_cleanup(self, runtime: Runtime, sandbox_id: str) -> None:
        try:
            attached = await runtime.attach(sandbox_id)
            if not isinstance(attached, MainExit):
                await attached.kill()
        except SandboxRuntimeError as e:
            log.info("attach to %s for kill: %s", sandbox_id, e)
        except Exception:
            log.exception("attach to %s for kill crashed", sandbox_id)
        await self._cleanup(runtime, sandbox_id)

    async def _reconcile_one(self, rec: SandboxRecord) -> None:
        try:
            runtime = self._placement.runtime_of(rec.node)
        except UnknownNode:
            self._finish_record(rec, FAILED, f"lost: node {rec.node!r} is unknown", None)
            return
        if rec.status in (PENDING, CREATING):
            self._keep_log(rec, None)
            await self._kill_and_cleanup(runtime, rec.id)
            self._finish_record(rec, FAILED, "interrupted by service restart", None)
            return
        try:
            attached = await runtime.attach(rec.id)
        except SandboxRuntimeError as e:
            attached = MainExit(-1, 0, time.time_ns(), f"lost: {e}")
        except Exception as e:
            log.exception("attach to %s crashed", rec.id)
            attached = MainExit(-1, 0, time.time_ns(), f"lost: internal error: {e}")
        if isinstance(attached, MainExit):
            if attached.reason == "lost" or attached.reason.startswith("lost:"):
                status, reason = FAILED, "lost during service restart"
            else:
                status, reason = classify_exit(attached, "")
            code = attached.exit_code if attached.exit_code >= 0 else None
            self._keep_log(rec, None)
            self._finish_record(rec, status, reason, code, attached.ended_at_ns)
            self._spawn(self._cleanup(runtime, rec.id))
            return
        live = _Live(rec, runtime, None, self._charge(*_spec_limits(rec.spec)))
        live.handle = attached
        self._adopt(live)
        live.task = asyncio.create_task(self._watch(live), name=f"sandbox-{rec.id}")
        self._push_deadline(live)  # its lease was extended by the restart
        log.info("re-attached sandbox id=%s", rec.id)

    def _finish_record(
        self, rec: SandboxRecord, status: int, reason: str, code: int | None, ended_ns: int = 0
    ) -> None:
        rec.status, rec.reason, rec.exit_code = status, reason, code
        rec.ended_ns = ended_ns or time.time_ns()
        self._registry.update_sandbox(rec)
        log.info("sandbox id=%s marked %s: %s", rec.id, status_name(status), reason)


def _spec_limits(spec: bytes) -> tuple[int | None, int | None, int | None]:
    """The (cpu millis, memory, disk) limits a stored spec asked for, None for those it did not
    (for quota and capacity accounting after a restart)."""
    from aviato.v1 import sandbox_pb2 as pb

    try:
        res = pb.SandboxSpec.FromString(spec).resources
    except Exception:
        return None, None, None

    def parse(text: str, parser: Callable[[str], int]) -> int | None:
        try:
            return parser(text) if text else None
        except quantities.QuantityError:
            return None

    return (
        parse(res.cpu, quantities.parse_cpu_millis),
        parse(res.memory, quantities.parse_bytes),
        parse(res.disk, quantities.parse_bytes),
    )
