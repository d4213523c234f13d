"""What to run: the sizes of each figure (`FULL`, `QUICK`) and the RL reward workload."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks._stats import MiB


@dataclass(frozen=True)
class Plan:
    """How much of each figure to run. `FULL` is the issue's; `QUICK` a smoke test (< 1 min).

    `rounds`: the timed series of a figure is split into this many rounds, and the systems take
    turns round by round, so that a change of the machine's load during the run (this machine
    is shared) falls on every system alike instead of on whichever ran at that moment.
    `series_seconds` bounds each system's time in one figure.
    """

    quick: bool = False
    rounds: int = 5
    burst_rounds: int = 3
    create_runs: int = 200
    burst: int = 1000
    exec_runs: int = 1000
    rl_sandboxes: int = 32
    rl_programs: int = 50
    file_small: int = 1 * MiB
    file_large: int = 100 * MiB
    file_repeats: int = 5
    idle: int = 500
    warmup: int = 5
    throughput_sandboxes: int = 16
    in_flight: int = 64
    throughput_execs: int = 6000
    memory_warmup: int = 500
    memory_sandboxes: int = 10_000
    memory_parallel: int = 8
    series_seconds: float = 120.0
    density_seconds: float = 300.0
    memory_seconds: float = 900.0  # bounds each wave of the memory figure
    settle_seconds: float = 1.0
    settle_limit_seconds: float = 30.0
    settle_reads: int = 5
    settle_interval: float = 0.5
    memory_settle_seconds: float = 1.0  # after a wave of the memory figure, before the reading
    pause_seconds: float = 0.5

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Plan()
QUICK = Plan(
    quick=True,
    rounds=2,
    burst_rounds=1,
    create_runs=15,
    burst=20,
    exec_runs=60,
    rl_sandboxes=8,
    rl_programs=5,
    file_large=8 * MiB,
    file_repeats=2,
    idle=40,
    warmup=2,
    throughput_execs=256,
    memory_warmup=20,
    memory_sandboxes=100,
    series_seconds=8.0,
    density_seconds=40.0,
    memory_seconds=40.0,
    settle_seconds=0.1,
    settle_limit_seconds=1.0,
    settle_reads=2,
    settle_interval=0.1,
    memory_settle_seconds=0.2,
    pause_seconds=0.05,
)

# --- the RL workload --------------------------------------------------------------------------

# The reward check: a candidate program arrives on stdin, defines `solve(n)`, and is scored on
# eight cases; the score is printed. The same text runs in-process to know the expected scores.
HARNESS = """\
import sys
def score(src):
    cases = [(n, n * (n + 1) * (2 * n + 1) // 6) for n in range(0, 50, 7)]
    ns = {}
    try:
        exec(compile(src, "<candidate>", "exec"), ns)
    except Exception:
        return "0.000"
    ok = 0
    for n, want in cases:
        try:
            ok += ns["solve"](n) == want
        except Exception:
            pass
    return "%.3f" % (ok / len(cases))
if __name__ == "__main__":
    print(score(sys.stdin.read()))
"""

CANDIDATES = (
    "def solve(n):\n    return sum(i * i for i in range(n + 1))\n",
    "def solve(n):\n    return n * (n + 1) * (2 * n + 1) // 6\n",
    "def solve(n):\n    return sum(i * i for i in range(n))\n",
    "def solve(n):\n    t = 0\n    for i in range(n + 1):\n        t += i ** 2\n    return t\n",
    "def solve(n):\n    return undefined_name\n",
    "def solve(n) return n\n",
    "def solve(n):\n    return str(n)\n",
    "def solve(n):\n    return sum(i * i for i in range(n + 1)) if n % 2 else 0\n",
)


def rl_programs(sandbox: int, count: int) -> list[tuple[bytes, str]]:
    """`count` (source, expected score) pairs for one sandbox; the sources differ everywhere."""
    namespace: dict[str, Any] = {"__name__": "harness"}
    exec(HARNESS, namespace)
    score: Callable[[str], str] = namespace["score"]
    out = []
    for k in range(count):
        src = f"# sandbox {sandbox}, candidate {k}\n" + CANDIDATES[(sandbox + k) % len(CANDIDATES)]
        out.append((src.encode(), score(src)))
    return out
