"""The recent commands of each sandbox, with how each ended and what it used, for the
dashboard's sandbox page.

Fed by the calls interceptor (`call_metrics.CallMetrics`), which sees each Exec and RunCommand's
init frame (the argv and the sandbox) and its terminal frame (the exit with its usage, or the
error): the exec servicers are not touched. Only commands that reached a terminal frame
are kept; a command that was refused before it started (another owner's sandbox: NOT_FOUND) is
kept only under the id it named, which only that id's owner or the operator can look at.

Bounded: the newest `PER_SANDBOX` commands of each of the `SANDBOXES` sandboxes that ran one
most recently (a deleted sandbox's go at once); an argv is kept to `ARGV_CHARS` characters. In
memory only: a restart of the service forgets them.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass

__all__ = ["COMMANDS", "CommandLog", "CommandRecord"]

PER_SANDBOX = 20
SANDBOXES = 1000
ARGV_CHARS = 200


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """One finished command: its argv (shortened), when it started (unix ns), how it ended
    (`exit_code`, or `error` the gRPC code name of an error frame), and its usage."""

    argv: str
    started_ns: int
    exit_code: int | None
    error: str
    wall_seconds: float
    cpu_seconds: float
    peak_memory_bytes: int


class CommandLog:
    """See the module docstring. Event-loop thread only."""

    def __init__(self, per_sandbox: int = PER_SANDBOX, sandboxes: int = SANDBOXES) -> None:
        self._per_sandbox = per_sandbox
        self._sandboxes = sandboxes
        self._by_sandbox: OrderedDict[str, deque[CommandRecord]] = OrderedDict()

    def add(self, sandbox_id: str, record: CommandRecord) -> None:
        commands = self._by_sandbox.get(sandbox_id)
        if commands is None:
            commands = self._by_sandbox[sandbox_id] = deque(maxlen=self._per_sandbox)
            while len(self._by_sandbox) > self._sandboxes:
                self._by_sandbox.popitem(last=False)
        else:
            self._by_sandbox.move_to_end(sandbox_id)
        commands.append(record)

    def forget(self, sandbox_id: str) -> None:
        """Drops a deleted sandbox's commands."""
        self._by_sandbox.pop(sandbox_id, None)

    def of(self, sandbox_id: str) -> list[CommandRecord]:
        """The sandbox's kept commands, newest first."""
        return list(reversed(self._by_sandbox.get(sandbox_id, ())))


def shorten(argv: list[str]) -> str:
    text = " ".join(argv)
    return text if len(text) <= ARGV_CHARS else text[: ARGV_CHARS - 1] + "…"


def now_ns() -> int:
    return time.time_ns()


COMMANDS = CommandLog()
