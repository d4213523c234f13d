"""`InProcessEgressHost`: the egress of sandboxes on this machine, each one's proxy listener
served by an `EgressGateway` in this process under the sandbox's current policy.

The local service uses one for its sandboxes; under the Ray placement each node host uses one
for the sandboxes of its node (`aviato.cluster.node_egress`).

A sandbox gets its proxy when its egress is first opened: at the create when its config allows
egress (the supervisor then binds the listener before the main process starts, so that process
has HTTP_PROXY too), or by a later `SetNetwork`. The listener lives in the sandbox's network
namespace for the rest of its life (the supervisor keeps it), and from then on the host accepts
on it whatever the policy says, so that a program that uses the proxy while egress is closed is
refused at once instead of waiting on a listener nobody accepts from. The service's record says
whether the sandbox has one (`egress_listener`), so that a restarted service serves it again.
"""

from __future__ import annotations

import logging

from aviato.egress.gateway import EgressGateway, EgressUsage
from aviato.egress.host import EgressHost, ListenerSource
from aviato.runtime.model import EgressPolicy

__all__ = ["InProcessEgressHost", "added_usage"]

log = logging.getLogger("aviato.egress")


def added_usage(base: EgressUsage, usage: EgressUsage) -> EgressUsage:
    """Both figures together."""
    return EgressUsage(
        bytes_sent=base.bytes_sent + usage.bytes_sent,
        bytes_received=base.bytes_received + usage.bytes_received,
        connections=base.connections + usage.connections,
        refused=base.refused + usage.refused,
    )


class InProcessEgressHost(EgressHost):
    """The served egress listeners of the sandboxes of this machine (use from one event loop)."""

    def __init__(self, gateway: EgressGateway) -> None:
        self._gateway = gateway
        # sandbox id -> what earlier runs counted (the gateway counts anew)
        self._served: dict[str, EgressUsage] = {}

    def serving(self, sandbox_id: str) -> bool:
        return sandbox_id in self._served

    def served(self) -> list[str]:
        """The sandboxes served."""
        return list(self._served)

    async def open(
        self,
        sandbox_id: str,
        handle: ListenerSource,
        policy: EgressPolicy,
        counted: EgressUsage,
    ) -> None:
        if sandbox_id in self._served:
            self._gateway.update(sandbox_id, policy)
            return
        listener = await handle.egress_listener()
        try:
            await self._gateway.serve(sandbox_id, listener, policy)
        except BaseException:
            listener.close()
            raise
        self._served[sandbox_id] = counted
        log.info("sandbox %s: egress %s", sandbox_id, policy.mode)

    async def update(self, sandbox_id: str, policy: EgressPolicy) -> None:
        if sandbox_id in self._served:
            self._gateway.update(sandbox_id, policy)

    async def usage(self, sandbox_id: str, *, max_age: float = 0.0) -> EgressUsage | None:
        return self.known_usage(sandbox_id)

    def known_usage(self, sandbox_id: str) -> EgressUsage | None:
        counted = self._served.get(sandbox_id)
        if counted is None:
            return None
        return added_usage(counted, self._gateway.usage(sandbox_id))

    async def close(self, sandbox_id: str) -> EgressUsage | None:
        counted = self._served.pop(sandbox_id, None)
        if counted is None:
            return None
        usage = await self._gateway.close(sandbox_id)
        return counted if usage is None else added_usage(counted, usage)

    async def close_all(self) -> None:
        self._served.clear()
        await self._gateway.close_all()
