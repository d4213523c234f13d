"""Latency and density of the aviato service, measured through gRPC on its unix socket.

    python benchmarks/server_latency.py [--socket PATH] [--quick] [--json OUT]

Without --socket it starts `python -m aviato.server` on a temporary state directory and stops it
(and removes every sandbox) at the end. The client is grpc.aio on the raw stubs, as the SDK uses.

Measures:
- create → first exec: CreateSandbox, then an Exec of /bin/true that waits server-side for the
  sandbox to run; p50/p99 of the sum (200 runs);
- exec round trip: /bin/true in a running sandbox, to the exit frame, over an Exec stream and over
  RunCommand (500 runs each, alternating);
- burst: 100 CreateSandbox at once, until every one is RUNNING;
- idle memory per sandbox: the drop of MemAvailable with 200 idle sandboxes, divided by 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
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
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable")


async def create(stub: pbg.SandboxServiceStub, **spec: Any) -> pb.Sandbox:
    req = pb.CreateSandboxRequest(spec=pb.SandboxSpec(**spec), request_id=str(uuid.uuid4()))
    created: pb.Sandbox = await stub.CreateSandbox(req)
    return created


async def exec_true(stub: pbg.SandboxServiceStub, sandbox_id: str, argv: list[str]) -> int:
    """As the SDK does it: write init, read to the terminal frame, then half-close."""
    call = stub.Exec()
    await call.write(pb.ExecRequest(init=pb.ExecInit(sandbox_id=sandbox_id, argv=argv)))
    while True:
        frame = await call.read()
        if frame is _EOF:
            raise RuntimeError("exec stream ended without an exit frame")
        kind = frame.WhichOneof("msg")
        if kind == "exit":
            code = int(frame.exit.exit_code)
            break
        if kind == "error":
            raise RuntimeError(frame.error.message)
    await call.done_writing()
    while await call.read() is not _EOF:
        pass
    return code


async def run_true(stub: pbg.SandboxServiceStub, sandbox_id: str, argv: list[str]) -> int:
    """As the SDK does it without stdin: one RunCommand, read to the terminal frame (the
    trailers are not awaited)."""
    call = stub.RunCommand(pb.ExecInit(sandbox_id=sandbox_id, argv=argv))
    while True:
        frame = await call.read()
        if frame is _EOF:
            raise RuntimeError("RunCommand ended without an exit frame")
        kind = frame.WhichOneof("msg")
        if kind == "exit":
            return int(frame.exit.exit_code)
        if kind == "error":
            raise RuntimeError(frame.error.message)


async def wait_running(stub: pbg.SandboxServiceStub, sandbox_id: str) -> pb.Sandbox:
    record: pb.Sandbox = await stub.WaitSandbox(
        pb.WaitSandboxRequest(
            sandbox_id=sandbox_id,
            condition=pb.WaitSandboxRequest.CONDITION_STARTED,
            timeout_seconds=60,
        )
    )
    return record


async def delete_all(stub: pbg.SandboxServiceStub, ids: list[str]) -> None:
    sem = asyncio.Semaphore(32)

    async def one(i: str) -> None:
        async with sem:
            await stub.DeleteSandbox(pb.DeleteSandboxRequest(sandbox_id=i))

    await asyncio.gather(*(one(i) for i in ids))


async def bench(socket_path: str, quick: bool) -> dict[str, Any]:
    runs_first, runs_exec, burst, idle = (20, 200, 20, 20) if quick else (200, 1000, 100, 200)
    results: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
        stub = pbg.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]
        info = await stub.GetServerInfo(pb.GetServerInfoRequest())
        results["server"] = {"runtime": info.runtime, "cgroups": info.cgroups}

        # Warm up.
        sb = await create(stub)
        await exec_true(stub, sb.id, ["/bin/true"])

        # Exec round trip: the Exec stream and RunCommand, alternating in blocks of 50.
        times, run_times = [], []
        for i in range(runs_exec):
            t0 = time.perf_counter()
            if (i // 50) % 2:
                await run_true(stub, sb.id, ["/bin/true"])
                run_times.append(time.perf_counter() - t0)
            else:
                await exec_true(stub, sb.id, ["/bin/true"])
                times.append(time.perf_counter() - t0)
        results["exec_round_trip"] = summary(times)
        results["run_command_round_trip"] = summary(run_times)
        await delete_all(stub, [sb.id])

        # Create → first exec.
        times = []
        ids = []
        for _ in range(runs_first):
            t0 = time.perf_counter()
            created = await create(stub)
            code = await exec_true(stub, created.id, ["/bin/true"])
            times.append(time.perf_counter() - t0)
            assert code == 0
            ids.append(created.id)
            if len(ids) >= 20:
                await delete_all(stub, ids)
                ids = []
        await delete_all(stub, ids)
        results["create_to_first_exec"] = summary(times)

        # Burst of creates.
        t0 = time.perf_counter()
        made = await asyncio.gather(*(create(stub) for _ in range(burst)))
        done = await asyncio.gather(*(wait_running(stub, s.id) for s in made))
        elapsed = time.perf_counter() - t0
        running = sum(1 for s in done if s.status == pb.SANDBOX_STATUS_RUNNING)
        results["burst_create"] = {"n": burst, "running": running, "seconds": round(elapsed, 3)}
        await delete_all(stub, [s.id for s in made])

        # Idle memory.
        await asyncio.sleep(1.0)
        before = mem_available()
        made = []
        for start in range(0, idle, 50):
            batch = await asyncio.gather(*(create(stub) for _ in range(min(50, idle - start))))
            await asyncio.gather(*(wait_running(stub, s.id) for s in batch))
            made += batch
        await asyncio.sleep(2.0)
        after = mem_available()
        results["idle_memory"] = {
            "sandboxes": idle,
            "per_sandbox_kib": round((before - after) / idle / 1024, 1),
        }
        await delete_all(stub, [s.id for s in made])
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--socket", help="an already running service's socket")
    p.add_argument("--quick", action="store_true", help="fewer runs (smoke test)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    server = None
    tmp = None
    socket_path = args.socket
    if socket_path is None:
        tmp = tempfile.mkdtemp(prefix="avt-bench-")
        state = Path(tmp) / "state"
        env = dict(os.environ, PYTHONPATH=str(Path(aviato.__file__).resolve().parents[1]))
        server = subprocess.Popen(
            [sys.executable, "-m", "aviato.server", "--state-dir", str(state),
             "--log-level", "WARNING", "--max-sandboxes", "1000"],
            env=env, stderr=open(Path(tmp) / "server.log", "wb"),  # noqa: SIM115
        )  # fmt: skip
        socket_path = str(state / "aviato.sock")
        deadline = time.monotonic() + 30
        while not os.path.exists(socket_path):
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start; see " + str(Path(tmp) / "server.log"))
            time.sleep(0.05)
    try:
        results = asyncio.run(bench(socket_path, args.quick))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
