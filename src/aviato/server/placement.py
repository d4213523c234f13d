"""Placement: which node runs a new sandbox, and which runtime serves an existing one.

The lifecycle asks `runtime_for_new(config)` when it creates a sandbox, records the returned node
name, and later asks `runtime_of(node)` (after a restart too). `LocalPlacement` has one node,
"local", served by one runtime on this machine. `aviato.cluster.placement.RayPlacement` maps
Ray node ids to runtimes living in node-host actors, and defers the choice of a node (node "")
to `place`, which the lifecycle awaits while the sandbox is PENDING.

What a placement does not do: capacity accounting (the lifecycle does that) and retries on
another node when a runtime refuses.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path

from aviato.runtime.base import Runtime, SandboxConfig

__all__ = ["LocalPlacement", "Placement", "UnknownNode"]


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
    def nodes(self) -> dict[str, Runtime]:
        """Every node with its runtime (for reconciliation and server info)."""

    @abc.abstractmethod
    def main_log_path(self, node: str, sandbox_id: str) -> Path | None:
        """Where the main log of a sandbox lives while its runtime state exists (None: unknown)."""

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

    def __init__(self, runtime: Runtime, state_dir: Path) -> None:
        self._runtime = runtime
        self._state_dir = state_dir

    def runtime_for_new(self, config: SandboxConfig) -> tuple[str, Runtime]:
        return self.NODE, self._runtime

    def runtime_of(self, node: str) -> Runtime:
        if node not in (self.NODE, ""):
            raise UnknownNode(node)
        return self._runtime

    def nodes(self) -> dict[str, Runtime]:
        return {self.NODE: self._runtime}

    def main_log_path(self, node: str, sandbox_id: str) -> Path | None:
        # The layout of docs/internals/layout.md: <state>/sandboxes/<id>/main.log.
        return self._state_dir / "sandboxes" / sandbox_id / "main.log"
