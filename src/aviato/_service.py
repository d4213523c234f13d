"""`server_info()`: what a service says about itself (`ServerInfo`), asked once and quickly.

Unlike the sandbox calls, this does not ride out an unreachable service: it is the question
"is it there, and what is it?", so one attempt within a short deadline answers it. It never
starts a local service unless asked to (`start_local=True`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from aviato import _defaults
from aviato._bridge import get_bridge
from aviato._client import ensure_local_service
from aviato._transport.grpc import GrpcTransport
from aviato.exceptions import AviatoConnectionError
from aviato.v1 import endpoint
from aviato.v1 import sandbox_pb2 as pb

__all__ = ["ServerInfo", "server_info"]

DEFAULT_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """A service's description of itself (`aviato.server_info`)."""

    #: where it was reached: ``unix:///...``, ``https://host:port``, ...
    url: str
    version: str
    #: where sandboxes are placed, e.g. "local" or "ray"
    placement: str
    #: which isolation runs sandboxes, e.g. "bubblewrap 0.11.0 (...)"
    runtime: str
    #: "v1", "v2" or "none" (no limits can be applied)
    cgroups: str
    state_dir: str
    #: the caller's running sandboxes
    sandboxes_running: int
    #: 0 when unbounded
    max_sandboxes: int
    #: the bound on all sandboxes of the node together (told only to the service's own user)
    sandbox_limits: str
    #: the caller's quota and what its live sandboxes hold
    quota: str
    #: how sandboxes reach the network when their egress allows it (docs/networking.md)
    egress: str = ""
    #: where the service's HTTP side (/metrics, the dashboard) listens; "" when it is off
    http: str = ""
    #: how often the service samples each sandbox's usage (0: never; docs/operations.md)
    usage_interval_seconds: float = 0.0
    #: the warm pool of ready sandboxes (`aviato server --warm-pool N`), told only to the
    #: service's own user; "" when it keeps none
    warm_pool: str = ""
    #: how long the records and logs of ended sandboxes are kept (`aviato server
    #: --keep-stopped`), e.g. "7d" or "forever"; the service's own user also learns how many
    #: were removed since the service started
    kept_stopped: str = ""

    @classmethod
    def _of(cls, url: str, info: pb.ServerInfo) -> ServerInfo:
        return cls(
            url=url,
            version=info.version,
            placement=info.placement,
            runtime=info.runtime,
            cgroups=info.cgroups,
            state_dir=info.state_dir,
            sandboxes_running=info.sandboxes_running,
            max_sandboxes=info.max_sandboxes,
            sandbox_limits=info.sandbox_limits,
            quota=info.quota,
            egress=info.egress,
            http=info.http,
            usage_interval_seconds=info.usage_interval_seconds,
            warm_pool=info.warm_pool,
            kept_stopped=info.kept_stopped,
        )


def server_info(
    base_url: str | None = None,
    *,
    start_local: bool = True,
    state_dir: str | os.PathLike[str] | None = None,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> ServerInfo:
    """Asks the service (`base_url`, else `AVIATO_BASE_URL`, else the local one) about itself.

    One attempt within `timeout_seconds`: raises `AviatoConnectionError` at once when nothing
    answers (a refused connection, a failed TLS handshake, no answer in time). For the local
    service: with `start_local` (the default) it is started if it is not running, as any SDK
    call would; without, a service that is not running raises `AviatoConnectionError`.
    `state_dir` picks the local service of another state directory (default: `AVIATO_STATE_DIR`,
    else the user's). Blocks; from async code run it in a thread.
    """
    url = _defaults.resolve_base_url(base_url, None)
    return get_bridge().run(_ask(url, start_local, state_dir, timeout_seconds))


async def _ask(
    url: str | None, start_local: bool, state_dir: str | os.PathLike[str] | None, deadline: float
) -> ServerInfo:
    if url is None and start_local:
        socket_path = await ensure_local_service(None if state_dir is None else str(state_dir))
        url = f"unix://{socket_path}"
    elif url is None:
        socket = endpoint.socket_path(endpoint.state_dir(state_dir))
        if not socket.exists():
            raise AviatoConnectionError(
                f"the local aviato service is not running (no socket at {socket})",
                code="UNAVAILABLE",
            )
        url = f"unix://{socket}"
    transport = GrpcTransport(url, api_key=_defaults.api_key())
    try:
        return ServerInfo._of(transport.url, await transport.server_info(call_timeout=deadline))
    finally:
        await transport.close()
