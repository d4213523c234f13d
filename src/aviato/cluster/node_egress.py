"""`NodeEgress`: the egress proxies of one Ray node's sandboxes, served in its node host.

A sandbox's proxy must run on its own machine: its supervisor hands the listening socket over a
Unix socket (SCM_RIGHTS), which does not cross nodes. So the node host serves it with an
`InProcessEgressHost` of its own, resolving names with the DNS servers the control plane gave
it (the service's `--egress-dns`; none: this node's /etc/resolv.conf), and judging addresses
as this node sees them (its own addresses are "the host's own" and always refused). The control
plane drives it with the actor calls of node.proto's egress block
(`aviato.cluster.remote_egress`).

The policy of each served sandbox is kept in `<state dir>/egress.json`, so that a node host
that Ray restarted serves the sandboxes' listeners again at its start (their supervisors keep
the listeners; without a server their programs would wait on them). What it cannot keep: the
figures counted since the last `open` by a node host that died (a restarted one counts on from
those given at `open`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from aviato._private import write_private
from aviato.cluster import codec
from aviato.egress.gateway import EgressGateway, EgressUsage
from aviato.egress.host import ListenerSource
from aviato.egress.resolver import Resolver
from aviato.egress.sandboxes import InProcessEgressHost
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import SandboxRuntimeError

__all__ = ["NodeEgress"]

log = logging.getLogger("aviato.cluster.nodehost")


class NodeEgress:
    """The served egress of the sandboxes of this node (use from the node host's loop)."""

    def __init__(self, state_dir: Path, nameservers: Sequence[str]) -> None:
        self._resolver = Resolver(tuple(nameservers) or None)
        self._host = InProcessEgressHost(EgressGateway(self._resolver))
        self._path = state_dir / "egress.json"
        # sandbox id -> (policy payload, counted at open): what a restarted node host serves.
        self._kept: dict[str, tuple[str, EgressUsage]] = {}

    @property
    def nameservers(self) -> tuple[str, ...]:
        """The DNS servers the proxies ask."""
        return self._resolver.nameservers

    async def open(
        self, request_message: bytes, handle_of: Callable[[str], Awaitable[ListenerSource]]
    ) -> None:
        """Serves the sandbox's listener under the policy of an `npb.OpenEgressRequest`."""
        request = npb.OpenEgressRequest.FromString(request_message)
        policy = codec.decode_policy(request.policy)
        counted = codec.decode_egress_usage(request.counted)
        handle = await handle_of(request.sandbox_id)
        await self._host.open(request.sandbox_id, handle, policy, counted)
        kept = self._kept.get(request.sandbox_id)
        self._kept[request.sandbox_id] = (
            request.policy.model.decode(),
            counted if kept is None else kept[1],
        )
        self._save()

    async def update(self, request_message: bytes) -> None:
        """Applies the policy of an `npb.UpdateEgressRequest` to a served sandbox."""
        request = npb.UpdateEgressRequest.FromString(request_message)
        if not self._host.serving(request.sandbox_id):
            return
        await self._host.update(request.sandbox_id, codec.decode_policy(request.policy))
        self._kept[request.sandbox_id] = (
            request.policy.model.decode(),
            self._kept.get(request.sandbox_id, ("", EgressUsage()))[1],
        )
        self._save()

    def usage(self, request_message: bytes) -> bytes:
        """The figures (`npb.EgressUsages`) of the served sandboxes an `npb.EgressUsageRequest`
        names."""
        request = npb.EgressUsageRequest.FromString(request_message)
        answer = npb.EgressUsages()
        for sandbox_id in request.sandbox_ids:
            usage = self._host.known_usage(sandbox_id)
            if usage is not None:
                answer.usage[sandbox_id].CopyFrom(codec.encode_egress_usage(usage))
        return answer.SerializeToString()

    async def close(self, sandbox_id: str) -> bytes:
        """Stops serving the sandbox: its final figures (`npb.EgressUsages`, empty when it was
        not served)."""
        answer = npb.EgressUsages()
        if self._kept.pop(sandbox_id, None) is not None:
            self._save()
        usage = await self._host.close(sandbox_id)
        if usage is not None:
            answer.usage[sandbox_id].CopyFrom(codec.encode_egress_usage(usage))
        return answer.SerializeToString()

    async def restore(self, handles: Mapping[str, ListenerSource]) -> None:
        """Serves again, at the node host's start, the listeners of the sandboxes an earlier
        node host served that still run here (`handles`); forgets the others."""
        try:
            saved = json.loads(self._path.read_text())
            entries = {
                str(sid): (str(policy), EgressUsage(*(int(n) for n in counted)))
                for sid, (policy, counted) in saved.items()
            }
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError) as e:
            log.warning("egress.json is unreadable (%s): no egress is served again", e)
            entries = {}
        for sandbox_id, (payload, counted) in entries.items():
            handle = handles.get(sandbox_id)
            if handle is None:
                continue
            try:
                policy = codec.decode_policy(npb.EgressPolicy(model=payload.encode()))
                await self._host.open(sandbox_id, handle, policy, counted)
            except (SandboxRuntimeError, OSError) as e:
                log.warning("sandbox %s: its egress is not served again: %s", sandbox_id, e)
                continue
            self._kept[sandbox_id] = (payload, counted)
        self._save()

    async def close_all(self) -> None:
        """Stops serving every sandbox (the node host is stopping; the policies stay kept)."""
        await self._host.close_all()

    def _save(self) -> None:
        plain = {
            sid: [policy, [u.bytes_sent, u.bytes_received, u.connections, u.refused]]
            for sid, (policy, u) in self._kept.items()
        }
        write_private(self._path, json.dumps(plain).encode())
