"""The connection to the service: channels, credentials, retries and error translation.

- `get_client(base_url)` returns the `Client` of the running event loop for that address. Channels
  are created lazily and shared: one per (event loop, address). In practice that is one channel
  per address on the SDK's background loop.
- Addresses: ``unix:///abs/path.sock``; ``http://host[:port]`` (plaintext, port 80 by default);
  ``https://host[:port]`` (TLS with the system roots, or the CA bundle named by `AVIATO_TLS_CA`;
  port 443 by default). None means the embedded local service, found or started by
  `aviato._local.ensure_local_service` (in a worker thread, so the loop never blocks).
- `AVIATO_API_KEY` is sent as ``authorization: Bearer <key>`` metadata on every call.
- `Client.unary` retries UNAVAILABLE within a budget (20 s by default) with jittered
  exponential backoff; for the local service it also restarts the service if it has died. Only
  unary calls and the opening of file reads are retried (creates are safe because they carry a
  request id); a command is never sent twice: an exec that breaks is reported, never replayed,
  and one cut off because its sandbox ended (ABORTED) raises `SandboxTerminatedError`.
- `translate_error` is the one place where gRPC failures become `aviato.exceptions`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.aio

from aviato import _bridge, _defaults, _local
from aviato.exceptions import (
    AviatoAuthenticationError,
    AviatoConnectionError,
    AviatoError,
    SandboxError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxResourceExhaustedError,
    SandboxTerminatedError,
    SandboxTimeoutError,
    SandboxValidationError,
)
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc

__all__ = ["Client", "error_from_status", "get_client", "parse_base_url", "translate_error"]

logger = logging.getLogger("aviato")

R = TypeVar("R")

RETRY_BUDGET_SECONDS = 20.0
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
]


@dataclass(frozen=True)
class Target:
    """A parsed base URL: the gRPC target string and whether TLS is used."""

    url: str
    target: str
    secure: bool


def parse_base_url(url: str) -> Target:
    """Parses ``unix:///path``, ``http://host:port`` or ``https://host:port``."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        path = url[len("unix:") :]
        path = "/" + path.lstrip("/")
        if path == "/":
            raise ValueError(f"base URL {url!r}: a unix URL needs an absolute socket path")
        return Target(url, f"unix://{path}", secure=False)
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"base URL {url!r} has no host")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"base URL {url!r} must not have a path or query")
        port = parts.port or (443 if scheme == "https" else 80)
        host = parts.hostname
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return Target(url, f"{host}:{port}", secure=scheme == "https")
    raise ValueError(
        f"base URL {url!r}: expected unix:///path.sock, http://host:port or https://host:port"
    )


# --- error translation ------------------------------------------------------------------------


def _code_of(value: grpc.StatusCode | int) -> grpc.StatusCode:
    if isinstance(value, grpc.StatusCode):
        return value
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def error_from_status(
    code: grpc.StatusCode | int,
    details: str,
    *,
    op: str,
    sandbox_id: str | None = None,
    filepath: str | None = None,
) -> AviatoError:
    """Maps a status (a grpc.StatusCode, or a google.rpc.Code number from an exec error frame)
    and its message to the exception of `aviato.exceptions` that describes it."""
    status = _code_of(code)
    name = status.name
    details = details or name
    message = f"{op} failed: {details}"
    if filepath is not None and status in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    ):
        # A NOT_FOUND that names the sandbox rather than the file means the sandbox is gone.
        sandbox_gone = (
            status == grpc.StatusCode.NOT_FOUND
            and sandbox_id is not None
            and sandbox_id in details
            and filepath not in details
        )
        if not sandbox_gone:
            return SandboxFileError(
                f"{op} {filepath!r} failed: {details}",
                filepath=filepath,
                sandbox_id=sandbox_id,
                code=name,
            )
    if status == grpc.StatusCode.NOT_FOUND:
        what = f"sandbox {sandbox_id!r} not found" if sandbox_id else details
        return SandboxNotFoundError(
            f"{op} failed: {what}" if sandbox_id else message, sandbox_id=sandbox_id, code=name
        )
    if status in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AviatoAuthenticationError(
            f"{message} (set AVIATO_API_KEY to a valid key for this service)", code=name
        )
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return SandboxTimeoutError(message, sandbox_id=sandbox_id, code=name)
    if status == grpc.StatusCode.UNAVAILABLE:
        return AviatoConnectionError(f"{op} failed: service unavailable: {details}", code=name)
    if status == grpc.StatusCode.ABORTED:
        # The service's word for "cut off: the sandbox ended under it": never retried, since a
        # command that started once must not run again.
        return SandboxTerminatedError(message, sandbox_id=sandbox_id, code=name)
    if status == grpc.StatusCode.INVALID_ARGUMENT:
        return SandboxValidationError(message, sandbox_id=sandbox_id, code=name)
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return SandboxResourceExhaustedError(message, sandbox_id=sandbox_id, code=name)
    if status in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED):
        return SandboxNotRunningError(message, sandbox_id=sandbox_id, code=name)
    return SandboxError(message, sandbox_id=sandbox_id, code=name)


def translate_error(
    err: BaseException,
    *,
    op: str,
    sandbox_id: str | None = None,
    filepath: str | None = None,
) -> BaseException:
    """Turns a gRPC error into an `AviatoError`; other exceptions are returned unchanged."""
    if isinstance(err, grpc.aio.AioRpcError):
        return error_from_status(
            err.code(), err.details() or "", op=op, sandbox_id=sandbox_id, filepath=filepath
        )
    if isinstance(err, grpc.RpcError):
        code = getattr(err, "code", None)
        details = getattr(err, "details", None)
        return error_from_status(
            code() if callable(code) else grpc.StatusCode.UNKNOWN,
            (details() if callable(details) else None) or str(err),
            op=op,
            sandbox_id=sandbox_id,
            filepath=filepath,
        )
    return err


def is_unavailable(err: BaseException) -> bool:
    return isinstance(err, grpc.aio.AioRpcError) and err.code() == grpc.StatusCode.UNAVAILABLE


def _is_tls_failure(err: grpc.aio.AioRpcError) -> bool:
    details = err.details() or ""
    return "handshake failed" in details.lower() or "CERTIFICATE_VERIFY_FAILED" in details


# --- the client -------------------------------------------------------------------------------


class Client:
    """A channel to one service address on one event loop, with its stub and credentials."""

    def __init__(self, target: Target, *, local_state_dir: str | None = None) -> None:
        self.target = target
        self.local_state_dir = local_state_dir
        key = _defaults.api_key()
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {key}"),) if key else ()
        )
        if target.secure:
            ca_file = os.environ.get(_defaults.ENV_TLS_CA)
            root = None
            if ca_file:
                with open(ca_file, "rb") as f:
                    root = f.read()
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            self.channel = grpc.aio.secure_channel(target.target, creds, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(target.target, options=_CHANNEL_OPTIONS)
        self.stub = sandbox_pb2_grpc.SandboxServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.closed = False
        #: False once the service answered RunCommand with UNIMPLEMENTED (an older service):
        #: commands then run over Exec.
        self.run_command = True

    def __repr__(self) -> str:
        return f"<aviato Client {self.target.url}>"

    async def unary(
        self,
        method: str,
        request: Any,
        *,
        rpc_timeout: float | None,
        op: str,
        sandbox_id: str | None = None,
        filepath: str | None = None,
        retry: bool = True,
        budget: float | None = None,
    ) -> Any:
        """Calls a unary RPC of the stub by name; retries UNAVAILABLE; raises AviatoError."""
        fn: Callable[..., Awaitable[Any]] = getattr(self.stub, method)
        return await self.with_retry(
            lambda: fn(request, timeout=rpc_timeout, metadata=self.metadata),
            op=op,
            sandbox_id=sandbox_id,
            filepath=filepath,
            retry=retry,
            budget=budget,
        )

    async def with_retry(
        self,
        attempt: Callable[[], Awaitable[R]],
        *,
        op: str,
        sandbox_id: str | None = None,
        filepath: str | None = None,
        retry: bool = True,
        budget: float | None = None,
    ) -> R:
        """Runs `attempt` (which must be safe to repeat), retrying UNAVAILABLE within `budget`
        seconds with jittered exponential backoff; errors are translated."""
        deadline = time.monotonic() + (RETRY_BUDGET_SECONDS if budget is None else budget)
        delay = 0.05
        revive_error: BaseException | None = None
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as err:
                if _is_tls_failure(err):  # not transient: do not retry
                    raise AviatoConnectionError(
                        f"{op} failed: TLS handshake with {self.target.url} failed "
                        f"({err.details()}); if the service uses a private CA, set "
                        f"{_defaults.ENV_TLS_CA} to its certificate bundle",
                        code=err.code().name,
                    ) from None
                if retry and is_unavailable(err) and time.monotonic() + delay < deadline:
                    logger.debug("%s: service unavailable, retrying in %.2fs", op, delay)
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 2.0)
                    if self.local_state_dir is not None:
                        revive_error = await self._revive_local_service()
                    continue
                if revive_error is not None and is_unavailable(err):
                    raise revive_error from None  # why the local service is not there
                raise translate_error(
                    err, op=op, sandbox_id=sandbox_id, filepath=filepath
                ) from None

    async def write_file(
        self,
        sandbox_id: str,
        path: str,
        data: memoryview,
        *,
        mode: int,
        make_parents: bool,
        rpc_timeout: float,
    ) -> None:
        """Writes a whole file over the WriteFile stream (header, then 256 KiB chunks); a short
        write raises SandboxFileError. Retried from the start on UNAVAILABLE."""
        header = pb.WriteFileHeader(
            sandbox_id=sandbox_id, path=path, mode=mode, make_parents=make_parents
        )

        async def frames() -> AsyncIterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(header=header)
            for i in range(0, len(data), _defaults.FILE_CHUNK_BYTES):
                yield pb.WriteFileRequest(data=bytes(data[i : i + _defaults.FILE_CHUNK_BYTES]))
            yield pb.WriteFileRequest(end=True)

        async def attempt() -> Any:
            return await self.stub.WriteFile(frames(), timeout=rpc_timeout, metadata=self.metadata)

        response = await self.with_retry(
            attempt, op="write file", sandbox_id=sandbox_id, filepath=path
        )
        if response.size != len(data):
            raise SandboxFileError(
                f"write of {path!r} was incomplete: {response.size} of {len(data)} bytes",
                filepath=path,
                sandbox_id=sandbox_id,
            )

    async def _revive_local_service(self) -> BaseException | None:
        """The local service may have died: start it again (a no-op when it answers)."""
        try:
            await _ensure_local_service(self.local_state_dir)
        except Exception as err:
            return err
        return None

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                await self.channel.close(grace=None)


async def _ensure_local_service(state_dir: str | None) -> str:
    """`_local.ensure_local_service` (blocking) in a thread of its own, never the loop's default
    executor: that one refuses work once the interpreter has begun to exit, and a stop fired at
    the end of a script may still have to reach (or start) the local service then."""
    future: concurrent.futures.Future[str] = concurrent.futures.Future()

    def work() -> None:
        try:
            future.set_result(_local.ensure_local_service(state_dir))
        except BaseException as err:
            future.set_exception(err)

    threading.Thread(target=work, name="aviato-local-service", daemon=True).start()
    return await asyncio.wrap_future(future)


# (loop, key) -> Client. Weak on the loop so that a closed loop's clients go away.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Client]] = (
    weakref.WeakKeyDictionary()
)
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)
_exit_hook_registered = False


async def get_client(base_url: str | None) -> Client:
    """The shared client of the running loop for `base_url` (None: the local service)."""
    loop = asyncio.get_running_loop()
    per_loop = _clients.get(loop)
    if per_loop is None:
        per_loop = _clients.setdefault(loop, {})
    state_dir: str | None = None
    if base_url is None:
        state_dir = _local_state_dir()
        key = f"local:{state_dir}"
    else:
        key = base_url
    client = per_loop.get(key)
    if client is not None and not client.closed:
        return client
    lock = _locks.setdefault(loop, asyncio.Lock())
    async with lock:
        client = per_loop.get(key)
        if client is not None and not client.closed:
            return client
        if base_url is None:
            assert state_dir is not None
            socket_path = await _ensure_local_service(state_dir)
            client = Client(parse_base_url(f"unix://{socket_path}"), local_state_dir=state_dir)
        else:
            client = Client(parse_base_url(base_url))
        per_loop[key] = client
        _register_exit_hook()
        return client


_state_dirs: dict[tuple[str | None, str | None, str | None], str] = {}


def _local_state_dir() -> str:
    """`_local.state_dir()`, remembered per value of the variables it depends on: it is asked on
    every call (every exec), and resolving it with pathlib each time was 1-2 % of an exec."""
    env = os.environ
    key = (env.get("AVIATO_STATE_DIR"), env.get("XDG_STATE_HOME"), env.get("HOME"))
    found = _state_dirs.get(key)
    if found is None:
        found = str(_local.state_dir())
        if all(v is None or v.startswith(("/", "~")) for v in key[:2]):  # else it needs the cwd
            _state_dirs[key] = found
    return found


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if _exit_hook_registered:
        return
    _exit_hook_registered = True

    async def _close_clients() -> None:
        loop = asyncio.get_running_loop()
        for client in list(_clients.get(loop, {}).values()):
            await client.close()

    _bridge.get_bridge().add_exit_hook(_close_clients, order=_bridge.EXIT_ORDER_CHANNELS)
