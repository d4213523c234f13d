"""The writable layer of a bubblewrap sandbox, as bwrap arguments (docs/state.md).

| config | the layer | bwrap makes `/` with |
|---|---|---|
| memory, no snapshot | bwrap's tmpfs | `--size N --tmpfs /` (the image root's own arguments) |
| disk, no snapshot | ext4 on a loop device | `--bind LAYER/upper /` |
| disk, from a snapshot | ext4 on a loop device | the overlay below |
| memory, from a snapshot | a tmpfs of the disk size | the overlay below |

The overlay: `--overlay-src TREE --overlay LAYER/upper LAYER/work /`.

LAYER is the layer's mount as the launcher stages it (`writable_layers.LAYER_AT`); TREE is the
snapshot's tree in the launcher's read-only id-mapped view of the state directory. The overlay
makes a start from a snapshot copy-on-write: nothing is copied, a file is copied up into the
sandbox's own layer when it is first written, and a deletion is a whiteout there, so sandboxes
started from one snapshot never see each other's changes.
"""

from __future__ import annotations

import asyncio

from aviato.runtime.base import LimitsUnavailable, SandboxConfig
from aviato.runtime.bubblewrap.command import OwnUserns
from aviato.runtime.image_roots import ImageRoot
from aviato.runtime.snapshot_store import SnapshotNotFound, SnapshotStore
from aviato.runtime.writable_layers import LAYER_KINDS, Layer, WritableLayers

__all__ = ["check_layer", "layer_root"]


def _needs_mount(config: SandboxConfig) -> bool:
    return config.writable_layer == "disk" or bool(config.snapshot_id)


def check_layer(
    config: SandboxConfig, layers: WritableLayers | None, snapshots: SnapshotStore
) -> None:
    """Refuses, in words, a layer this node cannot make or a snapshot it does not hold."""
    if config.writable_layer not in LAYER_KINDS:
        raise LimitsUnavailable(f"unknown writable layer {config.writable_layer!r}")
    if not _needs_mount(config):
        return
    what = "a disk-backed writable layer" if not config.snapshot_id else "a start from a snapshot"
    if layers is None:
        raise LimitsUnavailable(
            f"this node cannot give {what}: it needs the service to run as root"
        )
    if layers.error:
        raise LimitsUnavailable(f"this node cannot give {what}: {layers.error}")
    if config.snapshot_id and not snapshots.exists(config.snapshot_id):
        raise SnapshotNotFound(f"snapshot {config.snapshot_id} not found on this node")


async def layer_root(
    config: SandboxConfig,
    root: ImageRoot,
    layers: WritableLayers,
    snapshots: SnapshotStore,
    userns: OwnUserns,
) -> tuple[Layer | None, ImageRoot]:
    """Makes the sandbox's layer mount when it needs one; returns it (None: bwrap's tmpfs) and
    the image root that builds `/` on it."""
    if not _needs_mount(config):
        return None, root
    layer = await asyncio.to_thread(
        layers.make, config.sandbox_id, config.writable_layer, config.disk_bytes
    )
    try:
        if config.snapshot_id:
            lower = userns.host_path(str(snapshots.tree(config.snapshot_id)))
            args = ["--overlay-src", lower, "--overlay", layer.staged(layer.upper),
                    layer.staged(layer.work), "/"]  # fmt: skip
        else:
            args = ["--bind", layer.staged(layer.upper), "/"]
        return layer, root.on_layer(args)
    except BaseException:
        await asyncio.to_thread(layers.remove, config.sandbox_id)
        raise
