"""`NodeRuntime`: the control plane's `Runtime` for one Ray node, proxying to its `NodeHost`.

Exec is a direct gRPC stream to the node host (`execwire.py`: 2.4 ms → 0.7 ms per exec against
a Ray streaming generator, docs/cluster.md), or, when the node host has no exec port, the
`exec` streaming method with one `exec_control` actor call per stdin/resize/signal frame.
Everything else is an actor call: file reads and the main log come back as Ray streaming
generators (`num_returns="streaming"`), uploads are one awaited call per chunk (in order).

Node loss: the placement calls `mark_lost()` when the GCS declares the node dead. Every pending
call races against that, so in-flight execs and file transfers end with `NodeLost` (gRPC
UNAVAILABLE, "node lost: ...") and `wait_exit` returns a `MainExit` with reason "node lost",
which the lifecycle records as FAILED "node lost". Until then, a node host that does not answer
(its worker is restarting) is retried by `wait_exit` and reported as `SandboxGone` elsewhere.
The placement calls `mark_lost(NODE_HOST_LOST)` when the node is alive but its node host is gone
for good (Ray will not restart it, or it has not answered for longer than a bound, see
`unanswered_since`): the same, with reason "node host lost".

The main log is mirrored: each sandbox handle copies its log from the node into
`<control plane state>/cluster-logs/<id>.log` as it is written, because the service's log
stream and the log kept after the end read a file on the control plane's machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from aviato._private import open_private, private_dir
from aviato.cluster import execwire
from aviato.runtime.base import (
    ExecEvent,
    ExecHandle,
    ExecSpec,
    FileInfo,
    MainExit,
    RegistryCredentials,
    Runtime,
    SandboxConfig,
    SandboxGone,
    SandboxHandle,
    SandboxRuntimeError,
)
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["NODE_HOST_LOST", "NODE_LOST", "NodeLost", "NodeRuntime"]

log = logging.getLogger("aviato.cluster")

NODE_LOST = "node lost"
NODE_HOST_LOST = "node host lost"
WAIT_RETRY_SECONDS = 0.5
LOG_DRAIN_SECONDS = 2.0
# How long an actor failure waits for the GCS to declare the node dead (tuned health checks
# take 3-6 s; Ray's defaults about 60 s, after which the failure is reported as SandboxGone).
NODE_LOSS_GRACE_SECONDS = 8.0
WRITE_BATCH_BYTES = 1 << 20
T = TypeVar("T")
_EOF: Any = getattr(grpc.aio, "EOF", None)  # the end of a stream's responses


class NodeLost(SandboxRuntimeError):
    """The node that ran the sandbox left the cluster (died or was cut off)."""

    code = "UNAVAILABLE"


def _translate(exc: BaseException, node_id: str) -> BaseException:
    """An error of an actor call or of a direct-channel call as the runtime's own error."""
    from ray.exceptions import ActorUnschedulableError, RayError, RayTaskError

    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, SandboxRuntimeError):
            return cause
        return SandboxRuntimeError(f"node host on {node_id[:12]}: {cause!r}")
    if isinstance(exc, ActorUnschedulableError):
        # Hard node affinity and the node is gone: the GCS knows before our next poll does.
        return NodeLost(f"{NODE_LOST}: node {node_id[:12]} left the cluster")
    if isinstance(exc, RayError):  # died, unavailable (restarting), cancelled, lost objects
        return SandboxGone(f"node host on {node_id[:12]} does not answer: {type(exc).__name__}")
    if isinstance(exc, grpc.aio.AioRpcError):  # the direct exec channel
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return SandboxGone(f"node host on {node_id[:12]} does not answer: {code.name}")
        error = SandboxRuntimeError(f"node host on {node_id[:12]}: {exc.details()}")
        error.code = code.name
        return error
    return exc


class NodeRuntime(Runtime):
    """Sandboxes on one node, through its node-host actor.

    `holding(sandbox_id)` gives the (cpu, memory) the placement reserved for a sandbox here (the
    node host persists it, for a restarted control plane); `release(sandbox_id)` is called when
    a sandbox's state is cleaned up, so that the placement returns them to the node.
    """

    def __init__(
        self,
        node_id: str,
        actor: Any,
        facts: dict[str, Any],
        log_dir: Path,
        holding: Callable[[str], tuple[float, float]],
        release: Callable[[str], None],
    ) -> None:
        self.node_id = node_id
        self._actor = actor
        self._present: list[str] = list(facts.get("present", []))
        self._describe: dict[str, str] = dict(facts.get("describe", {}))
        self._log_dir = log_dir
        self._holding = holding
        self._release = release
        # Set once, with the reason (NODE_LOST or NODE_HOST_LOST).
        self._lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._unanswered_since: float | None = None
        self._handles: dict[str, RemoteSandbox] = {}
        self._exec_address = str(facts.get("exec_address", ""))
        self._exec_token = str(facts.get("exec_token", ""))
        self._exec_channel: Any = None  # grpc.aio.Channel (grpc-stubs type the sync API)
        self._refreshing: asyncio.Future[None] | None = None

    def exec_channel(self) -> Any:
        """The direct exec channel to the node host (execwire.py), opened on first use."""
        if self._exec_channel is None and self._exec_address:
            self._exec_channel = grpc.aio.insecure_channel(
                self._exec_address,
                options=[
                    ("grpc.keepalive_time_ms", 10_000),
                    ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.max_receive_message_length", 8 << 20),
                ],
            )
        return self._exec_channel

    @property
    def exec_token(self) -> str:
        return self._exec_token

    def channel_failed(self) -> None:
        """A direct call found the node host unreachable: ask it (in the background) where its
        channel is now, in case it restarted on another port."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        try:
            facts = await self.call("start")
        except SandboxRuntimeError:
            return
        address, token = str(facts.get("exec_address", "")), str(facts.get("exec_token", ""))
        if (address, token) != (self._exec_address, self._exec_token):
            old, self._exec_channel = self._exec_channel, None
            self._exec_address, self._exec_token = address, token
            if old is not None:
                await old.close()

    # --- plumbing ---

    @property
    def actor(self) -> Any:
        return self._actor

    @property
    def lost(self) -> bool:
        return self._lost.done()

    @property
    def lost_reason(self) -> str:
        """NODE_LOST or NODE_HOST_LOST once lost, else ''."""
        return self._lost.result() if self._lost.done() else ""

    @property
    def unanswered_since(self) -> float | None:
        """`time.monotonic()` of the first of the failures to reach the node host since it last
        answered (None while it answers): the placement's cue to ask Ray about it."""
        return self._unanswered_since

    def sandbox_ids(self) -> list[str]:
        """The sandboxes this runtime has handles for."""
        return list(self._handles)

    def mark_lost(self, reason: str = NODE_LOST) -> None:
        """The node (or, NODE_HOST_LOST, its node host) is gone: every pending and later call
        fails with NodeLost."""
        if not self._lost.done():
            self._lost.set_result(reason)

    def _node_lost(self) -> NodeLost:
        if self.lost_reason == NODE_HOST_LOST:
            return NodeLost(
                f"{NODE_HOST_LOST}: the node host on {self.node_id[:12]} is gone and was not "
                "restarted"
            )
        return NodeLost(f"{NODE_LOST}: node {self.node_id[:12]} left the cluster")

    async def probe(self, seconds: float) -> bool:
        """Whether the node host answers a ping within `seconds` (clears `unanswered_since`)."""
        try:
            await asyncio.wait_for(_await(self._actor.ping.remote()), seconds)
        except Exception:
            return False
        self._answered()
        return True

    def _answered(self) -> None:
        self._unanswered_since = None

    def _unanswered(self) -> None:
        if self._unanswered_since is None:
            self._unanswered_since = time.monotonic()

    async def race(self, awaitable: Awaitable[T]) -> T:
        """Awaits an actor call's result unless the node is lost first; Ray errors translated."""
        if self._lost.done():
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise self._node_lost()
        call: asyncio.Future[T] = asyncio.ensure_future(awaitable)
        lost: asyncio.Future[Any] = self._lost
        await asyncio.wait((call, lost), return_when=asyncio.FIRST_COMPLETED)
        if not call.done():
            call.cancel()
            raise self._node_lost()
        try:
            result = call.result()
        except Exception as e:
            error = _translate(e, self.node_id)
            if isinstance(error, SandboxGone) and "does not answer" in str(error):
                self._unanswered()
            else:
                self._answered()
            if isinstance(error, SandboxGone) and not self._lost.done():
                await self._settle()
            if self._lost.done():
                raise self._node_lost() from e
            raise error from e
        self._answered()
        return result

    async def _settle(self) -> None:
        """After a failed call: returns once the node is declared lost or its node host answers
        again (Ray restarted it), at most NODE_LOSS_GRACE_SECONDS. A node going down and a node
        host restarting look alike at first; the GCS tells which within its health checks, and
        an error should then say "node lost" rather than "does not answer"."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + NODE_LOSS_GRACE_SECONDS
        while not self._lost.done() and loop.time() < deadline:
            ping = asyncio.ensure_future(_await(self._actor.ping.remote()))
            lost: asyncio.Future[Any] = self._lost
            await asyncio.wait(
                (ping, lost), timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            if not ping.done():
                ping.cancel()
                return
            if ping.exception() is None:
                self._answered()
                return  # it answers: a restarted node host, not a lost node
            await asyncio.sleep(0.2)

    async def call(self, method: str, *args: Any) -> Any:
        return await self.race(_await(getattr(self._actor, method).remote(*args)))

    def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        """The items of a streaming actor method, each raced against node loss."""
        gen = getattr(self._actor, method).options(num_returns="streaming").remote(*args)
        return self._items(gen)

    async def _items(self, gen: Any) -> AsyncIterator[Any]:
        try:
            while True:
                try:
                    ref = await self.race(_anext_or_none(gen))
                except StopAsyncIteration:
                    return
                if ref is None:
                    return
                yield await self.race(_await(ref))
        finally:
            with contextlib.suppress(Exception):
                import ray

                ray.cancel(gen)

    def log_mirror_path(self, sandbox_id: str) -> Path:
        return self._log_dir / f"{sandbox_id}.log"

    # --- Runtime ---

    async def create(self, config: SandboxConfig) -> SandboxHandle:
        cpu, memory = self._holding(config.sandbox_id)
        await self.call("create", config, cpu, memory)
        return self._adopt(config.sandbox_id)

    def _adopt(self, sandbox_id: str) -> RemoteSandbox:
        handle = RemoteSandbox(self, sandbox_id)
        self._handles[sandbox_id] = handle
        return handle

    async def attach(self, sandbox_id: str) -> SandboxHandle | MainExit:
        try:
            ended = await self.call("attach", sandbox_id)
        except NodeLost:
            return MainExit(-1, 0, time.time_ns(), self.lost_reason or NODE_LOST)
        if isinstance(ended, MainExit):
            return ended
        return self._handles.get(sandbox_id) or self._adopt(sandbox_id)

    async def cleanup(self, sandbox_id: str) -> None:
        handle = self._handles.pop(sandbox_id, None)
        if handle is not None:
            handle.close()
        self._release(sandbox_id)
        with contextlib.suppress(NodeLost, SandboxGone):
            await self.call("cleanup", sandbox_id)
        self.log_mirror_path(sandbox_id).unlink(missing_ok=True)

    def list_present(self) -> list[str]:
        return list(self._present)

    def image_ready(self, image: str) -> bool:
        # Whether the node has it cached is a question for the node: built-in images are ready,
        # any other goes through prepare_image (a no-op call when the node has it).
        from aviato.runtime import image_roots

        return not image or image in image_roots.known_images()

    async def prepare_image(
        self, image: str, credentials: RegistryCredentials | None = None
    ) -> None:
        await self.call("prepare_image", image, credentials)

    def describe(self) -> dict[str, str]:
        return {**self._describe, "node": self.node_id}

    async def close(self) -> None:
        for handle in list(self._handles.values()):
            handle.close()
        self._handles.clear()
        if self._exec_channel is not None:
            await self._exec_channel.close()


async def _await(ref: Any) -> Any:
    return await ref


async def _anext_or_none(gen: Any) -> Any:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


class RemoteSandbox(SandboxHandle):
    """A sandbox on another node; its main log is mirrored here while it runs."""

    def __init__(self, runtime: NodeRuntime, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self._rt = runtime
        self._exit: MainExit | None = None
        self._log = runtime.log_mirror_path(sandbox_id)
        self._mirror = asyncio.ensure_future(self._mirror_log())

    @property
    def log_path(self) -> Path:
        return self._log

    def close(self) -> None:
        self._mirror.cancel()

    async def _mirror_log(self) -> None:
        """Copies the main log here until the sandbox ends; resumes where it stopped when the
        node host restarts meanwhile."""
        private_dir(self._log.parent)
        with os.fdopen(open_private(self._log, os.O_WRONLY | os.O_APPEND), "ab") as f:
            while self._exit is None and not self._rt.lost:
                try:
                    async for data in self._rt.stream("follow_log", self.sandbox_id, f.tell()):
                        f.write(data)
                        f.flush()
                    return  # the sandbox ended: the copy is complete
                except SandboxGone as e:
                    if "does not answer" not in str(e):
                        return
                    await asyncio.sleep(WAIT_RETRY_SECONDS)
                except SandboxRuntimeError as e:
                    log.debug("log mirror of %s ended: %s", self.sandbox_id, e)
                    return

    async def exec(self, spec: ExecSpec) -> ExecHandle:
        channel = self._rt.exec_channel()
        if channel is not None:
            call = execwire.open_exec(channel, self._rt.exec_token)
            try:
                await self._rt.race(call.write(execwire.init_frame(self.sandbox_id, spec)))
            except SandboxGone:
                self._rt.channel_failed()
                raise
            return DirectExec(self._rt, call)
        exec_id = secrets.token_hex(8)
        items = self._rt.stream("exec", self.sandbox_id, exec_id, spec)
        return RemoteExec(self._rt, exec_id, items)

    async def read_file(self, path: str) -> tuple[FileInfo, AsyncIterator[bytes]]:
        channel = self._rt.exec_channel()
        if channel is not None:
            try:
                return await self._read_direct(channel, path)
            except SandboxGone:
                self._rt.channel_failed()
                raise
        items = self._rt.stream("read_file", self.sandbox_id, path)
        try:
            info = await anext(items)
        except StopAsyncIteration:
            raise SandboxGone(f"sandbox {self.sandbox_id}: the read ended early") from None
        if not isinstance(info, FileInfo):
            raise SandboxRuntimeError("read_file: the node host sent no file info")

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in items:
                yield chunk

        return info, chunks()

    async def _read_direct(self, channel: Any, path: str) -> tuple[FileInfo, AsyncIterator[bytes]]:
        call = execwire.read_file(channel, self._rt.exec_token, self.sandbox_id, path)
        first = await self._rt.race(call.read())
        if first is _EOF or first.WhichOneof("msg") != "info":
            call.cancel()
            raise SandboxRuntimeError(f"read {path}: the node host sent no file info")

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while (frame := await self._rt.race(call.read())) is not _EOF:
                    yield frame.data
            finally:
                call.cancel()

        return FileInfo(size=first.info.size, mode=first.info.mode), chunks()

    async def _write_direct(
        self, channel: Any, path: str, mode: int, make_parents: bool, chunks: AsyncIterator[bytes]
    ) -> int:
        call = execwire.write_file(channel, self._rt.exec_token)
        header = pb.WriteFileHeader(
            sandbox_id=self.sandbox_id, path=path, mode=mode, make_parents=make_parents
        )
        try:
            await self._rt.race(call.write(pb.WriteFileRequest(header=header)))
            batch = bytearray()
            async for chunk in chunks:
                batch += chunk
                if len(batch) >= WRITE_BATCH_BYTES:
                    await self._rt.race(call.write(pb.WriteFileRequest(data=bytes(batch))))
                    batch.clear()
            if batch:
                await self._rt.race(call.write(pb.WriteFileRequest(data=bytes(batch))))
            await self._rt.race(call.write(pb.WriteFileRequest(end=True)))
            await self._rt.race(call.done_writing())
            response = await self._rt.race(_await(call))
        except BaseException:
            call.cancel()  # no end frame: the node host leaves no file
            raise
        return int(response.size)

    async def write_file(
        self, path: str, mode: int, make_parents: bool, chunks: AsyncIterator[bytes]
    ) -> int:
        channel = self._rt.exec_channel()
        if channel is not None:
            try:
                return await self._write_direct(channel, path, mode, make_parents, chunks)
            except SandboxGone:
                self._rt.channel_failed()
                raise
        write_id = secrets.token_hex(8)
        await self._rt.call("write_begin", self.sandbox_id, write_id, path, mode, make_parents)
        try:
            # One actor call per MiB rather than per client chunk (about 1 ms each).
            batch = bytearray()
            async for chunk in chunks:
                batch += chunk
                if len(batch) >= WRITE_BATCH_BYTES:
                    await self._rt.call("write_chunk", write_id, bytes(batch))
                    batch.clear()
            if batch:
                await self._rt.call("write_chunk", write_id, bytes(batch))
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._rt.call("write_end", write_id, False))
            raise
        size: int = await self._rt.call("write_end", write_id, True)
        return size

    async def _ended(self, call: Callable[[], Awaitable[MainExit]]) -> MainExit:
        if self._exit is not None:
            return self._exit
        while True:
            try:
                exit = await call()
                break
            except NodeLost:
                exit = MainExit(-1, 0, time.time_ns(), self._rt.lost_reason or NODE_LOST)
                break
            except SandboxGone as e:
                if "does not answer" not in str(e):
                    raise
                await asyncio.sleep(WAIT_RETRY_SECONDS)  # the node host restarts, or dies
        if self._exit is None:
            self._exit = exit
            if exit.reason not in (NODE_LOST, NODE_HOST_LOST):
                # The lifecycle keeps the log file once this returns: let the mirror catch up.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._mirror), LOG_DRAIN_SECONDS)
        return self._exit

    async def wait_exit(self) -> MainExit:
        return await self._ended(lambda: self._rt.call("wait_exit", self.sandbox_id))

    async def terminate(self, grace_seconds: float) -> MainExit:
        return await self._ended(lambda: self._rt.call("terminate", self.sandbox_id, grace_seconds))

    async def kill(self) -> MainExit:
        return await self._ended(lambda: self._rt.call("kill", self.sandbox_id))

    async def set_deadline(self, at_ns: int, why: str, grace_seconds: float) -> None:
        await self._rt.call("set_deadline", self.sandbox_id, at_ns, why, grace_seconds)


class RemoteExec(ExecHandle):
    def __init__(self, runtime: NodeRuntime, exec_id: str, items: AsyncIterator[Any]) -> None:
        self._rt = runtime
        self._id = exec_id
        self._items = items

    async def events(self) -> AsyncIterator[ExecEvent]:
        async for event in self._items:
            yield event

    async def _control(self, op: str, arg: Any = None) -> None:
        await self._rt.call("exec_control", self._id, op, arg)

    async def write_stdin(self, data: bytes) -> None:
        await self._control("stdin", data)

    async def close_stdin(self) -> None:
        await self._control("close_stdin")

    async def resize(self, rows: int, cols: int) -> None:
        await self._control("resize", (rows, cols))

    async def signal(self, signo: int) -> None:
        await self._control("signal", signo)

    async def kill(self) -> None:
        with contextlib.suppress(SandboxRuntimeError):
            await self._control("kill")


class DirectExec(ExecHandle):
    """An exec over the direct channel; every read and write races against node loss."""

    def __init__(self, runtime: NodeRuntime, call: Any) -> None:
        self._rt = runtime
        self._call = call

    async def events(self) -> AsyncIterator[ExecEvent]:
        while True:
            frame = await self._rt.race(self._call.read())
            if frame is _EOF:
                return
            event = execwire.event_of(frame)
            if event is not None:
                yield event

    async def _send(self, request: Any) -> None:
        await self._rt.race(self._call.write(request))

    async def write_stdin(self, data: bytes) -> None:
        await self._send(pb.ExecRequest(stdin=data))

    async def close_stdin(self) -> None:
        await self._send(pb.ExecRequest(stdin_eof=True))

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(pb.ExecRequest(resize=pb.TerminalSize(rows=rows, cols=cols)))

    async def signal(self, signo: int) -> None:
        await self._send(pb.ExecRequest(signal=signo))

    async def kill(self) -> None:
        self._call.cancel()  # the node host kills the command when its call is cancelled
