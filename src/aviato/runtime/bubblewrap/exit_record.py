"""How a sandbox ended: the exit record its supervisor writes (fd 5, `exit_code signal time_ns
[why]`; docs/internals/supervisor-protocol.md) and the cgroup's OOM counter, read into the
runtime's `MainExit`.

How a sandbox ends is read from the exit file the supervisor writes as its last act, plus the
cgroup's OOM counter: `reason` is "max lifetime exceeded" or "lease expired" when the supervisor
ended it at the deadline the service gave it (`set_deadline`: enforced also while the service is
down); "OOMKilled" when the OOM killer struck and the main process died of SIGKILL or exited with
137 (a shell passing on its command's SIGKILL), or no record was written; "signal from inside:
..." when a process of the sandbox sent its init SIGTERM/SIGINT; "killed" when we killed it,
"lost" when it vanished without a record for another reason.

An exec's `oom_killed` uses the same counter: read when the command starts and again if it dies of
SIGKILL (or its shell reports 137) without a timeout or a kill of ours. The counter is the
sandbox's: a command killed by something else while another process of the sandbox is OOM-killed
is reported as OOM-killed too.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

from aviato.runtime.base import MainExit


def parse_exit_file(text: str) -> tuple[int, int, int, str] | None:
    """`exit_code signal time_ns [why]` → the three numbers and `why` ("" when absent); None for
    an empty or torn record."""
    parts = text.split()
    if len(parts) not in (3, 4):
        return None
    try:
        code, signo, ended = (int(p) for p in parts[:3])
    except ValueError:
        return None
    return code, signo, ended, parts[3] if len(parts) == 4 else ""


DEADLINE_REASONS = {
    "deadline:lifetime": "max lifetime exceeded",
    "deadline:lease": "lease expired",
}


def inside_signal_reason(why: str) -> str:
    """`signal:SIG:PID` (the supervisor's record of a signal sent from inside) → a reason."""
    try:
        _, signo, pid = why.split(":")
        name, sender = signal.Signals(int(signo)).name, int(pid)
    except ValueError:
        return ""
    by = f"by its pid {sender}" if sender else "not by kill() (e.g. an I/O signal aimed at it)"
    return f"signal from inside: {name} sent to the sandbox's init {by}"


def main_exit(directory: Path, oom_kills: Callable[[], int] | None, killed: bool) -> MainExit:
    """How the sandbox with state `directory` ended, from its exit record; `oom_kills` reads its
    cgroup's OOM-kill counter (None without a cgroup); `killed`: whether the service killed it."""
    try:
        record = parse_exit_file((directory / "exit").read_text())
    except OSError:
        record = None
    ooms = oom_kills() if oom_kills is not None else 0
    if record is not None:
        code, signo, ended, why = record
        if why in DEADLINE_REASONS:
            return MainExit(code, signo, ended, DEADLINE_REASONS[why])
        # Killed by the OOM killer: SIGKILL itself, or a shell that reports its command's
        # SIGKILL as 137 (`sh -c 'big; exit $?'`) while the cgroup counted an OOM kill.
        oom_death = signo == signal.SIGKILL or (signo == 0 and code == 128 + signal.SIGKILL)
        reason = "OOMKilled" if ooms and oom_death else ""
        if not reason and why.startswith("signal:"):
            reason = inside_signal_reason(why)
        return MainExit(code, signo, ended, reason)
    if ooms:
        reason = "OOMKilled"
    elif killed:
        reason = "killed"
    else:
        reason = "lost"
    code = 128 + signal.SIGKILL if reason != "lost" else -1
    signo = signal.SIGKILL if reason != "lost" else 0
    return MainExit(code, signo, time.time_ns(), reason)
