"""The usage history of sandboxes: CPU, memory and tasks sampled on an interval, kept bounded.

Every `interval` seconds the service reads each live sandbox's usage from its handle
(`SandboxHandle.usage`: three small cgroup files on this node, about 25 µs a sandbox) and
appends it to that sandbox's ring. A ring holds at most `capacity` samples and covers the
sandbox's whole life: when it is full, each two neighbours merge into one (the later time and
CPU total, the larger memory and task count), and from then on only every other reading is
kept, so a long life is kept at a coarser step rather than cut. The rings of ended sandboxes are
kept for the `keep_ended` most recent ones, then dropped. In all the history holds at most
`capacity * (live sandboxes + keep_ended)` samples of 32 bytes each (4 integers in arrays).

Sampling runs on the service's event loop in slices of `SLICE` sandboxes, yielding between
slices, so that a round over a thousand sandboxes never holds the loop for more than about 2 ms
at a time (64 readings of about 30 µs).

Sandboxes on another machine (a Ray node): before each round the placement fetches their
readings, one call per node for all of its sandboxes (`Placement.refresh_usage`,
cluster/remote_usage.py), so the round itself still never waits. A node that does not answer
leaves a gap in its sandboxes' histories, never a guessed figure; a sandbox whose node cannot
read it at all says so (`unavailable`). A sandbox that starts and ends between two rounds has
no samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aviato.runtime.base import SandboxHandle, UsageReading

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_INTERVAL_SECONDS",
    "UNAVAILABLE_REASON",
    "History",
    "UsageHistory",
    "UsagePoint",
]

log = logging.getLogger("aviato.server.usage")

DEFAULT_INTERVAL_SECONDS = 5.0
DEFAULT_CAPACITY = 360  # 30 minutes at 5 s, then coarser
DEFAULT_KEEP_ENDED = 200
SLICE = 64
UNAVAILABLE_REASON = (
    "its node cannot read its usage (a node without cgroups, or a node host that does not answer)"
)


@dataclass(frozen=True, slots=True)
class UsagePoint:
    """One sample: unix time (ns), CPU ns used so far, memory bytes, tasks (-1: unknown)."""

    time_ns: int
    cpu_ns: int
    memory_bytes: int
    pids: int


class _Ring:
    """The samples of one sandbox (see the module docstring for how a full ring merges)."""

    __slots__ = ("_folded", "_pending", "capacity", "cpu", "memory", "pids", "stride", "times")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(2, capacity - capacity % 2)
        self.times = array("q")
        self.cpu = array("q")
        self.memory = array("q")
        self.pids = array("q")
        self.stride = 1  # readings per kept sample
        self._pending: tuple[int, int] | None = None  # (max memory, max pids) of skipped ones
        self._folded = 0

    def add(self, time_ns: int, reading: UsageReading) -> None:
        memory, pids = reading.memory_bytes, reading.pids
        if self._pending is not None:
            memory, pids = max(memory, self._pending[0]), max(pids, self._pending[1])
        self._folded += 1
        if self._folded < self.stride:  # one reading in `stride` is kept
            self._pending = (memory, pids)
            return
        self._folded = 0
        self._pending = None
        if len(self.times) >= self.capacity:
            self._merge()
        self.times.append(time_ns)
        self.cpu.append(reading.cpu_ns)
        self.memory.append(memory)
        self.pids.append(pids)

    def _merge(self) -> None:
        def pairs(values: array[int], pick: Callable[[int, int], int]) -> array[int]:
            return array("q", (pick(values[i], values[i + 1]) for i in range(0, len(values), 2)))

        def later(_a: int, b: int) -> int:
            return b

        self.times = pairs(self.times, later)
        self.cpu = pairs(self.cpu, later)
        self.memory = pairs(self.memory, max)
        self.pids = pairs(self.pids, max)
        self.stride *= 2

    def points(self, last: int = 0) -> list[UsagePoint]:
        start = max(0, len(self.times) - last) if last > 0 else 0
        return [
            UsagePoint(self.times[i], self.cpu[i], self.memory[i], self.pids[i])
            for i in range(start, len(self.times))
        ]


@dataclass(frozen=True)
class History:
    """What the history holds of one sandbox: its samples, oldest first, the interval between
    readings kept now (ns; it doubles each time the ring merges), and why there are none when
    the node cannot report (empty when it can)."""

    sandbox_id: str
    points: list[UsagePoint]
    step_ns: int
    unavailable: str = ""


class _Entry:
    __slots__ = ("ring", "skipped", "unavailable")

    def __init__(self, capacity: int) -> None:
        self.ring = _Ring(capacity)
        self.skipped = 0
        self.unavailable = False


class UsageHistory:
    """Samples the sandboxes that `live` lists, as (id, handle or None while it starts), every
    `interval` seconds (0: never; every history is then empty), after awaiting `refresh`
    (the placement's fetch of readings kept on other machines). Event-loop thread only."""

    def __init__(
        self,
        live: Callable[[], Iterable[tuple[str, SandboxHandle | None]]],
        *,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        capacity: int = DEFAULT_CAPACITY,
        keep_ended: int = DEFAULT_KEEP_ENDED,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._live = live
        self._refresh = refresh
        self.interval = interval
        self._capacity = capacity
        self._keep_ended = keep_ended
        self._entries: dict[str, _Entry] = {}
        self._ended: OrderedDict[str, _Entry] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0
        self.last_round_seconds = 0.0

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._sample_forever(), name="aviato-usage")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _sample_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.sample_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("usage sampling failed; trying again next round")
            self.last_round_seconds = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.interval - self.last_round_seconds))

    async def sample_once(self) -> None:
        """One round over every live sandbox (public for tests and the benchmark)."""
        if self._refresh is not None:
            await self._refresh()
        seen: set[str] = set()
        for n, (sandbox_id, handle) in enumerate(list(self._live())):
            if n and n % SLICE == 0:
                await asyncio.sleep(0)
            seen.add(sandbox_id)
            if handle is None:
                continue
            entry = self._entries.get(sandbox_id)
            if entry is None:
                entry = self._entries[sandbox_id] = _Entry(self._capacity)
            reading = handle.usage()
            if reading is None:
                entry.unavailable = not len(entry.ring.times)
                continue
            entry.unavailable = False
            entry.ring.add(time.time_ns(), reading)
        for sandbox_id in [s for s in self._entries if s not in seen]:
            self._ended[sandbox_id] = self._entries.pop(sandbox_id)
        while len(self._ended) > self._keep_ended:
            self._ended.popitem(last=False)
        self.rounds += 1

    def history(self, sandbox_id: str, last: int = 0) -> History:
        """The samples of `sandbox_id` (its newest `last` ones when `last` > 0)."""
        entry = self._entries.get(sandbox_id) or self._ended.get(sandbox_id)
        step = int(self.interval * 1e9)
        if entry is None:
            return History(sandbox_id, [], step)
        return History(
            sandbox_id,
            entry.ring.points(last),
            step * entry.ring.stride,
            UNAVAILABLE_REASON if entry.unavailable else "",
        )

    def recent(self, sandbox_id: str) -> tuple[int, int, float | None] | None:
        """(memory bytes, tasks) of the newest sample and the CPU cores used between the last
        two (None with one), without building samples: what a scrape reads of each sandbox."""
        entry = self._entries.get(sandbox_id)
        if entry is None:
            return None
        ring = entry.ring
        n = len(ring.times)
        if n == 0:
            return None
        cores = None
        if n >= 2 and ring.times[n - 1] > ring.times[n - 2] and ring.cpu[n - 2] >= 0:
            used = ring.cpu[n - 1] - ring.cpu[n - 2]
            cores = max(0, used) / (ring.times[n - 1] - ring.times[n - 2])
        return ring.memory[n - 1], ring.pids[n - 1], cores

    def latest(self, sandbox_id: str) -> UsagePoint | None:
        entry = self._entries.get(sandbox_id)
        if entry is None or not len(entry.ring.times):
            return None
        points = entry.ring.points(1)
        return points[0] if points else None

    def sample_count(self) -> int:
        """Samples held in all (what bounds the history's memory)."""
        return sum(len(e.ring.times) for e in (*self._entries.values(), *self._ended.values()))
