"""What the operator's view says of Ray nodes (`RayPlacement.health`, the `aviato_node_up`
metric), without a cluster: ready, starting, lost (the node, or its node host), refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray")

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aviato.server.config import ServerConfig
from aviato.server.metrics_state import ServiceState
from aviato.server.ray_placement import RayPlacement, _Node
from aviato.server.usage_history import UsageHistory

GiB = 1 << 30


def _runtime(lost: bool = False) -> Any:
    return SimpleNamespace(link=SimpleNamespace(lost=lost))


def test_each_node_s_state_reaches_the_metrics(tmp_path: Path) -> None:
    placement = RayPlacement(ServerConfig(state_dir=tmp_path, placement="ray"))
    placement._nodes = {
        "n1": _Node("n1", "host1", cpu=2, memory=4 * GiB, runtime=_runtime(),
                    held={"sbx-a": (1.0, GiB)}),
        "n2": _Node("n2", "host2", cpu=4, memory=2 * GiB),  # its node host is starting
        "n3": _Node("n3", "host3", runtime=_runtime(lost=True)),  # its node host was lost
        "n4": _Node("n4", "host4", alive=False),  # left the cluster
        "n5": _Node("n5", "host5", refused="speaks node protocol 3"),
    }  # fmt: skip
    health = {n.node: n for n in placement.health()}
    assert {k: n.state for k, n in health.items()} == {
        "n1": "ready", "n2": "starting", "n3": "lost", "n4": "lost", "n5": "refused",
    }  # fmt: skip
    assert health["n1"].cpu_held == 1.0 and health["n1"].memory_held_bytes == GiB
    assert health["n5"].detail == "speaks node protocol 3"

    lifecycle = SimpleNamespace(
        live_records=lambda owner=None: [], usage=UsageHistory(lambda: [], interval=0)
    )
    registry = CollectorRegistry()
    registry.register(ServiceState(lifecycle, placement, 10))  # type: ignore[arg-type]
    up = {
        s.labels["node"]: (s.labels["state"], s.value)
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
        if s.name == "aviato_node_up"
    }
    assert up == {
        "n1": ("ready", 1.0), "n2": ("starting", 0.0), "n3": ("lost", 0.0),
        "n4": ("lost", 0.0), "n5": ("refused", 0.0),
    }  # fmt: skip
