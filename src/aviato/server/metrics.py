"""The service's Prometheus metrics (docs/operations.md lists them), with `prometheus-client`.

Two kinds:

- **Events**, counted where they happen, in this module's registry (`REGISTRY`): every gRPC
  call by method and status code with its duration (`call_metrics.CallMetrics`, an interceptor
  that registers a done-callback per call), exec errors sent in-band by code (`errors.error_frame`),
  file bytes moved, image pulls by result, and the time from create to RUNNING.
- **State**, read when scraped (`metrics_state.ServiceState`, a collector over the lifecycle,
  the usage history and the placement, registered on `REGISTRY` by the HTTP side): live
  sandboxes by status and image, per-owner usage, egress bytes, nodes under Ray, the
  sampler's own cost. Apart so that this module, imported where events happen (errors,
  sandbox runs), imports nothing of the service back.

Labels are bounded: methods and codes are fixed sets; owners are the registry's API key owners
(plus "local"); images are those of live sandboxes; nodes those the placement knows.

The registry is one per process (as is usual with prometheus-client): a second service in
the same process (tests) would add to the same event counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.process_collector import ProcessCollector

from aviato.server.records import SandboxRecord

__all__ = [
    "EXEC_ERRORS",
    "FILE_BYTES",
    "IMAGE_PULLS",
    "REGISTRY",
    "RPCS",
    "RPC_SECONDS",
    "SANDBOX_START_SECONDS",
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
