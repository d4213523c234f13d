"""Assembles and runs the service: registry, runtime, lifecycle, gRPC server, sockets, pid file.

`serve(config, stop)` runs until `stop` is set, then closes gracefully: it stops accepting calls,
gives running calls a short grace, cancels its own tasks and closes the runtime, the registry and
the socket. Sandboxes keep running (a restart re-attaches them).

One service per state directory: `server.pid` is held with an exclusive flock for the life of the
process, so a second service on the same directory fails at once instead of stealing the socket.
The unix socket is created under umask 077 and chmod'ed 0600: it needs no API key, so only the
service's own user may connect.

What this cannot do: make TCP safe without TLS. `--listen` without `--tls-cert/--tls-key` serves
plaintext (API keys travel in the clear); it logs a warning and is meant for loopback or tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import importlib
import inspect
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from aviato._private import open_private, secure_tree
from aviato.server.admin import AdminServicer
from aviato.server.api import SandboxServicer
from aviato.server.auth import Authenticator
from aviato.server.call_metrics import CallMetrics
from aviato.server.command_log import COMMANDS
from aviato.server.config import ServerConfig, parse_listen
from aviato.server.images_api import ImageServicer
from aviato.server.lean_listener import LeanListener, MethodTable
from aviato.server.lifecycle import Lifecycle
from aviato.server.local_files_api import LOCAL_FILES, local_file_handlers
from aviato.server.placement import LocalPlacement, Placement
from aviato.server.registry import Registry
from aviato.server.snapshots import SnapshotService
from aviato.v1 import admin_pb2_grpc, images_pb2_grpc, sandbox_pb2_grpc
from aviato.v1.local_frames import local_socket_path

if TYPE_CHECKING:
    from aviato.server.http_side import HttpSide

__all__ = ["AlreadyRunning", "StartupError", "configure_logging", "serve"]

log = logging.getLogger("aviato.server")

MAX_MESSAGE_BYTES = 8 << 20
SHUTDOWN_GRACE_SECONDS = 2.0

GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]


class _MalformedRequests(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Answers a request message that does not parse with INVALID_ARGUMENT.

    grpc parses requests before the servicer runs and reports a protobuf DecodeError (corrupt
    wire format, a string field that is not UTF-8) as UNKNOWN, or, inside a request stream, as
    whatever the servicer makes of the exception (INTERNAL). Here every handler receives raw
    bytes and parses them itself; a request that does not parse ends the call with
    INVALID_ARGUMENT "request: ...", and a streaming handler is closed (an exec's command is
    killed as when its client goes away). The end of a request stream is confirmed before the
    handler sees it (`_confirm_end`): a client killed mid-upload, or while it feeds an exec's
    stdin, must not look like one that finished (a partial file committed, a command seeing
    the end of a half-sent input).
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, Any] = {}  # method → wrapped handler (known methods only)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            # grpc's stubs type the handlers of the synchronous API; these are the asyncio ones.
            handler: Any = await continuation(details)
            if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED
                return None
            wrapped = self._wrapped[details.method] = self._wrap(handler)
        return wrapped

    @staticmethod
    def _wrap(handler: Any) -> Any:
        parse = getattr(handler, "request_deserializer", None)
        if parse is None:
            return handler
        serialize = handler.response_serializer

        async def one(raw: bytes, context: Any) -> Any:
            try:
                return parse(raw)
            except Exception as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _malformed(e))

        async def many(
            raws: AsyncIterator[bytes],
            context: Any,
            handler_task: asyncio.Task[Any] | None,
            confirm_end: bool = False,
        ) -> AsyncIterator[Any]:
            async for raw in raws:
                try:
                    message = parse(raw)
                except Exception as e:
                    try:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _malformed(e))
                    finally:
                        # Read by another task of the handler (exec's input pump): the handler
                        # itself may be waiting for output, so end it (its cleanup kills the
                        # command) now that the client has its status.
                        if handler_task is not None and handler_task is not asyncio.current_task():
                            handler_task.cancel()
                yield message
            if confirm_end:
                await _confirm_end(context)

        if not handler.request_streaming and not handler.response_streaming:
            inner_uu = handler.unary_unary

            async def uu(raw: bytes, context: Any) -> Any:
                return await inner_uu(await one(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(uu, response_serializer=serialize)
        if not handler.request_streaming:
            inner_us = handler.unary_stream
            if not inspect.isasyncgenfunction(inner_us):  # writes with context.write()

                async def us_writes(raw: bytes, context: Any) -> Any:
                    return await inner_us(await one(raw, context), context)

                return grpc.unary_stream_rpc_method_handler(
                    us_writes, response_serializer=serialize
                )

            async def us(raw: bytes, context: Any) -> AsyncIterator[Any]:
                request = await one(raw, context)
                async for response in inner_us(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(us, response_serializer=serialize)
        if not handler.response_streaming:
            inner_su = handler.stream_unary

            async def su(raws: AsyncIterator[bytes], context: Any) -> Any:
                requests = many(raws, context, asyncio.current_task(), confirm_end=True)
                return await inner_su(requests, context)

            return grpc.stream_unary_rpc_method_handler(su, response_serializer=serialize)
        inner_ss = handler.stream_stream
        if not inspect.isasyncgenfunction(inner_ss):  # writes with context.write()

            async def ss_writes(raws: AsyncIterator[bytes], context: Any) -> Any:
                requests = many(raws, context, asyncio.current_task(), confirm_end=True)
                return await inner_ss(requests, context)

            return grpc.stream_stream_rpc_method_handler(ss_writes, response_serializer=serialize)

        async def ss(raws: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
            requests = many(raws, context, asyncio.current_task(), confirm_end=True)
            async for response in inner_ss(requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(ss, response_serializer=serialize)


async def _confirm_end(context: Any) -> None:
    """Returns if the client ended its request stream; raises CancelledError if it went away.

    grpc ends a request stream the same way in both cases, and learns of a lost client (its
    cancellation of the handler) a moment later: WriteFile would commit a half-sent upload in
    that moment, and an exec would close its command's stdin as if the input were complete.
    One more read is a round trip through grpc's core, which knows by then: on a lost call the
    handler is cancelled before the read returns. (A read, not a send: sending headers here
    could collide with the handler's own abort.)
    """
    try:
        await context.read()
    except asyncio.CancelledError:
        raise
    except Exception as e:
        raise asyncio.CancelledError(f"the client went away before ending its stream: {e}") from e


def _malformed(e: Exception) -> str:
    return f"request: not a valid message: {e}"


class StartupError(RuntimeError):
    """The service cannot start (bad configuration, port in use, ...). The message says why."""


class AlreadyRunning(StartupError):
    pass


class _LogfmtFormatter(logging.Formatter):
    """One line per record: `ts=... level=... logger=... msg="..."` (plus the traceback)."""

    _second = -1
    _second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # formatted once a second, not per line
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        ts = self._second_text
        msg = record.getMessage().replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        line = (
            f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f'logger={record.name} msg="{msg}"'
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The formatter shows none of these: each costs every record a lookup (the logging HOWTO's
    # "Optimization"; a create logs a line, and the service's loop runs the handler).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # grpc's and asyncio's debug output would drown ours.
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))


def _lock_pid_file(path: Path) -> int:
    fd = open_private(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise AlreadyRunning(
            f"another aviato server is running on {path.parent} (pid {other or '?'})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _remove_stale_socket(path: Path) -> None:
    """Removes a socket left by a dead service (we hold the pid lock, so no live one owns it)."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise AlreadyRunning(f"{path} answers although no server holds the pid lock")


def _build_placement(config: ServerConfig) -> Placement:
    if config.placement == "ray":
        from aviato.server.ray_placement import RayPlacement

        return RayPlacement(config)
    if config.placement != "local":
        raise StartupError(f"--placement: {config.placement!r} is not available")
    from aviato.runtime.bubblewrap import BubblewrapRuntime
    from aviato.runtime.cgroups import ParentLimits

    # Warm pool members (nobody's) never take a place of `--max-sandboxes` from users.
    bound = config.max_sandboxes + config.warm_pool if config.max_sandboxes else 1_000_000
    runtime = BubblewrapRuntime(
        config.state_dir,
        max_sandboxes=bound,
        cgroup_parent=config.cgroup_parent,
        parent_limits=ParentLimits.of_this_machine(config.cgroup_memory_bytes, config.cgroup_pids),
        insecure_registries=config.insecure_registries,
        image_limits=config.image_limits(),
    )
    return LocalPlacement(runtime, config.egress_dns)


def _bind(server: grpc.aio.Server, config: ServerConfig) -> None:
    sock = config.socket_path
    _remove_stale_socket(sock)
    old_umask = os.umask(0o077)
    try:
        server.add_insecure_port(f"unix:{sock}")
    finally:
        os.umask(old_umask)
    os.chmod(sock, 0o600)
    if config.listen:
        host, port = parse_listen(config.listen)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if config.tls_cert or config.tls_key:
            if not (config.tls_cert and config.tls_key):
                raise StartupError("--tls-cert and --tls-key must be given together")
            try:
                creds = grpc.ssl_server_credentials(
                    [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())]
                )
            except OSError as e:
                raise StartupError(f"cannot read the TLS files: {e}") from e
            bound = server.add_secure_port(address, creds)
        else:
            log.warning("serving plaintext TCP on %s: API keys are sent in the clear", address)
            bound = server.add_insecure_port(address)
        if not bound:
            raise StartupError(f"--listen: cannot bind {address}")
        log.info("listening on tcp %s (%s)", address, "tls" if config.tls_cert else "plaintext")


async def _start_http(
    config: ServerConfig, lifecycle: Lifecycle, placement: Placement, registry: Registry
) -> HttpSide:
    """Starts the HTTP side at `config.http`; StartupError when it cannot bind."""
    # aiohttp is loaded only by a service that serves HTTP (about 0.15 s of CPU), as ray only by
    # one that places on Ray; in a thread, so that a service already answering keeps answering.
    module = await asyncio.to_thread(importlib.import_module, "aviato.server.http_side")
    http: HttpSide = module.HttpSide(config, lifecycle, placement, Authenticator(registry))
    try:
        await http.start()
    except OSError as e:
        raise StartupError(str(e)) from e
    return http


async def _start_default_http(
    config: ServerConfig,
    lifecycle: Lifecycle,
    placement: Placement,
    registry: Registry,
    servicer: SandboxServicer,
) -> HttpSide | None:
    """The loopback default (`config.default_http`), started once the API answers: a service
    that cannot bind it (no loopback in its network namespace) runs on without it."""
    try:
        http = await _start_http(config, lifecycle, placement, registry)
    except StartupError as e:
        log.warning("no HTTP side on %s: %s", config.http, e)
        return None
    servicer.http_address = http.address
    return http


async def _start_lean(
    config: ServerConfig, table: MethodTable, interceptors: list[Any]
) -> LeanListener | None:
    """The lean local listener beside the gRPC socket (docs/internals/transport.md); None, and
    clients use gRPC, when its path cannot be bound (too long for a unix socket)."""
    path = Path(local_socket_path(str(config.socket_path)))
    _remove_stale_socket(path)
    listener = LeanListener(path, table, interceptors)
    try:
        await listener.start()
    except OSError as e:
        log.warning("no lean local socket (clients use gRPC): %s", e)
        return None
    return listener


async def serve(
    config: ServerConfig, stop: asyncio.Event, placement: Placement | None = None
) -> None:
    """Runs the service until `stop` is set. Raises StartupError if it cannot start.

    `placement` replaces the one `config.placement` names (tests use a fake runtime).
    """
    try:  # private to the service's user, every start (aviato._private)
        secure_tree(config.state_dir)
    except OSError as e:
        raise StartupError(f"state directory {config.state_dir}: {e}") from e
    pid_fd = _lock_pid_file(config.pid_path)
    registry: Registry | None = None
    lifecycle: Lifecycle | None = None
    snapshots: SnapshotService | None = None
    server: grpc.aio.Server | None = None
    lean: LeanListener | None = None
    http: HttpSide | None = None
    http_start: asyncio.Task[HttpSide | None] | None = None
    try:
        registry = Registry(config.registry_path)
        placement = placement or _build_placement(config)
        try:
            await placement.start()
        except Exception as e:
            raise StartupError(f"placement {placement.name}: {e}") from e
        lifecycle = Lifecycle(registry, placement, config)
        lifecycle.when_deleted(COMMANDS.forget)
        await lifecycle.start()
        snapshots = SnapshotService(lifecycle, registry, placement)
        await snapshots.start()
        if config.http and not config.http_by_default:  # the operator's: bound before ready
            http = await _start_http(config, lifecycle, placement, registry)
            config = dataclasses.replace(config, http=http.address)  # the port, if it was 0
        interceptors = [CallMetrics(), _MalformedRequests()]  # metrics outermost: see call_metrics
        server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
        servicer = SandboxServicer(lifecycle, Authenticator(registry), placement, config, snapshots)
        images = ImageServicer(Authenticator(registry), placement)
        admin = AdminServicer(registry)
        table = MethodTable()  # the same handlers, for the lean local socket
        for target in (server, table):
            sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(servicer, target)  # type: ignore[no-untyped-call]
            images_pb2_grpc.add_ImageServiceServicer_to_server(images, target)  # type: ignore[no-untyped-call]
            admin_pb2_grpc.add_AdminServicer_to_server(admin, target)  # type: ignore[no-untyped-call]
        table.add_registered_method_handlers(LOCAL_FILES, local_file_handlers(servicer))
        # The lean socket first: a client that finds the gRPC socket answering finds it too.
        lean = await _start_lean(config, table, interceptors)
        _bind(server, config)
        await server.start()
        if config.http and config.http_by_default:
            servicer.http_address = ""  # until it is bound
            http_start = asyncio.create_task(
                _start_default_http(config, lifecycle, placement, registry, servicer)
            )
        log.info(
            "aviato server ready pid=%d state_dir=%s socket=%s",
            os.getpid(), config.state_dir, config.socket_path,
        )  # fmt: skip
        await stop.wait()
        log.info("shutting down (sandboxes keep running)")
    finally:
        if http_start is not None:
            http_start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                http = await http_start
        if http is not None:
            await http.close()
        if lean is not None:
            await lean.close(SHUTDOWN_GRACE_SECONDS)
        if server is not None:
            await server.stop(SHUTDOWN_GRACE_SECONDS)
        if snapshots is not None:
            await snapshots.close()
        if lifecycle is not None:
            await lifecycle.close()
        if placement is not None:
            with contextlib.suppress(Exception):
                await placement.close()
        if registry is not None:
            registry.close()
        if server is not None:
            config.socket_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            config.pid_path.unlink()
        os.close(pid_fd)
        log.info("stopped")
