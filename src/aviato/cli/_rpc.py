"""A blocking gRPC connection for the commands that the SDK does not cover.

`sh` (a TTY with resize), `logs -f`, `cp` with progress and `version` speak aviato.v1 directly.
They find the service exactly as the SDK does, through the SDK's own helpers: AVIATO_BASE_URL
when set (parsed by `aviato._client.parse_base_url`), otherwise the local service of the state
directory, started on first use by `aviato._local.ensure_local_service`. AVIATO_API_KEY travels as
`authorization: Bearer` metadata on every call.

Why not the SDK's channel: it is a grpc.aio channel bound to the SDK's background loop. A command
is one short-lived process with one stream at a time, and grpc's blocking iterators let Ctrl-C
and signal handlers (SIGWINCH for `sh`) run in the main thread as a terminal user expects.

`preflight()` exists because the SDK retries an unreachable service for 20 s before it gives up:
right for a training loop riding out a restart, too long for a person at a prompt who mistyped
AVIATO_BASE_URL.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from aviato import _client, _defaults, _local
from aviato.cli._output import CliError
from aviato.v1 import endpoint, sandbox_pb2_grpc
from aviato.v1 import sandbox_pb2 as pb

PREFLIGHT_SECONDS = 5.0


@dataclass
class Connection:
    """A channel, its stub, and the metadata to send with each call."""

    target: str
    channel: grpc.Channel
    stub: sandbox_pb2_grpc.SandboxServiceStub
    metadata: tuple[tuple[str, str], ...]

    def close(self) -> None:
        self.channel.close()


def base_url() -> str | None:
    """AVIATO_BASE_URL, or None for the local service."""
    return _defaults.resolve_base_url(None, None)


def local_socket(start: bool) -> Path:
    """The local service's socket; with `start`, the service is started if it is not running."""
    if start:
        return Path(_local.ensure_local_service(None))
    return endpoint.socket_path()


def _channel(url: str) -> grpc.Channel:
    try:
        target = _client.parse_base_url(url)
    except ValueError as exc:
        raise CliError(f"{_defaults.ENV_BASE_URL}: {exc}") from None
    if not target.secure:
        return grpc.insecure_channel(target.target)
    roots: bytes | None = None
    ca = os.environ.get(_defaults.ENV_TLS_CA, "").strip()
    if ca:
        try:
            roots = Path(ca).read_bytes()
        except OSError as exc:
            raise CliError(f"{_defaults.ENV_TLS_CA}={ca}: {exc.strerror}") from exc
    credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.secure_channel(target.target, credentials)


def connect(start_local: bool = True) -> Connection:
    """Open a channel to the service the SDK would use; see the module docstring."""
    url = base_url() or f"unix://{local_socket(start=start_local)}"
    channel = _channel(url)
    key = _defaults.api_key()
    return Connection(
        target=url,
        channel=channel,
        stub=sandbox_pb2_grpc.SandboxServiceStub(channel),  # type: ignore[no-untyped-call]
        metadata=(("authorization", f"Bearer {key}"),) if key else (),
    )


@contextmanager
def connection(start_local: bool = True) -> Iterator[Connection]:
    conn = connect(start_local=start_local)
    try:
        yield conn
    finally:
        conn.close()


def preflight() -> None:
    """Fail at once, with one clear line, when a remote AVIATO_BASE_URL does not answer.

    The first connection attempt decides: READY passes, a refused connection or a failed TLS
    handshake (TRANSIENT_FAILURE) fails, and so does no answer within PREFLIGHT_SECONDS. Nothing
    is checked for the local service: the SDK starts it when it is not running.
    """
    url = base_url()
    if url is None:
        return
    channel = _channel(url)
    states: queue.SimpleQueue[grpc.ChannelConnectivity] = queue.SimpleQueue()
    channel.subscribe(states.put, try_to_connect=True)
    deadline = time.monotonic() + PREFLIGHT_SECONDS
    try:
        while True:
            try:
                state = states.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                state = grpc.ChannelConnectivity.TRANSIENT_FAILURE
            if state == grpc.ChannelConnectivity.READY:
                return
            if state in (
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                grpc.ChannelConnectivity.SHUTDOWN,
            ):
                break
    finally:
        channel.unsubscribe(states.put)
        channel.close()
    hint = "is it running?"
    if url.startswith("https:"):
        hint += f" Is its certificate trusted (set {_defaults.ENV_TLS_CA} to its CA)?"
    raise CliError(
        f"cannot reach the aviato service at {url} (set by {_defaults.ENV_BASE_URL}); {hint}"
    )


def wait_started(conn: Connection, sandbox_id: str, timeout: float = 120.0) -> pb.Sandbox:
    """Block until the sandbox runs (or has ended) and return its record.

    A sandbox just made by `aviato run` may still be PENDING; an exec sent then would be refused.
    """
    request = pb.WaitSandboxRequest(
        sandbox_id=sandbox_id,
        condition=pb.WaitSandboxRequest.CONDITION_STARTED,
        timeout_seconds=timeout,
    )
    record: pb.Sandbox = conn.stub.WaitSandbox(
        request, metadata=conn.metadata, timeout=timeout + 10
    )
    return record


def translate(exc: grpc.RpcError, op: str, sandbox_id: str | None = None) -> BaseException:
    """The SDK's exception for a raw gRPC failure, so both paths print the same message."""
    return _client.translate_error(exc, op=op, sandbox_id=sandbox_id)
