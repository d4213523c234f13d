"""Warm exec latency and CPU per exec, for A/B comparisons of two builds of aviato.

    PYTHONPATH=<checkout>/src python benchmarks/exec_cost.py [--n 600] [--rl 32x10] [--skip-rl]

Measures the aviato that is imported (so `PYTHONPATH=/path/to/other/src` measures another build;
the service it autostarts comes from the same package) against a fresh service in a temporary
state directory, and prints one JSON line:

- warm exec: `exec(["true"])` in one sandbox, `n` with the sync API and `n` awaited, interleaved
  in six blocks each; p50/p99, and CPU per exec of this process (`time.process_time`) and of the
  service (`/proc/<pid>/stat`) — CPU is the steadier figure on a shared machine;
- raw: the same exec on the raw gRPC stubs from a loop of its own (no SDK), p50;
- RL: 32 sandboxes x 10 programs of the RL figure (`input=` when the SDK has it, else
  `stdin=True`, write, close), awaited; programs/s and CPU per program in both processes.

Run two builds alternately, several times, and compare the pairs: a single run says little when
other jobs share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=600, help="execs per API")
    p.add_argument("--rl", default="32x10", help="sandboxes x programs")
    p.add_argument("--skip-rl", action="store_true")
    args = p.parse_args()
    state = tempfile.mkdtemp(prefix="avcost")
    os.environ["AVIATO_STATE_DIR"] = state
    out: dict[str, Any] = {"load": os.getloadavg()[0]}
    try:
        out.update(_measure(state, args))
    finally:
        _stop_service(state)
        shutil.rmtree(state, ignore_errors=True)
    out["load_end"] = os.getloadavg()[0]
    print(json.dumps(out), flush=True)


def _service_cpu(state: str) -> float:
    pid = int(Path(state, "server.pid").read_text().split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop_service(state: str) -> None:
    try:
        os.kill(int(Path(state, "server.pid").read_text().split()[0]), signal.SIGTERM)
        time.sleep(1.5)
    except (OSError, ValueError):
        pass


def _measure(state: str, args: argparse.Namespace) -> dict[str, Any]:
    import aviato
    from aviato import Sandbox

    out: dict[str, Any] = {"aviato": str(Path(aviato.__file__).parent)}
    has_input = "input" in inspect.signature(Sandbox.exec).parameters
    sb = Sandbox.run()
    sb.wait()
    for _ in range(50):
        sb.exec(["true"]).result()
    sync_t: list[float] = []
    async_t: list[float] = []
    cpu = {"sync_client": 0.0, "sync_service": 0.0, "async_client": 0.0, "async_service": 0.0}

    async def awaited(k: int) -> None:
        for _ in range(k):
            t0 = time.perf_counter()
            await sb.exec(["true"])
            async_t.append(time.perf_counter() - t0)

    block = max(1, args.n // 6)
    for _ in range(6):
        c0, s0 = time.process_time(), _service_cpu(state)
        for _ in range(block):
            t0 = time.perf_counter()
            sb.exec(["true"]).result()
            sync_t.append(time.perf_counter() - t0)
        c1, s1 = time.process_time(), _service_cpu(state)
        asyncio.run(awaited(block))
        c2, s2 = time.process_time(), _service_cpu(state)
        cpu["sync_client"] += c1 - c0
        cpu["sync_service"] += s1 - s0
        cpu["async_client"] += c2 - c1
        cpu["async_service"] += s2 - s1
    out.update(
        sync_p50_ms=_pct(sync_t, 0.5),
        sync_p99_ms=_pct(sync_t, 0.99),
        async_p50_ms=_pct(async_t, 0.5),
        async_p99_ms=_pct(async_t, 0.99),
        raw_p50_ms=_pct(asyncio.run(_raw(state, sb.sandbox_id or "", args.n)), 0.5),
    )
    out.update({f"cpu_{k}_ms": v * 1e3 / len(sync_t) for k, v in cpu.items()})
    sb.stop().result()
    if not args.skip_rl:
        out.update(_rl(state, args.rl, has_input))
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


async def _raw(state: str, sandbox_id: str, n: int) -> list[float]:
    """`true` on the raw stubs: RunCommand when the service has it, else an Exec stream."""
    import grpc
    import grpc.aio

    from aviato.v1 import sandbox_pb2 as pb
    from aviato.v1 import sandbox_pb2_grpc as pbg

    eof = grpc.aio.EOF  # type: ignore[attr-defined]
    times: list[float] = []
    async with grpc.aio.insecure_channel(f"unix://{state}/aviato.sock") as channel:
        stub = pbg.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]
        init = pb.ExecInit(sandbox_id=sandbox_id, argv=["true"])
        run_command = hasattr(stub, "RunCommand")
        for i in range(n + 50):
            t0 = time.perf_counter()
            if run_command:
                call = stub.RunCommand(init)
            else:
                call = stub.Exec()
                await call.write(pb.ExecRequest(init=init))
            while True:
                frame = await call.read()
                if frame is eof or frame.WhichOneof("msg") in ("exit", "error"):
                    break
            if not run_command:
                await call.done_writing()
            if i >= 50:
                times.append(time.perf_counter() - t0)
    return times


def _rl(state: str, shape: str, has_input: bool) -> dict[str, Any]:
    from aviato import Sandbox
    from benchmarks._plan import HARNESS, rl_programs

    n_boxes, n_programs = (int(x) for x in shape.split("x"))
    boxes = [Sandbox.run() for _ in range(n_boxes)]
    for box in boxes:
        box.wait()
    programs = [rl_programs(i, n_programs) for i in range(n_boxes)]
    argv = ["python3", "-c", HARNESS]

    async def one(box: Any, src: bytes) -> Any:
        if has_input:
            return await box.exec(argv, input=src)
        proc = box.exec(argv, stdin=True)
        await proc.stdin.write(src)
        await proc.stdin.close()
        return await proc

    async def worker(box: Any, todo: list[tuple[bytes, str]]) -> int:
        ok = 0
        for src, want in todo:
            ok += (await one(box, src)).stdout.strip() == want
        return ok

    async def run_all() -> int:
        return sum(
            await asyncio.gather(*(worker(b, p) for b, p in zip(boxes, programs, strict=True)))
        )

    t0, c0, s0 = time.perf_counter(), time.process_time(), _service_cpu(state)
    ok = asyncio.run(run_all())
    seconds = time.perf_counter() - t0
    result = {
        "rl_scored": ok,
        "rl_per_s": ok / seconds,
        "rl_cpu_client_ms": (time.process_time() - c0) * 1e3 / max(ok, 1),
        "rl_cpu_service_ms": (_service_cpu(state) - s0) * 1e3 / max(ok, 1),
    }
    for box in boxes:
        box.stop()
    time.sleep(1.0)
    return result


if __name__ == "__main__":
    main()
