"""The volumes of one Ray node: `NodeVolumes` in its node host, `RemoteVolumes` for the control
plane (node.proto's volumes block; docs/volumes.md, "Under Ray").

A volume lives on its home node, in that node host's state directory (a `VolumeStore`:
runtime/volume_store.py), because its files must be where the sandboxes that mount it run; the
control plane places those sandboxes there (server/volumes.py). The control plane sends a
sandbox's config with each volume named by owner key, name and size, and host directories by the
path asked for; the node host fills in what to bind (`NodeVolumes.resolve`) before it creates
the sandbox: volumes are made on first use, host directories checked against the operator's
allowed trees on this node's own disk (`--allow-host-mount`: the control plane sends its list
at each of its starts, `configure`; the node host keeps it in `mounts.json` for a restart of its
own). A volume in the shared volume directory (`--ray-volume-dir`) comes with its directory
named (`source`), made by the control plane on the same shared filesystem; the node host checks
that it lies there, and binds it as any volume.

What survives: the files and (for sized volumes) their mounts, across restarts of the node host
and of the control plane; not a move of the node's state directory (a node whose Ray node id
changed starts with a new one: its volumes stay in the old one, unreachable).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path

from aviato._private import private_dir, write_private
from aviato.cluster.link import NodeLink
from aviato.node.v1 import node_pb2 as npb
from aviato.runtime.base import PathRefused, SandboxConfig
from aviato.runtime.host_mounts import HostMounts
from aviato.runtime.volume_store import VolumeStore

__all__ = ["NodeVolumes", "RemoteVolumes"]


class NodeVolumes:
    """This node's volumes and allowed host directories (use from the node host's loop)."""

    def __init__(self, state_dir: Path) -> None:
        self.store = VolumeStore(state_dir)
        self._kept = state_dir / "mounts.json"
        try:
            kept = json.loads(self._kept.read_text())
            allowed, shared = [str(p) for p in kept["host_mounts"]], str(kept["volume_dir"])
        except (OSError, ValueError, TypeError, KeyError):
            allowed, shared = [], ""
        self.host_mounts = HostMounts(allowed)
        self._shared = shared

    def configure(self, host_mounts: tuple[str, ...], volume_dir: str) -> None:
        """The host directories sandboxes may mount, and the shared volume directory ("" none),
        from now on (kept for a restart)."""
        self.host_mounts = HostMounts(host_mounts)
        self._shared = volume_dir
        private_dir(self._kept.parent)
        plain = {"host_mounts": list(host_mounts), "volume_dir": volume_dir}
        write_private(self._kept, json.dumps(plain).encode())

    def _shared_source(self, source: str) -> str:
        """A volume's directory in the shared volume directory, which the control plane made
        and named: it must lie there (and be a directory on this node too)."""
        below = os.path.join(self._shared, "volumes", "") if self._shared else ""
        if not below or not source.startswith(below) or ".." in source.split("/"):
            raise PathRefused(
                f"{source!r} is not in this node's shared volume directory "
                f"({self._shared or 'none'}); the control plane and its node hosts disagree"
            )
        if not os.path.isdir(source):
            raise PathRefused(
                f"the shared volume directory {self._shared} does not hold {source!r} on this "
                "node: is it mounted here (the same filesystem as on the control plane)?"
            )
        return source

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
            elif mount.source:  # in the shared volume directory
                source = self._shared_source(mount.source)
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
