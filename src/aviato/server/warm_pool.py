"""The warm pool (`aviato server --warm-pool N`): sandboxes of the service's default shape,
started ahead of demand, each handed out once to a create whose spec is exactly that shape.

The shape is what an empty spec validates to with the service's defaults: the default image
(`host` unless `--default-image`), the default memory, pids and disk, the keep-alive main
process, no environment, mounts, mounted files, secrets, egress, exposed ports, snapshot or
node selector, the default writable layer. A create whose validated config differs from it in
anything the runtime sees (only the sandbox's id and its idle timeout, which only the service's
reaper reads, are left out of the comparison) creates a fresh sandbox, as without a pool.

Why a pooled sandbox is indistinguishable from a fresh one:
- it was made by the same `runtime.create` from the same config a fresh one of that shape gets:
  same image, limits (its cgroup), isolation, environment, hostname, user namespace;
- nobody has touched it: a member has no record, is not listed, is in no owner's quota, and no
  call can name it (every sandbox call finds its sandbox through the lifecycle's records); it is
  handed out at most once (`claim` removes it) and never comes back to the pool;
- its identity is given at the claim: the id it was started under is random like a fresh one's
  and was never shown to anyone; the record (owner, tags, lifetime, lease, created time) is
  written then, and the supervisor gets the claimed sandbox's deadline before it is recorded
  RUNNING (`sandbox_runs`), replacing the member's own.
What differs, and cannot be hidden: its init process started before the create call (up to
`MEMBER_LIFETIME_SECONDS` before: `ps -o etime 1` in the sandbox shows it), and its cgroup's CPU
counter holds the few milliseconds its start took.

Members live at most `MEMBER_LIFETIME_SECONDS` (their supervisor's own deadline, so they end
even when the service is killed and never restarted); one that ends is replaced. A member is
not claimed in its last `CLAIM_MARGIN_SECONDS`. On shutdown the members are killed and their
state removed; after a crash, the restarted service's reconciliation kills them (runtime state
without a record), before the pool starts again.

Refilling runs in the background, one member at a time, only while no user create is starting
(on 2 cores a refill beside a user's create would slow that create), while the service has
room (`room()`), and with a growing pause after a failed start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from aviato.runtime.base import Runtime, SandboxHandle, SandboxRuntimeError
from aviato.runtime.model import SandboxConfig
from aviato.server.record_json import config_json
from aviato.server.records import kept_config

__all__ = [
    "MEMBER_LIFETIME_SECONDS",
    "PoolMember",
    "WarmPool",
    "new_sandbox_id",
]

log = logging.getLogger("aviato.server.warm_pool")

# How long a member waits for a claim before its supervisor ends it (and it is replaced).
MEMBER_LIFETIME_SECONDS = 900.0
# A member this close to its end is not handed out (its supervisor may be ending it).
CLAIM_MARGIN_SECONDS = 60.0
# How long the refill waits after a claim (the claimed sandbox's first commands run then).
QUIET_AFTER_CLAIM_SECONDS = 0.2
# How often the refill looks again while user creates are starting.
YIELD_SECONDS = 0.005
# How often a full service is asked again whether it has room for a member.
ROOM_POLL_SECONDS = 1.0
# Pauses after failed starts: the first, and the longest.
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 60.0
# How long the shutdown waits for members to be killed and removed.
CLOSE_SECONDS = 20.0


def new_sandbox_id() -> str:
    """A fresh sandbox id (the lifecycle's and the pool's are made the same way)."""
    return "sbx-" + secrets.token_hex(6)


# What of a config is not the pool's shape: the sandbox's id and its idle timeout (enforced by
# the service's reaper, never seen by the runtime; the claimed sandbox's record keeps the
# request's).
_NOT_SHAPE = frozenset({"sandbox_id", "idle_timeout_seconds"})
_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(SandboxConfig) if f.name not in _NOT_SHAPE)


@dataclass
class PoolMember:
    """A started sandbox of the pool's shape, not yet anybody's."""

    sandbox_id: str
    config: SandboxConfig
    handle: SandboxHandle
    started: float  # time.monotonic() when it became ready
    watcher: asyncio.Task[None] | None = None
    # `record_json.config_json` of the record a claim keeps of `config`, made while it waits
    # (`config_text_for`).
    config_text: str = ""

    def config_for(self, config: SandboxConfig) -> SandboxConfig:
        """The claimed sandbox's config: the claimer's `config` (of the pool's shape) under the
        member's id; the member's own when they agree on the idle timeout (no copy)."""
        if config.idle_timeout_seconds == self.config.idle_timeout_seconds:
            return self.config
        return replace(self.config, idle_timeout_seconds=config.idle_timeout_seconds)

    def config_text_for(self, config: SandboxConfig) -> str:
        """`record_json.config_json(config)` when `config` is the member's own (made while it
        waited), else "" (the registry makes it)."""
        return self.config_text if config is self.config else ""


class WarmPool:
    """Keeps up to `size` members of `shape` (a validated config, sandbox_id "") started on
    `runtime` (of node `node`). `busy()`: user creates are starting now (the refill waits);
    `room()`: the service may hold one more sandbox. `grace_seconds`: the stop grace given to a
    member's supervisor with its deadline. Use from the event loop thread only."""

    def __init__(
        self,
        size: int,
        shape: SandboxConfig,
        runtime: Runtime,
        node: str,
        *,
        busy: Callable[[], bool],
        room: Callable[[], bool],
        grace_seconds: float,
    ) -> None:
        self.size = size
        self.node = node
        self.runtime = runtime
        self._shape = replace(shape, sandbox_id="")
        self._busy = busy
        self._room = room
        self._grace = grace_seconds
        self._ready: list[PoolMember] = []
        self._starting = 0
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._removals: set[asyncio.Task[None]] = set()
        self._closing = False
        self._last_claim = 0.0
        self.claims = 0  # creates served by a member
        self.misses = 0  # creates of the shape that found the pool empty
        self.failures = 0  # members that failed to start
        self.last_error = ""

    # --- the service's side ---

    def start(self) -> None:
        """Starts filling the pool in the background."""
        self._filler = asyncio.create_task(self._fill_forever(), name="aviato-warm-pool")
        self._wanted.set()

    def matches(self, config: SandboxConfig) -> bool:
        """Whether a create of `config` may be served by a member."""
        shape = self._shape  # field by field: no copy of `config` per create
        return all(getattr(config, name) == getattr(shape, name) for name in _SHAPE_FIELDS)

    def claim(self, config: SandboxConfig) -> PoolMember | None:
        """A ready member for a create of `config`, removed from the pool for good; None when
        the config is not the pool's shape or no member is ready. Synchronous: nothing can
        interleave between the choice and the removal."""
        if self._closing or not self.matches(config):
            return None
        now = time.monotonic()
        while self._ready:
            member = self._ready.pop(0)
            ended = member.watcher is None or member.watcher.done()
            if member.watcher is not None:
                member.watcher.cancel()
            fresh = now - member.started < MEMBER_LIFETIME_SECONDS - CLAIM_MARGIN_SECONDS
            if not ended and fresh:
                self.claims += 1
                self._last_claim = now
                self._wanted.set()
                return member
            self._retire(member)  # near its end or gone: never handed out
        self.misses += 1
        self._wanted.set()
        return None

    def discard(self, member: PoolMember) -> None:
        """Removes a claimed member whose create was not recorded after all (a retried
        create's request id was in the registry): killed and its state removed, as any member
        that is never handed out."""
        self._retire(member)

    def describe(self) -> str:
        """One line for `aviato server status`."""
        text = (
            f"{len(self._ready)} of {self.size} ready ({self._starting} starting); image "
            f"{self._shape.image}, default limits; {self.claims} creates served, "
            f"{self.misses} missed"
        )
        if self.last_error:
            text += f"; last failure: {self.last_error}"
        return text

    @property
    def ready_ids(self) -> list[str]:
        return [m.sandbox_id for m in self._ready]

    @property
    def held(self) -> int:
        """Members ready or starting: sandboxes of this node that belong to nobody yet."""
        return len(self._ready) + self._starting

    async def close(self) -> None:
        """Stops refilling, kills every member and removes its state (bounded in time)."""
        self._closing = True
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        members, self._ready = self._ready, []
        for member in members:
            self._retire(member)
        if self._removals:
            await asyncio.wait(list(self._removals), timeout=CLOSE_SECONDS)

    # --- filling ---

    async def _fill_forever(self) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        while not self._closing:
            await self._wanted.wait()
            self._wanted.clear()
            while not self._closing and len(self._ready) + self._starting < self.size:
                # A claimed sandbox's first commands come right after its create: leave them
                # the CPU (a member's start takes a core for ~10 ms), as user creates.
                quiet = self._last_claim + QUIET_AFTER_CLAIM_SECONDS - time.monotonic()
                if quiet > 0 or self._busy():
                    await asyncio.sleep(max(quiet, YIELD_SECONDS))
                    continue
                if not self._room():  # the service is full: look again later
                    await asyncio.sleep(ROOM_POLL_SECONDS)
                    continue
                if await self._start_one():
                    backoff = FIRST_BACKOFF_SECONDS
                else:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _start_one(self) -> bool:
        config = replace(self._shape, sandbox_id=new_sandbox_id())
        self._starting += 1
        try:
            handle = await self.runtime.create(config)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # SandboxRuntimeError, or a crash: counted, logged, retried
            self.failures += 1
            self.last_error = str(e)[:200]
            log.warning("warm pool: a member failed to start: %s", e)
            return False
        finally:
            self._starting -= 1
        member = PoolMember(config.sandbox_id, config, handle, time.monotonic())
        kept = kept_config(config)
        if kept is config:  # what a claim's record keeps: made now, not at the claim
            member.config_text = config_json(kept)
        try:
            deadline = time.time_ns() + int(MEMBER_LIFETIME_SECONDS * 1e9)
            await handle.set_deadline(deadline, "lifetime", self._grace)
        except (SandboxRuntimeError, OSError) as e:
            self.failures += 1
            self.last_error = f"deadline not given: {e}"[:200]
            self._retire(member)
            return False
        if self._closing:
            self._retire(member)
            return True
        member.watcher = asyncio.create_task(self._watch(member))
        self._ready.append(member)
        return True

    async def _watch(self, member: PoolMember) -> None:
        """Drops a member that ends while it waits (its deadline, or a crash)."""
        await member.handle.wait_exit()
        if member in self._ready:
            self._ready.remove(member)
            log.info("warm pool: member %s ended unclaimed; replacing it", member.sandbox_id)
            self._retire(member)
            self._wanted.set()

    def _retire(self, member: PoolMember) -> None:
        """Kills a member that will never be handed out and removes its state, in the
        background."""

        async def remove() -> None:
            try:
                await member.handle.kill()  # a member that ended already just answers
                await self.runtime.cleanup(member.sandbox_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("warm pool: removing member %s failed", member.sandbox_id)

        task = asyncio.create_task(remove())
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)
