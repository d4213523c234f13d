"""`NodeLink`: the control plane's connection to one node host, and what it knows of its health.

Two carriers: actor calls through Ray (`call`, `stream`) and the node host's direct gRPC channel
(`exec_channel`, execwire.py). Every pending call races against the node's loss (`race`): the
placement calls `mark_lost()` when the GCS declares the node dead, and every pending and later
call then fails with `NodeLost` (gRPC UNAVAILABLE, "node lost: ..."). Until then, a node host
that does not answer (its worker is restarting) is reported as `SandboxGone` "does not answer",
after waiting up to NODE_LOSS_GRACE_SECONDS for the GCS to tell a lost node from a restarting
host. `mark_lost(NODE_HOST_LOST)` is the same for a node that lives while its node host is gone
for good.

Ray is imported where it is used: it is an optional dependency (`aviato[ray]`), and the
placement reports its absence in words of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc

from aviato.runtime.base import SandboxGone, SandboxRuntimeError

__all__ = ["NODE_HOST_LOST", "NODE_LOST", "NodeLink", "NodeLost"]

NODE_LOST = "node lost"
NODE_HOST_LOST = "node host lost"
# How long an actor failure waits for the GCS to declare the node dead (tuned health checks
# take 3-6 s; Ray's defaults about 60 s, after which the failure is reported as SandboxGone).
NODE_LOSS_GRACE_SECONDS = 8.0
T = TypeVar("T")


class NodeLost(SandboxRuntimeError):
    """The node that ran the sandbox left the cluster (died or was cut off)."""

    code = "UNAVAILABLE"


def _translate(exc: BaseException, node_id: str) -> BaseException:
    """An error of an actor call or of a direct-channel call as the runtime's own error."""
    from ray.exceptions import ActorUnschedulableError, RayError, RayTaskError  # optional dep.

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


class NodeLink:
    """Calls to the node host `actor` on `node_id`, given the facts its `start` returned."""

    def __init__(self, node_id: str, actor: Any, facts: dict[str, Any]) -> None:
        self.node_id = node_id
        self._actor = actor
        # Set once, with the reason (NODE_LOST or NODE_HOST_LOST).
        self._lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._unanswered_since: float | None = None
        self._exec_address = str(facts.get("exec_address", ""))
        self._exec_token = str(facts.get("exec_token", ""))
        self._exec_channel: Any = None  # grpc.aio.Channel (grpc-stubs type the sync API)
        self._refreshing: asyncio.Future[None] | None = None

    # --- the direct channel ---

    def exec_channel(self) -> Any:
        """The direct exec channel to the node host (execwire.py), opened on first use; None
        when the node host has none (then exec and files go through Ray)."""
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

    async def close(self) -> None:
        if self._exec_channel is not None:
            await self._exec_channel.close()

    # --- health ---

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

    def mark_lost(self, reason: str = NODE_LOST) -> None:
        """The node (or, NODE_HOST_LOST, its node host) is gone: every pending and later call
        fails with NodeLost."""
        if not self._lost.done():
            self._lost.set_result(reason)

    def node_lost(self) -> NodeLost:
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
        self._unanswered_since = None
        return True

    # --- calls ---

    async def race(self, awaitable: Awaitable[T]) -> T:
        """Awaits an actor call's result unless the node is lost first; Ray errors translated."""
        if self._lost.done():
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise self.node_lost()
        call: asyncio.Future[T] = asyncio.ensure_future(awaitable)
        lost: asyncio.Future[Any] = self._lost
        await asyncio.wait((call, lost), return_when=asyncio.FIRST_COMPLETED)
        if not call.done():
            call.cancel()
            raise self.node_lost()
        try:
            result = call.result()
        except Exception as e:
            error = _translate(e, self.node_id)
            if isinstance(error, SandboxGone) and "does not answer" in str(error):
                if self._unanswered_since is None:
                    self._unanswered_since = time.monotonic()
            else:
                self._unanswered_since = None
            if isinstance(error, SandboxGone) and not self._lost.done():
                await self._settle()
            if self._lost.done():
                raise self.node_lost() from e
            raise error from e
        self._unanswered_since = None
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
                self._unanswered_since = None
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
                import ray  # an optional dependency, present once a link exists

                ray.cancel(gen)


async def _await(ref: Any) -> Any:
    return await ref


async def _anext_or_none(gen: Any) -> Any:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None
