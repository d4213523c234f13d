"""Reconciling the registry with the runtimes when the service starts.

Every RUNNING or PAUSED record is re-attached (or its end, meanwhile, recorded), PAUSED or
RUNNING as the node's freezer says; records left PENDING or
CREATING by a crash become FAILED "interrupted by service restart"; runtime state without a
record is killed and removed; every lease gets at least one full TTL, since its clients could
not renew while the service was down.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aviato.runtime.base import (
    MainExit,
    Runtime,
    SandboxRuntimeError,
)
from aviato.server.placement import UnknownNode
from aviato.server.quotas import charge_of
from aviato.server.records import (
    SandboxRecord,
    SandboxStatus,
)
from aviato.server.sandbox_runs import SandboxRuns
from aviato.server.sandbox_states import (
    LeaseState,
    LiveSandbox,
    classify_exit,
)

__all__ = ["Reconciliation"]

log = logging.getLogger("aviato.server.lifecycle")

PENDING = SandboxStatus.PENDING
CREATING = SandboxStatus.CREATING
RUNNING = SandboxStatus.RUNNING
PAUSED = SandboxStatus.PAUSED
FAILED = SandboxStatus.FAILED


class Reconciliation(SandboxRuns):
    """Re-attaching the registry's sandboxes after a service restart."""

    async def _reconcile(self) -> None:
        now = time.time_ns()
        for lease in self._registry.all_leases():
            expires = max(lease.expires_ns, now + int(lease.ttl_seconds * 1e9))
            self._leases[(lease.owner, lease.id)] = LeaseState(
                lease.owner, lease.id, lease.ttl_seconds, expires
            )
        records = self._registry.sandboxes_with_status((PENDING, CREATING, RUNNING, PAUSED))
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
                        self._keep_log(rec)
                    await self._cleanup(runtime, sandbox_id)
                else:
                    log.warning("sandbox %s on node %s has no record: killing it", sandbox_id, node)
                    await self._kill_and_cleanup(runtime, sandbox_id)
        log.info(
            "reconciled: %d sandboxes re-attached, %d leases", len(self._live), len(self._leases)
        )

    async def _recall_pause(self, live: LiveSandbox) -> None:
        """Records a re-attached sandbox PAUSED or RUNNING as its node's kernel has it (the
        freezer's state outranks the record: the service may have died between the two)."""
        assert live.handle is not None
        try:
            paused = await live.handle.paused()
        except SandboxRuntimeError as e:
            log.info("sandbox %s: cannot tell whether it is paused (%s)", live.rec.id, e)
            return
        status = PAUSED if paused else RUNNING
        if live.rec.status != status:
            live.rec.status = status
            self._registry.update_sandbox(live.rec)

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
            self._keep_log(rec)
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
            self._keep_log(rec)
            self._finish_record(rec, status, reason, code, attached.ended_at_ns)
            self._start_cleanup(runtime, rec.id)
            return
        live = LiveSandbox(rec, runtime, None, charge_of(rec.config))
        live.handle = attached
        self._adopt(live)
        await self._recall_pause(live)
        if live.rec.status == PAUSED:  # its proxy opens at resume (pausing.py says why)
            live.egress_deferred = True
            if not await self._expose_ports(live):
                return
        elif not await self._open_network(live):
            return
        live.task = asyncio.create_task(self._watch(live), name=f"sandbox-{rec.id}")
        self._push_deadline(live)  # its lease was extended by the restart
        log.info("re-attached sandbox id=%s", rec.id)
