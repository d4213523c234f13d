"""Counting every gRPC call of the service (`CallMetrics`, the outermost interceptor): by
method and status code, with its duration; the data bytes of file transfers; and each
command's init and terminal frames for the dashboard's recent commands (`command_log`).

Per call: one `add_done_callback` on its context, whose callback (run by grpc when the call
ends) reads the code and observes the duration. File transfers count requests as the raw bytes
of their frames (this interceptor is the outermost, so it sees them before they are parsed) and
answers at `context.write`; Exec and RunCommand have their `context.write` watched for the
terminal frame (one `WhichOneof` per frame). Measured: within the noise of an exec
(docs/benchmarks.md).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from aviato.server.command_log import COMMANDS, CommandRecord, shorten
from aviato.server.metrics import FILE_BYTES, IMAGE_PULLS, RPC_SECONDS, RPCS
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["CallMetrics"]

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
