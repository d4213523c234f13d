"""The node host's side of egress (cluster/node_egress.py) without Ray: its requests are the
node protocol's bytes, its gateway real, its listener a real socket on this machine's loopback
that a stand-in handle gives (as a supervisor gives the sandbox's, the same socket every time).

What must hold: the policy and the figures a request carries are applied; a node host that
restarts (a new NodeEgress on the same state directory) serves again the listeners of the
sandboxes still there, under their last policy, and forgets the others; closing gives the final
figures and forgets the sandbox for good.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from aviato.cluster import codec
from aviato.cluster.node_egress import NodeEgress
from aviato.egress.gateway import EgressUsage
from aviato.egress.host import ListenerSource
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.model import EgressPolicy, EgressRule

# Nothing is reachable: every CONNECT is judged by policy alone, never connected.
ONLY_DOCS = EgressPolicy(rules=(EgressRule(cidr="203.0.113.0/24"),))
NAMESERVERS = ("192.0.2.53",)  # never asked: the requests name addresses


class _Listener:
    """Stands in for a SandboxHandle: gives the same listening socket on every call."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))

    async def egress_listener(self) -> socket.socket:
        return self.socket.dup()


def _open_request(sandbox_id: str, policy: EgressPolicy, counted: EgressUsage) -> bytes:
    return npb.OpenEgressRequest(
        sandbox_id=sandbox_id,
        policy=codec.encode_policy(policy),
        counted=codec.encode_egress_usage(counted),
    ).SerializeToString()


async def _connect_status(port: int, target: str) -> int:
    """The status the proxy on `port` answers a CONNECT to `target` with."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        return int(line.split()[1])
    finally:
        writer.close()


def _usage(node: NodeEgress, sandbox_id: str) -> EgressUsage | None:
    request = npb.EgressUsageRequest(sandbox_ids=[sandbox_id, "sbx-unknown"]).SerializeToString()
    answer = npb.EgressUsages.FromString(node.usage(request))
    assert "sbx-unknown" not in answer.usage
    found = answer.usage.get(sandbox_id)
    return None if found is None else codec.decode_egress_usage(found)


async def _scenario(state: Path) -> None:
    listener = _Listener()
    port = listener.socket.getsockname()[1]
    handles: dict[str, ListenerSource] = {"sbx-a": listener}

    async def handle_of(sandbox_id: str) -> ListenerSource:
        return handles[sandbox_id]

    first = NodeEgress(state, NAMESERVERS)
    await first.open(_open_request("sbx-a", ONLY_DOCS, EgressUsage(refused=10)), handle_of)
    assert await _connect_status(port, "198.51.100.7:443") == 403
    assert _usage(first, "sbx-a") == EgressUsage(refused=11)

    # A policy that admits nothing, applied and kept for a restarted host.
    update = npb.UpdateEgressRequest(
        sandbox_id="sbx-a", policy=codec.encode_policy(EgressPolicy())
    ).SerializeToString()
    await first.update(update)
    assert await _connect_status(port, "203.0.113.9:443") == 403

    # The node host dies (its gateway with it); a new one serves the listener again at start.
    await first.close_all()
    second = NodeEgress(state, NAMESERVERS)
    await second.restore({"sbx-a": listener, "sbx-gone": listener})
    assert await _connect_status(port, "203.0.113.9:443") == 403  # the last policy, served
    assert _usage(second, "sbx-a") == EgressUsage(refused=11)  # counted at open, and this one

    final = npb.EgressUsages.FromString(await second.close("sbx-a"))
    assert codec.decode_egress_usage(final.usage["sbx-a"]) == EgressUsage(refused=11)
    assert not npb.EgressUsages.FromString(await second.close("sbx-a")).usage
    third = NodeEgress(state, NAMESERVERS)
    await third.restore({"sbx-a": listener})
    assert _usage(third, "sbx-a") is None  # closed for good: not served again
    listener.socket.close()


def test_a_restarted_node_host_serves_its_sandboxes_egress_again(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path))


def test_an_unreadable_egress_file_serves_nothing_and_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "egress.json").write_text("{not json")

    async def scenario() -> None:
        listener = _Listener()
        node = NodeEgress(tmp_path, NAMESERVERS)
        await node.restore({"sbx-a": listener})
        assert _usage(node, "sbx-a") is None
        listener.socket.close()

    asyncio.run(scenario())
    assert (tmp_path / "egress.json").read_text() == "{}"
