"""Load and leak check: many sandboxes at once, many execs, then nothing left behind.

    python benchmarks/reliability_load.py [--sandboxes 500] [--execs 10000] [--concurrency 64]
                                          [--json OUT] [--nofile N]

Starts `python -m aviato.server` on a fresh state directory (with a private TMPDIR), then:

1. counts what exists before (see "Leak accounting");
2. creates `--sandboxes` sandboxes at once (every CreateSandbox in flight together) and waits
   until each is RUNNING;
3. runs `--execs` execs spread round-robin over them, `--concurrency` at a time; each is
   `echo <n>` and must exit 0 with exactly that output;
4. counts again with every sandbox alive (`during`: shows that the counters see them), deletes
   every sandbox (all at once), stops the service, and counts a last time.

Any error (a failed call, a wrong output, a non-zero exit, a sandbox not RUNNING) is counted and
the first few are kept. The result (JSON on stdout, and in `--json`) has `"ok": true` only with
zero errors and zero leaks. `--nofile` starts the service with that soft RLIMIT_NOFILE (the
common default of 1024 shows whether the service copes with it).

Leak accounting, before and after:
- processes: host processes whose cgroup names one of the run's sandboxes, plus every live
  descendant of the bwrap pids recorded in the sandboxes' runtime.json;
- cgroups: `/sys/fs/cgroup/*/aviato/<id>` directories of the run's sandboxes;
- mounts: lines of the host's /proc/self/mountinfo that name the run's directory, one of its
  sandboxes or bubblewrap's staging paths (sandbox mounts live in their own namespaces; any
  such line is a leak into the host's; the machine's total changes with other programs);
- runtime dirs: `<state>/sandboxes/*`; kept logs: `<state>/logs/*`; tmp entries: the service's
  private TMPDIR, plus entries of /tmp whose name contains one of the run's sandbox ids.
The run's sandbox ids come from the service's log and the registry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
try:  # a checkout without `pip install .`
    import aviato
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(ROOT / "src"))
    import aviato

from aviato.v1 import sandbox_pb2 as pb  # noqa: E402
from aviato.v1 import sandbox_pb2_grpc as pbg  # noqa: E402

_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # not in grpc's stubs

SBX = re.compile(r"sbx-[0-9a-f]{12}")
CGROUP_ROOT = Path("/sys/fs/cgroup")
MAX_EXAMPLES = 5


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "max_ms": round(max(ms), 3) if ms else 0.0,
        "mean_ms": round(statistics.fmean(ms), 3) if ms else 0.0,
    }


class Errors:
    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, what: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(what[:300])

    def as_dict(self) -> dict[str, Any]:
        return {"errors": self.count, "error_examples": self.examples}


# --- the service and what it leaves -----------------------------------------------------------


class Service:
    def __init__(self, nofile: int | None, max_sandboxes: int) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="avrl", dir="/tmp"))
        self.state = self.base / "s"
        self.tmpdir = self.base / "t"
        self.tmpdir.mkdir()
        self.log_path = self.base / "server.log"
        self.nofile = nofile
        self.max_sandboxes = max_sandboxes
        self.proc: subprocess.Popen[bytes] | None = None
        self.bwraps: set[tuple[int, int]] = set()
        self.ids: set[str] = set()

    @property
    def socket(self) -> Path:
        return self.state / "aviato.sock"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
        package_dir = str(Path(aviato.__file__).resolve().parents[1])
        env["PYTHONPATH"] = package_dir + os.pathsep + env.get("PYTHONPATH", "")
        env["TMPDIR"] = str(self.tmpdir)
        nofile = self.nofile

        def limit() -> None:
            if nofile:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "aviato.server",
                    "--state-dir",
                    str(self.state),
                    "--max-sandboxes",
                    str(self.max_sandboxes),
                    "--log-level",
                    "INFO",
                ],
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
                preexec_fn=limit,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited: {self.log_path.read_text()[-2000:]}")
            if self.socket.exists():
                with grpc.insecure_channel(f"unix://{self.socket}") as ch:
                    try:
                        pbg.SandboxServiceStub(ch).GetServerInfo(  # type: ignore[no-untyped-call]
                            pb.GetServerInfoRequest(), timeout=2
                        )
                        return
                    except grpc.RpcError:
                        pass
            time.sleep(0.05)
        raise RuntimeError("the service did not answer in 60 s")

    def stop(self) -> None:
        self.remember()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def remember(self) -> None:
        with contextlib.suppress(OSError):
            self.ids.update(SBX.findall(self.log_path.read_text(errors="replace")))
        sandboxes = self.state / "sandboxes"
        if sandboxes.is_dir():
            for entry in sandboxes.iterdir():
                self.ids.add(entry.name)
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    rec = json.loads((entry / "runtime.json").read_text())
                    self.bwraps.add((int(rec["pid"]), int(rec["starttime"])))

    def footprint(self) -> dict[str, int]:
        self.remember()
        procs = set(_processes_in_cgroups(self.ids))
        for pid, start in self.bwraps:
            if _start_time(pid) == start:
                procs.add(pid)
                procs |= _descendants(pid)
        cgroups = sum(
            1
            for h in (CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else [])
            for sid in self.ids
            if (h / "aviato" / sid).exists()
        )
        sandboxes = self.state / "sandboxes"
        logs = self.state / "logs"
        tmp_hits = sum(1 for e in os.listdir("/tmp") if any(s in e for s in self.ids))
        return {
            "processes": len(procs),
            "cgroups": cgroups,
            "mounts": _our_mounts(self.base, self.ids),
            "runtime_dirs": len(list(sandboxes.iterdir())) if sandboxes.is_dir() else 0,
            "kept_logs": len(list(logs.iterdir())) if logs.is_dir() else 0,
            "tmp_entries": len(list(self.tmpdir.iterdir())) + tmp_hits,
        }

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def _our_mounts(base: Path, ids: set[str]) -> int:
    """Mounts of the host's namespace that belong to this run: naming its directory, one of its
    sandboxes, or bubblewrap's staging paths. (Other programs of the machine mount and unmount
    things meanwhile, so the total is no measure; a sandbox's mounts live in its own namespace
    and must never show up here.)"""
    needles = [str(base), "newroot", "bwrap", ".aviato", *ids]
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return sum(1 for line in lines if any(n in line for n in needles))


def _processes_in_cgroups(ids: set[str]) -> list[int]:
    found: list[int] = []
    if not ids:
        return found
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if any(s in ids for s in SBX.findall(Path(entry.path, "cgroup").read_text())):
                    found.append(int(entry.name))
    return found


def _start_time(pid: int) -> int | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
        return int(data[data.rfind(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                data = Path(entry.path, "stat").read_bytes()
                ppid = int(data[data.rfind(b")") + 2 :].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


# --- the load ---------------------------------------------------------------------------------


async def create_all(
    stub: pbg.SandboxServiceStub, n: int, errors: Errors
) -> tuple[list[str], list[float]]:
    async def one(i: int) -> tuple[str | None, float]:
        t0 = time.perf_counter()
        try:
            sb = await stub.CreateSandbox(
                pb.CreateSandboxRequest(
                    spec=pb.SandboxSpec(tags=["reliability-load"]), request_id=str(uuid.uuid4())
                ),
                timeout=300,
            )
            got = await stub.WaitSandbox(
                pb.WaitSandboxRequest(
                    sandbox_id=sb.id,
                    condition=pb.WaitSandboxRequest.CONDITION_STARTED,
                    timeout_seconds=300,
                ),
                timeout=320,
            )
        except grpc.aio.AioRpcError as e:
            errors.add(f"create {i}: {e.code().name} {e.details()}")
            return None, 0.0
        if got.status != pb.SANDBOX_STATUS_RUNNING:
            errors.add(
                f"create {i}: {sb.id} is {pb.SandboxStatus.Name(got.status)} ({got.status_reason})"
            )
            return sb.id, 0.0
        return sb.id, time.perf_counter() - t0

    results = await asyncio.gather(*(one(i) for i in range(n)))
    ids = [sid for sid, _ in results if sid]
    return ids, [t for sid, t in results if sid and t]


async def exec_one(stub: pbg.SandboxServiceStub, sandbox_id: str, n: int) -> str | None:
    """`echo n`; returns an error description, or None when it exited 0 with "n\\n"."""
    call = stub.Exec(timeout=120)
    await call.write(
        pb.ExecRequest(init=pb.ExecInit(sandbox_id=sandbox_id, argv=["/bin/echo", str(n)]))
    )
    out = b""
    try:
        while True:
            frame = await call.read()
            if frame is _EOF:
                return "the stream ended without a terminal frame"
            kind = frame.WhichOneof("msg")
            if kind == "output":
                out += frame.output.data
            elif kind == "exit":
                if frame.exit.exit_code != 0:
                    return f"exit code {frame.exit.exit_code}"
                if out != f"{n}\n".encode():
                    return f"output {out[:80]!r}"
                return None
            elif kind == "error":
                return f"error frame {frame.error.code}: {frame.error.message}"
    finally:
        with contextlib.suppress(Exception):
            await call.done_writing()


async def exec_all(
    stub: pbg.SandboxServiceStub, ids: list[str], m: int, concurrency: int, errors: Errors
) -> list[float]:
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            try:
                problem = await exec_one(stub, ids[i % len(ids)], i)
            except grpc.aio.AioRpcError as e:
                problem = f"{e.code().name} {e.details()}"
            if problem:
                errors.add(f"exec {i} in {ids[i % len(ids)]}: {problem}")
            else:
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(i) for i in range(m)))
    return latencies


async def delete_all(stub: pbg.SandboxServiceStub, ids: list[str], errors: Errors) -> None:
    async def one(sid: str) -> None:
        try:
            await stub.DeleteSandbox(pb.DeleteSandboxRequest(sandbox_id=sid), timeout=300)
        except grpc.aio.AioRpcError as e:
            errors.add(f"delete {sid}: {e.code().name} {e.details()}")

    await asyncio.gather(*(one(s) for s in ids))


async def load(
    socket: Path,
    sandboxes: int,
    execs: int,
    concurrency: int,
    probe: Callable[[], dict[str, int]],
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub = pbg.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]
        errors = Errors()
        t0 = time.perf_counter()
        ids, create_lat = await create_all(stub, sandboxes, errors)
        result["create"] = {
            "seconds": round(time.perf_counter() - t0, 2),
            "created": len(ids),
            **summary(create_lat),
            **errors.as_dict(),
        }
        log(
            f"created {len(ids)}/{sandboxes} in {result['create']['seconds']} s, "
            f"{errors.count} errors"
        )

        exec_errors = Errors()
        if ids:
            t0 = time.perf_counter()
            lat = await exec_all(stub, ids, execs, concurrency, exec_errors)
            seconds = time.perf_counter() - t0
            result["exec"] = {
                "seconds": round(seconds, 2),
                "per_second": round(len(lat) / seconds, 1) if seconds else 0.0,
                **summary(lat),
                **exec_errors.as_dict(),
            }
            log(f"{len(lat)}/{execs} execs in {seconds:.1f} s, {exec_errors.count} errors")
        listed = await stub.ListSandboxes(pb.ListSandboxesRequest(page_size=1000), timeout=60)
        running = sum(1 for s in listed.sandboxes if s.status == pb.SANDBOX_STATUS_RUNNING)
        result["running_after_execs"] = running
        result["during"] = probe()  # the same counters with every sandbox alive

        delete_errors = Errors()
        t0 = time.perf_counter()
        await delete_all(stub, ids, delete_errors)
        result["delete"] = {
            "seconds": round(time.perf_counter() - t0, 2),
            **delete_errors.as_dict(),
        }
        log(f"deleted {len(ids)} in {result['delete']['seconds']} s")
        left = await stub.ListSandboxes(
            pb.ListSandboxesRequest(include_terminated=True), timeout=60
        )
        result["records_after_delete"] = len(left.sandboxes)
        result["errors"] = errors.count + exec_errors.count + delete_errors.count
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/reliability_load.py", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--sandboxes", type=int, default=500)
    p.add_argument("--execs", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--nofile", type=int, default=0, help="the service's soft RLIMIT_NOFILE")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    svc = Service(args.nofile or None, max(args.sandboxes, 1000))
    report: dict[str, Any] = {
        "scenario": "reliability_load",
        "config": {
            "sandboxes": args.sandboxes,
            "execs": args.execs,
            "concurrency": args.concurrency,
            "nofile": args.nofile or "inherited",
            "cpus": os.cpu_count(),
        },
    }
    try:
        before = svc.footprint()
        svc.start()
        t0 = time.perf_counter()
        report.update(
            asyncio.run(
                load(svc.socket, args.sandboxes, args.execs, args.concurrency, svc.footprint)
            )
        )
        report["total_seconds"] = round(time.perf_counter() - t0, 2)
        svc.stop()
        # Give the kernel a moment to tear down the last pid namespaces.
        deadline = time.monotonic() + 10
        after = svc.footprint()
        while after["processes"] and time.monotonic() < deadline:
            time.sleep(0.2)
            after = svc.footprint()
        report["sandbox_ids_seen"] = len(svc.ids)
        report["before"], report["after"] = before, after
        leaks = {k: after[k] - before[k] for k in before if after[k] != before[k]}
        report["leaks"] = leaks
        report["ok"] = report["errors"] == 0 and not leaks and report["records_after_delete"] == 0
        if not report["ok"]:
            report["service_log_tail"] = svc.log_path.read_text(errors="replace")[-3000:]
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()
        svc.remove()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
