"""Client leases and the reaper.

A lease is held by a client that renews it; sandboxes created under it are stopped when it
expires (reason "lease expired") or is released with stop_sandboxes. Leases are stored in the
registry; the reaper (every `reaper_interval_seconds`) starts the stops that expired lifetimes
and leases call for, and every renewal or release moves the deadline the runtime enforces.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time

from aviato.server.errors import InvalidArgument, NotFound
from aviato.server.registry import LeaseRecord
from aviato.server.sandbox_runs import SandboxRuns
from aviato.server.sandbox_states import (
    LEASE_REASON,
    LIFETIME_REASON,
    LeaseState,
)
from aviato.v1.errors_pb2 import LEASE_NOT_FOUND

__all__ = ["DEFAULT_LEASE_TTL", "MAX_LEASE_TTL", "LeaseKeeping"]

log = logging.getLogger("aviato.server.lifecycle")

_LEASE_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
DEFAULT_LEASE_TTL = 30.0
MAX_LEASE_TTL = 3600.0


class LeaseKeeping(SandboxRuns):
    """Leases (renew, release, expiry) and the reaper that ends what lifetimes and leases
    call for."""

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

    def _push_lease_deadlines(self, owner: str, lease_id: str) -> None:
        for live in self._live.values():
            if live.rec.lease_id == lease_id and live.rec.owner == owner:
                self._push_deadline(live)

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
                self._spawn(self._stop_live(live, grace, LIFETIME_REASON))
        for key, lease in list(self._leases.items()):
            if now >= lease.expires_ns:
                del self._leases[key]
                self._registry.delete_lease(lease.owner, lease.id)
                log.info("lease expired id=%s owner=%s", lease.id, lease.owner)
                self._spawn(self._stop_lease_sandboxes(lease, LEASE_REASON))
