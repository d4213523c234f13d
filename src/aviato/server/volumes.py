"""Named volumes and operator-approved host directories (docs/volumes.md): what they are for
the control plane (records, owners, sizes, homes); their files are a `VolumeStore`'s
(runtime/volume_store.py) on the machine that holds them.

A volume belongs to one owner and name; the owner key (a digest of the owner's name, never a
path) names its files. It is created by the first sandbox that mounts it, persists until
`DeleteVolume`, and belongs to its owner alone: another owner's volume of the same name is
another volume, and a name the caller has no volume of is simply absent (never "exists but not
yours"). The registry records each (volume_records.py).

Sizes: a new volume gets the size its first mount asks for (`DirectoryMount.size_bytes`) or the
service's `volume_max_bytes`, which is also the largest it may ask; it is a filesystem of that
size (a hard bound). Volumes made before (directory volumes, `max_bytes` 0 in their row) keep
the measured bound: once one holds `volume_max_bytes`, mounting it read-write is refused.
Each owner may have `owner_max_volumes` volumes.

Placement: locally the service's own store holds every volume. Under Ray a volume lives on its
home node, the node of the first sandbox that mounted it (recorded after placement,
`settle_homes`); every later sandbox that mounts it gets the node selector `aviato.node=<home>`
added, and the node host makes the files and binds them. A sandbox whose volumes live on two
nodes is refused. With a shared volume directory (`--ray-volume-dir`, the same shared filesystem
on every node and here), new volumes are directory volumes there instead, usable from any node
(their `node` is SHARED); this service makes, measures and deletes them itself. Host
directories are checked here by their text (allowed trees) and, where they are bound, on the
disk (runtime/host_mounts.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from aviato.runtime.base import PathRefused, SandboxRuntimeError
from aviato.runtime.host_mounts import HostMounts
from aviato.runtime.model import DirectoryMount, SandboxConfig
from aviato.runtime.volume_store import MIN_VOLUME_BYTES, VolumeHost, VolumeStore
from aviato.server.errors import (
    CapacityExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from aviato.server.validation import validate_path
from aviato.server.volume_records import VolumeRecords, VolumeRow

__all__ = [
    "MAX_MOUNTS",
    "HostMounts",
    "VolumeInfo",
    "VolumeNotFound",
    "Volumes",
    "validate_mounts",
    "validate_volume_name",
]

log = logging.getLogger("aviato.server.volumes")

MAX_MOUNTS = 32
NODE_KEY = "aviato.node"  # the node selector's key that ray_placement matches to a node id
# The `node` of a volume in the shared volume directory (--ray-volume-dir): it has no home.
SHARED = "(shared)"
# How long a listing or a delete waits for a volume's node.
NODE_CALL_SECONDS = 10.0
MAX_VOLUME_NAME = 64
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Where a volume may not be mounted: the kernel's filesystems and aviato's own.
_RESERVED = ("/proc", "/dev", "/sys", "/.aviato")


class VolumeNotFound(NotFound):
    """The caller has no volume of that name (another owner's of that name is not seen)."""


def validate_volume_name(name: str, field: str) -> str:
    """A volume's name: letters, digits, '.', '_', '-', starting with a letter or digit
    (so never '.', '..' or a path), at most 64 characters."""
    if not name:
        raise InvalidArgument(field, "a volume needs a name")
    if len(name) > MAX_VOLUME_NAME:
        raise InvalidArgument(field, f"a volume name has at most {MAX_VOLUME_NAME} characters")
    if not _VOLUME_NAME.fullmatch(name):
        raise InvalidArgument(
            field,
            f"{name!r} is not a volume name: use letters, digits, '.', '_' and '-', starting "
            "with a letter or digit (no '/', no '..')",
        )
    return name


def validate_mounts(
    items: Iterable[tuple[str, str, str, bool, int]], field: str
) -> tuple[DirectoryMount, ...]:
    """(path, volume, host_path, read_only, size_bytes) of a request as mounts: absolute,
    normalized, distinct sandbox paths, none inside another or in a reserved tree; exactly one
    of volume and host_path each; host paths absolute and normalized, always read-only, without
    a size; sizes not negative."""
    result: list[DirectoryMount] = []
    for i, (path_text, volume, host_path, read_only, size) in enumerate(items):
        item = f"{field}[{i}]"
        if i >= MAX_MOUNTS:
            raise InvalidArgument(field, f"more than {MAX_MOUNTS} mounts")
        path = validate_path(path_text, f"{item}.path")
        if path == "/":
            raise InvalidArgument(f"{item}.path", "a mount cannot replace '/'")
        for reserved in _RESERVED:
            if path == reserved or path.startswith(reserved + "/"):
                raise InvalidArgument(
                    f"{item}.path", f"{path!r} is inside {reserved}, which is reserved"
                )
        if bool(volume) == bool(host_path):
            raise InvalidArgument(item, "give exactly one of a volume name and a host path")
        if size < 0:
            raise InvalidArgument(
                f"{item}.size_bytes", f"a volume's size cannot be negative ({size})"
            )
        if volume:
            validate_volume_name(volume, f"{item}.volume")
        elif size:
            raise InvalidArgument(
                f"{item}.size_bytes", "a host directory has no size; give it to volumes only"
            )
        else:
            host_path = validate_path(host_path, f"{item}.host_path")
            read_only = True
        for other in result:
            if other.path == path:
                raise InvalidArgument(f"{item}.path", f"{path!r} is mounted twice")
            if path.startswith(other.path + "/") or other.path.startswith(path + "/"):
                raise InvalidArgument(
                    f"{item}.path",
                    f"{path!r} and {other.path!r}: one mount cannot lie inside another",
                )
        result.append(
            DirectoryMount(
                path=path, volume=volume, host_path=host_path, read_only=read_only,
                size_bytes=size,
            )
        )  # fmt: skip
    return tuple(result)


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    size_bytes: int
    max_size_bytes: int
    created_ns: int
    used_by: tuple[str, ...]
    node: str = ""
    size_enforced: bool = False


def owner_key(owner: str) -> str:
    """The name of an owner's volumes on disk (a digest: an owner's name is never a path)."""
    return hashlib.sha256(owner.encode()).hexdigest()[:32]


class Volumes:
    """The service's volumes: their records, sizes, homes, and who mounts them.

    `store`: the local placement's volumes (this machine's). `volume_host(node)`: the volumes
    of a Ray node (None when the node is unknown: gone); None for the local placement.
    `shared_dir`: under Ray, the shared volume directory ("" none)."""

    def __init__(
        self,
        state_dir: Path,
        records: VolumeRecords,
        *,
        max_bytes: int,
        owner_max_volumes: int,
        host_mounts: HostMounts,
        placement: str,
        volume_host: Callable[[str], VolumeHost | None] | None = None,
        shared_dir: str = "",
    ) -> None:
        self.store = VolumeStore(state_dir)
        self._shared = (
            VolumeStore(Path(shared_dir)) if shared_dir and placement != "local" else None
        )
        self._records = records
        self.max_bytes = max_bytes
        self.owner_max_volumes = owner_max_volumes
        self.host_mounts = host_mounts
        self._placement = placement
        self._volume_host = volume_host

    @property
    def _remote(self) -> bool:
        return self._placement != "local"

    def directory(self, owner: str, name: str) -> Path:
        """Where a local directory volume's files are."""
        return self.store.directory(owner_key(owner), name)

    # --- create ---

    def resolve(self, owner: str, config: SandboxConfig) -> SandboxConfig:
        """`config` with each mount made ready: volumes created on first use (counted against
        the owner's number of volumes), sized, and (locally) their files made and `source`
        filled in, (under Ray) their home node put in the node selector; host paths checked
        against the allowed trees. Raises a ServiceError in words."""
        if not config.mounts:
            return config
        key = owner_key(owner)
        mounts: list[DirectoryMount] = []
        homes: dict[str, str] = {}  # node -> a volume that lives there
        for i, mount in enumerate(config.mounts):
            field = f"spec.mounts[{i}]"
            if mount.host_path:
                mounts.append(replace(mount, source=self._host_source(mount, field)))
                continue
            row = self._ensure_record(owner, mount, field)
            mount = replace(mount, volume_key=key, size_bytes=row.max_bytes)
            store = self.store
            if self._remote:
                if row.node == SHARED and self._shared is None:
                    raise FailedPrecondition(
                        f"{field}.volume: volume {mount.volume!r} lives in the shared volume "
                        "directory, which this service no longer has (aviato server "
                        "--ray-volume-dir)"
                    )
                if row.node != SHARED:
                    if row.node:
                        homes.setdefault(row.node, mount.volume)
                    mounts.append(mount)
                    continue
                assert self._shared is not None  # refused above otherwise
                store = self._shared
            source = self._local_source(owner, mount, row, field, store)
            mounts.append(replace(mount, source=source))
        config = replace(config, mounts=tuple(mounts))
        return self._pin_to_home(config, homes) if homes else config

    def _host_source(self, mount: DirectoryMount, field: str) -> str:
        if self._remote:  # checked by its text here, on the disk by the node host
            refused = self.host_mounts.refusal(mount.host_path)
            if refused:
                raise InvalidArgument(f"{field}.host_path", refused)
            return ""
        try:
            return self.host_mounts.resolve(mount.host_path)
        except PathRefused as e:
            raise InvalidArgument(f"{field}.host_path", str(e)) from None

    def _ensure_record(self, owner: str, mount: DirectoryMount, field: str) -> VolumeRow:
        name, asked = mount.volume, mount.size_bytes
        if asked and asked < MIN_VOLUME_BYTES:
            raise InvalidArgument(
                f"{field}.size_bytes",
                f"volume {name!r}: {_show(asked)} is too small; a volume has at least "
                f"{_show(MIN_VOLUME_BYTES)}",
            )
        if asked and self.max_bytes and asked > self.max_bytes:
            raise InvalidArgument(
                f"{field}.size_bytes",
                f"volume {name!r}: {_show(asked)} is more than this service allows a volume "
                f"({_show(self.max_bytes)}, aviato server --volume-max-size)",
            )
        row = self._records.get(owner, name)
        if row is None:
            if self.owner_max_volumes and self._records.count(owner) >= self.owner_max_volumes:
                raise CapacityExceeded(
                    f"{field}.volume: creating volume {name!r} would pass your quota of "
                    f"{self.owner_max_volumes} volumes; delete one first (aviato volume rm)"
                )
            size = asked or self.max_bytes
            if not self._remote and self.store.sized_error:
                size = 0  # this machine cannot make sized volumes: a directory volume
            if self._shared is not None:
                if asked:
                    raise InvalidArgument(
                        f"{field}.size_bytes",
                        f"volume {name!r}: this service keeps volumes in a shared directory "
                        "(aviato server --ray-volume-dir), where it measures their sizes but "
                        "cannot enforce them; ask for no size",
                    )
                size = 0
            self._records.insert(owner, name, _now_ns(), size)
            if self._shared is not None:
                self._records.settle_node(owner, name, SHARED)
            row = self._records.get(owner, name)
            assert row is not None
        elif asked and row.max_bytes and asked != row.max_bytes:
            raise FailedPrecondition(
                f"{field}.size_bytes: volume {name!r} exists with size {_show(row.max_bytes)}; "
                "a volume keeps the size it was made with (ask for none, or delete it and "
                "make it again)"
            )
        return row

    def _local_source(
        self, owner: str, mount: DirectoryMount, row: VolumeRow, field: str, store: VolumeStore
    ) -> str:
        """The volume's files made (on first use) in `store`, which this machine reaches: the
        local placement's, or the shared volume directory."""
        try:
            source = store.ensure(mount.volume_key, mount.volume, row.max_bytes)
        except SandboxRuntimeError as e:
            raise FailedPrecondition(f"{field}.volume: volume {mount.volume!r}: {e}") from None
        if not mount.read_only and self.max_bytes and not row.max_bytes:
            # A directory volume (made before sizes were enforced): its measured bound.
            size = store.usage(mount.volume_key, mount.volume)
            self._records.set_size(owner, mount.volume, size)
            if size >= self.max_bytes:
                raise CapacityExceeded(
                    f"{field}.volume: volume {mount.volume!r} holds {_show(size)}, its bound is "
                    f"{_show(self.max_bytes)}: it can be mounted read-only only; delete files "
                    "from it (read-write mounts are refused until it is under its bound)"
                )
        return source

    def _pin_to_home(self, config: SandboxConfig, homes: dict[str, str]) -> SandboxConfig:
        """`config` placed on the one node its volumes live on (refused when on several, or
        when its node selector names another node)."""
        if len(homes) > 1:
            (a, va), (b, vb) = list(homes.items())[:2]
            raise FailedPrecondition(
                f"spec.mounts: volume {va!r} lives on node {a[:12]} and volume {vb!r} on node "
                f"{b[:12]}; a sandbox can mount volumes of one node only (use them in two "
                "sandboxes, or copy one volume's files into a new volume)"
            )
        home, volume = next(iter(homes.items()))
        selector = dict(config.node_selector)
        wanted = selector.get(NODE_KEY)
        if wanted is not None and wanted != home:
            raise FailedPrecondition(
                f"spec.node_selector: {NODE_KEY}={wanted} asks for another node than the one "
                f"volume {volume!r} lives on ({home[:12]}); drop the selector, or the volume"
            )
        selector[NODE_KEY] = home
        return replace(config, node_selector=tuple(sorted(selector.items())))

    def settle_homes(self, owner: str, config: SandboxConfig, node: str) -> None:
        """Records `node` as the home of the sandbox's volumes that had none (under Ray, once
        the sandbox is placed). FailedPrecondition when one got another home meanwhile (two
        first uses placed at once on two nodes): this sandbox must not make a second copy."""
        if not self._remote:
            return
        for mount in config.mounts:
            if not mount.volume:
                continue
            home = self._records.settle_node(owner, mount.volume, node)
            if home and home not in (node, SHARED):
                raise FailedPrecondition(
                    f"volume {mount.volume!r} was made on node {home[:12]} by another sandbox "
                    f"meanwhile, and this one was placed on {node[:12]}; create it again"
                )

    # --- list, delete ---

    async def of_owner(self, owner: str, used_by: dict[str, list[str]]) -> list[VolumeInfo]:
        """The owner's volumes, each measured now (locally in a thread; under Ray by its node,
        or as last measured when the node does not answer within NODE_CALL_SECONDS: all at
        once, so a listing takes about that long at most). `used_by`: volume name -> the live
        sandboxes that mount it."""
        key = owner_key(owner)
        result = []
        rows = self._records.of_owner(owner)
        sizes = await asyncio.gather(*(self._measure(key, row) for row in rows))
        for row, size in zip(rows, sizes, strict=True):
            if size != row.size_bytes:
                self._records.set_size(owner, row.name, size)
            result.append(
                VolumeInfo(
                    row.name, size, row.max_bytes or self.max_bytes, row.created_ns,
                    tuple(used_by.get(row.name, ())), "" if row.node == SHARED else row.node,
                    bool(row.max_bytes),
                )
            )  # fmt: skip
        return result

    async def _measure(self, key: str, row: VolumeRow) -> int:
        if not self._remote:
            return await asyncio.to_thread(self.store.usage, key, row.name)
        if row.node == SHARED:
            if self._shared is None:
                return row.size_bytes
            return await asyncio.to_thread(self._shared.usage, key, row.name)
        host = self._host_of(row.node)
        if host is None:
            return row.size_bytes
        try:
            return await asyncio.wait_for(host.usage(key, row.name), NODE_CALL_SECONDS)
        except (SandboxRuntimeError, TimeoutError) as e:
            log.info("volume %s: its node %s did not measure it: %s", row.name, row.node, e)
            return row.size_bytes

    def _host_of(self, node: str) -> VolumeHost | None:
        if not node or self._volume_host is None:
            return None
        return self._volume_host(node)

    async def delete(self, owner: str, name: str, users: list[str]) -> None:
        """Deletes the volume and its files; refused while `users` (live sandboxes) mount it.
        Under Ray its node removes the files; a node that is gone leaves them (logged), a node
        that does not answer keeps the volume (Unavailable: try again)."""
        validate_volume_name(name, "name")
        row = self._records.get(owner, name)
        if row is None:
            raise VolumeNotFound(f"volume {name!r} not found")
        if users:
            more = f" (and {len(users) - 1} more)" if len(users) > 1 else ""
            raise FailedPrecondition(
                f"volume {name!r} is in use by sandbox {users[0]}{more}; stop it first"
            )
        key = owner_key(owner)
        if not self._remote:
            await asyncio.to_thread(self.store.delete, key, name)
        elif row.node == SHARED:
            if self._shared is None:
                log.warning(
                    "volume %s of %s was in the shared volume directory, which this service "
                    "no longer has (--ray-volume-dir): its files stay there", name, key,
                )  # fmt: skip
            else:
                await asyncio.to_thread(self._shared.delete, key, name)
        elif row.node:
            host = self._host_of(row.node)
            if host is None:
                log.warning(
                    "volume %s of %s: its node %s is gone; its files stay on that node's disk",
                    name, key, row.node,
                )  # fmt: skip
            else:
                try:
                    await asyncio.wait_for(host.delete(key, name), NODE_CALL_SECONDS)
                except (SandboxRuntimeError, TimeoutError) as e:
                    raise Unavailable(
                        f"volume {name!r} lives on node {row.node[:12]}, which did not remove "
                        f"it ({e or 'no answer'}); try again"
                    ) from None
        self._records.delete(owner, name)

    def close(self, in_use: Iterable[tuple[str, str]]) -> None:
        """At the service's stop: unmounts this machine's sized volumes that no live sandbox
        mounts (`in_use`: (owner, name); names "" are host directories, ignored) and their
        root's bind mount when none is left (runtime/volume_store.py). Blocking."""
        self.store.close({(owner_key(owner), name) for owner, name in in_use if name})

    def clear_trash(self) -> None:
        """Removes what deletes on this machine left behind (a service stopped during one)."""
        self.store.clear_trash()
        if self._shared is not None:
            self._shared.clear_trash()


def _now_ns() -> int:
    return time.time_ns()


def _show(n: int) -> str:
    for unit, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n} bytes"
