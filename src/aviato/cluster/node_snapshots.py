"""The node host's calls for pause, snapshots and usage readings (node.proto's last blocks).

`NodeStateCalls` is a base of `NodeHost` (nodehost.py): its methods are actor methods of the
node host, unary control calls: `pause`, `resume`, `paused` on the sandbox's own handle (the
cgroup freezer of this node, runtime/bubblewrap); `snapshot` (a `TakeSnapshotRequest`: the
runtime's capture into this node's `snapshots/<id>/`, then its facts kept beside the tree as
`facts.json`, which bound the tree's transfer); `snapshot_ids` and `delete_snapshot` on the
runtime's snapshot store. Trees stay in the node's state directory: they survive the node host
(Ray restarts it on its node) and the control plane.

`snapshot_handlers` adds the direct channel's `ExportSnapshot` (a tree as a tar stream,
snapshot_archive.write_archive in a thread feeding a bounded queue) and `ImportSnapshot` (a
stream from another node spooled and unpacked with the walls of image layers,
snapshot_archive.unpack_archive). One import per snapshot id at a time; one that finds the
snapshot here answers at once without reading the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from aviato.cluster import codec
from aviato.cluster.snapshot_archive import (
    Spool,
    archive_bound,
    read_facts,
    unpack_archive,
    write_archive,
    write_facts,
)
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import SandboxHandle, SandboxRuntimeError, Unsupported
from aviato.runtime.snapshot_store import SnapshotStore

if TYPE_CHECKING:
    from aviato.cluster.execwire import ExecServer

__all__ = ["NodeStateCalls", "snapshot_handlers"]

EXPORT_QUEUE_PIECES = 4  # 1 MiB pieces between the walking thread and the stream
EXPORT_PUT_SECONDS = 0.5  # how often a blocked walker looks whether the reader went away


def _store(runtime: Any) -> SnapshotStore:
    store: SnapshotStore | None = getattr(runtime, "snapshots", None)
    if store is None:
        raise Unsupported("this node's runtime keeps no snapshots")
    return store


class NodeStateCalls:
    """Actor methods of the node host for pause, snapshots and usage (the module docstring)."""

    async def _handle(self, sandbox_id: str) -> SandboxHandle:
        raise NotImplementedError  # the node host's

    async def _ready(self) -> Any:
        raise NotImplementedError  # the node host's

    async def pause(self, sandbox_id: str) -> None:
        await (await self._handle(sandbox_id)).pause()

    async def sandbox_usage(self, request_message: bytes) -> bytes:
        """What the sandboxes of an `npb.NodeUsageRequest` use now (`npb.NodeUsage`; one that
        ended or that the node cannot read is absent): a few cgroup files each."""
        request = npb.NodeUsageRequest.FromString(request_message)
        answer = npb.NodeUsage()
        for sandbox_id in request.sandbox_ids:
            try:
                reading = (await self._handle(sandbox_id)).usage()
            except SandboxRuntimeError:
                continue
            if reading is not None:
                answer.readings[sandbox_id].CopyFrom(
                    npb.UsageReading(
                        cpu_ns=reading.cpu_ns, memory_bytes=reading.memory_bytes, pids=reading.pids
                    )
                )
        return answer.SerializeToString()

    async def resume(self, sandbox_id: str) -> None:
        await (await self._handle(sandbox_id)).resume()

    async def paused(self, sandbox_id: str) -> bool:
        return await (await self._handle(sandbox_id)).paused()

    async def snapshot(self, request_message: bytes) -> bytes:
        """Takes a snapshot (an `npb.TakeSnapshotRequest`): its `npb.SnapshotFacts`."""
        request = npb.TakeSnapshotRequest.FromString(request_message)
        store = _store(await self._ready())
        handle = await self._handle(request.sandbox_id)
        facts = await handle.snapshot(request.snapshot_id, request.max_bytes)
        try:
            await asyncio.to_thread(write_facts, store, request.snapshot_id, facts)
        except BaseException:
            await asyncio.to_thread(store.delete, request.snapshot_id)
            raise
        return codec.encode_snapshot_facts(facts).SerializeToString()

    async def snapshot_ids(self) -> bytes:
        """The snapshots this node holds, an `npb.SnapshotIds`."""
        store = _store(await self._ready())
        return npb.SnapshotIds(ids=store.ids()).SerializeToString()

    async def delete_snapshot(self, snapshot_id: str) -> None:
        store = _store(await self._ready())
        await asyncio.to_thread(store.delete, snapshot_id)


def snapshot_handlers(
    server: ExecServer, runtime_of: Callable[[], Awaitable[Any]], min_free_disk: int
) -> dict[str, Any]:
    """The direct channel's snapshot transfer methods, for `ExecServer(more_handlers=...)`."""
    importing: dict[str, asyncio.Lock] = {}

    async def export(
        request: npb.ExportSnapshotRequest, context: Any
    ) -> AsyncIterator[npb.SnapshotArchive]:
        await server.authorize(context)
        try:
            store = _store(await runtime_of())
            facts = await asyncio.to_thread(read_facts, store, request.snapshot_id)
        except SandboxRuntimeError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        yield npb.SnapshotArchive(facts=codec.encode_snapshot_facts(facts))
        pieces: queue.Queue[bytes | BaseException | None] = queue.Queue(EXPORT_QUEUE_PIECES)
        gone = threading.Event()

        def emit(data: bytes) -> None:
            while not gone.is_set():
                with contextlib.suppress(queue.Full):
                    pieces.put(data, timeout=EXPORT_PUT_SECONDS)
                    return
            raise _ReaderGone

        def walk() -> None:
            try:
                # Bounded as the receiver bounds it: a refusal in words from here, not a
                # reset there (snapshot_archive's docstring).
                write_archive(store.tree(request.snapshot_id), emit, archive_bound(facts),
                              request.snapshot_id)  # fmt: skip
                emit_last: bytes | BaseException | None = None
            except _ReaderGone:
                return
            except BaseException as e:  # handed to the stream
                emit_last = e
            with contextlib.suppress(_ReaderGone):
                while not gone.is_set():
                    with contextlib.suppress(queue.Full):
                        pieces.put(emit_last, timeout=EXPORT_PUT_SECONDS)
                        return

        walker = asyncio.ensure_future(asyncio.to_thread(walk))
        try:
            while (piece := await _next(pieces)) is not None:
                if isinstance(piece, BaseException):
                    code = getattr(piece, "code", "INTERNAL")
                    await context.abort(grpc.StatusCode[code], f"exporting: {piece}")
                    return
                yield npb.SnapshotArchive(data=piece)
        finally:
            gone.set()
            with contextlib.suppress(BaseException):
                await walker

    async def import_(
        requests: AsyncIterator[npb.ImportSnapshotRequest], context: Any
    ) -> npb.SnapshotFacts:
        await server.authorize(context)
        requests = aiter(requests)
        header = (await anext(requests)).header
        snapshot_id = header.snapshot_id
        lock = importing.setdefault(snapshot_id, asyncio.Lock())
        try:
            async with lock:
                store = _store(await runtime_of())
                if store.exists(snapshot_id):
                    return codec.encode_snapshot_facts(
                        await asyncio.to_thread(read_facts, store, snapshot_id)
                    )
                store.tree(snapshot_id)  # refuses a malformed id (NOT_FOUND)
                facts = codec.decode_snapshot_facts(header.facts)
                spool = Spool(store, snapshot_id, archive_bound(facts))
                try:
                    ended = False
                    async for request in requests:
                        if request.WhichOneof("frame") == "end":
                            ended = True
                            break
                        await asyncio.to_thread(spool.write, request.data)
                    if not ended:
                        raise SandboxRuntimeError("the transfer ended before its end frame")
                except BaseException:
                    spool.discard()
                    raise
                await asyncio.to_thread(
                    unpack_archive, store, snapshot_id, spool, facts, min_free_disk
                )
                return codec.encode_snapshot_facts(facts)
        except SandboxRuntimeError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
            raise  # unreachable: abort raises
        finally:
            if not lock.locked():
                importing.pop(snapshot_id, None)

    return {
        "ExportSnapshot": grpc.unary_stream_rpc_method_handler(
            export,
            request_deserializer=npb.ExportSnapshotRequest.FromString,
            response_serializer=npb.SnapshotArchive.SerializeToString,
        ),
        "ImportSnapshot": grpc.stream_unary_rpc_method_handler(
            import_,
            request_deserializer=npb.ImportSnapshotRequest.FromString,
            response_serializer=npb.SnapshotFacts.SerializeToString,
        ),
    }


async def _next(pieces: queue.Queue[bytes | BaseException | None]) -> bytes | BaseException | None:
    """The walker's next piece; the waiting thread gives up now and then, so that a stream
    cancelled meanwhile leaves no thread blocked behind it."""
    while True:
        with contextlib.suppress(queue.Empty):
            return await asyncio.to_thread(pieces.get, True, EXPORT_PUT_SECONDS)


class _ReaderGone(Exception):
    """The export's reader went away: the walk stops."""
