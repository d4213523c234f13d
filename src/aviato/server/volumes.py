"""Named volumes and operator-approved host directories (docs/volumes.md).

A volume is a directory of the service's state, one per owner and name:
`<state>/volumes/<owner key>/<name>/`, where the owner key is a digest of the owner's name (an
owner name is never a path). It is created by the first sandbox that mounts it, persists until
`DeleteVolume`, and belongs to its owner alone: another owner's volume of the same name is
another directory, and a name the caller has no volume of is simply absent (never "exists but
not yours"). The registry records each with its owner, last measured size and creation time.

Bounds: each volume may hold `volume_max_bytes` (measured by walking its files, in allocated
blocks, whenever a sandbox mounts it read-write and at each listing): once it holds that much,
mounting it read-write is refused, read-only still works. What a running sandbox writes is not
stopped at the bound (no per-volume filesystem or project quota here): the bound is checked at
the next mount. Each owner may have `owner_max_volumes` volumes.

Host directories: a sandbox may bind, read-only, a host directory under one the operator
allowed (`--allow-host-mount DIR`). The path asked for is resolved (every symlink followed) and
the result must still lie under an allowed tree, itself resolved; the resolved path is what is
bound, so a symlink cannot lead out of the allowed tree. Someone who can write inside the
allowed tree can still swap a directory for a symlink between the check and the bind: the
allowed trees are the operator's, and sandboxes only ever see them read-only.

Placement: volumes live on the service's machine, so only the local placement can bind them;
a Ray placement refuses sandboxes that ask for any (docs/volumes.md says how they would travel).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from aviato._private import private_dir
from aviato.runtime.model import DirectoryMount, SandboxConfig
from aviato.server.errors import CapacityExceeded, FailedPrecondition, InvalidArgument, NotFound
from aviato.server.validation import validate_path

__all__ = [
    "MAX_MOUNTS",
    "HostMounts",
    "VolumeInfo",
    "VolumeNotFound",
    "VolumeRecords",
    "Volumes",
    "validate_mounts",
    "validate_volume_name",
]

MAX_MOUNTS = 32
MAX_VOLUME_NAME = 64
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Where a volume may not be mounted: the kernel's filesystems and aviato's own.
_RESERVED = ("/proc", "/dev", "/sys", "/.aviato")

VOLUMES_MIGRATION = """
    CREATE TABLE volumes (
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        size_bytes INTEGER NOT NULL DEFAULT 0,
        created_ns INTEGER NOT NULL,
        PRIMARY KEY (owner, name)
    );
"""


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
    items: Iterable[tuple[str, str, str, bool]], field: str
) -> tuple[DirectoryMount, ...]:
    """(path, volume, host_path, read_only) of a request as mounts: absolute, normalized,
    distinct sandbox paths, none inside another or in a reserved tree; exactly one of volume
    and host_path each; host paths absolute and normalized, always read-only."""
    result: list[DirectoryMount] = []
    for i, (path_text, volume, host_path, read_only) in enumerate(items):
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
        if volume:
            validate_volume_name(volume, f"{item}.volume")
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
            DirectoryMount(path=path, volume=volume, host_path=host_path, read_only=read_only)
        )
    return tuple(result)


class HostMounts:
    """The host directories the operator allowed, and the check of a path asked for."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = tuple(os.path.realpath(path) for path in allowed)

    def resolve(self, host_path: str, field: str) -> str:
        """The real path to bind for `host_path`: it and every symlink in it resolved, and
        the result under an allowed tree; a refusal says which rule, never what is there."""
        if not self.allowed:
            raise InvalidArgument(
                field,
                "this service allows no host directories to be mounted (the operator "
                "allows some with `aviato server --allow-host-mount DIR`)",
            )
        asked_under = any(_under(host_path, root) for root in self.allowed)
        real = os.path.realpath(host_path)
        if not asked_under or not any(_under(real, root) for root in self.allowed):
            where = ", ".join(self.allowed)
            if asked_under:
                raise InvalidArgument(
                    field,
                    f"{host_path!r} leads through a symlink out of the allowed directories "
                    f"({where})",
                )
            raise InvalidArgument(
                field,
                f"{host_path!r} is not under a directory the operator allows to mount ({where})",
            )
        if not os.path.isdir(real):
            raise InvalidArgument(field, f"{host_path!r} is not a directory on the host")
        return real


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    size_bytes: int
    max_size_bytes: int
    created_ns: int
    used_by: tuple[str, ...]


class VolumeRecords:
    """The registry's `volumes` table (one row per owner and name)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get(self, owner: str, name: str) -> tuple[int, int] | None:
        """(size_bytes, created_ns), or None."""
        row = self._db.execute(
            "SELECT size_bytes, created_ns FROM volumes WHERE owner=? AND name=?", (owner, name)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def insert(self, owner: str, name: str, created_ns: int) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO volumes (owner, name, size_bytes, created_ns) VALUES (?,?,0,?)",
            (owner, name, created_ns),
        )

    def set_size(self, owner: str, name: str, size: int) -> None:
        self._db.execute(
            "UPDATE volumes SET size_bytes=? WHERE owner=? AND name=?", (size, owner, name)
        )

    def count(self, owner: str) -> int:
        row = self._db.execute("SELECT COUNT(*) FROM volumes WHERE owner=?", (owner,)).fetchone()
        return int(row[0])

    def of_owner(self, owner: str) -> list[tuple[str, int, int]]:
        rows = self._db.execute(
            "SELECT name, size_bytes, created_ns FROM volumes WHERE owner=? ORDER BY name",
            (owner,),
        ).fetchall()
        return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]

    def delete(self, owner: str, name: str) -> bool:
        cur = self._db.execute("DELETE FROM volumes WHERE owner=? AND name=?", (owner, name))
        return cur.rowcount > 0


def disk_usage(root: Path) -> int:
    """Bytes allocated to the files below `root` (st_blocks), following no symlink and not
    crossing into other filesystems. Hard links count once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    try:
        top = os.lstat(root)
    except OSError:
        return 0
    stack = [str(root)]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != top.st_dev:
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    return total


class Volumes:
    """The service's volumes: where each lives, its record, its bound, who mounts it."""

    def __init__(
        self,
        state_dir: Path,
        records: VolumeRecords,
        *,
        max_bytes: int,
        owner_max_volumes: int,
        host_mounts: HostMounts,
        placement: str,
    ) -> None:
        self._root = state_dir / "volumes"
        self._trash = state_dir / "volumes-deleted"
        self._records = records
        self.max_bytes = max_bytes
        self.owner_max_volumes = owner_max_volumes
        self.host_mounts = host_mounts
        self._placement = placement

    def directory(self, owner: str, name: str) -> Path:
        key = hashlib.sha256(owner.encode()).hexdigest()[:32]
        return self._root / key / name

    def resolve(self, owner: str, config: SandboxConfig) -> SandboxConfig:
        """`config` with each mount's host directory filled in: volumes created on first use
        (counted against the owner's number of volumes), read-write ones refused past their
        bound, host paths checked against the allowed trees. Raises a ServiceError in words."""
        if not config.mounts:
            return config
        if self._placement != "local":
            raise FailedPrecondition(
                f"spec.mounts: volumes and host directories live on the service's machine and "
                f"cannot reach a sandbox placed by {self._placement!r} yet; run it without "
                "mounts, or on a local service"
            )
        mounts: list[DirectoryMount] = []
        for i, mount in enumerate(config.mounts):
            field = f"spec.mounts[{i}]"
            if mount.host_path:
                real = self.host_mounts.resolve(mount.host_path, f"{field}.host_path")
                mounts.append(replace(mount, source=real, read_only=True))
                continue
            mounts.append(replace(mount, source=str(self._ensure(owner, mount, field))))
        return replace(config, mounts=tuple(mounts))

    def _ensure(self, owner: str, mount: DirectoryMount, field: str) -> Path:
        name = mount.volume
        directory = self.directory(owner, name)
        known = self._records.get(owner, name)
        if known is None:
            if self.owner_max_volumes and self._records.count(owner) >= self.owner_max_volumes:
                raise CapacityExceeded(
                    f"{field}.volume: creating volume {name!r} would pass your quota of "
                    f"{self.owner_max_volumes} volumes; delete one first (aviato volume rm)"
                )
            self._records.insert(owner, name, time.time_ns())
        private_dir(directory.parent)
        # The volume's own directory is the sandbox root's (mode 0755; id-mapped by the launcher
        # for a root service): private_dir would make it 0700 and the host's.
        directory.mkdir(mode=0o755, exist_ok=True)
        if not mount.read_only and self.max_bytes:
            size = disk_usage(directory)
            self._records.set_size(owner, name, size)
            if size >= self.max_bytes:
                raise CapacityExceeded(
                    f"{field}.volume: volume {name!r} holds {_show(size)}, its bound is "
                    f"{_show(self.max_bytes)}: it can be mounted read-only only; delete files "
                    "from it (read-write mounts are refused until it is under its bound)"
                )
        return directory

    async def of_owner(self, owner: str, used_by: dict[str, list[str]]) -> list[VolumeInfo]:
        """The owner's volumes, each measured now (in a thread: a walk of its files).
        `used_by`: volume name -> the live sandboxes that mount it."""
        result = []
        for name, _, created in self._records.of_owner(owner):
            size = await asyncio.to_thread(disk_usage, self.directory(owner, name))
            self._records.set_size(owner, name, size)
            result.append(
                VolumeInfo(name, size, self.max_bytes, created, tuple(used_by.get(name, ())))
            )
        return result

    def delete(self, owner: str, name: str, users: list[str]) -> None:
        """Deletes the volume and its files; refused while `users` (live sandboxes) mount it."""
        validate_volume_name(name, "name")
        if self._records.get(owner, name) is None:
            raise VolumeNotFound(f"volume {name!r} not found")
        if users:
            more = f" (and {len(users) - 1} more)" if len(users) > 1 else ""
            raise FailedPrecondition(
                f"volume {name!r} is in use by sandbox {users[0]}{more}; stop it first"
            )
        directory = self.directory(owner, name)
        private_dir(self._trash)
        doomed = self._trash / f"{directory.parent.name}-{name}-{time.time_ns()}"
        try:
            os.rename(directory, doomed)
        except FileNotFoundError:
            doomed = Path()
        self._records.delete(owner, name)
        if doomed != Path():
            threading.Thread(
                target=shutil.rmtree, args=(doomed,), kwargs={"ignore_errors": True}, daemon=True
            ).start()

    def clear_trash(self) -> None:
        """Removes what deletes left behind (a service stopped during one)."""
        shutil.rmtree(self._trash, ignore_errors=True)


def _show(n: int) -> str:
    for unit, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n} bytes"
