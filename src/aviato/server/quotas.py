"""Per-owner quotas: how much of the service one owner's live sandboxes may hold.

A quota bounds four sums over an owner's non-terminal sandboxes: their number, and the cpu,
memory and disk limits they were given. A sandbox counts with the limits the runtime applies to
it: one that asks for no memory or disk counts as the service's default size, and one that asks
for no cpu limit may use every core, so it counts as all of the service host's cores.

The service-wide default (`aviato server --owner-max-*`) applies to every owner, the unix
socket's owner "local" included; an owner's own row in the registry (`aviato keys quota`)
replaces any of the four values. 0 means no bound.

Charging is the lifecycle's: `charge` when a sandbox is admitted (or re-attached after a
restart), `release` when it becomes terminal. `check` and `charge` are synchronous, so nothing
can slip between them when the caller does not await in between (the lifecycle's create does
not): 20 concurrent creates cannot overshoot.

What this cannot do: bound what a sandbox *uses*, only the limits it was given (the runtime's
cgroups enforce those); and a quota lowered below what an owner already holds stops only new
creates, it never stops running sandboxes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from aviato.runtime.model import SandboxConfig
from aviato.server.errors import CapacityExceeded
from aviato.server.registry import OwnerQuotaRecord, Registry
from aviato.v1.errors_pb2 import QUOTA_EXCEEDED
from aviato.v1.quantities import format_bytes, format_cpu

__all__ = [
    "Charge",
    "OwnerQuotas",
    "Quota",
    "QuotaExceeded",
    "charge_of",
    "format_bytes",
    "format_cpu",
    "host_cpu_millis",
]


@functools.cache
def host_cpu_millis() -> int:
    """What a sandbox without a cpu limit counts as: every core of this host (counted once:
    `os.cpu_count` reads sysfs at every call, and a create asks for it)."""
    return (os.cpu_count() or 1) * 1000


class QuotaExceeded(CapacityExceeded):
    """An owner's quota would be exceeded. The message names only that owner's usage."""

    reason = QUOTA_EXCEEDED


@dataclass(frozen=True)
class Quota:
    """Bounds on an owner's live sandboxes; 0 means no bound."""

    sandboxes: int = 0
    cpu_millis: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0

    @property
    def unbounded(self) -> bool:
        return not (self.sandboxes or self.cpu_millis or self.memory_bytes or self.disk_bytes)

    def describe(self) -> str:
        """E.g. "sandboxes 10, cpu 4, memory 8Gi, disk no bound"."""

        def show(value: int, fmt: Callable[[int], str]) -> str:
            return fmt(value) if value else "no bound"

        return (
            f"sandboxes {show(self.sandboxes, str)}, cpu {show(self.cpu_millis, format_cpu)}, "
            f"memory {show(self.memory_bytes, format_bytes)}, "
            f"disk {show(self.disk_bytes, format_bytes)}"
        )


@dataclass(frozen=True)
class Charge:
    """What one sandbox counts against its owner's quota.

    `cpu_default`, `memory_default`, `disk_default`: the spec asked for none, so the value is
    what the runtime gives such a sandbox (said so in refusals).
    """

    cpu_millis: int
    memory_bytes: int
    disk_bytes: int
    cpu_default: bool = False
    memory_default: bool = False
    disk_default: bool = False


def charge_of(config: SandboxConfig) -> Charge:
    """What a sandbox counts as: its resolved limits, all of the host's cores for no cpu limit."""
    return Charge(
        cpu_millis=host_cpu_millis() if config.cpu_millis is None else config.cpu_millis,
        memory_bytes=config.memory_bytes,
        disk_bytes=config.disk_bytes,
        cpu_default=config.cpu_millis is None,
        memory_default="memory" not in config.asked_limits,
        disk_default="disk" not in config.asked_limits,
    )


@dataclass
class _Usage:
    sandboxes: int = 0
    cpu_millis: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0

    def add(self, charge: Charge, sign: int) -> None:
        self.sandboxes += sign
        self.cpu_millis += sign * charge.cpu_millis
        self.memory_bytes += sign * charge.memory_bytes
        self.disk_bytes += sign * charge.disk_bytes

    @property
    def empty(self) -> bool:
        return self.sandboxes <= 0


@dataclass
class OwnerQuotas:
    """The default quota, each owner's override (read from the registry at every check, so
    `aviato keys quota` takes effect without a restart) and each owner's usage."""

    default: Quota
    registry: Registry | None = None
    _usage: dict[str, _Usage] = field(default_factory=dict)

    def quota_of(self, owner: str) -> Quota:
        row = self.registry.get_owner_quota(owner) if self.registry is not None else None
        return _merge(self.default, row)

    def usage_of(self, owner: str) -> tuple[int, int, int, int]:
        """(sandboxes, cpu millis, memory bytes, disk bytes) the owner's live sandboxes hold."""
        u = self._usage.get(owner) or _Usage()
        return u.sandboxes, u.cpu_millis, u.memory_bytes, u.disk_bytes

    def describe(self, owner: str) -> str:
        """The owner's quota and usage, e.g. "sandboxes 2 of 10, cpu 2 (no bound), ..."."""
        quota = self.quota_of(owner)
        used = self._usage.get(owner) or _Usage()

        def show(what: str, value: int, limit: int, fmt: Callable[[int], str]) -> str:
            bound = f"of {fmt(limit)}" if limit else "(no bound)"
            return f"{what} {fmt(value)} {bound}"

        return ", ".join((
            show("sandboxes", used.sandboxes, quota.sandboxes, str),
            show("cpu", used.cpu_millis, quota.cpu_millis, format_cpu),
            show("memory", used.memory_bytes, quota.memory_bytes, format_bytes),
            show("disk", used.disk_bytes, quota.disk_bytes, format_bytes),
        ))  # fmt: skip

    def check(self, owner: str, charge: Charge) -> None:
        """Raises QuotaExceeded when one more sandbox with `charge` would exceed the quota."""
        quota = self.quota_of(owner)
        if quota.unbounded:
            return
        used = self._usage.get(owner) or _Usage()
        if quota.sandboxes and used.sandboxes + 1 > quota.sandboxes:
            plural = "" if used.sandboxes == 1 else "es"
            raise QuotaExceeded(
                f"quota reached: you have {used.sandboxes} live sandbox{plural} and your limit "
                f"is {quota.sandboxes}; stop or delete some of yours first"
            )
        _check_amount(
            "cpu", "resources.cpu", charge.cpu_millis, used.cpu_millis, quota.cpu_millis,
            format_cpu,
            "no cpu limit lets it use all of the host's "
            f"{format_cpu(host_cpu_millis())} cores" if charge.cpu_default else "",
        )  # fmt: skip
        _check_amount(
            "memory", "resources.memory", charge.memory_bytes, used.memory_bytes,
            quota.memory_bytes, format_bytes,
            "the default, as it asks for none" if charge.memory_default else "",
        )  # fmt: skip
        _check_amount(
            "disk", "resources.disk", charge.disk_bytes, used.disk_bytes, quota.disk_bytes,
            format_bytes, "the default, as it asks for none" if charge.disk_default else "",
        )  # fmt: skip

    def charge(self, owner: str, charge: Charge) -> None:
        self._usage.setdefault(owner, _Usage()).add(charge, +1)

    def release(self, owner: str, charge: Charge) -> None:
        usage = self._usage.get(owner)
        if usage is None:
            return
        usage.add(charge, -1)
        if usage.empty:
            del self._usage[owner]


def _merge(default: Quota, row: OwnerQuotaRecord | None) -> Quota:
    if row is None:
        return default

    def pick(own: int | None, base: int) -> int:
        return base if own is None else own

    return Quota(
        sandboxes=pick(row.sandboxes, default.sandboxes),
        cpu_millis=pick(row.cpu_millis, default.cpu_millis),
        memory_bytes=pick(row.memory_bytes, default.memory_bytes),
        disk_bytes=pick(row.disk_bytes, default.disk_bytes),
    )


def _check_amount(
    what: str,
    field_name: str,
    asked: int,
    used: int,
    limit: int,
    show: Callable[[int], str],
    why_asked: str,
) -> None:
    if not limit or used + asked <= limit:
        return
    because = f" ({why_asked})" if why_asked else ""
    if asked > limit:
        raise QuotaExceeded(
            f"quota reached: this sandbox needs {what} {show(asked)}{because}, more than your "
            f"whole {what} quota of {show(limit)}; ask for less ({field_name})"
        )
    raise QuotaExceeded(
        f"quota reached: this sandbox needs {what} {show(asked)}{because}, and your live "
        f"sandboxes already hold {show(used)} of your {what} quota of {show(limit)}; ask for "
        f"less ({field_name}) or stop some of yours first"
    )
