"""Numbers: percentiles, bounded loops, memory and facts about the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20


def pct(values: list[float], q: float) -> float:
    """The q-th percentile as `sorted[round(q/100 * (n-1))]` (the method of host-facts.md)."""
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def latency_summary(seconds: list[float]) -> dict[str, Any]:
    """p50/p90/p99/mean/max in milliseconds of a list of durations in seconds."""
    if not seconds:
        return {"n": 0}
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p90_ms": round(pct(ms, 90), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "max_ms": round(max(ms), 3),
    }


@dataclass
class Errors:
    """Counts failures of one series and keeps the first few messages."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, what: str | BaseException) -> None:
        self.count += 1
        if len(self.examples) < 5:
            text = what if isinstance(what, str) else f"{type(what).__name__}: {what}"
            self.examples.append(text[:300])

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"errors": self.count}
        if self.examples:
            out["error_examples"] = self.examples
        return out


def meminfo_kib() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0])
    return out


def mem_available_bytes() -> int:
    return meminfo_kib()["MemAvailable"] * 1024


def settle_mem_available(
    pause: float, limit: float = 30.0, reads: int = 5, interval: float = 0.5
) -> tuple[int, float]:
    """MemAvailable once it has settled: `sync`, a pause, then a read every `interval` until `reads`
    reads in a row lie within 4 MiB, for at most `limit` seconds after the pause. Returns the
    median of the last `reads` reads and their spread in MiB (how far from settled it was)."""
    os.sync()
    time.sleep(pause)
    history: list[int] = []
    deadline = time.monotonic() + limit
    while True:
        history.append(mem_available_bytes())
        last = history[-reads:]
        spread = max(last) - min(last)
        if len(last) == reads and (spread <= 4 * MiB or time.monotonic() > deadline):
            return int(statistics.median(last)), round(spread / MiB, 1)
        time.sleep(interval)


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def _cgroup_version() -> str:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "v2"
    if Path("/sys/fs/cgroup/memory").is_dir():
        unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
        return "v1 (hybrid)" if unified.exists() else "v1"
    return "unknown"


def machine_facts() -> dict[str, Any]:
    mem = meminfo_kib()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem.get("MemTotal", 0) / (1 << 20), 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "cgroup": _cgroup_version(),
        "python": platform.python_version(),
        "uid": os.geteuid(),
        # bubblewrap reads the whole mount table for each mount it makes: raw bwrap's create
        # time grows with it (5.6 ms at 43 mounts, 15.3 ms at 285 here); aviato's launcher
        # shows bwrap only the mounts it uses (docs/benchmarks.md).
        "host_mounts": _mount_count(),
        # Every sandbox starts one supervisor; built against static glibc its start is ~0.6 ms
        # slower in this VM than against musl (setup.py).
        "supervisor": _supervisor_version(),
    }


def _supervisor_version() -> str:
    try:
        from aviato.runtime.supervisor import c_library, supervisor_binary

        libc = c_library(supervisor_binary()) or "an unnamed C library"
        return f"supervisor built against {libc}"
    except Exception as e:  # not installed: said in the report
        return f"supervisor unknown ({e})"


def _mount_count() -> int:
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return -1


def parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        parents[int(entry)] = int(fields[1])
    return parents


def children_of(pid: int) -> list[int]:
    return [child for child, parent in parent_map().items() if parent == pid]


def tree_pss_bytes(roots: list[int]) -> tuple[int, int]:
    """(sum of Pss, number of processes) over `roots` and all their descendants."""
    parents = parent_map()
    kids: dict[int, list[int]] = {}
    for child, parent in parents.items():
        kids.setdefault(parent, []).append(child)
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(kids.get(pid, ()))
    total = 0
    for pid in seen:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total, len(seen)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
