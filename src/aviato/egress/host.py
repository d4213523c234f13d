"""`EgressHost`: where the egress proxies of some sandboxes run, and how the service asks them.

The service serves each sandbox's egress through the host of the sandbox's node
(`Placement.egress(node)`): in its own process for the local placement
(`sandboxes.InProcessEgressHost`), in the node host of the sandbox's Ray node for the Ray
placement (`aviato.cluster.remote_egress.NodeEgressHost`, which runs an `InProcessEgressHost`
there). The proxy must run where the sandbox's listening socket can be handed over: on the
sandbox's own machine.

Figures are `gateway.EgressUsage`; `counted` (given at `open`) is what earlier runs counted,
which the figures start from.
"""

from __future__ import annotations

import abc
import socket
from typing import Protocol

from aviato.egress.gateway import EgressUsage
from aviato.runtime.model import EgressPolicy

__all__ = ["EgressHost", "ListenerSource"]


class ListenerSource(Protocol):
    """What gives a sandbox's proxy listener: `runtime.base.SandboxHandle` (named by its one
    method here, so that the egress layer needs no more of the runtime than its model)."""

    async def egress_listener(self) -> socket.socket: ...


class EgressHost(abc.ABC):
    """The served egress of the sandboxes of one place (use from the service's event loop).

    A sandbox is served from `open` to `close`; every other call is a no-op (or None) for a
    sandbox not served. Calls that reach another machine raise the runtime's
    SandboxRuntimeError when it does not answer.
    """

    @abc.abstractmethod
    def serving(self, sandbox_id: str) -> bool:
        """Whether this host serves the sandbox's egress (no I/O)."""

    @abc.abstractmethod
    async def open(
        self,
        sandbox_id: str,
        handle: ListenerSource,
        policy: EgressPolicy,
        counted: EgressUsage,
    ) -> None:
        """Serves the sandbox's proxy listener (its supervisor creates one if it has none yet)
        under `policy`; for a sandbox served already, applies `policy` (its figures go on).
        Raises SandboxRuntimeError or OSError when the listener cannot be had or served."""

    @abc.abstractmethod
    async def update(self, sandbox_id: str, policy: EgressPolicy) -> None:
        """Applies `policy` to a served sandbox: new requests at once; open connections it no
        longer admits are closed."""

    @abc.abstractmethod
    async def usage(self, sandbox_id: str, *, max_age: float = 0.0) -> EgressUsage | None:
        """The figures of a served sandbox (None for one not served), at most `max_age` seconds
        old (0: live). A host that cannot answer gives the figures it knows."""

    @abc.abstractmethod
    def known_usage(self, sandbox_id: str) -> EgressUsage | None:
        """The latest figures at hand without asking anyone (None for a sandbox not served):
        live in process, those of the last answer from another machine."""

    @abc.abstractmethod
    async def close(self, sandbox_id: str) -> EgressUsage | None:
        """Stops serving the sandbox (its connections are closed); its final figures, or None
        when it was not served. (A host that cannot answer gives the figures it knows.)"""

    @abc.abstractmethod
    async def close_all(self) -> None:
        """Forgets every sandbox as the service stops. In process, the proxies stop (their
        listeners stay in the sandboxes, for a restarted service); on another machine they go
        on serving (a restarted service finds them with `open`)."""
