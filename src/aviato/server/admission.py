"""Admission of new sandboxes: the service's capacity and each owner's quota.

`check` refuses a create the service or the owner has no room for; `take` counts an admitted
(or re-attached) sandbox and `give_back` uncounts it when it ends. Both are synchronous, so that
nothing slips between a check and its take when the caller does not await in between.

Only the service's own user (owner "local") is told the service's figures; any other owner
learns that the service is full, never how many sandboxes or how much memory other owners hold,
nor the host's free memory or paths.
"""

from __future__ import annotations

from aviato.server.auth import LOCAL_OWNER
from aviato.server.config import ServerConfig, available_memory_bytes, free_disk_bytes
from aviato.server.errors import CapacityExceeded
from aviato.server.quotas import Charge, OwnerQuotas
from aviato.server.registry import Registry
from aviato.v1.quantities import format_bytes

__all__ = ["Admission"]


class Admission:
    """What live sandboxes hold (memory reserved, each owner's usage) and the bounds on it."""

    def __init__(self, config: ServerConfig, registry: Registry) -> None:
        self._config = config
        self._memory_reserved = 0
        self._quotas = OwnerQuotas(config.owner_quota, registry)

    def check(self, owner: str, charge: Charge, live_count: int) -> None:
        """Raises CapacityExceeded (or QuotaExceeded) when `owner` may not add `charge` now,
        with `live_count` sandboxes live."""
        self._quotas.check(owner, charge)
        memory = charge.memory_bytes
        operator = owner == LOCAL_OWNER
        limit = self._config.max_sandboxes
        if limit and live_count >= limit:
            raise CapacityExceeded(
                f"capacity exhausted: {live_count} of {limit} sandboxes are live "
                "(server --max-sandboxes); stop or delete some first"
                if operator
                else "capacity exhausted: the service runs as many sandboxes as it may "
                "(server --max-sandboxes); try again later"
            )
        mem_limit = self._config.max_memory_bytes
        if mem_limit and self._memory_reserved + memory > mem_limit:
            raise CapacityExceeded(
                f"memory capacity exhausted: requested {format_bytes(memory)}, "
                f"{format_bytes(self._memory_reserved)} of {format_bytes(mem_limit)} "
                "already reserved by live sandboxes (server --max-memory)"
                if operator
                else "memory capacity exhausted: the service cannot reserve the "
                f"{format_bytes(memory)} this sandbox asks for (server --max-memory); ask for "
                "less (resources.memory), or try again later"
            )

        floor = self._config.min_free_memory_bytes
        if floor:
            available = available_memory_bytes()
            if available is not None and available < floor:
                raise CapacityExceeded(
                    f"host memory low: {format_bytes(available)} available, below the floor of "
                    f"{format_bytes(floor)} (server --min-free-memory); stop some sandboxes first"
                    if operator
                    else "host memory low (server --min-free-memory); try again later"
                )
        floor = self._config.min_free_disk_bytes
        if floor:
            free = free_disk_bytes(self._config.state_dir)
            if free is not None and free < floor:
                raise CapacityExceeded(
                    f"host disk low: {format_bytes(free)} free for the state directory "
                    f"{self._config.state_dir}, below the floor of {format_bytes(floor)} "
                    "(server --min-free-disk); delete ended sandboxes or unused images first"
                    if operator
                    else "host disk low (server --min-free-disk); try again later"
                )

    def take(self, owner: str, charge: Charge) -> None:
        self._memory_reserved += charge.memory_bytes
        self._quotas.charge(owner, charge)

    def give_back(self, owner: str, charge: Charge) -> None:
        self._memory_reserved -= charge.memory_bytes
        self._quotas.release(owner, charge)

    def describe_quota(self, owner: str) -> str:
        """The owner's quota and what its live sandboxes hold, in words."""
        return self._quotas.describe(owner)
