"""RayPlacement's choice of node, without a cluster: fits, selectors, reasons, waiting, deadline."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")

from aviato.runtime.base import SandboxConfig
from aviato.server.config import ServerConfig
from aviato.server.ray_placement import PlacementTimeout, RayPlacement, _Node

GiB = 1 << 30


def _placement(tmp_path: Path, timeout: float = 5.0) -> RayPlacement:
    config = ServerConfig(state_dir=tmp_path, placement="ray", placement_timeout_seconds=timeout)
    placement = RayPlacement(config)
    runtime: Any = object()  # only its presence matters to the choice
    placement._nodes = {
        "n1": _Node("n1", "host1", {"pool": "a"}, cpu=2, memory=4 * GiB, runtime=runtime),
        "n2": _Node("n2", "host2", {"pool": "b"}, cpu=4, memory=2 * GiB, runtime=runtime),
        "dead": _Node("dead", "host3", {"pool": "a"}, cpu=8, memory=64 * GiB, alive=False),
    }
    return placement


def _config(
    sid: str, memory: int | None = None, cpu: int | None = None, **selector: str
) -> SandboxConfig:
    return SandboxConfig(
        sandbox_id=sid, image="host", command=(), env={}, working_dir="",
        memory_bytes=GiB if memory is None else memory,  # the default a service resolves
        cpu_millis=cpu, node_selector=tuple(sorted(selector.items())),
    )  # fmt: skip


def test_most_free_memory_first_then_room_runs_out(tmp_path: Path) -> None:
    p = _placement(tmp_path)
    chosen = [p.choose(_config(f"s{i}")) for i in range(6)]  # 1 GiB each by default
    nodes = [c.id if isinstance(c, _Node) else None for c in chosen]
    assert nodes[:6].count("n1") == 4 and nodes.count("n2") == 2
    reason = p.choose(_config("s7"))
    assert isinstance(reason, str) and reason.startswith("waiting for room: needs cpu 0 memory 1Gi")
    holder = next(n for n in p._nodes.values() if "s1" in n.held)
    p._release(holder, "s1")
    assert isinstance(p.choose(_config("s8")), _Node)


def test_cpu_and_selectors(tmp_path: Path) -> None:
    p = _placement(tmp_path)
    got = p.choose(_config("c", memory=GiB, cpu=3000))
    assert isinstance(got, _Node) and got.id == "n2"  # only n2 has 3 cpus
    got = p.choose(_config("pinned", pool="a"))
    assert isinstance(got, _Node) and got.id == "n1"
    got = p.choose(_config("by-host", **{"aviato.node": "host2"}))
    assert isinstance(got, _Node) and got.id == "n2"
    reason = p.choose(_config("nowhere", pool="zzz"))
    assert isinstance(reason, str) and "matches node_selector {pool=zzz}" in reason


def test_place_waits_with_a_reason_then_fails_at_the_deadline(tmp_path: Path) -> None:
    p = _placement(tmp_path, timeout=0.6)
    reasons: list[str] = []

    async def main() -> None:
        with pytest.raises(PlacementTimeout, match=r"not placed within 0.6 s: waiting for room"):
            await p.place(_config("big", memory=8 * GiB), reasons.append, lambda: False)
        assert (
            await p.place(_config("stopped", memory=8 * GiB), reasons.append, lambda: True) is None
        )

    asyncio.run(main())
    assert reasons and "memory 8Gi" in reasons[0]


def test_each_node_host_bounds_all_its_sandboxes(tmp_path: Path) -> None:
    """A node host writes the bound on all of its sandboxes together to its parent cgroup, as a
    local service does: the operator's value, and where none was given, its own machine's
    default (not the control plane's)."""
    import os
    import secrets

    from reliability.harness import remove_cgroup_parent

    from aviato.cluster.nodehost import NodeHost
    from aviato.runtime.cgroups import default_parent_memory_bytes
    from aviato.server.ray_placement import node_host_args

    if os.geteuid() != 0:
        pytest.skip("writing cgroup limits needs root here")
    parent = f"aviato-test-{secrets.token_hex(4)}"
    config = ServerConfig(state_dir=tmp_path / "cp", ray_node_state_dir=str(tmp_path),
                          cgroup_parent=parent, cgroup_memory_bytes=None,
                          cgroup_pids=1234)  # fmt: skip
    host = NodeHost(*node_host_args(config, "n" * 16))

    async def limits() -> tuple[int | None, int | None]:
        runtime = host._new_runtime()
        try:
            if not runtime.cgroups.available:
                pytest.skip(f"no cgroups: {runtime.cgroups.reason}")
            return runtime.cgroups.parent_limits()
        finally:
            await runtime.close()

    try:
        memory, pids = asyncio.run(limits())
    finally:
        remove_cgroup_parent(parent)
    assert pids == 1234
    assert memory is not None and abs(memory - default_parent_memory_bytes()) < 1 << 20


def test_node_hosts_resolve_egress_names_with_the_services_dns(tmp_path: Path) -> None:
    """The service's --egress-dns reaches every node host (node_host_args); without it a node
    asks its own /etc/resolv.conf's servers."""
    from aviato.cluster.nodehost import NodeHost
    from aviato.server.ray_placement import node_host_args

    config = ServerConfig(state_dir=tmp_path / "cp", ray_node_state_dir=str(tmp_path),
                          egress_dns=("192.0.2.53", "2001:db8::53"))  # fmt: skip
    host = NodeHost(*node_host_args(config, "n" * 16))
    assert host._egress.nameservers == ("192.0.2.53", "2001:db8::53")
