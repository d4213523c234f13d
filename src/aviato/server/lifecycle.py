"""The lifecycle of sandboxes: the service's operations on them (create, get, list, wait, stop,
delete, the running handle) over its parts: `sandbox_runs` (driving and ending sandboxes),
`leases` (leases and the reaper), `pausing` (pause, resume, extend, idle), `reconcile`
(restarts), `admission` (capacity and quotas).

States: PENDING → CREATING → RUNNING → COMPLETED | FAILED | TERMINATED, and RUNNING ⇄ PAUSED
(`pausing`: pause, resume, extend, idle_timeout); a create whose node is known and whose image
is ready (and a warm pool claim) starts CREATING, PENDING being the wait for either. Each
sandbox that is not terminal has one `LiveSandbox` entry in memory (its record, its runtime
handle, one task that drives it from creation to its end) and is mirrored in the registry at
every state change.
Terminal records live only in the registry. The hot paths (exec, files) read only the in-memory map.

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
import builtins
import contextlib
import functools
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from aviato.runtime.base import SandboxHandle, SandboxRuntimeError
from aviato.runtime.model import EgressPolicy
from aviato.server.codec import default_config
from aviato.server.errors import FailedPrecondition, InvalidArgument, SandboxNotFound
from aviato.server.pausing import Pausing
from aviato.server.placement import UnknownNode
from aviato.server.quotas import charge_of
from aviato.server.reconcile import Reconciliation
from aviato.server.records import (
    ALL_STATUSES,
    LIVE_STATUSES,
    TERMINAL_STATUSES,
    SandboxRecord,
    SandboxStatus,
    ValidSpec,
    kept_config,
)
from aviato.server.retention import Retention
from aviato.server.sandbox_states import (
    LeaseState,
    LiveSandbox,
    classify_exit,
    status_name,
)
from aviato.server.usage_history import UsageHistory
from aviato.server.warm_pool import WarmPool, new_sandbox_id
from aviato.v1.errors_pb2 import SANDBOX_NOT_RUNNING, SERVICE_SHUTTING_DOWN

__all__ = ["LeaseState", "Lifecycle", "classify_exit", "status_name"]

log = logging.getLogger("aviato.server.lifecycle")

PENDING = SandboxStatus.PENDING
CREATING = SandboxStatus.CREATING
RUNNING = SandboxStatus.RUNNING
TERMINATED = SandboxStatus.TERMINATED
PAUSED = SandboxStatus.PAUSED
_STARTING = (PENDING, CREATING)
DEFAULT_WAIT = 60.0
MAX_WAIT = 3600.0
_CREATE_DRAIN_SECONDS = 10.0
_CLEANUP_DRAIN_SECONDS = 10.0
# How old the egress figures of a listing may be (a Ray node is asked at most once in this time).
LIST_USAGE_AGE = 1.0


class Lifecycle(Pausing, Reconciliation):
    """All sandbox operations of the service. Use from the event loop thread only."""

    usage: UsageHistory  # the usage history of live sandboxes (server/usage_history.py)

    @functools.cached_property
    def retention(self) -> Retention:
        """The removal of ended sandboxes older than `--keep-stopped` (server/retention.py):
        what a delete removes, through the registry and the `when_deleted` listeners."""
        return Retention(
            self._registry.connection, self._config.keep_stopped_seconds,
            self._config.logs_dir, is_live=lambda sid: sid in self._live, forget=self._forgotten,
        )  # fmt: skip

    def _forgotten(self, sandbox_id: str) -> None:
        for forget in self._deleted_listeners:
            forget(sandbox_id)

    async def start(self) -> None:
        """Reconciles the registry with the runtimes, then starts the reaper and the usage
        sampler."""
        await self._reconcile()  # first: it kills the members a crashed service left
        self._reaper = asyncio.create_task(self._reap_forever(), name="aviato-reaper")
        self._start_pool()
        self.usage = UsageHistory(
            self.live_handles,
            interval=self._config.usage_interval_seconds,
            refresh=self._placement.refresh_usage,
        )
        self.usage.start()
        self.retention.start()

    def _start_pool(self) -> None:
        """Starts the warm pool (`--warm-pool N`) of the local placement's node."""
        size = self._config.warm_pool
        if size <= 0:
            return
        if self._placement.name != "local":
            log.warning("--warm-pool is ignored under --placement %s", self._placement.name)
            return
        shape = default_config(self._config.spec_defaults())
        node, runtime = self._placement.runtime_for_new(shape)
        self.pool = WarmPool(
            size, shape, runtime, node,
            busy=lambda: self._creates_starting > 0, room=self._room_for_member,
            grace_seconds=self._config.default_stop_grace_seconds,
        )  # fmt: skip
        self.pool.start()

    def _room_for_member(self) -> bool:
        """Whether one more pool member keeps the service under `--max-sandboxes`."""
        bound = self._config.max_sandboxes
        return not bound or len(self._live) + (self.pool.held if self.pool else 0) < bound

    def live_handles(self) -> Iterator[tuple[str, SandboxHandle | None]]:
        """Every live sandbox's id and handle (None until it is created)."""
        return ((live.rec.id, live.handle) for live in self._live.values())

    def live_records(self, owner: str | None = None) -> builtins.list[SandboxRecord]:
        """The records of live sandboxes: all of them, or only `owner`'s."""
        return [v.rec for v in self._live.values() if owner is None or v.rec.owner == owner]

    def active_calls(self, sandbox_id: str) -> int:
        """Commands and file transfers running in a live sandbox now (0 when it is not live)."""
        live = self._live.get(sandbox_id)
        return live.active_calls if live is not None else 0

    async def close(self) -> None:
        """Stops the service's tasks; sandboxes keep running. In-flight creates may finish."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        await self.retention.close()
        if self.pool is not None:
            await self.pool.close()  # members are nobody's: they end with the service
        with contextlib.suppress(AttributeError):  # never started
            await self.usage.close()
        creating = [
            live.task
            for live in self._live.values()
            if live.handle is None and live.task is not None and not live.task.done()
        ]
        if creating:
            await asyncio.wait(creating, timeout=_CREATE_DRAIN_SECONDS)
        if self._cleanups:  # ended sandboxes' layers: unmounted, not left halfway
            await asyncio.wait(list(self._cleanups.values()), timeout=_CLEANUP_DRAIN_SECONDS)
        tasks: list[asyncio.Task[None]] = list(self._background)
        for live in self._live.values():
            tasks.extend(t for t in (live.task, live.stop_task) if t is not None)
        if self._reaper is not None:
            tasks.append(self._reaper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._ports.close_all()  # the sandboxes' addresses stay recorded for a restart
        for live in self._live.values():  # a restarted service counts on from these
            egress = self._egress_of(live.rec)
            usage = egress.known_usage(live.rec.id) if egress is not None else None
            if usage is not None:
                live.rec.network_usage = usage
                self._registry.update_sandbox(live.rec)
        # Their listeners stay in the sandboxes for a restart (a node host keeps serving).
        for node in self._placement.nodes():
            with contextlib.suppress(UnknownNode):
                await self._placement.egress(node).close_all()
        # The volumes live sandboxes mount stay mounted; the others, and their root, go.
        in_use = {(v.rec.owner, m.volume) for v in self._live.values() for m in v.rec.config.mounts}
        await asyncio.to_thread(self.volumes.close, in_use)

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

    def record(self, owner: str, sandbox_id: str) -> SandboxRecord:
        """The sandbox's record as it is (egress figures as last refreshed); NotFound for a
        sandbox the owner does not have."""
        return self._record(owner, sandbox_id)

    async def get(self, owner: str, sandbox_id: str) -> SandboxRecord:
        return await self._with_usage(self._record(owner, sandbox_id))

    async def _with_usage(self, rec: SandboxRecord, max_age: float = 0.0) -> SandboxRecord:
        """`rec` with the figures of its egress while it is served, at most `max_age` seconds
        old (in process they are always live; a remote node is asked)."""
        if rec.terminal:
            return rec
        egress = self._egress_of(rec)
        if egress is None or not egress.serving(rec.id):
            return rec
        usage = await egress.usage(rec.id, max_age=max_age)
        if usage is not None and not rec.terminal:
            rec.network_usage = usage
        return rec

    async def list(
        self,
        owner: str,
        *,
        tags: Sequence[str],
        statuses: Sequence[SandboxStatus],
        include_terminated: bool,
        page_size: int,
        page_token: str,
    ) -> tuple[list[SandboxRecord], str]:
        """A page of records. No statuses: the non-terminal ones (all with include_terminated)."""
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = 100 if page_size == 0 else min(page_size, 1000)
        if statuses:
            wanted = set(statuses)
        elif include_terminated:
            wanted = set(ALL_STATUSES)
        else:
            wanted = set(LIVE_STATUSES)
        records, token = self._registry.list_sandboxes(
            owner, statuses=wanted, tags=tags, limit=size, page_token=page_token
        )
        # Live entries are fresher than rows only in identity, but keep one object per sandbox.
        # Their egress figures may be up to LIST_USAGE_AGE old: a Ray node is asked for all of
        # its sandboxes' figures in one call, at most once in that time.
        live = await asyncio.gather(*(
            self._with_usage(self._live[r.id].rec, LIST_USAGE_AGE) if r.id in self._live
            else _as_is(r)
            for r in records
        ))  # fmt: skip
        return list(live), token

    def running_count(self, owner: str | None = None) -> int:
        """RUNNING sandboxes: all of them, or only `owner`'s."""
        return sum(
            1
            for live in self._live.values()
            if live.rec.status == RUNNING and (owner is None or live.rec.owner == owner)
        )

    def quota_text(self, owner: str) -> str:
        """The owner's quota and what its live sandboxes hold, in words."""
        return self._admission.describe_quota(owner)

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
        capacity check and the insert. The registry is asked for an earlier create of the
        request id only when this one cannot be recorded (refused, or its insert meets the
        request id's unique key): a new request id, nearly every create's, costs no lookup.
        A live sandbox of the request id is answered at once, from memory.
        """
        if self._closing:
            raise FailedPrecondition("the service is shutting down", reason=SERVICE_SHUTTING_DOWN)
        live = self._by_request.get((owner, request_id))
        if live is not None:
            return live.rec
        try:
            return self._create_new(owner, request_id, valid, lease_id, lease_ttl_seconds)
        except Exception:
            earlier = self._registry.get_by_request(owner, request_id)
            if earlier is None:
                raise
            live = self._live.get(earlier.id)
            return live.rec if live is not None else earlier

    def _create_new(
        self,
        owner: str,
        request_id: str,
        valid: ValidSpec,
        lease_id: str,
        lease_ttl_seconds: float,
    ) -> SandboxRecord:
        """`create` of a request id not live now; sqlite3.IntegrityError when the registry
        holds a sandbox of it (its member, if one was claimed, is removed)."""
        if lease_id:
            self._check_lease_args(lease_id, lease_ttl_seconds, "lease_id", "lease_ttl_seconds")
        charge = charge_of(valid.config)
        self._admission.check(owner, charge, len(self._live))

        config = self.secrets.resolve(owner, self.volumes.resolve(owner, valid.config))
        # Last, once nothing else can refuse the create: a warm pool member of exactly this
        # spec. The runtime checked that spec when it started the member (`runtime.create`
        # checks all that `runtime.check` does), and a member takes no new place on its node.
        pool = self.pool
        member = pool.claim(config) if pool is not None else None
        if pool is not None and member is not None:
            sandbox_id, node, runtime = member.sandbox_id, pool.node, pool.runtime
            config = member.config_for(config)
        else:
            sandbox_id = new_sandbox_id()
            config = replace(config, sandbox_id=sandbox_id)
            node, runtime = self._placement.runtime_for_new(config)
            runtime.check(config)  # refused here, not accepted and then FAILED
        # PENDING only while it waits for a node or an image: one registry write less per
        # create (a restart treats PENDING and CREATING alike: the sandbox is removed, FAILED).
        ready = member is not None or (node and runtime.image_ready(config.image))
        starting = CREATING if ready else PENDING
        now = time.time_ns()
        lifetime = valid.max_lifetime_seconds
        rec = SandboxRecord(
            id=sandbox_id,
            owner=owner,
            request_id=request_id,
            status=starting,
            config=kept_config(config),
            created_ns=now,
            tags=valid.tags,
            max_lifetime_seconds=lifetime,
            lease_id=lease_id,
            node=node,
            expires_ns=now + int(lifetime * 1e9) if lifetime > 0 else None,
        )
        if lease_id:
            self.renew_lease(owner, lease_id, lease_ttl_seconds)
        known = member.config_text_for(rec.config) if member is not None else ""
        try:
            self._registry.insert_sandbox(rec, known)
        except sqlite3.IntegrityError:
            if pool is not None and member is not None:
                pool.discard(member)  # nobody's, and never handed out again
            raise
        live = LiveSandbox(rec, runtime, config, charge)
        self._adopt(live)
        if member is not None:
            live.handle = member.handle
        live.task = asyncio.create_task(self._drive(live), name=f"sandbox-{sandbox_id}")
        return rec

    def volume_users(self, owner: str) -> dict[str, builtins.list[str]]:
        """The owner's volumes that live sandboxes mount now: name -> sandbox ids."""
        users: dict[str, builtins.list[str]] = {}
        for live in self._live.values():
            if live.rec.owner == owner:
                for mount in live.rec.config.mounts:
                    if mount.volume:
                        users.setdefault(mount.volume, []).append(live.rec.id)
        return users

    async def delete_volume(self, owner: str, name: str) -> None:
        """Deletes the owner's volume `name`; refused while a live sandbox mounts it."""
        await self.volumes.delete(owner, name, self.volume_users(owner).get(name, []))

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
            return status in TERMINAL_STATUSES or (not terminal and status in (RUNNING, PAUSED))

        await self._wait_until(live, reached, limit)
        return live.rec

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

    async def set_network(self, owner: str, sandbox_id: str, egress: EgressPolicy) -> SandboxRecord:
        """Replaces the sandbox's egress (see SetNetwork): recorded at once; a running
        sandbox's proxy applies it to new requests and closes the connections it no longer
        admits; one not yet running starts with it."""
        rec = self._record(owner, sandbox_id)
        live = self._live.get(sandbox_id)
        if live is None or rec.terminal:
            raise FailedPrecondition(
                f"sandbox {sandbox_id} has ended; its network cannot change",
                reason=SANDBOX_NOT_RUNNING,
            )
        async with self._network_change:
            if rec.status == RUNNING and live.handle is not None:
                await self._apply_egress(rec, live.handle, egress)
            elif rec.status == PAUSED and live.handle is not None and not live.egress_deferred:
                # Its proxy takes the new policy at once; one not yet opened opens at resume
                # (its frozen supervisor cannot hand over a listener now).
                served = self._egress_of(rec)
                if served is not None and served.serving(rec.id):
                    await self._apply_egress(rec, live.handle, egress)
                elif not egress.isolated:
                    live.egress_deferred = True
            rec.config = replace(rec.config, egress=egress)
            if live.config is not None:
                live.config = replace(live.config, egress=egress)
            self._registry.update_config(rec)
        return await self._with_usage(rec)

    async def _apply_egress(
        self, rec: SandboxRecord, handle: SandboxHandle, egress: EgressPolicy
    ) -> None:
        """Gives a running sandbox's proxy `egress` (opening it when it has none and egress
        is no longer isolated); FailedPrecondition when its egress host cannot."""
        try:
            host = self._placement.egress(rec.node)
            if host.serving(rec.id):
                await host.update(rec.id, egress)
            elif not egress.isolated:
                await host.open(rec.id, handle, egress, rec.network_usage)
                rec.egress_listener = True
                self._registry.update_sandbox(rec)
        except UnknownNode as e:
            raise FailedPrecondition(
                f"sandbox {rec.id}: its node {e} is unknown", reason=SANDBOX_NOT_RUNNING
            ) from e
        except (SandboxRuntimeError, OSError) as e:
            raise FailedPrecondition(
                f"sandbox {rec.id}: cannot change its egress: {e}", reason=SANDBOX_NOT_RUNNING
            ) from e

    def when_deleted(self, forget: Callable[[str], None]) -> None:
        """Calls `forget(sandbox_id)` once each sandbox is deleted, so that what the service
        keeps in memory by sandbox id (commands, their output) goes with its record."""
        self._deleted_listeners.append(forget)

    async def delete(self, owner: str, sandbox_id: str) -> None:
        """Stops the sandbox if needed, then removes its record, its kept log and its state."""
        rec = self._record(owner, sandbox_id)
        if not rec.terminal:
            rec = await self.stop(owner, sandbox_id, 0.0)
        if not self._registry.delete_sandbox(sandbox_id):
            raise SandboxNotFound(sandbox_id)
        self._forgotten(sandbox_id)
        with contextlib.suppress(FileNotFoundError):
            self._kept_log(sandbox_id).unlink()
        with contextlib.suppress(UnknownNode):
            await self._cleanup(self._placement.runtime_of(rec.node), sandbox_id)
        log.info("sandbox deleted id=%s", sandbox_id)

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
        if live.rec.status == PAUSED:
            raise FailedPrecondition(
                f"sandbox {sandbox_id} is paused: resume it first (Sandbox.resume, or "
                f"`aviato resume {sandbox_id}`)",
                reason=SANDBOX_NOT_RUNNING,
                sandbox_id=sandbox_id,
            )
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

    def log_source(
        self, owner: str, sandbox_id: str
    ) -> tuple[SandboxHandle | None, Callable[[], bool]]:
        """The handle to read the main log from while the sandbox runs (None while it starts
        and once it ended: then its log is at `kept_log_path`), and a function telling whether
        the sandbox has ended."""
        rec = self._record(owner, sandbox_id)
        live = self._live.get(sandbox_id)
        if live is None or rec.terminal:
            return None, lambda: True
        return live.handle, lambda: live.rec.terminal

    def kept_log_path(self, sandbox_id: str) -> Path:
        """Where the log of a terminal sandbox is kept (it moves there when the sandbox ends)."""
        return self._kept_log(sandbox_id)


async def _as_is(rec: SandboxRecord) -> SandboxRecord:
    return rec
