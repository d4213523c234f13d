"""Round-trip latency of `exec(["true"])` through the supervisor client (no bubblewrap).

Starts `aviato-supervisor --keepalive` as a host process with its control socket on fd 3, then
times N sequential execs (exec() until the ExecExit event) and N pings over one connection.

    python benchmarks/supervisor_roundtrip.py [--runs 1000] [--binary PATH]

Without --binary it uses the installed binary, or compiles src/.../native/*.c into a temporary
directory when the package was not built.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # a checkout without `pip install .`
    import aviato  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(ROOT / "src"))

from aviato.runtime.base import ExecExit, ExecSpec  # noqa: E402
from aviato.runtime.supervisor import (  # noqa: E402
    SupervisorConnection,
    SupervisorMissing,
    supervisor_binary,
)


def find_binary(tmp: Path, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    try:
        return supervisor_binary()
    except SupervisorMissing:
        out = tmp / "aviato-supervisor"
        srcs = sorted(str(p) for p in (ROOT / "src/aviato/runtime/native").glob("*.c"))
        subprocess.run(["cc", "-std=c11", "-O2", "-static", "-o", str(out), *srcs], check=True)
        return out


def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def report(name: str, samples: list[float]) -> None:
    s = sorted(x * 1000 for x in samples)
    print(
        f"{name:<22} n={len(s):<5} p50={percentile(s, 50):.3f} ms  p90={percentile(s, 90):.3f} ms"
        f"  p99={percentile(s, 99):.3f} ms  mean={statistics.fmean(s):.3f} ms"
    )


async def bench(sock_path: Path, runs: int) -> None:
    conn = await SupervisorConnection.connect(sock_path)
    spec = ExecSpec(argv=("true",))

    async def once() -> float:
        t0 = time.perf_counter()
        h = await conn.exec(spec)
        async for ev in h.events():
            if not isinstance(ev, ExecExit) or ev.exit_code != 0:
                raise RuntimeError(f"unexpected event {ev}")
        return time.perf_counter() - t0

    for _ in range(50):  # warm-up
        await once()
    report("exec(['true'])", [await once() for _ in range(runs)])

    pings = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await conn.ping()
        pings.append(time.perf_counter() - t0)
    report("ping", pings)

    t0 = time.perf_counter()
    await asyncio.gather(*(once() for _ in range(runs)))
    elapsed = time.perf_counter() - t0
    print(f"{'concurrent exec':<22} {runs} execs in {elapsed:.3f} s = {runs / elapsed:.0f}/s")
    await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--binary")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="avbench-"))
    try:
        binary = find_binary(tmp, args.binary)
        sock_path = tmp / "ctl.sock"
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(sock_path))
        lsock.listen(16)
        # The listening socket must be fd 3 in the supervisor (moved out of the way first).
        fd = fcntl.fcntl(lsock.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
        pid = os.posix_spawn(
            str(binary),
            [str(binary), "--keepalive"],
            dict(os.environ),
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, 3)],
        )
        os.close(fd)
        lsock.close()
        try:
            asyncio.run(bench(sock_path, args.runs))
        finally:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
