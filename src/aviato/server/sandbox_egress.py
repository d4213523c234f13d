"""The egress of the service's sandboxes: each one's proxy listener served by the egress
gateway under the sandbox's current policy.

A sandbox gets its proxy when its egress is first opened: at the create when its config allows
egress (the supervisor then binds the listener before the main process starts, so that process
has HTTP_PROXY too), or by a later `SetNetwork`. The listener lives in the sandbox's network
namespace for the rest of its life (the supervisor keeps it), and from then on this service
accepts on it whatever the policy says, so that a program that uses the proxy while egress is
closed is refused at once instead of waiting on a listener nobody accepts from. The record's
`egress_listener` says whether the sandbox has one, so that a restarted service serves it again.

Under the Ray placement the sandbox's handle cannot hand its listener across nodes (it raises
Unsupported), and a sandbox asking for egress there fails to start, saying so.
"""

from __future__ import annotations

import logging

from aviato.egress.gateway import EgressGateway, EgressUsage
from aviato.runtime.base import SandboxHandle
from aviato.runtime.model import EgressPolicy
from aviato.server.records import NetworkUsage

__all__ = ["SandboxEgress"]

log = logging.getLogger("aviato.server.egress")


def _added(base: NetworkUsage, usage: EgressUsage) -> NetworkUsage:
    return NetworkUsage(
        bytes_sent=base.bytes_sent + usage.bytes_sent,
        bytes_received=base.bytes_received + usage.bytes_received,
        connections=base.connections + usage.connections,
        refused=base.refused + usage.refused,
    )


class SandboxEgress:
    """The served egress listeners of one service's sandboxes (use from its event loop)."""

    def __init__(self, gateway: EgressGateway) -> None:
        self._gateway = gateway
        # sandbox id -> what an earlier run of the service counted (the gateway counts anew)
        self._served: dict[str, NetworkUsage] = {}

    def serving(self, sandbox_id: str) -> bool:
        return sandbox_id in self._served

    async def open(
        self,
        sandbox_id: str,
        handle: SandboxHandle,
        policy: EgressPolicy,
        counted: NetworkUsage,
    ) -> None:
        """Serves the sandbox's proxy listener (created by its supervisor if it has none yet)
        under `policy`; `counted` is what earlier runs of the service counted for it, which its
        figures start from. Raises the handle's SandboxRuntimeError when it cannot give one."""
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

    def update(self, sandbox_id: str, policy: EgressPolicy) -> None:
        """Applies `policy` to a served sandbox (new requests at once; open connections it no
        longer admits are closed)."""
        if sandbox_id in self._served:
            self._gateway.update(sandbox_id, policy)

    def usage(self, sandbox_id: str) -> NetworkUsage | None:
        """The live figures of a served sandbox; None for one not served."""
        counted = self._served.get(sandbox_id)
        if counted is None:
            return None
        return _added(counted, self._gateway.usage(sandbox_id))

    async def close(self, sandbox_id: str) -> NetworkUsage | None:
        """Stops serving the sandbox (its connections are closed); its final figures."""
        counted = self._served.pop(sandbox_id, None)
        if counted is None:
            return None
        usage = await self._gateway.close(sandbox_id)
        return counted if usage is None else _added(counted, usage)

    async def close_all(self) -> None:
        self._served.clear()
        await self._gateway.close_all()
