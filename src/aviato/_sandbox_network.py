"""The network of a sandbox: where clients reach its exposed ports, what egress it has and what
went through it, and changing its egress while it runs.

`SandboxNetwork` is a base class of `aviato.Sandbox`, not used alone: `SandboxCore` provides
the state below (the last answer of the service, `_record`, and the spec it was created with).
docs/networking.md says how egress and ingress work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aviato import _defaults
from aviato._client import Client
from aviato._defaults import EgressRule, NetworkOptions
from aviato._operation import OperationRef
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["NetworkUsage", "SandboxNetwork"]


@dataclass(frozen=True)
class NetworkUsage:
    """What went through a sandbox's egress since it started: bytes it sent out and received
    on the connections it was allowed, those connections (plain HTTP requests count one
    each), and the connections its egress policy refused."""

    bytes_sent: int = 0
    bytes_received: int = 0
    connections: int = 0
    refused: int = 0


class SandboxNetwork:
    """Exposed ports and egress (see the module docstring); `Sandbox` provides the state."""

    _record: pb.Sandbox | None
    _spec: pb.SandboxSpec
    _request_timeout: float

    async def _ensure_started(self) -> None:
        raise NotImplementedError

    async def _client(self) -> Client:
        raise NotImplementedError

    def _require_id(self) -> str:
        raise NotImplementedError

    def _apply(self, record: pb.Sandbox) -> None:
        raise NotImplementedError

    def _known_spec(self) -> pb.SandboxSpec:
        """The spec as of the last answer of the service (egress changes), else as created."""
        return self._record.spec if self._record is not None else self._spec

    @property
    def exposed_ports(self) -> tuple[tuple[int, str], ...]:
        """Where a client reaches each exposed port (``network=NetworkOptions(exposed_ports=
        [8080])``) while the sandbox runs: (port, address) pairs such as
        ``((8080, "127.0.0.1:41234"),)``, in the order asked; ``dict(sb.exposed_ports)[8080]``
        is the address of port 8080. Empty until RUNNING and once ended. Known as of the last
        answer of the service (`wait`, `get_status`, `from_id`)."""
        if self._record is None:
            return ()
        return tuple((item.port, item.address) for item in self._record.exposed_ports)

    @property
    def service_address(self) -> str | None:
        """The address ("127.0.0.1:41234") of the first exposed port while the sandbox runs."""
        ports = self.exposed_ports
        return ports[0][1] if ports else None

    @property
    def applied_ingress_mode(self) -> str:
        """``"local"`` when the sandbox exposes ports (at addresses on the local service's
        host), else ``"none"``."""
        return "local" if self._spec.exposed_ports else "none"

    @property
    def applied_egress_mode(self) -> str:
        """``"isolated"`` (loopback only), ``"allowlist"`` (only what its `EgressRule`s list)
        or ``"internet"``, as of the last answer of the service (`set_network` changes it)."""
        spec = self._known_spec()
        if spec.egress_mode == "internet":
            return "internet"
        return "allowlist" if len(spec.egress) else "isolated"

    @property
    def egress_rules(self) -> tuple[EgressRule, ...]:
        """The sandbox's egress allow-list as of the last answer of the service."""
        return tuple(
            EgressRule(dns_name=r.dns_name) if r.WhichOneof("target") == "dns_name"
            else EgressRule(cidr=r.cidr)
            for r in self._known_spec().egress
        )  # fmt: skip

    @property
    def network_usage(self) -> NetworkUsage:
        """Bytes and connections through the sandbox's egress, as of the last answer of the
        service (refreshed by `get_status`, `wait`, `from_id`, `set_network`)."""
        if self._record is None:
            return NetworkUsage()
        u = self._record.network_usage
        return NetworkUsage(u.bytes_sent, u.bytes_received, u.connections, u.refused)

    def set_network(
        self, network: NetworkOptions | Mapping[str, Any] | None = None, **options: Any
    ) -> OperationRef[None]:
        """Replaces the sandbox's egress while it runs: ``sb.set_network(egress_mode=
        "internet")`` to open it for a set-up phase, ``sb.set_network(deny_egress=True)`` to
        close it again, ``sb.set_network(egress=[EgressRule(dns_name="pypi.org")])`` for an
        allow-list. Takes a `NetworkOptions` (or dict), or its egress fields as keywords.

        New connections follow the new policy at once and open connections it no longer admits
        are closed, when the returned ref resolves. Commands started after egress was first
        opened find the proxy in HTTP_PROXY/HTTPS_PROXY (the main process too, when the sandbox
        was created with egress). Exposed ports cannot change (ValueError if given)."""
        if network is not None and options:
            raise TypeError("set_network takes a NetworkOptions or keywords, not both")
        net = _defaults.coerce_network(network) if network is not None else None
        if net is None:
            net = NetworkOptions(**options)
        if net.exposed_ports or net.ingress_mode or net.deny_ingress:
            raise ValueError(
                "set_network changes egress only; exposed ports are fixed when the sandbox is "
                "created"
            )
        mode, rules = net.to_spec_egress()
        return OperationRef._of(self._set_network(mode, rules))

    async def _set_network(self, mode: str, rules: list[pb.EgressRule]) -> None:
        await self._ensure_started()
        sandbox_id = self._require_id()
        client = await self._client()
        request = pb.SetNetworkRequest(sandbox_id=sandbox_id, egress_mode=mode, egress=rules)
        record = await client.with_retry(
            lambda: client.transport.set_network(request, call_timeout=self._request_timeout),
            op="set network",
        )
        self._apply(record)
