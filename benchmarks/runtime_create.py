"""Sandbox start-up and idle density of `BubblewrapRuntime`, measured directly (no service or gRPC).

    python benchmarks/runtime_create.py [--runs 200] [--idle 200] [--json OUT] [--supervisor BIN]

Measures:
- create → first exec: `BubblewrapRuntime.create()` of a keep-alive sandbox, then `exec(["true"])`
  until its exit event; p50/p99 over `--runs` sandboxes created one after another (each is
  killed and cleaned up before the next, outside the timed span);
- the same split into its two parts (create until the supervisor's HELLO; the first exec);
- the same after an idle gap (`--gap` seconds before each of `--gap-runs` creates): how a
  service that creates sandboxes now and then sees it. Here the first cgroup migration after a
  quiet spell waits for an RCU grace period (cgroup_threadgroup_rwsem), which costs ~10 ms;
- idle memory: the drop of MemAvailable (and the rise of MemTotal - MemAvailable, kernel memory
  included) with `--idle` idle sandboxes running, divided by their number, after `sync` and a
  settle time before and after. The benchmark process's own growth (the supervisor connections'
  buffers) is reported separately as `service_rss_per_sandbox_kib`.

Prints a JSON document (also written to --json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
try:  # a checkout without `pip install .`
    import aviato  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(ROOT / "src"))

from aviato.runtime.base import ExecExit, ExecSpec, SandboxConfig  # noqa: E402
from aviato.runtime.bubblewrap import BubblewrapRuntime  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p90_ms": round(pct(ms, 90), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "mean_ms": round(sum(ms) / len(ms), 3),
        "max_ms": round(max(ms), 3),
    }


def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0])  # KiB
    return out


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def supervisor_path(given: str | None) -> Path | None:
    if given:
        return Path(given)
    built = ROOT / "src/aviato/runtime/_bin/aviato-supervisor"
    if built.exists():
        return built
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = Path(tempfile.mkdtemp()) / "aviato-supervisor"
    srcs = sorted(str(p) for p in (ROOT / "src/aviato/runtime/native").glob("*.c"))
    subprocess.run([cc, "-std=c11", "-O2", "-static", "-o", str(out), *srcs], check=True)
    return out


async def first_exec(handle: Any) -> None:
    e = await handle.exec(ExecSpec(argv=("true",)))
    async for ev in e.events():
        if isinstance(ev, ExecExit):
            assert ev.exit_code == 0, ev


async def bench_create(
    rt: BubblewrapRuntime, runs: int, warmup: int, gap: float = 0.0
) -> dict[str, Any]:
    total: list[float] = []
    create: list[float] = []
    exec_first: list[float] = []
    for i in range(warmup + runs):
        if gap:
            await asyncio.sleep(gap)
        sid = f"bench-{uuid.uuid4().hex[:10]}"
        t0 = time.perf_counter()
        handle = await rt.create(SandboxConfig(sid, "host", (), {}, ""))
        t1 = time.perf_counter()
        await first_exec(handle)
        t2 = time.perf_counter()
        await handle.kill()
        await rt.cleanup(sid)
        if i >= warmup:
            total.append(t2 - t0)
            create.append(t1 - t0)
            exec_first.append(t2 - t1)
    return {
        "create_to_first_exec": summary(total),
        "create_only": summary(create),
        "first_exec_only": summary(exec_first),
    }


async def settle() -> None:
    proc = await asyncio.create_subprocess_exec("sync")
    await proc.wait()
    await asyncio.sleep(2.0)


async def bench_idle(rt: BubblewrapRuntime, count: int) -> dict[str, Any]:
    await settle()
    before, rss_before = meminfo(), rss_kib()
    handles = []
    t0 = time.perf_counter()
    for _ in range(count):
        handles.append(await rt.create(SandboxConfig(f"idle-{uuid.uuid4().hex[:10]}", "host",
                                                     (), {}, "")))  # fmt: skip
    created_s = time.perf_counter() - t0
    await asyncio.gather(*(first_exec(h) for h in handles))
    await settle()
    after, rss_after = meminfo(), rss_kib()
    avail_drop = before["MemAvailable"] - after["MemAvailable"]
    used_rise = (after["MemTotal"] - after["MemAvailable"]) - (
        before["MemTotal"] - before["MemAvailable"]
    )
    slab_rise = after.get("Slab", 0) - before.get("Slab", 0)
    result = {
        "sandboxes": count,
        "sequential_create_ms_each": round(created_s * 1000 / count, 3),
        "memavailable_drop_per_sandbox_kib": round(avail_drop / count, 1),
        "used_rise_per_sandbox_kib": round(used_rise / count, 1),
        "slab_rise_per_sandbox_kib": round(slab_rise / count, 1),
        "service_rss_per_sandbox_kib": round((rss_after - rss_before) / count, 1),
    }
    t0 = time.perf_counter()
    await asyncio.gather(*(h.kill() for h in handles))
    for h in handles:
        await rt.cleanup(h.sandbox_id)
    result["teardown_ms_each"] = round((time.perf_counter() - t0) * 1000 / count, 3)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--gap-runs", type=int, default=30, help="creates after an idle gap")
    parser.add_argument("--gap", type=float, default=0.2, help="idle seconds before each")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--supervisor")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="avbench-", dir="/tmp"))
    rt = BubblewrapRuntime(state, supervisor=supervisor_path(args.supervisor),
                      max_sandboxes=max(512, args.idle + 8))  # fmt: skip
    result: dict[str, Any] = {
        "benchmark": "runtime_create",
        "host": {"nproc": os.cpu_count(), "kernel": os.uname().release},
        "runtime": rt.describe(),
    }
    try:
        if args.runs:
            result.update(await bench_create(rt, args.runs, args.warmup))
        if args.gap_runs:
            result["after_idle_gap"] = {
                "gap_s": args.gap,
                **await bench_create(rt, args.gap_runs, 2, gap=args.gap),
            }
        if args.idle:
            result["idle"] = await bench_idle(rt, args.idle)
    finally:
        for sid in rt.list_present():
            await rt.cleanup(sid)
        await rt.close()
        shutil.rmtree(state, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
