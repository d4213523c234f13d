"""The service's Prometheus metrics (docs/operations.md lists them), with `prometheus-client`.

Two kinds:

- **Events**, counted where they happen, in this module's registry (`REGISTRY`): every gRPC
  call by method and status code with its duration (`CallMetrics`, an interceptor that only
  registers a done-callback per call), exec errors sent in-band by code (`errors.error_frame`),
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

import inspect
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from aviato.server.command_log import COMMANDS, CommandRecord, shorten
from aviato.server.records import SandboxRecord, SandboxStatus
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato.server.lifecycle import Lifecycle
    from aviato.server.placement import Placement

__all__ = [
    "EXEC_ERRORS",
    "FILE_BYTES",
    "IMAGE_PULLS",
    "REGISTRY",
    "CallMetrics",
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


# -- the calls ---------------------------------------------------------------------------------

_UPLOADS = frozenset({"WriteFile", "UploadTree"})
_DOWNLOADS = frozenset({"ReadFile", "DownloadTree"})
_PULL = "PullImage"


class _Downloads:
    """A servicer context whose `write` counts the data bytes of file frames."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        FILE_BYTES.labels("out").inc(len(message.data))
        await self._context.write(message)


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class _ExecWatch:
    """A servicer context that notes a command's terminal frame in the command log."""

    __slots__ = ("_context", "_init", "_started_ns")

    def __init__(self, context: Any) -> None:
        self._context = context
        self._init: pb.ExecInit | None = None
        self._started_ns = time.time_ns()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def note_init(self, raw: Any, *, exec_request: bool) -> None:
        try:
            if exec_request:
                request = pb.ExecRequest.FromString(raw)
                self._init = request.init if request.WhichOneof("msg") == "init" else None
            else:
                self._init = pb.ExecInit.FromString(raw)
        except Exception:  # malformed: the inner interceptor answers it
            self._init = None

    async def write(self, message: Any) -> None:
        kind = message.WhichOneof("msg")
        if (kind == "exit" or kind == "error") and self._init is not None:
            self._note(message, kind)
        await self._context.write(message)

    def _note(self, message: Any, kind: str) -> None:
        init = self._init
        assert init is not None
        self._init = None  # one terminal frame per command
        if kind == "exit":
            usage = message.exit.usage
            record = CommandRecord(
                shorten(list(init.argv)), self._started_ns, message.exit.exit_code, "",
                usage.wall_seconds, usage.cpu_user_seconds + usage.cpu_system_seconds,
                usage.peak_memory_bytes,
            )  # fmt: skip
        else:
            code = _CODE_NAMES.get(message.error.code, "UNKNOWN")
            wall = (time.time_ns() - self._started_ns) / 1e9
            record = CommandRecord(
                shorten(list(init.argv)), self._started_ns, None, code, wall, 0.0, 0
            )
        COMMANDS.add(init.sandbox_id, record)


async def _watched(requests: Any, watch: _ExecWatch) -> Any:
    first = True
    async for raw in requests:
        if first:
            first = False
            watch.note_init(raw, exec_request=True)
        yield raw


class CallMetrics(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every call by method and status code and observes its duration.

    Per call: one `add_done_callback` on its context; the callback (run by grpc when the call
    ends) reads the code and observes. File transfers also count their data bytes: requests as
    the raw bytes of their frames (this interceptor is the outermost, so it sees them before
    they are parsed), answers at `context.write`.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, Any] = {}

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler: Any = await continuation(details)
            if handler is None:
                return None
            wrapped = self._wrapped[details.method] = _wrap(details.method, handler)
        return wrapped


def _wrap(path: str, handler: Any) -> Any:
    method = path.rsplit("/", 1)[-1]
    calls, seconds = RPCS, RPC_SECONDS.labels(method)
    pull = method == _PULL

    def begin(context: Any) -> None:
        started = time.perf_counter()

        def done(ctx: Any) -> None:
            code = ctx.code()
            name = code.name if isinstance(code, grpc.StatusCode) else "OK"
            if ctx.cancelled() and code is None:
                name = "CANCELLED"
            calls.labels(method, name).inc()
            seconds.observe(time.perf_counter() - started)
            if pull:
                IMAGE_PULLS.labels("ok" if name == "OK" else "failed").inc()

        context.add_done_callback(done)

    serialize = handler.response_serializer
    parse = handler.request_deserializer
    if not handler.request_streaming and not handler.response_streaming:
        inner_uu = handler.unary_unary

        async def uu(request: Any, context: Any) -> Any:
            begin(context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            uu, request_deserializer=parse, response_serializer=serialize
        )
    if not handler.request_streaming:
        inner_us = handler.unary_stream
        download = method in _DOWNLOADS

        async def us(request: Any, context: Any) -> Any:
            begin(context)
            if download:
                return await inner_us(request, _Downloads(context))
            if method == "RunCommand":
                watch = _ExecWatch(context)
                watch.note_init(request, exec_request=False)
                return await inner_us(request, watch)
            return await inner_us(request, context)

        if _is_asyncgen(inner_us):

            async def us_gen(request: Any, context: Any) -> Any:
                begin(context)
                async for response in inner_us(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                us_gen, request_deserializer=parse, response_serializer=serialize
            )
        return grpc.unary_stream_rpc_method_handler(
            us, request_deserializer=parse, response_serializer=serialize
        )
    upload = method in _UPLOADS
    if not handler.response_streaming:
        inner_su = handler.stream_unary

        async def su(requests: Any, context: Any) -> Any:
            begin(context)
            return await inner_su(_uploaded(requests) if upload else requests, context)

        return grpc.stream_unary_rpc_method_handler(
            su, request_deserializer=parse, response_serializer=serialize
        )
    inner_ss = handler.stream_stream
    if _is_asyncgen(inner_ss):

        async def ss_gen(requests: Any, context: Any) -> Any:
            begin(context)
            async for response in inner_ss(requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            ss_gen, request_deserializer=parse, response_serializer=serialize
        )

    async def ss(requests: Any, context: Any) -> Any:
        begin(context)
        if method == "Exec":
            watch = _ExecWatch(context)
            return await inner_ss(_watched(requests, watch), watch)
        return await inner_ss(requests, context)

    return grpc.stream_stream_rpc_method_handler(
        ss, request_deserializer=parse, response_serializer=serialize
    )


def _is_asyncgen(fn: Any) -> bool:
    return inspect.isasyncgenfunction(fn)


async def _uploaded(requests: Any) -> Any:
    counter = FILE_BYTES.labels("in")
    async for raw in requests:
        counter.inc(len(raw) if isinstance(raw, bytes) else len(getattr(raw, "data", b"")))
        yield raw


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
