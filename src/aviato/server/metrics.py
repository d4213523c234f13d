"""The service's Prometheus metrics (docs/operations.md lists them), with `prometheus-client`.

Two kinds:

- **Events**, counted where they happen, in this module's registry (`REGISTRY`): every gRPC
  call by method and status code with its duration (`call_metrics.CallMetrics`, an interceptor
  that registers a done-callback per call), exec errors sent in-band by code (`errors.error_frame`),
  file bytes moved, image pulls by result, and the time from create to RUNNING.
- **State**, read when scraped (`ServiceState`, a collector over the lifecycle, the usage
  history and the placement): live sandboxes by status and image, per-owner usage, egress
  bytes, nodes under Ray, the sampler's own cost.

Labels are bounded: methods and codes are fixed sets; owners are the registry's API key owners
(plus "local"); images are those of live sandboxes; nodes those the placement knows.

The registry is one per process (as is usual with prometheus-client): a second service in
the same process (tests) would add to the same event counters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from aviato.server.records import SandboxRecord, SandboxStatus

if TYPE_CHECKING:
    from aviato.server.lifecycle import Lifecycle
    from aviato.server.placement import Placement

__all__ = [
    "EXEC_ERRORS",
    "FILE_BYTES",
    "IMAGE_PULLS",
    "REGISTRY",
    "RPCS",
    "RPC_SECONDS",
    "SANDBOX_START_SECONDS",
    "ServiceState",
    "sandbox_started",
]

REGISTRY = CollectorRegistry()
disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series beside every counter (this process only)
ProcessCollector(registry=REGISTRY)  # the service's own CPU, memory, open files

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))  # fmt: skip

RPCS = Counter(
    "aviato_rpcs",
    "gRPC calls answered, by method and status code (errors: any code but OK)",
    ["method", "code"],
    registry=REGISTRY,
)
RPC_SECONDS = Histogram(
    "aviato_rpc_duration_seconds",
    "Duration of gRPC calls, by method (Exec and RunCommand: the whole command)",
    ["method"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
EXEC_ERRORS = Counter(
    "aviato_exec_errors",
    "Commands that ended with an error frame instead of an exit, by code",
    ["code"],
    registry=REGISTRY,
)
SANDBOX_START_SECONDS = Histogram(
    "aviato_sandbox_start_seconds",
    "Time from a sandbox's create to RUNNING (image pulls and waits for a node included)",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
IMAGE_PULLS = Counter(
    "aviato_image_pulls",
    "Image pulls, by result (ok, failed); PullImage calls and pulls for creates",
    ["result"],
    registry=REGISTRY,
)
FILE_BYTES = Counter(
    "aviato_file_bytes",
    "Bytes moved by file transfers (ReadFile, WriteFile, UploadTree, DownloadTree), by "
    "direction (in: to sandboxes)",
    ["direction"],
    registry=REGISTRY,
)


for _label in ("ok", "failed"):  # every series exists from the start, at 0
    IMAGE_PULLS.labels(_label)
for _label in ("in", "out"):
    FILE_BYTES.labels(_label)


def sandbox_started(rec: SandboxRecord) -> None:
    """Observes the create-to-RUNNING time of a sandbox that has just started."""
    if rec.started_ns is not None:
        SANDBOX_START_SECONDS.observe(max(0, rec.started_ns - rec.created_ns) / 1e9)


# -- the state, read when scraped --------------------------------------------------------------


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
