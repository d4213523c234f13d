"""`NodeHost`: the actor that owns the sandboxes of one Ray node.

The control plane starts one per node (see `placement.py` for the actor options: detached, named
`aviato-nodehost-<node id>`, hard node affinity, `num_cpus=0`, restarted by Ray on its node). It
wraps a `BubblewrapRuntime` whose state lives in `<node state dir>/<node id>`; calls name
sandboxes by id, and the host keeps their handles. Arguments and results of the runtime's model
travel as `aviato.node.v1` messages serialized to bytes (codec.py), never as pickled Python
objects, so that the protocol is versioned: `start` reports its version and the control plane
refuses a node host of another. Exec and files normally travel over the host's direct gRPC channel
(`execwire.py`); the streaming methods here (exec, read_file, logs, pull_image: async
generators the control plane calls with `num_returns="streaming"`) serve the main log and image
pulls always, and exec and files when that channel could not start.

Restarts: Ray restarts a dead node host by running its constructor only; the first call that
needs the runtime (or the control plane's `ping` after a failed call) runs `start`, which
re-attaches every sandbox still running here (they run in their own sessions and survive the
worker) exactly as the local service does after its restart.

State that must survive the actor, in its state directory: the runtime's per-sandbox state,
`holdings.json` (the cpu and memory each sandbox was placed with, so that a restarted control
plane can account for them again), `egress.json` (the egress policy of each sandbox whose proxy
this host serves, node_egress.py), `channel.json` (the direct channel's port and token, so
that the control plane's channel reconnects to a restarted host by itself) and the runtime's
`snapshots/` (trees taken or copied here, with their facts: node_snapshots.py).

Fencing: a background task asks the GCS for a key every second. When no answer came for longer
than the lease, the node is cut off from the cluster: the GCS has (or will have) declared it dead,
and the control plane has marked its sandboxes FAILED "node lost". The host then kills every
sandbox it owns and refuses new ones until the GCS answers again, so a partitioned node does not
run sandboxes that the service believes gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aviato._private import secure_tree, write_private
from aviato.cluster import codec
from aviato.cluster.node_egress import NodeEgress
from aviato.cluster.node_paths import path_handlers
from aviato.cluster.node_snapshots import NodeStateCalls, snapshot_handlers
from aviato.cluster.node_volumes import NodeVolumes
from aviato.images.limits import PullLimits
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import (
    ExecHandle,
    ImagePullProgress,
    ImageService,
    LogRecord,
    MainExit,
    SandboxGone,
    SandboxHandle,
    SandboxRuntimeError,
    Unsupported,
)
from aviato.runtime.image_service import pull_with_progress

__all__ = ["NodeFenced", "NodeHost"]

log = logging.getLogger("aviato.cluster.nodehost")

FENCE_PROBE_INTERVAL_SECONDS = 1.0
LOG_BATCH_BYTES = 256 << 10
EXEC_START_SECONDS = 30.0
FILE_BATCH_BYTES = 1 << 20


class NodeFenced(SandboxRuntimeError):
    """The node lost the cluster for longer than its lease and stopped its sandboxes."""

    code = "UNAVAILABLE"


def _probe_gcs() -> None:
    """One round trip to the GCS (raises when it does not answer within 2 s)."""
    from ray.experimental import internal_kv

    client = internal_kv.internal_kv_get_gcs_client()  # type: ignore[no-untyped-call]
    if client is None:
        raise ConnectionError("this worker has no GCS client")
    client.internal_kv_get(b"aviato:fence-probe", b"aviato", timeout=2.0)


class NodeHost(NodeStateCalls):
    """One node's sandboxes. Every public method is an actor method (the actor is async);
    pause and snapshots are NodeStateCalls' (node_snapshots.py)."""

    def __init__(
        self,
        state_dir: str,
        lease_seconds: float,
        max_sandboxes: int,
        default_memory_bytes: int,
        insecure_registries: tuple[str, ...] = (),
        image_limits: PullLimits | None = None,
        cgroup_parent: str = "aviato",
        parent_memory_bytes: int | None = 0,
        parent_pids: int | None = 0,
        egress_dns: tuple[str, ...] = (),
    ) -> None:
        self._state_dir = Path(state_dir)
        self._egress = NodeEgress(self._state_dir, egress_dns)
        self._volumes = NodeVolumes(self._state_dir)
        self._cgroup_parent = cgroup_parent
        self._parent_limits = (parent_memory_bytes, parent_pids)
        self._insecure_registries = tuple(insecure_registries)
        self._image_limits = image_limits
        self._lease = lease_seconds
        self._max = max_sandboxes
        self._default_memory = default_memory_bytes
        self._runtime: Any = None  # BubblewrapRuntime, built in start() (it needs the event loop)
        self._handles: dict[str, SandboxHandle] = {}
        # exec id → its handle; a future so that a control call that overtakes the exec's
        # start (they travel as separate actor calls) waits for it instead of being lost.
        self._execs: dict[str, asyncio.Future[ExecHandle]] = {}
        self._writes: dict[str, tuple[asyncio.Queue[bytes | None], asyncio.Task[int]]] = {}
        self._holdings: dict[str, list[float]] = {}
        self._fence_task: asyncio.Task[None] | None = None
        self._last_contact = time.monotonic()
        self._fenced = False
        self._start_lock: asyncio.Lock | None = None
        self._exec_server: Any = None
        self._exec_address = ""

    # --- start, facts ---

    async def start(self) -> dict[str, Any]:
        """Builds the runtime and re-attaches what runs here; idempotent. Returns the facts."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._runtime is None:
                from aviato.runtime.bubblewrap import raise_fd_limit

                raise_fd_limit()
                self._runtime = self._new_runtime()
                self._holdings = self._load_holdings()
                for sandbox_id in self._runtime.list_present():
                    with contextlib.suppress(Exception):
                        attached = await self._runtime.attach(sandbox_id)
                        if not isinstance(attached, MainExit):
                            self._handles[sandbox_id] = attached
                await self._egress.restore(dict(self._handles))
                await self._volumes.start()
                self._fence_task = asyncio.create_task(self._fence_forever())
                await self._serve_exec()
        return {
            "protocol": codec.VERSION,
            "pid": os.getpid(),
            "exec_address": self._exec_address,
            "exec_token": self._exec_server.token if self._exec_address else "",
            "present": self._runtime.list_present(),
            "describe": self._runtime.describe(),
            "holdings": dict(self._holdings),
            "snapshots": self._runtime.snapshot_ids(),
        }

    def _new_runtime(self) -> Any:
        """This node's BubblewrapRuntime, its state directory made private first (_private)."""
        from aviato.runtime.bubblewrap import BubblewrapRuntime
        from aviato.runtime.cgroups import ParentLimits

        secure_tree(self._state_dir)
        return BubblewrapRuntime(
            self._state_dir,
            max_sandboxes=self._max,
            cgroup_parent=self._cgroup_parent,
            parent_limits=ParentLimits.of_this_machine(*self._parent_limits),
            insecure_registries=self._insecure_registries,
            image_limits=self._image_limits,
        )

    async def _serve_exec(self) -> None:
        """Starts the direct exec channel (execwire.py) on this node's IP; without it the
        control plane falls back to the `exec` streaming method."""
        import ray

        from aviato.cluster.execwire import ExecServer

        # The port and token outlive a restart of this actor, so that the control plane's
        # channel simply reconnects to the restarted host.
        saved_path = self._state_dir / "channel.json"
        try:
            saved = json.loads(saved_path.read_text())
            port, token = int(saved["port"]), str(saved["token"])
        except (OSError, ValueError, KeyError, TypeError):
            port, token = 0, ""
        floor = self._image_limits.min_free_disk_bytes if self._image_limits else 0
        self._exec_server = ExecServer(
            self._handle,
            token or None,
            lambda server: {
                **path_handlers(server, self._handle),
                **snapshot_handlers(server, self._ready, floor),
            },
        )
        host: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        for candidate in dict.fromkeys((port, 0)):
            try:
                self._exec_address = await self._exec_server.start(host, candidate)
                break
            except Exception:
                log.warning("direct channel: cannot listen on %s:%d", host, candidate)
        else:
            log.error("the direct channel did not start; exec and files go through Ray")
            return
        write_private(saved_path, json.dumps({
            "port": int(self._exec_address.rsplit(":", 1)[1]), "token": self._exec_server.token,
        }).encode())  # fmt: skip

    async def ping(self) -> float:
        """Answers once started: the control plane pings a node host that Ray restarted (which
        runs only the constructor) to bring its runtime and direct channel back."""
        if self._runtime is None:
            await self.start()
        return time.time()

    # --- holdings ---

    def _holdings_path(self) -> Path:
        return self._state_dir / "holdings.json"

    def _load_holdings(self) -> dict[str, list[float]]:
        try:
            data = json.loads(self._holdings_path().read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): [float(v[0]), float(v[1])] for k, v in data.items()}

    def _save_holdings(self) -> None:
        write_private(self._holdings_path(), json.dumps(self._holdings).encode())

    # --- sandboxes ---

    async def _ready(self) -> Any:
        """The runtime, once started (Ray restarts a dead node host with its constructor only,
        so the first call after a restart starts it); NodeFenced while fenced."""
        if self._runtime is None:
            await self.start()
        if self._fenced:
            raise NodeFenced("this node lost the cluster for longer than its lease (fenced)")
        return self._runtime

    async def _handle(self, sandbox_id: str) -> SandboxHandle:
        handle = self._handles.get(sandbox_id)
        if handle is not None:
            return handle
        attached: SandboxHandle | MainExit = await (await self._ready()).attach(sandbox_id)
        if isinstance(attached, MainExit):
            raise SandboxGone(f"sandbox {sandbox_id} has ended")
        self._handles[sandbox_id] = attached
        return attached

    async def create(self, config_message: bytes, cpu: float, memory: float) -> None:
        """Creates the sandbox of an `npb.SandboxConfig`."""
        config = codec.decode_config(npb.SandboxConfig.FromString(config_message))
        runtime = await self._ready()
        config = await self._volumes.resolve(config)
        self._holdings[config.sandbox_id] = [cpu, memory]
        self._save_holdings()
        try:
            handle = await runtime.create(config)
        except BaseException:
            self._holdings.pop(config.sandbox_id, None)
            self._save_holdings()
            raise
        self._handles[config.sandbox_id] = handle

    async def attach(self, sandbox_id: str) -> bytes:
        """An `npb.Attached`: without `ended` when the sandbox runs here (and is now attached)."""
        attached = await (await self._ready()).attach(sandbox_id)
        if isinstance(attached, MainExit):
            return _bytes(npb.Attached(ended=codec.encode_main_exit(attached)))
        self._handles[sandbox_id] = attached
        return _bytes(npb.Attached())

    async def wait_exit(self, sandbox_id: str) -> bytes:
        """How the sandbox ended (an `npb.MainExit`), once it has."""
        handle = self._handles.get(sandbox_id)
        if handle is None:
            attached = await (await self._ready()).attach(sandbox_id)
            if isinstance(attached, MainExit):
                return _exit_bytes(attached)
            handle = self._handles[sandbox_id] = attached
        return _exit_bytes(await handle.wait_exit())

    async def terminate(self, sandbox_id: str, grace_seconds: float) -> bytes:
        return _exit_bytes(await (await self._handle(sandbox_id)).terminate(grace_seconds))

    async def kill(self, sandbox_id: str) -> bytes:
        return _exit_bytes(await (await self._handle(sandbox_id)).kill())

    async def set_deadline(
        self, sandbox_id: str, at_ns: int, why: str, grace_seconds: float
    ) -> None:
        """Passes the control plane's deadline to the sandbox's supervisor, which enforces it
        also while the control plane (or this node host) is down."""
        await (await self._handle(sandbox_id)).set_deadline(at_ns, why, grace_seconds)

    async def cleanup(self, sandbox_id: str) -> None:
        await self._egress.close(sandbox_id)
        self._handles.pop(sandbox_id, None)
        if self._holdings.pop(sandbox_id, None) is not None:
            self._save_holdings()
        if self._runtime is not None:
            await self._runtime.cleanup(sandbox_id)

    def list_present(self) -> list[str]:
        return [] if self._runtime is None else list(self._runtime.list_present())

    async def prepare_image(self, image: str, credentials_message: bytes) -> None:
        """Pulls an OCI image into this node's store unless it is there already (credentials:
        an `npb.RegistryCredentials`, or empty for none)."""
        credentials = (
            codec.decode_credentials(npb.RegistryCredentials.FromString(credentials_message))
            if credentials_message
            else None
        )
        await (await self._ready()).prepare_image(image, credentials)

    # --- images ---

    async def _images(self) -> ImageService:
        images: ImageService | None = (await self._ready()).images
        if images is None:
            raise Unsupported("this node's runtime keeps no image store")
        return images

    async def pull_image(self, request_message: bytes) -> AsyncIterator[bytes]:
        """Pulls an image (an `npb.PullImageRequest`): `npb.PullImageEvent`s, the pulled image
        last."""
        request = npb.PullImageRequest.FromString(request_message)
        credentials = (
            codec.decode_credentials(request.credentials)
            if request.HasField("credentials")
            else None
        )
        async for item in pull_with_progress(await self._images(), request.image, credentials):
            if isinstance(item, ImagePullProgress):
                yield _bytes(npb.PullImageEvent(progress=codec.encode_progress(item)))
            else:
                yield _bytes(npb.PullImageEvent(image=codec.encode_image(item)))

    async def list_images(self) -> bytes:
        """This node's images, an `npb.ImageList`."""
        images = await (await self._images()).list_images()
        return _bytes(npb.ImageList(images=[codec.encode_image(i) for i in images]))

    async def remove_image(self, image: str) -> bytes:
        """Removes one image unless a sandbox uses it; the removed image, an `npb.ImageInfo`."""
        return _bytes(codec.encode_image(await (await self._images()).remove(image)))

    async def prune_images(self) -> bytes:
        """Removes every image no sandbox uses: an `npb.ImageList` of them."""
        removed = await (await self._images()).prune()
        return _bytes(npb.ImageList(images=[codec.encode_image(i) for i in removed]))

    # --- exec ---

    async def exec(
        self, sandbox_id: str, exec_id: str, spec_message: bytes
    ) -> AsyncIterator[bytes]:
        """Runs the command of an `npb.ExecSpec`; yields its `npb.ExecEvent`s (the last an exit
        or failed)."""
        started = self._exec_future(exec_id)
        try:
            handle = await self._handle(sandbox_id)
            proc = await handle.exec(codec.decode_spec(npb.ExecSpec.FromString(spec_message)))
            started.set_result(proc)
            async for event in proc.events():
                yield _bytes(codec.encode_event(event))
        finally:
            if not started.done():
                started.cancel()
            self._execs.pop(exec_id, None)

    def _exec_future(self, exec_id: str) -> asyncio.Future[ExecHandle]:
        future = self._execs.get(exec_id)
        if future is None:
            future = self._execs[exec_id] = asyncio.get_running_loop().create_future()
        return future

    async def exec_control(self, exec_id: str, op: str, arg: Any = None) -> None:
        """stdin / close_stdin / resize / signal / kill for a running exec (gone: no-op)."""
        future = self._exec_future(exec_id)
        try:
            proc = await asyncio.wait_for(asyncio.shield(future), EXEC_START_SECONDS)
        except (TimeoutError, asyncio.CancelledError):
            if self._execs.get(exec_id) is future and not future.done():
                del self._execs[exec_id]
            return
        if op == "stdin":
            await proc.write_stdin(arg)
        elif op == "close_stdin":
            await proc.close_stdin()
        elif op == "resize":
            await proc.resize(*arg)
        elif op == "signal":
            await proc.signal(arg)
        elif op == "kill":
            await proc.kill()

    # --- files ---

    async def read_file(self, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
        """`npb.FileInfo` bytes first, then the file's content in pieces."""
        handle = await self._handle(sandbox_id)
        info, chunks = await handle.read_file(path)
        yield _bytes(codec.encode_file_info(info))
        # Each yield is a Ray object and a round trip's worth of overhead: send large pieces.
        batch = bytearray()
        async for chunk in chunks:
            batch += chunk
            if len(batch) >= FILE_BATCH_BYTES:
                yield bytes(batch)
                batch.clear()
        if batch:
            yield bytes(batch)

    async def write_begin(
        self, sandbox_id: str, write_id: str, path: str, mode: int, make_parents: bool
    ) -> None:
        """Starts a write fed by `write_chunk` and finished by `write_end`."""
        handle = await self._handle(sandbox_id)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)

        async def chunks() -> AsyncIterator[bytes]:
            while (chunk := await queue.get()) is not None:
                yield chunk

        task = asyncio.create_task(handle.write_file(path, mode, make_parents, chunks()))
        self._writes[write_id] = (queue, task)

    async def write_chunk(self, write_id: str, data: bytes) -> None:
        queue, task = self._writes[write_id]
        put = asyncio.ensure_future(queue.put(data))
        await asyncio.wait({put, task}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            self._writes.pop(write_id, None)
            await task  # raises the write's error

    async def write_end(self, write_id: str, commit: bool) -> int:
        """Commits (or abandons) the write; returns the size written."""
        queue, task = self._writes.pop(write_id)
        if not commit:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return 0
        await queue.put(None)
        return await task

    # --- logs ---

    async def logs(self, request_message: bytes) -> AsyncIterator[bytes]:
        """The main log's records as `SandboxHandle.logs` gives them (an `npb.LogsRequest`), in
        `npb.LogBatch`es of what is at hand, up to LOG_BATCH_BYTES each."""
        request = npb.LogsRequest.FromString(request_message)
        handle = await self._handle(request.sandbox_id)
        records = handle.logs(request.since_ns, request.tail, request.follow)
        skip = request.skip
        async for batch in _batches(records, LOG_BATCH_BYTES):
            if skip >= len(batch):
                skip -= len(batch)
                continue
            batch, skip = batch[skip:], 0
            yield _bytes(npb.LogBatch(records=[codec.encode_record(r) for r in batch]))

    # --- egress (node_egress.py; node.proto's egress block) ---

    async def open_egress(self, request_message: bytes) -> None:
        """Serves a sandbox's egress proxy here (an `npb.OpenEgressRequest`)."""
        await self._ready()
        await self._egress.open(request_message, self._handle)

    async def update_egress(self, request_message: bytes) -> None:
        """Applies a new policy (an `npb.UpdateEgressRequest`) to a served sandbox."""
        await self._egress.update(request_message)

    def egress_usage(self, request_message: bytes) -> bytes:
        """The figures of served sandboxes (`npb.EgressUsageRequest` -> `npb.EgressUsages`)."""
        return self._egress.usage(request_message)

    async def close_egress(self, sandbox_id: str) -> bytes:
        """Stops serving a sandbox's egress: its final figures (an `npb.EgressUsages`)."""
        return await self._egress.close(sandbox_id)

    # --- volumes (node_volumes.py; node.proto's volumes block) ---

    def configure_mounts(self, host_mounts: list[str], volume_dir: str) -> None:
        """The host directories sandboxes may mount here and the shared volume directory (the
        control plane's --allow-host-mount and --ray-volume-dir, sent at each of its starts;
        kept for a restarted node host)."""
        self._volumes.configure(tuple(str(p) for p in host_mounts), str(volume_dir))

    async def volume_usage(self, request_message: bytes) -> bytes:
        """What a volume takes of this node's disk (`npb.VolumeRef` -> `npb.VolumeUsage`)."""
        await self._ready()
        return await self._volumes.usage(request_message)

    async def delete_volume(self, request_message: bytes) -> None:
        """Removes a volume's files here (an `npb.VolumeRef`)."""
        await self._ready()
        await self._volumes.delete(request_message)

    # --- fencing ---

    async def _fence_forever(self) -> None:
        probe: asyncio.Future[None] | None = None
        while True:
            await asyncio.sleep(FENCE_PROBE_INTERVAL_SECONDS)
            if probe is None or probe.done():
                if probe is not None and probe.exception() is None:
                    self._last_contact = time.monotonic()
                    if self._fenced:
                        log.warning("the cluster answers again: accepting sandboxes")
                        self._fenced = False
                probe = asyncio.ensure_future(asyncio.to_thread(_probe_gcs))
                await asyncio.wait({probe}, timeout=FENCE_PROBE_INTERVAL_SECONDS)
                if probe.done() and probe.exception() is None:
                    self._last_contact = time.monotonic()
                    self._fenced = False
            silent = time.monotonic() - self._last_contact
            if silent > self._lease and not self._fenced:
                await self._fence(silent)

    async def _fence(self, silent: float) -> None:
        log.error("no answer from the cluster for %.1f s: stopping every sandbox here", silent)
        self._fenced = True
        handles = list(self._handles.values())
        await asyncio.gather(*(h.kill() for h in handles), return_exceptions=True)


def _bytes(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _exit_bytes(exit: MainExit) -> bytes:
    return _bytes(codec.encode_main_exit(exit))


async def _batches(records: AsyncIterator[LogRecord], limit: int) -> AsyncIterator[list[LogRecord]]:
    """The records in lists: each holds what the source gives without waiting (up to `limit`
    bytes of data), so that a burst travels as one Ray object and a trickle is not held back."""
    source = aiter(records)
    batch: list[LogRecord] = []
    size = 0
    following: asyncio.Future[LogRecord] = asyncio.ensure_future(anext(source))
    try:
        while True:
            if batch and not following.done():
                await asyncio.sleep(0)  # one step for a source that has more at hand
                if not following.done():
                    yield batch
                    batch, size = [], 0
            try:
                record = await following
            except StopAsyncIteration:
                break
            following = asyncio.ensure_future(anext(source))
            batch.append(record)
            size += len(record.data)
            if size >= limit:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch
    finally:
        following.cancel()
