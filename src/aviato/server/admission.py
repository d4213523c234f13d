"""Admission of new sandboxes: the service's capacity and each owner's quota.

`check` refuses a create the service or the owner has no room for; `take` counts an admitted
(or re-attached) sandbox and `give_back` uncounts it when it ends. Both are synchronous, so that
nothing slips between a check and its take when the caller does not await in between.

The host's free memory and disk are read again only when it matters (`HostReading`): a create
that leaves a recent reading well above its floor is admitted on that reading; one that would
come near the floor, or any create once the reading is `HOST_READING_SECONDS` old, reads the
host afresh, and only a fresh reading refuses.

Only the service's own user (owner "local") is told the service's figures; any other owner
learns that the service is full, never how many sandboxes or how much memory other owners hold,
nor the host's free memory or paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aviato.server.auth import LOCAL_OWNER
from aviato.server.config import ServerConfig, available_memory_bytes, free_disk_bytes
from aviato.server.errors import CapacityExceeded
from aviato.server.quotas import Charge, OwnerQuotas
from aviato.server.registry import Registry
from aviato.v1.quantities import format_bytes

__all__ = ["HOST_READING_SECONDS", "Admission", "HostReading"]

# How old a reading of the host's free memory or disk may be and still admit a create.
HOST_READING_SECONDS = 1.0


class HostReading:
    """A figure of the host (bytes of memory available, of disk free) held to a floor, read
    through `read` (None: unknown, which never refuses) at most every `max_age` seconds.

    `below_floor(taking)` answers whether a create that may take `taking` bytes of it must be
    refused. A reading is reused while it is younger than `max_age` and, less everything the
    creates admitted on it may take (their whole limits, as if each used all of it at once) and
    this one's, still at or above the floor; otherwise the figure is read again and the create
    judged on that fresh reading exactly as without a reading kept: refused when it is below
    the floor. So a refusal always comes from a fresh reading, and an admission from a reading
    at most `max_age` old that left room for every create admitted on it. What it cannot see:
    memory or disk that processes outside the sandboxes take within `max_age`; a reading taken
    at every create would not see what they take right after it either.
    """

    def __init__(
        self,
        read: Callable[[], int | None],
        floor: int,
        max_age: float = HOST_READING_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self.floor = floor
        self._max_age = max_age
        self._clock = clock
        self._value: int | None = None
        self._at = 0.0
        self._taken = 0  # what the creates admitted on the kept reading may take
        self.reads = 0  # how often the host was read (for tests)

    def below_floor(self, taking: int) -> int | None:
        """The fresh figure when it is below the floor (refuse the create), else None; counts
        `taking` against the kept reading when the create is admitted."""
        now = self._clock()
        value = self._value
        if (
            value is not None
            and now - self._at < self._max_age
            and value - self._taken - taking >= self.floor
        ):
            self._taken += taking
            return None
        self.reads += 1
        value = self._read()
        self._value, self._at, self._taken = value, now, 0
        if value is None or value >= self.floor:
            self._taken = taking
            return None
        self._value = None  # a refusal is never reused: the next create reads again
        return value


class Admission:
    """What live sandboxes hold (memory reserved, each owner's usage) and the bounds on it."""

    def __init__(self, config: ServerConfig, registry: Registry) -> None:
        self._config = config
        self._memory_reserved = 0
        self._quotas = OwnerQuotas(config.owner_quota, registry)
        self.host_memory = HostReading(available_memory_bytes, config.min_free_memory_bytes)
        self.host_disk = HostReading(
            lambda: free_disk_bytes(config.state_dir), config.min_free_disk_bytes
        )

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

        floor = self.host_memory.floor
        if floor:
            available = self.host_memory.below_floor(memory)
            if available is not None:
                raise CapacityExceeded(
                    f"host memory low: {format_bytes(available)} available, below the floor of "
                    f"{format_bytes(floor)} (server --min-free-memory); stop some sandboxes first"
                    if operator
                    else "host memory low (server --min-free-memory); try again later"
                )
        floor = self.host_disk.floor
        if floor:
            free = self.host_disk.below_floor(charge.disk_bytes)
            if free is not None:
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
