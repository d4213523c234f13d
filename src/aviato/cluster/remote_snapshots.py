"""Moving a snapshot from the node that holds it to the node that starts a sandbox from it.

The control plane relays: it opens `ExportSnapshot` on the source node host's direct channel and
`ImportSnapshot` on the target's, and passes each piece (1 MiB) on as it comes, one at a time,
so that its memory holds one piece and gRPC's windows whatever the snapshot's size; the target
node host spools and unpacks it (snapshot_archive.py). The copy is complete before the create
that needed it, and stays on the target (a cache: the next start there copies nothing) until the
snapshot is deleted (server/snapshots.py deletes it on every node that holds it).

Why through the control plane rather than node to node: the control plane already holds both
direct channels and their tokens, and node hosts need no credentials of each other; the price
is that the bytes cross the control plane's network twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from aviato.cluster import codec
from aviato.cluster.execwire import EOF, SERVICE, TOKEN_HEADER
from aviato.cluster.node_paths import typed
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import SandboxRuntimeError, SnapshotFacts, Unsupported

if TYPE_CHECKING:
    from aviato.cluster.link import NodeLink

__all__ = ["copy_snapshot"]

log = logging.getLogger("aviato.cluster")

EXPORT_METHOD = f"/{SERVICE}/ExportSnapshot"
IMPORT_METHOD = f"/{SERVICE}/ImportSnapshot"
# How long a failed write waits for the target's own answer (see `send`).
ANSWER_WAIT_SECONDS = 5.0


def _channel(link: NodeLink) -> Any:
    channel = link.exec_channel()
    if channel is None:
        raise Unsupported(
            f"node {link.node_id[:12]} has no direct channel, which moving snapshots needs"
        )
    return channel


async def _race(link: NodeLink, awaitable: Any) -> Any:
    try:
        return await link.race(awaitable)
    except SandboxRuntimeError as e:
        raise typed(e, link.node_id) from e


async def copy_snapshot(source: NodeLink, target: NodeLink, snapshot_id: str) -> SnapshotFacts:
    """Copies the snapshot from `source`'s node to `target`'s; its facts."""
    started = time.monotonic()
    export = _channel(source).unary_stream(
        EXPORT_METHOD,
        request_serializer=npb.ExportSnapshotRequest.SerializeToString,
        response_deserializer=npb.SnapshotArchive.FromString,
    )(npb.ExportSnapshotRequest(snapshot_id=snapshot_id),
      metadata=((TOKEN_HEADER, source.exec_token),))  # fmt: skip
    imported = _channel(target).stream_unary(
        IMPORT_METHOD,
        request_serializer=npb.ImportSnapshotRequest.SerializeToString,
        response_deserializer=npb.SnapshotFacts.FromString,
    )(metadata=((TOKEN_HEADER, target.exec_token),))
    moved = 0

    async def send(request: npb.ImportSnapshotRequest) -> bool:
        """Whether the target still reads (False once it has answered: it held the snapshot
        already, or refused; its answer is then awaited below)."""
        if imported.done():
            return False
        try:
            await _race(target, imported.write(request))
        except Exception:
            if not imported.done():
                # A target that refuses mid-stream ends the call, and a write can fail (the
                # stream reset) before that answer has arrived: wait for it a little, so
                # that the user reads the target's reason, not the reset.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(_await(imported), ANSWER_WAIT_SECONDS)
            if not imported.done():
                raise
            return False
        return True

    try:
        first = await _race(source, export.read())
        if first is EOF or first.WhichOneof("frame") != "facts":
            raise SandboxRuntimeError(f"snapshot {snapshot_id}: the source sent no facts")
        header = npb.ImportSnapshotHeader(snapshot_id=snapshot_id, facts=first.facts)
        reading = await send(npb.ImportSnapshotRequest(header=header))
        while reading and (piece := await _race(source, export.read())) is not EOF:
            reading = await send(npb.ImportSnapshotRequest(data=piece.data))
            moved += len(piece.data)
        if reading and await send(npb.ImportSnapshotRequest(end=True)):
            await _race(target, imported.done_writing())
        facts = codec.decode_snapshot_facts(await _race(target, _await(imported)))
    finally:
        export.cancel()
        imported.cancel()
    log.info(
        "snapshot copied id=%s from=%s to=%s archive_bytes=%d in %.3fs",
        snapshot_id, source.node_id[:12], target.node_id[:12], moved,
        time.monotonic() - started,
    )  # fmt: skip
    return facts


async def _await(ref: Any) -> Any:
    return await ref
