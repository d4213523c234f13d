"""The usage readings of a node's sandboxes, as the control plane sees them.

The service's usage history (server/usage_history.py) reads each live sandbox's
`SandboxHandle.usage()` every round without waiting. For a sandbox on a Ray node that reading
lives on the node, so once per round, before it, the placement asks every node host for all of
its sandboxes in one actor call (`sandbox_usage`, node.proto's usage block) and keeps the
answers here; `RemoteSandbox.usage()` returns the kept one while it is fresh. A node that does
not answer within `ASK_SECONDS` leaves its sandboxes without a reading for that round (their
history has a gap, never a guessed figure), and a reading older than `FRESH_SECONDS` is not
given.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aviato.cluster.link import NodeLink
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import SandboxRuntimeError, UsageReading

__all__ = ["NodeUsageReader"]

log = logging.getLogger("aviato.cluster")

ASK_SECONDS = 2.0
FRESH_SECONDS = 30.0


class NodeUsageReader:
    """The last readings of one node's sandboxes (see the module docstring)."""

    def __init__(self, link: NodeLink) -> None:
        self._link = link
        self._known: dict[str, tuple[float, UsageReading]] = {}

    async def refresh(self, sandbox_ids: list[str]) -> None:
        """Asks the node for the readings of `sandbox_ids`; forgets every other sandbox's."""
        self._known = {s: self._known[s] for s in sandbox_ids if s in self._known}
        if not sandbox_ids:
            return
        request = npb.NodeUsageRequest(sandbox_ids=sandbox_ids).SerializeToString()
        try:
            answer = npb.NodeUsage.FromString(
                await asyncio.wait_for(self._link.call("sandbox_usage", request), ASK_SECONDS)
            )
        except (SandboxRuntimeError, TimeoutError, AttributeError) as e:
            log.debug("usage of node %s: %s", self._link.node_id[:12], e)
            return
        now = time.monotonic()
        for sandbox_id, r in answer.readings.items():
            if sandbox_id in sandbox_ids:
                self._known[sandbox_id] = (now, UsageReading(r.cpu_ns, r.memory_bytes, r.pids))

    def reading(self, sandbox_id: str) -> UsageReading | None:
        """The kept reading of `sandbox_id` while it is fresh, else None."""
        kept = self._known.get(sandbox_id)
        if kept is None or time.monotonic() - kept[0] > FRESH_SECONDS:
            return None
        return kept[1]
