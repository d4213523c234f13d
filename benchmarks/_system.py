"""The one interface every measured system implements: aviato and each reference.

A *box* is whatever the system calls a sandbox (an aviato `Sandbox`, a Docker container, a
directory for the floor and raw bubblewrap). The scenarios (`scenarios.py`) are written once
against this interface, so every system does exactly the same work:

- sync: `create`, `exec`, `write_file`, `read_file`, `stop` (one after another);
- async: `acreate`, `aexec`, `astop` (many at once on one event loop);
- throughput: `exec_rate`, many commands in flight at once (by default through `aexec`);
- density: `start_idle` / `stop_idle` of many idle sandboxes, each system its natural way.

Commands are argv lists resolved inside the box with the `host` image's PATH, so that `python3`
is the same interpreter everywhere (the floor resolves it with that PATH on the host).
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TIMEOUT = 120.0


class Skip(Exception):
    """The system cannot be measured here (the message says why)."""


@dataclass(frozen=True)
class ExecOut:
    code: int
    stdout: bytes
    stderr: bytes = b""


@dataclass
class Rate:
    """A series of commands kept `in_flight` at once: how many ended well, in how long."""

    ok: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class System(abc.ABC):
    """A system under measurement. `start()` may raise `Skip`."""

    name: str = ""
    label: str = ""
    # Whether a box runs commands without being started anew for each (raw bwrap starts one
    # bwrap per command: its throughput is the create figure's matter, not measured there).
    persistent_boxes: bool = True

    def start(self) -> None:  # noqa: B027 - optional hook
        """Prepares the system (a daemon, a service, an image); may raise `Skip`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases everything `start()` made. Must not raise."""

    def describe(self) -> dict[str, Any]:
        """Versions and settings, for the JSON."""
        return {}

    # -- sync ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def create(self) -> Any:
        """A new box, ready to take a command (it may still be starting)."""

    @abc.abstractmethod
    def exec(self, box: Any, argv: Sequence[str], stdin: bytes | None = None) -> ExecOut:
        """Runs `argv` in `box` and waits for its exit."""

    @abc.abstractmethod
    def write_file(self, box: Any, path: str, data: bytes) -> None:
        """Creates `path` (absolute, in the box) holding `data`."""

    @abc.abstractmethod
    def read_file(self, box: Any, path: str) -> bytes: ...

    @abc.abstractmethod
    def stop(self, box: Any) -> None:
        """Ends the box and frees what it holds."""

    # -- async ---------------------------------------------------------------------------------

    @abc.abstractmethod
    async def acreate(self) -> Any: ...

    @abc.abstractmethod
    async def aexec(self, box: Any, argv: Sequence[str], stdin: bytes | None = None) -> ExecOut: ...

    @abc.abstractmethod
    async def astop(self, box: Any) -> None: ...

    # -- throughput ----------------------------------------------------------------------------

    def exec_rate(
        self, boxes: list[Any], argv: Sequence[str], in_flight: int, count: int, seconds: float
    ) -> Rate:
        """Runs `argv` `count` times (at most `seconds`), `in_flight` at once, spread over
        `boxes` in turn. By default `in_flight` tasks awaiting `aexec` on one event loop, as
        an async client would; a system with a cheaper way overrides it."""
        return asyncio.run(self._aexec_rate(boxes, argv, in_flight, count, seconds))

    async def _aexec_rate(
        self, boxes: list[Any], argv: Sequence[str], in_flight: int, count: int, seconds: float
    ) -> Rate:
        rate = Rate()
        left = count
        deadline = time.monotonic() + seconds

        async def worker(index: int) -> None:
            nonlocal left
            box = boxes[index % len(boxes)]
            while left > 0 and time.monotonic() < deadline:
                left -= 1
                try:
                    out = await self.aexec(box, argv)
                except Exception as exc:
                    rate.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if out.code == 0:
                    rate.ok += 1
                else:
                    rate.errors.append(f"exit {out.code}: {out.stderr[-200:]!r}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(in_flight)))
        rate.seconds = time.perf_counter() - t0
        return rate

    # -- density -------------------------------------------------------------------------------

    @abc.abstractmethod
    def start_idle(self, n: int, deadline_s: float) -> tuple[list[Any], int]:
        """Starts up to `n` idle boxes, all running when it returns; (boxes, errors)."""

    @abc.abstractmethod
    def stop_idle(self, boxes: list[Any]) -> int:
        """Stops them all, as fast as the system allows; returns the number of errors."""

    def idle_pids(self, boxes: list[Any]) -> list[int]:
        """Processes whose trees hold the idle boxes (for the PSS cross-check); [] if unknown."""
        return []

    def files_dir(self) -> str:
        """Where in a box the file benchmark writes (a tmpfs where the system has one)."""
        return "/workspace"
