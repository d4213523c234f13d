"""`NodeEgressHost`: the control plane's `EgressHost` for the sandboxes of one Ray node, whose
proxies run in that node's node host (node_egress.py).

Every call is one unary actor call through the node's `NodeLink` (node.proto's egress block):
they are control calls, a few per sandbox, which is what the actor calls carry; the node host's
direct gRPC channel is for the byte streams of exec, files and ports.

Figures: the last answer for each served sandbox is kept (`known_usage`). `usage(max_age=0)`
asks the node for that one sandbox; with `max_age` (a listing) the figures kept are given while
they are younger than that, else the node is asked once for all of its served sandboxes (one
call, shared by the concurrent askers). A node that does not answer within USAGE_SECONDS gives
the figures kept. `close_all` only forgets: the node host goes on serving while the control
plane is down, and a restarted control plane finds its sandboxes again with `open`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from aviato.cluster import codec
from aviato.cluster.link import NodeLink
from aviato.egress.gateway import EgressUsage
from aviato.egress.host import EgressHost, ListenerSource
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import SandboxRuntimeError
from aviato.runtime.model import EgressPolicy

__all__ = ["USAGE_SECONDS", "NodeEgressHost"]

log = logging.getLogger("aviato.cluster")

# How long a question for figures waits for the node host.
USAGE_SECONDS = 2.0
# How long closing waits for the final figures.
CLOSE_SECONDS = 10.0


class NodeEgressHost(EgressHost):
    """The egress of the sandboxes of one node, served by its node host."""

    def __init__(self, link: NodeLink) -> None:
        self._link = link
        self._known: dict[str, EgressUsage] = {}  # served sandbox -> its last figures
        self._all_asked_at = -math.inf  # time.monotonic() of the last question for all
        self._asking_all: asyncio.Future[None] | None = None

    def serving(self, sandbox_id: str) -> bool:
        return sandbox_id in self._known

    async def open(
        self,
        sandbox_id: str,
        handle: ListenerSource,
        policy: EgressPolicy,
        counted: EgressUsage,
    ) -> None:
        request = npb.OpenEgressRequest(
            sandbox_id=sandbox_id,
            policy=codec.encode_policy(policy),
            counted=codec.encode_egress_usage(counted),
        )
        await self._call("open_egress", request.SerializeToString())
        self._known.setdefault(sandbox_id, counted)

    async def update(self, sandbox_id: str, policy: EgressPolicy) -> None:
        if sandbox_id not in self._known:
            return
        request = npb.UpdateEgressRequest(sandbox_id=sandbox_id, policy=codec.encode_policy(policy))
        await self._call("update_egress", request.SerializeToString())

    async def usage(self, sandbox_id: str, *, max_age: float = 0.0) -> EgressUsage | None:
        if sandbox_id not in self._known:
            return None
        if max_age <= 0:
            await self._ask([sandbox_id])
        elif time.monotonic() - self._all_asked_at > max_age:
            if self._asking_all is None or self._asking_all.done():
                self._asking_all = asyncio.ensure_future(self._ask_all())
            await asyncio.shield(self._asking_all)
        return self._known.get(sandbox_id)

    def known_usage(self, sandbox_id: str) -> EgressUsage | None:
        return self._known.get(sandbox_id)

    async def close(self, sandbox_id: str) -> EgressUsage | None:
        known = self._known.pop(sandbox_id, None)
        if known is None:
            return None
        try:
            answer = npb.EgressUsages.FromString(
                await asyncio.wait_for(self._call("close_egress", sandbox_id), CLOSE_SECONDS)
            )
        except (SandboxRuntimeError, TimeoutError) as e:
            log.info("sandbox %s: its node did not give its final egress figures: %s",
                     sandbox_id, e)  # fmt: skip
            return known
        final = answer.usage.get(sandbox_id)
        return known if final is None else codec.decode_egress_usage(final)

    async def close_all(self) -> None:
        self._known.clear()

    async def _call(self, method: str, *args: object) -> bytes:
        try:
            answer: bytes = await self._link.call(method, *args)
        except AttributeError:  # a node host of a release without egress
            raise SandboxRuntimeError(
                f"the node host on {self._link.node_id[:12]} cannot serve egress (an older "
                "aviato release): run the same release on every node"
            ) from None
        return answer

    async def _ask_all(self) -> None:
        self._all_asked_at = time.monotonic()
        await self._ask(list(self._known))

    async def _ask(self, sandbox_ids: list[str]) -> None:
        """Keeps the node's figures of `sandbox_ids` (those kept stay when it does not answer)."""
        request = npb.EgressUsageRequest(sandbox_ids=sandbox_ids).SerializeToString()
        try:
            answer = npb.EgressUsages.FromString(
                await asyncio.wait_for(self._call("egress_usage", request), USAGE_SECONDS)
            )
        except (SandboxRuntimeError, TimeoutError) as e:
            log.debug("egress figures of node %s: %s", self._link.node_id[:12], e)
            return
        for sandbox_id, usage in answer.usage.items():
            if sandbox_id in self._known:  # not closed meanwhile
                self._known[sandbox_id] = codec.decode_egress_usage(usage)
