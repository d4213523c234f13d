"""The volumes of one Ray node: `NodeVolumes` in its node host, `RemoteVolumes` for the control
plane (node.proto's volumes block; docs/volumes.md, "Under Ray").

A volume lives on its home node, in that node host's state directory (a `VolumeStore`:
runtime/volume_store.py), because its files must be where the sandboxes that mount it run; the
control plane places those sandboxes there (server/volumes.py). The control plane sends a
sandbox's config with each volume named by owner key, name and size, and host directories by the
path asked for; the node host fills in what to bind (`NodeVolumes.resolve`) before it creates
the sandbox: volumes are made on first use, host directories checked against the operator's
allowed trees on this node's own disk (`--allow-host-mount`: the control plane sends its list
at each of its starts, `allow_host_mounts`; the node host keeps it in `host-mounts.json` for a
restart of its own).

What survives: the files and (for sized volumes) their mounts, across restarts of the node host
and of the control plane; not a move of the node's state directory (a node whose Ray node id
changed starts with a new one: its volumes stay in the old one, unreachable).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

from aviato._private import private_dir, write_private
from aviato.cluster.link import NodeLink
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import SandboxConfig
from aviato.runtime.host_mounts import HostMounts
from aviato.runtime.volume_store import VolumeStore

__all__ = ["NodeVolumes", "RemoteVolumes"]


class NodeVolumes:
    """This node's volumes and allowed host directories (use from the node host's loop)."""

    def __init__(self, state_dir: Path) -> None:
        self.store = VolumeStore(state_dir)
        self._allowed_path = state_dir / "host-mounts.json"
        try:
            allowed = [str(p) for p in json.loads(self._allowed_path.read_text())]
        except (OSError, ValueError, TypeError):
            allowed = []
        self.host_mounts = HostMounts(allowed)

    def allow_host_mounts(self, paths: tuple[str, ...]) -> None:
        """The host directories sandboxes may mount from now on (kept for a restart)."""
        self.host_mounts = HostMounts(paths)
        private_dir(self._allowed_path.parent)
        write_private(self._allowed_path, json.dumps(list(paths)).encode())

    async def start(self) -> None:
        """Removes what deletes left behind when an earlier node host stopped during one."""
        await asyncio.to_thread(self.store.clear_trash)

    async def resolve(self, config: SandboxConfig) -> SandboxConfig:
        """`config` with each mount's `source` on this node: volumes made (and mounted) on first
        use, host paths resolved under the allowed trees (PathRefused otherwise)."""
        if not config.mounts:
            return config
        mounts = []
        for mount in config.mounts:
            if mount.host_path:
                source = self.host_mounts.resolve(mount.host_path)
            else:
                source = await asyncio.to_thread(
                    self.store.ensure, mount.volume_key, mount.volume, mount.size_bytes
                )
            mounts.append(replace(mount, source=source))
        return replace(config, mounts=tuple(mounts))

    async def usage(self, request_message: bytes) -> bytes:
        """`npb.VolumeRef` -> `npb.VolumeUsage`."""
        ref = npb.VolumeRef.FromString(request_message)
        size = await asyncio.to_thread(self.store.usage, ref.owner_key, ref.name)
        return npb.VolumeUsage(size_bytes=size).SerializeToString()

    async def delete(self, request_message: bytes) -> None:
        """Removes the files of the volume of an `npb.VolumeRef` (nothing when it has none)."""
        ref = npb.VolumeRef.FromString(request_message)
        await asyncio.to_thread(self.store.delete, ref.owner_key, ref.name)


class RemoteVolumes:
    """A node's volumes, through its node host (a `VolumeHost`)."""

    def __init__(self, link: NodeLink) -> None:
        self._link = link

    async def usage(self, key: str, name: str) -> int:
        ref = npb.VolumeRef(owner_key=key, name=name).SerializeToString()
        return int(
            npb.VolumeUsage.FromString(await self._link.call("volume_usage", ref)).size_bytes
        )

    async def delete(self, key: str, name: str) -> None:
        ref = npb.VolumeRef(owner_key=key, name=name).SerializeToString()
        await self._link.call("delete_volume", ref)
