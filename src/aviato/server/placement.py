"""Placement: which node runs a new sandbox, and which runtime serves an existing one.

The lifecycle asks `runtime_for_new(config)` when it creates a sandbox, records the returned node
name, and later asks `runtime_of(node)` (after a restart too). `LocalPlacement` has one node,
"local", served by one runtime on this machine. `aviato.server.ray_placement.RayPlacement` maps
Ray node ids to runtimes living in node-host actors, and defers the choice of a node (node "")
to `place`, which the lifecycle awaits while the sandbox is PENDING. `egress(node)` is where
the egress proxies of a node's sandboxes run (aviato.egress.host): in this process for
"local", in the node's node host under Ray.

What a placement does not do: capacity accounting (the lifecycle does that) and retries on
another node when a runtime refuses.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aviato.egress.gateway import EgressGateway
from aviato.egress.host import EgressHost
from aviato.egress.resolver import Resolver
from aviato.egress.sandboxes import InProcessEgressHost
from aviato.runtime.base import Runtime, SandboxConfig
from aviato.runtime.volume_store import VolumeHost

__all__ = ["LocalPlacement", "NodeHealth", "Placement", "UnknownNode"]


@dataclass(frozen=True)
class NodeHealth:
    """What the placement knows of one node (the operator's view: metrics, the dashboard).

    `state`: "ready" (takes sandboxes), "starting" (its node host is starting), "lost" (left the
    cluster, or its node host was lost), "refused" (its node host speaks another protocol:
    `detail` says why). CPU and memory are what the node offers sandboxes (0: not counted)
    and what the sandboxes placed on it hold of that."""

    node: str
    hostname: str
    state: str
    cpu: float = 0.0
    memory_bytes: float = 0.0
    cpu_held: float = 0.0
    memory_held_bytes: float = 0.0
    sandboxes: int = 0
    detail: str = ""


class UnknownNode(LookupError):
    """A record names a node this placement does not know (e.g. the placement changed)."""


class Placement(abc.ABC):
    name: str

    @abc.abstractmethod
    def runtime_for_new(self, config: SandboxConfig) -> tuple[str, Runtime]:
        """The node and runtime that will run a new sandbox.

        Node "" defers the choice: the lifecycle then awaits `place` before creating.
        """

    async def place(
        self,
        config: SandboxConfig,
        waiting: Callable[[str], None],
        stopped: Callable[[], bool],
    ) -> tuple[str, Runtime] | None:
        """Chooses a node for a sandbox whose `runtime_for_new` deferred the choice.

        Waits for room, calling `waiting(reason)` while none is found; None once `stopped()`;
        raises a SandboxRuntimeError when it gives up (the message becomes the FAILED reason).
        """
        return self.runtime_for_new(config)

    @abc.abstractmethod
    def runtime_of(self, node: str) -> Runtime:
        """The runtime of a node named in a record; UnknownNode if there is none."""

    @abc.abstractmethod
    def egress(self, node: str) -> EgressHost:
        """Where the egress proxies of the sandboxes of a node named in a record run;
        UnknownNode if there is none."""

    @abc.abstractmethod
    def nodes(self) -> dict[str, Runtime]:
        """Every node with its runtime (for reconciliation and server info)."""

    def health(self) -> list[NodeHealth]:
        """Every node the placement knows, with its state (see `NodeHealth`)."""
        return [NodeHealth(node, node, "ready") for node in self.nodes()]

    @abc.abstractmethod
    def keep_log(self, node: str, sandbox_id: str, into: Path) -> None:
        """Moves the main log of a sandbox that ended to `into` (the service keeps it there for
        StreamLogs until the record is deleted or removed by the retention, `--keep-stopped`),
        before its runtime state is cleaned up.
        Nothing when there is no log; OSError when it cannot be moved."""

    def volume_host(self, node: str) -> VolumeHost | None:
        """The volumes of another machine's node (None: unknown, or the service's own store
        holds them, as for the local placement)."""
        return None

    async def refresh_usage(self) -> None:
        """Before each round of the usage history: fetches the readings that live on other
        machines, so that `SandboxHandle.usage()` answers without waiting. The default (every
        sandbox on this machine) has nothing to fetch."""
        return None

    async def start(self) -> None:
        """Connects to whatever the placement needs (a cluster); before the lifecycle starts."""
        return None

    async def close(self) -> None:
        """Closes every runtime; sandboxes keep running."""
        for runtime in self.nodes().values():
            await runtime.close()


class LocalPlacement(Placement):
    """Everything on this machine, node "local"."""

    name = "local"
    NODE = "local"

    def __init__(self, runtime: Runtime, egress_dns: Sequence[str] = ()) -> None:
        """`egress_dns`: the DNS servers the egress proxy asks (addresses; empty: this
        machine's /etc/resolv.conf)."""
        self._runtime = runtime
        self._egress_dns = tuple(egress_dns)
        self._egress: InProcessEgressHost | None = None

    def runtime_for_new(self, config: SandboxConfig) -> tuple[str, Runtime]:
        return self.NODE, self._runtime

    def runtime_of(self, node: str) -> Runtime:
        if node not in (self.NODE, ""):
            raise UnknownNode(node)
        return self._runtime

    def egress(self, node: str) -> EgressHost:
        self.runtime_of(node)  # UnknownNode for another node
        if self._egress is None:
            resolver = Resolver(self._egress_dns or None)
            self._egress = InProcessEgressHost(EgressGateway(resolver))
        return self._egress

    def nodes(self) -> dict[str, Runtime]:
        return {self.NODE: self._runtime}

    def keep_log(self, node: str, sandbox_id: str, into: Path) -> None:
        self.runtime_of(node).keep_log(sandbox_id, into)
