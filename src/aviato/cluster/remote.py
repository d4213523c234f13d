"""`NodeRuntime`: the control plane's `Runtime` for one Ray node, proxying to its `NodeHost`.

Calls travel over a `NodeLink` (link.py): exec and file transfers over the node host's direct
gRPC channel (execwire.py: 2.4 ms → 0.7 ms per exec against a Ray streaming generator,
docs/cluster.md), everything else as actor calls; the runtime's model crosses as node protocol
messages (codec.py). File reads and the main log come back as Ray streaming generators when
there is no direct channel (`num_returns="streaming"`), uploads then are one awaited call per
MiB (in order).

Node loss (link.py): in-flight execs and file transfers end with `NodeLost`, and `wait_exit`
returns a `MainExit` with reason "node lost" (or "node host lost"), which the lifecycle records
as FAILED. Until then, a node host that does not answer (its worker is restarting) is retried by
`wait_exit` and reported as `SandboxGone` elsewhere.

Egress: a sandbox's proxy runs in its node host (node_egress.py), driven through `egress`
(remote_egress.py); `RemoteSandbox.egress_listener` stays Unsupported (a socket does not cross
nodes).

The main log is copied: each sandbox handle copies its records from the node into
`<control plane state>/cluster-logs/<id>.log` (the supervisor's format, runtime/logs.py) as
they are written, because the service keeps a sandbox's log after its end, when the node has
removed its own. `logs()` itself asks the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aviato._private import open_private, private_dir
from aviato.cluster import codec, execwire
from aviato.cluster.link import NODE_HOST_LOST, NODE_LOST, NodeLink, NodeLost
from aviato.cluster.node_images import NodeImages
from aviato.cluster.node_paths import (
    remote_path_op,
    remote_read_file_at,
    remote_write_file_at,
    typed,
)
from aviato.cluster.node_volumes import RemoteVolumes
from aviato.cluster.port_relay import connect_remote_port
from aviato.cluster.remote_egress import NodeEgressHost
from aviato.cluster.remote_exec import start_exec
from aviato.cluster.remote_usage import NodeUsageReader
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime import image_roots
from aviato.runtime.base import (
    ExecHandle,
    ExecSpec,
    FileInfo,
    ImageService,
    LogRecord,
    MainExit,
    PathOp,
    PathOpResult,
    RegistryCredentials,
    Runtime,
    SandboxConfig,
    SandboxGone,
    SandboxHandle,
    SandboxRuntimeError,
    SnapshotFacts,
    Unsupported,
    UsageReading,
)
from aviato.runtime.logs import encode_record

__all__ = ["NODE_HOST_LOST", "NODE_LOST", "NodeLost", "NodeRuntime"]

log = logging.getLogger("aviato.cluster")

WAIT_RETRY_SECONDS = 0.5
LOG_DRAIN_SECONDS = 2.0
WRITE_BATCH_BYTES = 1 << 20
_EOF: Any = execwire.EOF


class NodeRuntime(Runtime):
    """Sandboxes on one node, through its node-host actor.

    `holding(sandbox_id)` gives the (cpu, memory) the placement reserved for a sandbox here (the
    node host persists it, for a restarted control plane); `release(sandbox_id)` is called when
    a sandbox's state is cleaned up, so that the placement returns them to the node.

    Snapshots: the ids this node holds are known from the node host's start and kept up to date
    by this runtime's own calls (`snapshot_ids` must answer without a call). A create from a
    snapshot this node does not hold first has `bring_snapshot(id, self)` (the placement's:
    remote_snapshots.copy_snapshot from a node that holds it) copy it here, once: concurrent
    creates wait for the same copy.
    """

    def __init__(
        self,
        node_id: str,
        actor: Any,
        facts: dict[str, Any],
        log_dir: Path,
        holding: Callable[[str], tuple[float, float]],
        release: Callable[[str], None],
        bring_snapshot: Callable[[str, NodeRuntime], Awaitable[None]] | None = None,
    ) -> None:
        self.node_id = node_id
        self.link = NodeLink(node_id, actor, facts)
        # The sandboxes' egress proxies, which run in the node host (remote_egress.py).
        self.egress = NodeEgressHost(self.link)
        self._present: list[str] = list(facts.get("present", []))
        self._describe: dict[str, str] = dict(facts.get("describe", {}))
        self._log_dir = log_dir
        self._holding = holding
        self._release = release
        self._handles: dict[str, RemoteSandbox] = {}
        self._images = NodeImages(self.link)
        self._snapshots: set[str] = {str(s) for s in facts.get("snapshots", [])}
        self._bring_snapshot = bring_snapshot
        self._bringing: dict[str, asyncio.Future[None]] = {}
        # The volumes whose home is this node (node_volumes.py).
        self.volumes = RemoteVolumes(self.link)
        # Its sandboxes' usage readings, asked once per round of the usage history.
        self.usage = NodeUsageReader(self.link)

    def sandbox_ids(self) -> list[str]:
        """The sandboxes this runtime has handles for."""
        return list(self._handles)

    def log_copy_path(self, sandbox_id: str) -> Path:
        return self._log_dir / f"{sandbox_id}.log"

    # --- Runtime ---

    @property
    def images(self) -> ImageService:
        return self._images

    async def create(self, config: SandboxConfig) -> SandboxHandle:
        if config.snapshot_id and config.snapshot_id not in self._snapshots:
            await self._brought(config.snapshot_id)
        cpu, memory = self._holding(config.sandbox_id)
        message = codec.encode_config(config).SerializeToString()
        await self.link.call("create", message, cpu, memory)
        return self._adopt(config.sandbox_id)

    def _adopt(self, sandbox_id: str) -> RemoteSandbox:
        handle = RemoteSandbox(self, sandbox_id)
        self._handles[sandbox_id] = handle
        return handle

    async def attach(self, sandbox_id: str) -> SandboxHandle | MainExit:
        try:
            attached = npb.Attached.FromString(await self.link.call("attach", sandbox_id))
        except NodeLost:
            return MainExit(-1, 0, time.time_ns(), self.link.lost_reason or NODE_LOST)
        if attached.HasField("ended"):
            return codec.decode_main_exit(attached.ended)
        return self._handles.get(sandbox_id) or self._adopt(sandbox_id)

    async def cleanup(self, sandbox_id: str) -> None:
        handle = self._handles.pop(sandbox_id, None)
        if handle is not None:
            handle.close()
        self._release(sandbox_id)
        with contextlib.suppress(NodeLost, SandboxGone):
            await self.link.call("cleanup", sandbox_id)
        self.log_copy_path(sandbox_id).unlink(missing_ok=True)

    def list_present(self) -> list[str]:
        return list(self._present)

    def image_ready(self, image: str) -> bool:
        # Whether the node has it cached is a question for the node: built-in images are ready,
        # any other goes through prepare_image (a no-op call when the node has it).
        return not image or image in image_roots.known_images()

    async def prepare_image(
        self, image: str, credentials: RegistryCredentials | None = None
    ) -> None:
        message = (
            b""
            if credentials is None
            else codec.encode_credentials(credentials).SerializeToString()
        )
        await self.link.call("prepare_image", image, message)

    def describe(self) -> dict[str, str]:
        return {**self._describe, "node": self.node_id}

    # --- snapshots ---

    def snapshot_ids(self) -> list[str]:
        return sorted(self._snapshots)

    def holds_snapshot(self, snapshot_id: str) -> bool:
        return snapshot_id in self._snapshots

    def note_snapshot(self, snapshot_id: str) -> None:
        """The node holds this snapshot now (taken or copied here)."""
        self._snapshots.add(snapshot_id)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        try:
            await self.link.call("delete_snapshot", snapshot_id)
        except AttributeError:
            raise typed(_older(), self.node_id) from None
        self._snapshots.discard(snapshot_id)

    async def _brought(self, snapshot_id: str) -> None:
        """Copies the snapshot here unless a copy is under way already (then waits for it)."""
        if self._bring_snapshot is None:
            raise SandboxRuntimeError(f"snapshot {snapshot_id} is not on node {self.node_id[:12]}")
        bringing = self._bringing.get(snapshot_id)
        if bringing is None:
            bringing = asyncio.ensure_future(self._bring_snapshot(snapshot_id, self))
            self._bringing[snapshot_id] = bringing
            bringing.add_done_callback(lambda _: self._bringing.pop(snapshot_id, None))
        await asyncio.shield(bringing)
        self._snapshots.add(snapshot_id)

    async def close(self) -> None:
        for handle in list(self._handles.values()):
            handle.close()
        self._handles.clear()
        await self.link.close()


def _older() -> SandboxRuntimeError:
    error = SandboxRuntimeError("no such call")
    error.code = "UNIMPLEMENTED"
    return error


def _exit_of(message: bytes) -> MainExit:
    return codec.decode_main_exit(npb.MainExit.FromString(message))


class RemoteSandbox(SandboxHandle):
    """A sandbox on another node; its main log is copied here while it runs."""

    def __init__(self, runtime: NodeRuntime, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self._runtime = runtime
        self._link = runtime.link
        self._exit: MainExit | None = None
        self._log_copy = runtime.log_copy_path(sandbox_id)
        self._copying = asyncio.ensure_future(self._copy_log())
        self._port_relays: set[asyncio.Task[None]] = set()

    def usage(self) -> UsageReading | None:
        return self._runtime.usage.reading(self.sandbox_id)

    def close(self) -> None:
        self._copying.cancel()
        for relay in list(self._port_relays):
            relay.cancel()

    async def connect_port(self, port: int) -> socket.socket:
        """A socketpair end whose peer is relayed to `port` on the sandbox's loopback over the
        node host's direct channel (port_relay.py); needs that channel."""
        channel = self._link.exec_channel()
        if channel is None:
            raise Unsupported(
                f"sandbox {self.sandbox_id}: its node has no direct channel, which port "
                "connections need"
            )
        call = execwire.open_connect_port(channel, self._link.exec_token)
        try:
            return await connect_remote_port(
                call, self.sandbox_id, port, self._link.race, self._port_relays
            )
        except SandboxGone as e:
            if "does not answer" in str(e):
                self._link.channel_failed()
            raise

    async def _batches(
        self, since_ns: int, tail: int, follow: bool
    ) -> AsyncIterator[list[LogRecord]]:
        """The node host's records in its batches. When the node host restarts meanwhile (it
        "does not answer" for a while), asks again from the last record given on: records
        stamped at or after its time, less those of that time already given."""
        request = npb.LogsRequest(
            sandbox_id=self.sandbox_id, since_ns=since_ns, tail=tail, follow=follow
        )
        while True:
            try:
                async for item in self._link.stream("logs", request.SerializeToString()):
                    batch = [codec.decode_record(r) for r in npb.LogBatch.FromString(item).records]
                    if batch:
                        last = batch[-1].time_ns
                        same = sum(1 for r in batch if r.time_ns == last)
                        seen = request.skip + same if request.since_ns == last else same
                        request.since_ns, request.tail, request.skip = last, -1, seen
                    yield batch
                return
            except SandboxGone as e:
                if "does not answer" not in str(e) or self._exit is not None:
                    raise
                await asyncio.sleep(WAIT_RETRY_SECONDS)

    async def logs(
        self, since_ns: int = 0, tail: int = -1, follow: bool = False
    ) -> AsyncIterator[LogRecord]:
        async for batch in self._batches(since_ns, tail, follow):
            for record in batch:
                yield record

    async def _copy_log(self) -> None:
        """Copies the main log's records here until the sandbox ends (across restarts of the
        node host), for the log the service keeps after the end."""
        private_dir(self._log_copy.parent)
        with os.fdopen(open_private(self._log_copy, os.O_WRONLY | os.O_APPEND), "ab") as f:
            try:
                async for batch in self._batches(0, -1, follow=True):
                    f.write(b"".join(encode_record(r) for r in batch))
                    f.flush()
            except SandboxRuntimeError as e:
                log.debug("log copy of %s ended: %s", self.sandbox_id, e)

    async def exec(self, spec: ExecSpec) -> ExecHandle:
        return await start_exec(self._link, self.sandbox_id, spec)

    async def read_file(self, path: str) -> tuple[FileInfo, AsyncIterator[bytes]]:
        channel = self._link.exec_channel()
        if channel is not None:
            try:
                return await self._read_direct(channel, path)
            except SandboxGone:
                self._link.channel_failed()
                raise
        items = self._link.stream("read_file", self.sandbox_id, path)
        try:
            first = await anext(items)
        except StopAsyncIteration:
            raise SandboxGone(f"sandbox {self.sandbox_id}: the read ended early") from None
        info = codec.decode_file_info(npb.FileInfo.FromString(first))

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in items:
                yield chunk

        return info, chunks()

    async def _read_direct(self, channel: Any, path: str) -> tuple[FileInfo, AsyncIterator[bytes]]:
        call = execwire.read_file(channel, self._link.exec_token, self.sandbox_id, path)
        first = await self._link.race(call.read())
        if first is _EOF or first.WhichOneof("frame") != "info":
            call.cancel()
            raise SandboxRuntimeError(f"read {path}: the node host sent no file info")

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while (frame := await self._link.race(call.read())) is not _EOF:
                    yield frame.data
            finally:
                call.cancel()

        return codec.decode_file_info(first.info), chunks()

    async def _write_direct(
        self, channel: Any, path: str, mode: int, make_parents: bool, chunks: AsyncIterator[bytes]
    ) -> int:
        call = execwire.write_file(channel, self._link.exec_token)
        header = npb.WriteFileHeader(
            sandbox_id=self.sandbox_id, path=path, mode=mode, make_parents=make_parents
        )
        race = self._link.race
        try:
            await race(call.write(npb.WriteFileRequest(header=header)))
            batch = bytearray()
            async for chunk in chunks:
                batch += chunk
                if len(batch) >= WRITE_BATCH_BYTES:
                    await race(call.write(npb.WriteFileRequest(data=bytes(batch))))
                    batch.clear()
            if batch:
                await race(call.write(npb.WriteFileRequest(data=bytes(batch))))
            await race(call.write(npb.WriteFileRequest(end=True)))
            await race(call.done_writing())
            response = await race(_await(call))
        except BaseException:
            call.cancel()  # no end frame: the node host leaves no file
            raise
        return int(response.size)

    async def write_file(
        self, path: str, mode: int, make_parents: bool, chunks: AsyncIterator[bytes]
    ) -> int:
        channel = self._link.exec_channel()
        if channel is not None:
            try:
                return await self._write_direct(channel, path, mode, make_parents, chunks)
            except SandboxGone:
                self._link.channel_failed()
                raise
        write_id = secrets.token_hex(8)
        await self._link.call("write_begin", self.sandbox_id, write_id, path, mode, make_parents)
        try:
            # One actor call per MiB rather than per client chunk (about 1 ms each).
            batch = bytearray()
            async for chunk in chunks:
                batch += chunk
                if len(batch) >= WRITE_BATCH_BYTES:
                    await self._link.call("write_chunk", write_id, bytes(batch))
                    batch.clear()
            if batch:
                await self._link.call("write_chunk", write_id, bytes(batch))
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._link.call("write_end", write_id, False))
            raise
        size: int = await self._link.call("write_end", write_id, True)
        return size

    async def _ended(self, call: Callable[[], Awaitable[bytes]]) -> MainExit:
        if self._exit is not None:
            return self._exit
        while True:
            try:
                exit = _exit_of(await call())
                break
            except NodeLost:
                exit = MainExit(-1, 0, time.time_ns(), self._link.lost_reason or NODE_LOST)
                break
            except SandboxGone as e:
                if "does not answer" not in str(e):
                    raise
                await asyncio.sleep(WAIT_RETRY_SECONDS)  # the node host restarts, or dies
        if self._exit is None:
            self._exit = exit
            if exit.reason not in (NODE_LOST, NODE_HOST_LOST):
                # The lifecycle keeps the log file once this returns: let the copy catch up.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._copying), LOG_DRAIN_SECONDS)
        return self._exit

    async def wait_exit(self) -> MainExit:
        return await self._ended(lambda: self._link.call("wait_exit", self.sandbox_id))

    async def terminate(self, grace_seconds: float) -> MainExit:
        return await self._ended(
            lambda: self._link.call("terminate", self.sandbox_id, grace_seconds)
        )

    async def kill(self) -> MainExit:
        return await self._ended(lambda: self._link.call("kill", self.sandbox_id))

    async def set_deadline(self, at_ns: int, why: str, grace_seconds: float) -> None:
        await self._link.call("set_deadline", self.sandbox_id, at_ns, why, grace_seconds)

    # --- directories (node_paths.py), pause and snapshots (node_snapshots.py) ---

    async def path_op(self, op: PathOp) -> PathOpResult:
        return await remote_path_op(self._link, self.sandbox_id, op)

    async def read_file_at(self, root: str, rel: str) -> tuple[FileInfo, AsyncIterator[bytes]]:
        return await remote_read_file_at(self._link, self.sandbox_id, root, rel)

    async def write_file_at(
        self, root: str, rel: str, mode: int, mtime_ns: int | None, chunks: AsyncIterator[bytes]
    ) -> int:
        return await remote_write_file_at(
            self._link, self.sandbox_id, root, rel, mode, mtime_ns, chunks
        )

    async def _state_call(self, method: str, *args: Any) -> Any:
        try:
            return await self._link.call(method, *args)
        except AttributeError:  # a node host of a release without the call
            raise typed(_older(), self._link.node_id) from None

    async def pause(self) -> None:
        await self._state_call("pause", self.sandbox_id)

    async def resume(self) -> None:
        await self._state_call("resume", self.sandbox_id)

    async def paused(self) -> bool:
        return bool(await self._state_call("paused", self.sandbox_id))

    async def snapshot(self, snapshot_id: str, max_bytes: int) -> SnapshotFacts:
        request = npb.TakeSnapshotRequest(
            sandbox_id=self.sandbox_id, snapshot_id=snapshot_id, max_bytes=max_bytes
        )
        answer = await self._state_call("snapshot", request.SerializeToString())
        self._runtime.note_snapshot(snapshot_id)
        return codec.decode_snapshot_facts(npb.SnapshotFacts.FromString(answer))


async def _await(ref: Any) -> Any:
    return await ref
