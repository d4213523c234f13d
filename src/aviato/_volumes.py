"""Volumes: `Volume` (a named, persistent directory of the caller's, mounted into sandboxes),
`HostMount` (an operator-approved host directory, read-only), and `Volumes` (list, delete).

A sandbox takes them as ``volumes={"/cache": Volume("cache"), "/data": Volume("ds",
read_only=True), "/datasets": HostMount("/data/datasets/imagenet")}``: the key is the
absolute path inside the sandbox. A volume is created by the first sandbox that mounts it and
kept until `Volumes.delete`; several sandboxes may mount it at once. What the service does
with them, and what it refuses: docs/volumes.md.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from aviato import _defaults
from aviato._bridge import get_bridge
from aviato._client import get_client
from aviato.exceptions import SandboxValidationError
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.quantities import QuantityError, parse_bytes

__all__ = ["HostMount", "Volume", "VolumeInfo", "Volumes", "mounts_to_proto"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class Volume:
    """The caller's volume `name` (letters, digits, '.', '_', '-'; at most 64), mounted
    read-write, or read-only with ``read_only=True``. ``Volume.from_name(name)`` is the same.

    ``size`` (bytes, or a quantity such as ``"10Gi"``): the size a new volume is made with, a
    hard bound (a write past it fails with "No space left on device" in the sandbox); None: the
    service's default. An existing volume keeps its size (another size is refused)."""

    name: str
    read_only: bool = False
    size: int | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise SandboxValidationError(
                f"Volume({self.name!r}): a volume name is 1 to 64 letters, digits, '.', '_' or "
                "'-', starting with a letter or digit (no '/', no '..')"
            )
        if not isinstance(self.read_only, bool):
            raise TypeError(f"Volume.read_only must be True or False, not {self.read_only!r}")
        self.size_bytes  # noqa: B018 (refuses a nonsense size now, not at the create)

    @property
    def size_bytes(self) -> int:
        """The size asked for in bytes (0: the service's default)."""
        size = self.size
        if size is None:
            return 0
        if isinstance(size, bool) or not isinstance(size, int | str):
            raise TypeError(
                f"Volume({self.name!r}): size must be bytes (an int) or a quantity such as "
                f"'10Gi', not {type(size).__name__}"
            )
        if isinstance(size, str):
            try:
                size = parse_bytes(size)
            except QuantityError:
                raise SandboxValidationError(
                    f"Volume({self.name!r}): size {self.size!r} is not a size; give bytes or a "
                    "quantity such as '512Mi' or '10Gi'"
                ) from None
        if size <= 0:
            raise SandboxValidationError(
                f"Volume({self.name!r}): size must be positive, not {self.size!r}"
            )
        return size

    @classmethod
    def from_name(
        cls, name: str, *, read_only: bool = False, size: int | str | None = None
    ) -> Volume:
        return cls(name, read_only, size)


@dataclass(frozen=True, slots=True)
class HostMount:
    """A directory of the service's host, mounted read-only. It must lie under one the
    operator allowed (``aviato server --allow-host-mount DIR``), also after its symlinks are
    resolved; anything else is refused when the sandbox is created."""

    host_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.host_path, str) or not self.host_path.startswith("/"):
            raise SandboxValidationError(
                f"HostMount({self.host_path!r}): the host path must be absolute"
            )


def mounts_to_proto(volumes: Mapping[str, Volume | HostMount] | None) -> list[pb.DirectoryMount]:
    """The spec's mounts of a ``volumes`` option; errors name the option and the path."""
    if volumes is None:
        return []
    if not isinstance(volumes, Mapping):
        raise TypeError(
            "volumes must be a dict of sandbox paths to Volume or HostMount, e.g. "
            f'{{"/cache": Volume("cache")}}, not {type(volumes).__name__}'
        )
    result: list[pb.DirectoryMount] = []
    for path, item in volumes.items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise SandboxValidationError(f"volumes: {path!r} is not an absolute sandbox path")
        if isinstance(item, Volume):
            result.append(
                pb.DirectoryMount(
                    path=path, volume=item.name, read_only=item.read_only,
                    size_bytes=item.size_bytes,
                )
            )  # fmt: skip
        elif isinstance(item, HostMount):
            result.append(pb.DirectoryMount(path=path, host_path=item.host_path, read_only=True))
        else:
            raise TypeError(
                f"volumes[{path!r}] must be a Volume or a HostMount, not {type(item).__name__}"
            )
    return result


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    """One of the caller's volumes, as `Volumes.list` reports it."""

    name: str
    #: what its files take on disk, measured when listed
    size_bytes: int
    #: its size: a hard bound when `size_enforced`; else (an older volume) once it holds this
    #: much it can be mounted read-only only (0: no bound)
    max_size_bytes: int
    created_at: datetime | None
    #: ids of the live sandboxes that mount it (such a volume cannot be deleted)
    used_by: tuple[str, ...]
    #: under Ray: the node that holds its files (sandboxes that mount it run there)
    node: str = ""
    #: whether `max_size_bytes` is a hard bound (a filesystem of that size) or only measured
    size_enforced: bool = False

    @classmethod
    def _of(cls, volume: pb.Volume) -> VolumeInfo:
        created = (
            volume.created_at.ToDatetime(tzinfo=UTC) if volume.HasField("created_at") else None
        )
        return cls(
            name=volume.name,
            size_bytes=volume.size_bytes,
            max_size_bytes=volume.max_size_bytes,
            created_at=created,
            used_by=tuple(volume.used_by),
            node=volume.node,
            size_enforced=volume.size_enforced,
        )


class Volumes:
    """The caller's volumes on the service. Both methods block, like `Images`'s, and raise the
    `aviato.exceptions` error of the service's answer: code NOT_FOUND for a name the caller has
    no volume of (another owner's volume of that name is never seen), FAILED_PRECONDITION for a
    volume that a live sandbox mounts (the message names it)."""

    @staticmethod
    def list(*, base_url: str | None = None) -> builtins.list[VolumeInfo]:
        """The caller's volumes, sorted by name, each measured now."""
        return get_bridge().run(_list(base_url))

    @staticmethod
    def delete(name: str, *, base_url: str | None = None) -> None:
        """Deletes the volume `name` and its files; refused while a live sandbox mounts it."""
        get_bridge().run(_delete(name, base_url))


async def _list(base_url: str | None) -> list[VolumeInfo]:
    client = await get_client(_defaults.resolve_base_url(base_url, None))
    volumes = await client.with_retry(
        lambda: client.transport.list_volumes(
            call_timeout=_defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
        ),
        op="list volumes",
    )
    return [VolumeInfo._of(v) for v in volumes]


async def _delete(name: str, base_url: str | None) -> None:
    client = await get_client(_defaults.resolve_base_url(base_url, None))
    await client.transport.delete_volume(
        name, call_timeout=_defaults.DEFAULT_REQUEST_TIMEOUT_SECONDS
    )
