"""`ServiceState`: the gauges of /metrics read from the service when scraped (see metrics.py,
which holds the event counters and the registry this collector is added to)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aviato.server.records import SandboxStatus

if TYPE_CHECKING:
    from aviato.server.lifecycle import Lifecycle
    from aviato.server.placement import Placement

__all__ = ["ServiceState"]


class ServiceState(Collector):
    """Gauges read from the service when scraped (see the module docstring)."""

    def __init__(self, lifecycle: Lifecycle, placement: Placement, max_sandboxes: int) -> None:
        self._lifecycle = lifecycle
        self._placement = placement
        self._max_sandboxes = max_sandboxes

    def collect(self) -> Iterator[Metric]:
        records = self._lifecycle.live_records()
        history = self._lifecycle.usage
        by_state: dict[tuple[str, str], int] = defaultdict(int)
        owners: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0])
        for rec in records:
            by_state[(_STATUS_NAMES[rec.status], rec.config.image)] += 1
            totals = owners[rec.owner]
            totals[0] += 1
            recent = history.recent(rec.id)
            if recent is not None:
                totals[1] += max(0, recent[0])
                totals[2] += max(0, recent[1])
                totals[3] += recent[2] or 0.0
            usage = rec.network_usage
            totals[4] += usage.bytes_sent
            totals[5] += usage.bytes_received
        sandboxes = GaugeMetricFamily(
            "aviato_sandboxes", "Live sandboxes by status and image", labels=["status", "image"]
        )
        for (status, image), count in sorted(by_state.items()):
            sandboxes.add_metric([status, image], count)
        yield sandboxes
        yield GaugeMetricFamily(
            "aviato_sandboxes_max", "The service's bound on live sandboxes (0: none)",
            value=self._max_sandboxes,
        )  # fmt: skip
        families = [
            ("aviato_owner_sandboxes", "Live sandboxes per owner"),
            ("aviato_owner_memory_bytes", "Memory charged to each owner's live sandboxes"),
            ("aviato_owner_pids", "Tasks in each owner's live sandboxes"),
            ("aviato_owner_cpu_cores", "CPU cores each owner's live sandboxes used between "
                                       "their last two samples"),
            ("aviato_owner_egress_sent_bytes", "Bytes each owner's live sandboxes sent out"),
            ("aviato_owner_egress_received_bytes", "Bytes each owner's live sandboxes received"),
        ]  # fmt: skip
        for index, (name, text) in enumerate(families):
            family = GaugeMetricFamily(name, text, labels=["owner"])
            for owner, totals in sorted(owners.items()):
                family.add_metric([owner], totals[index])
            yield family
        yield GaugeMetricFamily(
            "aviato_usage_samples", "Usage samples the service holds (all sandboxes)",
            value=history.sample_count(),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "aviato_usage_round_seconds", "How long the last sampling round took",
            value=history.last_round_seconds,
        )  # fmt: skip
        nodes = GaugeMetricFamily(
            "aviato_node_up", "1 for each node that takes sandboxes, 0 otherwise, by state",
            labels=["node", "hostname", "state"],
        )  # fmt: skip
        held = GaugeMetricFamily(
            "aviato_node_sandboxes", "Live sandboxes on each node", labels=["node"]
        )
        per_node: dict[str, int] = defaultdict(int)
        for rec in records:
            per_node[rec.node] += 1
        for node in self._placement.health():
            nodes.add_metric([node.node, node.hostname, node.state], node.state == "ready")
            held.add_metric([node.node], per_node.get(node.node, 0))
        yield nodes
        yield held


_STATUS_NAMES = {status: status.name.lower() for status in SandboxStatus}
