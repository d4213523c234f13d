"""Where a warm exec's CPU goes, process by process, next to the floor's: the measurement behind
docs/benchmarks.md's "Why the exec goals are out of reach here".

    python benchmarks/exec_anatomy.py [--seconds 6] [--in-flight 64] [--sandboxes 1]

Prints one JSON object:

- `floor`: `posix_spawn` + `waitpid` of `/usr/bin/true`, `in_flight` at a time, for `seconds`:
  spawns/s, and CPU per spawn of this process (the parent) and of its children (`true`);
- `aviato`: `exec(["true"])` awaited `in_flight` at a time, spread over `sandboxes` sandboxes
  of a fresh local service, for `seconds`: execs/s, and CPU per exec of this process (the
  SDK), of the service, of the sandboxes' supervisors and of their children (the commands,
  with the hardening each child does before its `execve`);
- `cpu_ratio`: the floor's CPU per spawn ÷ aviato's per exec, which is the throughput ratio
  with every core busy; `measured_ratio` is below it by the share of time the cores idle
  (`busy`: CPU used ÷ cores, for each);
- `beside_the_command_ms`: what aviato spends per exec beyond the floor's command and parent
  (the SDK, the service, the supervisor, and the child's hardening before `execve`: the
  children's CPU above the floor's `true`).

CPU is read from /proc (utime + stime; children's when they are reaped), so it counts what
each process spent whatever else runs on the machine; the rates do not: run it on a quiet
machine. Needs the SDK importable and a host where aviato runs (root or user namespaces).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TRUE = "/usr/bin/true"


def _ticks(pid: int | str) -> tuple[float, float]:
    """(own CPU, reaped children's CPU) of `pid`, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def floor(seconds: float, in_flight: int) -> dict[str, Any]:
    before, count = os.times(), 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        pids = [os.posix_spawn(TRUE, ["true"], {}) for _ in range(in_flight)]
        for pid in pids:
            os.waitpid(pid, 0)
        count += in_flight
    elapsed, after = time.monotonic() - started, os.times()
    own = after.user + after.system - before.user - before.system
    children = (
        after.children_user + after.children_system - before.children_user - before.children_system
    )
    return {
        "per_s": round(count / elapsed),
        "parent_ms": round(own / count * 1e3, 3),
        "commands_ms": round(children / count * 1e3, 3),
    }


def _supervisor_of(sandbox_id: str) -> list[int]:
    """The pids whose cgroup names the sandbox and whose name is the supervisor's."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "supervisor" and sandbox_id in (
                entry / "cgroup"
            ).read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


async def _aviato(service: int, seconds: float, in_flight: int, sandboxes: int) -> dict[str, Any]:
    import aviato

    boxes = list(await asyncio.gather(*(aviato.Sandbox.run() for _ in range(sandboxes))))
    for box in boxes:
        for _ in range(20):
            await box.exec(["true"])
    supervisors = [pid for box in boxes for pid in _supervisor_of(box.sandbox_id or "")]
    count = 0
    stop_at = time.monotonic() + seconds

    async def worker(box: aviato.Sandbox) -> None:
        nonlocal count
        while time.monotonic() < stop_at:
            await box.exec(["true"])
            count += 1

    me0, svc0 = os.times(), _ticks(service)
    sup0 = [_ticks(pid) for pid in supervisors]
    started = time.monotonic()
    await asyncio.gather(*(worker(boxes[i % sandboxes]) for i in range(in_flight)))
    elapsed = time.monotonic() - started
    me1, svc1 = os.times(), _ticks(service)
    sup1 = [_ticks(pid) for pid in supervisors]
    await asyncio.gather(*(box.stop() for box in boxes))

    def per(value: float) -> float:
        return round(value / count * 1e3, 3)

    return {
        "sandboxes": sandboxes,
        "per_s": round(count / elapsed),
        "sdk_ms": per(me1.user + me1.system - me0.user - me0.system),
        "service_ms": per(svc1[0] - svc0[0]),
        "supervisor_ms": per(sum(a[0] - b[0] for a, b in zip(sup1, sup0, strict=True))),
        "commands_ms": per(sum(a[1] - b[1] for a, b in zip(sup1, sup0, strict=True))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--sandboxes", type=int, default=1)
    args = parser.parse_args()
    state = tempfile.mkdtemp(prefix="avanat", dir="/tmp")
    service = subprocess.Popen(
        [sys.executable, "-m", "aviato.server", "--state-dir", state, "--http", "off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    os.environ["AVIATO_STATE_DIR"] = state
    out: dict[str, Any] = {"load": os.getloadavg()[0]}
    try:
        out["floor"] = floor(args.seconds, args.in_flight)
        deadline = time.monotonic() + 30
        while not Path(state, "aviato.sock").exists():  # else the SDK would start its own
            if time.monotonic() > deadline or service.poll() is not None:
                raise SystemExit(f"the service in {state} did not start")
            time.sleep(0.05)
        out["aviato"] = asyncio.run(
            _aviato(service.pid, args.seconds, args.in_flight, args.sandboxes)
        )
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(30)
        shutil.rmtree(state, ignore_errors=True)
    fl, av = out["floor"], out["aviato"]
    floor_cpu = fl["parent_ms"] + fl["commands_ms"]
    aviato_cpu = av["sdk_ms"] + av["service_ms"] + av["supervisor_ms"] + av["commands_ms"]
    cores = os.cpu_count() or 1
    out["busy"] = {
        "floor": round(fl["per_s"] * floor_cpu / 1e3 / cores, 3),
        "aviato": round(av["per_s"] * aviato_cpu / 1e3 / cores, 3),
    }
    out["beside_the_command_ms"] = round(aviato_cpu - floor_cpu, 3)
    out["cpu_ratio"] = round(floor_cpu / aviato_cpu, 3)
    out["measured_ratio"] = round(av["per_s"] / fl["per_s"], 3)
    out["load_end"] = os.getloadavg()[0]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
