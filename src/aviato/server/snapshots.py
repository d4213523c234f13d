"""Snapshots and forks (docs/state.md): the service's side.

A snapshot is a row of the registry (`snapshots`: owner, the sandbox and image it came from,
the node that holds its tree) plus a tree on that node (runtime/snapshot_store.py). The row is
written only after the node has the complete tree, so a service killed mid-snapshot lists
nothing; `start` removes trees without a row (that kill) and rows without a tree.

Rules: every id is the owner's own (another owner's snapshot, like an unknown one, is NOT_FOUND);
a sandbox starts from a snapshot only over the image the snapshot was taken over; a snapshot is
not deleted while a live sandbox starts from it (refused: its tree is that sandbox's lower
layer). A fork takes an *internal* snapshot (not listed) and starts `count` sandboxes from it;
the snapshot goes once none of them is live any more (`collect`, every `COLLECT_EVERY_S` and at
start).

Under Ray (docs/state.md, "Under Ray"): the row's node is where the snapshot was taken; other
nodes may hold copies (made when a sandbox started from it there, server/ray_placement.py).
Deleting removes it from every node that holds it; a node that did not answer then keeps a
tree without a row, which `collect` removes once the node is back (trees of captures in flight
excepted). A fork is pinned to its source's node (`node_selector` "aviato.node"), where its
snapshot is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from dataclasses import replace

from aviato.server.errors import FailedPrecondition, InvalidArgument, NotFound
from aviato.server.lifecycle import Lifecycle
from aviato.server.placement import LocalPlacement, Placement, UnknownNode
from aviato.server.records import (
    LIVE_STATUSES,
    TERMINAL_STATUSES,
    SandboxRecord,
    SnapshotRecord,
    ValidSpec,
)
from aviato.server.registry import Registry
from aviato.server.snapshot_table import SnapshotTable
from aviato.server.validation import validate_snapshot_id

__all__ = ["MAX_FORKS", "SnapshotService"]

log = logging.getLogger("aviato.server.snapshots")

MAX_FORKS = 64
COLLECT_EVERY_S = 30.0
# The node_selector key every placement with several nodes matches against a node's id
# (server/ray_placement.py's NODE_KEY; not imported from there: Ray is optional).
NODE_SELECTOR_KEY = "aviato.node"
FORK_START_WAIT_S = 120.0


class SnapshotNotFound(NotFound):
    def __init__(self, snapshot_id: str) -> None:
        super().__init__(f"snapshot {snapshot_id!r} not found")


class SnapshotService:
    """Snapshots of one service: create, list, delete, fork, and the start-up reconciliation."""

    def __init__(self, lifecycle: Lifecycle, registry: Registry, placement: Placement) -> None:
        self._lifecycle = lifecycle
        self._registry = registry
        self._table = SnapshotTable(registry)
        self._placement = placement
        self._collector: asyncio.Task[None] | None = None
        self._creating: set[str] = set()  # captures whose row is not written yet

    # -- start, stop, collection ------------------------------------------------------------

    async def start(self) -> None:
        """Drops rows whose tree is gone and trees without a row (a capture cut short by the
        end of the service), then removes unused fork snapshots; starts the periodic collect."""
        rows = {s.id: s for s in self._table.find()}
        for node in self._placement.nodes():
            with contextlib.suppress(UnknownNode):
                runtime = self._placement.runtime_of(node)
                present = set(runtime.snapshot_ids())
                for orphan in present - set(rows):
                    log.warning("snapshot tree %s has no record: removing it", orphan)
                    await runtime.delete_snapshot(orphan)
                for snap in rows.values():
                    if snap.node == node and snap.id not in present:
                        log.warning("snapshot %s lost its tree: forgetting it", snap.id)
                        self._table.delete(snap.id)
        await self.collect()
        self._collector = asyncio.create_task(self._collect_forever(), name="snapshot-collect")

    async def close(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector

    async def _collect_forever(self) -> None:
        while True:
            await asyncio.sleep(COLLECT_EVERY_S)
            try:
                await self.collect()
            except Exception:
                log.exception("collecting fork snapshots failed")

    async def collect(self) -> None:
        """Deletes fork snapshots that no live sandbox starts from any more, and trees of any
        node that have no row (left by a delete while that node did not answer)."""
        used = self._in_use()
        rows = self._table.find()
        for snap in rows:
            if snap.internal and snap.id not in used:
                await self._remove(snap)
        known = {s.id for s in rows} | self._creating
        for node, runtime in self._placement.nodes().items():
            for orphan in set(runtime.snapshot_ids()) - known:
                if orphan in self._creating or self._table.find(snapshot_id=orphan):
                    continue  # began (or even ended) meanwhile
                log.info("snapshot tree %s on %s has no record: removing it", orphan, node)
                with contextlib.suppress(Exception):
                    await runtime.delete_snapshot(orphan)

    def _in_use(self) -> dict[str, list[str]]:
        users: dict[str, list[str]] = {}
        for rec in self._registry.sandboxes_with_status(LIVE_STATUSES):
            if rec.config.snapshot_id:
                users.setdefault(rec.config.snapshot_id, []).append(rec.id)
        return users

    async def _remove(self, snap: SnapshotRecord) -> None:
        """Forgets the snapshot, then removes its tree from every node that holds it."""
        self._table.delete(snap.id)  # first: never listed without its tree
        holders = [
            runtime
            for node, runtime in self._placement.nodes().items()
            if node == snap.node or snap.id in runtime.snapshot_ids()
        ]
        for runtime in holders:
            try:
                await runtime.delete_snapshot(snap.id)
            except Exception as e:  # the node does not answer: `collect` removes it later
                log.warning("snapshot %s: a node did not remove its tree: %s", snap.id, e)
        log.info("snapshot deleted id=%s nodes=%d", snap.id, len(holders))

    # -- the API's operations ----------------------------------------------------------------

    def owned(self, owner: str, snapshot_id: str, field: str = "snapshot_id") -> SnapshotRecord:
        validate_snapshot_id(snapshot_id, field, allow_empty=False)
        found = self._table.find(owner, snapshot_id)
        if not found:
            raise SnapshotNotFound(snapshot_id)
        return found[0]

    def check_start(self, owner: str, valid: ValidSpec) -> None:
        """Refuses a create from a snapshot the owner does not have or over another image."""
        config = valid.config
        if not config.snapshot_id:
            return
        snap = self.owned(owner, config.snapshot_id, "spec.snapshot_id")
        if snap.image != config.image:
            raise FailedPrecondition(
                f"snapshot {snap.id} was taken over image {snap.image!r}; a sandbox starts "
                f"from it only over that image, not {config.image!r}"
            )

    async def create(self, owner: str, sandbox_id: str, internal: bool = False) -> SnapshotRecord:
        """Snapshots the owner's running sandbox (frozen while its layer is copied)."""
        handle = await self._lifecycle.running_handle(owner, sandbox_id)
        rec = self._lifecycle.record(owner, sandbox_id)
        limit = rec.config.disk_bytes
        if rec.config.snapshot_id:  # the merged view holds the base snapshot too
            base = self._table.find(snapshot_id=rec.config.snapshot_id)
            limit += base[0].size_bytes if base else 0
        snapshot_id = "snap-" + secrets.token_hex(8)
        started = time.monotonic()
        self._creating.add(snapshot_id)
        try:
            facts = await handle.snapshot(snapshot_id, limit)
            snap = SnapshotRecord(
                id=snapshot_id, owner=owner, source_sandbox_id=sandbox_id,
                image=rec.config.image, node=rec.node, size_bytes=facts.size_bytes,
                entries=facts.entries, skipped=facts.skipped, created_ns=time.time_ns(),
                internal=internal,
            )  # fmt: skip
            self._table.insert(snap)
        finally:
            self._creating.discard(snapshot_id)
        log.info(
            "snapshot created id=%s sandbox=%s bytes=%d entries=%d in %.3fs",
            snapshot_id, sandbox_id, facts.size_bytes, facts.entries, time.monotonic() - started,
        )  # fmt: skip
        return snap

    def owned_list(self, owner: str) -> list[SnapshotRecord]:
        return [s for s in self._table.find(owner) if not s.internal]

    async def delete(self, owner: str, snapshot_id: str) -> None:
        snap = self.owned(owner, snapshot_id)
        users = self._in_use().get(snap.id, [])
        if users:
            raise FailedPrecondition(
                f"snapshot {snap.id} is in use: sandbox {', '.join(sorted(users))} started "
                "from it; stop those first"
            )
        await self._remove(snap)

    async def fork(
        self, owner: str, sandbox_id: str, count: int, tags: tuple[str, ...]
    ) -> list[SandboxRecord]:
        """`count` running sandboxes from the sandbox's current state; all or none."""
        if not 1 <= count <= MAX_FORKS:
            raise InvalidArgument("count", f"{count} is not between 1 and {MAX_FORKS}")
        source = self._lifecycle.record(owner, sandbox_id)
        if any(path for path, _ in source.config.mounted_files):
            raise FailedPrecondition(
                f"sandbox {sandbox_id} has mounted files, whose contents the service does not "
                "keep: fork a sandbox without them (write the files instead)"
            )
        snap = await self.create(owner, sandbox_id, internal=True)
        config = replace(source.config, sandbox_id="", snapshot_id=snap.id)
        if not isinstance(self._placement, LocalPlacement) and snap.node:
            # On the source's node, where the snapshot is (the placement's own selector key).
            pinned = tuple(p for p in config.node_selector if p[0] != NODE_SELECTOR_KEY)
            config = replace(config, node_selector=(*pinned, (NODE_SELECTOR_KEY, snap.node)))
        spec = ValidSpec(config=config, tags=tags or source.tags,
                         max_lifetime_seconds=source.max_lifetime_seconds)  # fmt: skip
        made: list[SandboxRecord] = []
        try:
            for _ in range(count):
                made.append(self._lifecycle.create(owner, str(uuid.uuid4()), spec))
            done = [
                await self._lifecycle.wait(owner, rec.id, False, FORK_START_WAIT_S) for rec in made
            ]
            failed = [r for r in done if r.status in TERMINAL_STATUSES]
            if failed:
                raise FailedPrecondition(
                    f"fork {failed[0].id} did not start: {failed[0].reason or 'failed'}"
                )
        except BaseException:
            for rec in made:
                with contextlib.suppress(Exception):
                    await self._lifecycle.delete(owner, rec.id)
            await self.collect()
            raise
        log.info("sandbox forked id=%s count=%d snapshot=%s", sandbox_id, count, snap.id)
        return done
