"""A large file each way through the SDK's streaming calls, with the client's peak memory.

    python -m benchmarks.streaming [--gib 10] [--dir /var/tmp]

Prints one JSON line. The client runs in a subprocess of its own so that its peak RSS
(`ru_maxrss`) is the SDK's alone: after a warm-up (every code path loaded once), it writes
`--gib` GiB of zeros into a disk-layer sandbox from an iterator (`write_file_streaming`), reads
them back as chunks (`read_file_streaming`) and into a local file (`download_file`), and
reports the growth of its peak RSS over the warm-up's. The floor, in the same run: `cp` of a
file of the same size between two files of the same disk (`--dir`), the plainest way to move
the same bytes once through the kernel; the ratios are aviato's MB/s over the floor's.

The sandbox's layer is a sparse ext4 image of the sandbox's disk size, so a run needs about
three times `--gib` of free space in `--dir` and in the service's state directory together.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

CLIENT = textwrap.dedent(
    """
    import json, resource, sys, time
    from aviato import Sandbox

    size = int(sys.argv[1])
    local = sys.argv[2]
    chunk = bytes(1 << 20)

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def zeros():
        for _ in range(size // len(chunk)):
            yield chunk

    disk = f"{size // (1 << 30) + 2}Gi"
    out = {}
    with Sandbox.run(resources={"memory": "1Gi", "disk": disk}, writable_layer="disk") as sb:
        sb.wait()
        sb.write_file("/tmp/warm", b"x" * 300_000).result()
        sb.read_file("/tmp/warm").result()
        out["baseline_mib"] = peak_mib()
        t = time.monotonic()
        assert sb.write_file_streaming("/tmp/big", zeros()).result() == size
        out["up_s"] = time.monotonic() - t
        out["after_up_mib"] = peak_mib()
        t = time.monotonic()
        got = 0
        with sb.read_file_streaming("/tmp/big") as chunks:
            for part in chunks:
                got += len(part)
        assert got == size, got
        out["down_iter_s"] = time.monotonic() - t
        out["after_read_mib"] = peak_mib()
        t = time.monotonic()
        assert sb.download_file("/tmp/big", local).result() == size
        out["down_file_s"] = time.monotonic() - t
        out["peak_mib"] = peak_mib()
    print(json.dumps(out))
    """
)


def _floor_seconds(size: int, directory: Path) -> float:
    """Seconds of `cp` of a `size`-byte file written beforehand (not sparse) on `directory`."""
    source, copy = directory / "floor-source", directory / "floor-copy"
    try:
        with source.open("wb") as f:
            block = bytes(1 << 20)
            for _ in range(size // len(block)):
                f.write(block)
        os.sync()
        t = time.monotonic()
        subprocess.run(["cp", str(source), str(copy)], check=True)
        os.sync()
        return time.monotonic() - t
    finally:
        source.unlink(missing_ok=True)
        copy.unlink(missing_ok=True)


def measure(gib: int, directory: Path) -> dict[str, Any]:
    size = gib << 30
    with tempfile.TemporaryDirectory(dir=directory) as work:
        floor_s = _floor_seconds(size, Path(work))
        local = Path(work) / "download.bin"
        proc = subprocess.run(
            [sys.executable, "-c", CLIENT, str(size), str(local)],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        got = json.loads(proc.stdout.strip().splitlines()[-1])

    def mbs(seconds: float) -> float:
        return round(size / seconds / 1e6, 1)

    return {
        "gib": gib,
        "floor_cp_mb_s": mbs(floor_s),
        "write_streaming_mb_s": mbs(got["up_s"]),
        "read_streaming_mb_s": mbs(got["down_iter_s"]),
        "download_file_mb_s": mbs(got["down_file_s"]),
        "write_ratio": round(floor_s / got["up_s"], 2),
        "read_ratio": round(floor_s / got["down_iter_s"], 2),
        "download_ratio": round(floor_s / got["down_file_s"], 2),
        "client_baseline_mib": round(got["baseline_mib"], 1),
        "client_after_write_mib": round(got["after_up_mib"], 1),
        "client_after_read_mib": round(got["after_read_mib"], 1),
        "client_peak_mib": round(got["peak_mib"], 1),
        "client_growth_mib": round(got["peak_mib"] - got["baseline_mib"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__)
    p.add_argument("--gib", type=int, default=10, help="the file's size in GiB (default 10)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="where the floor's files and the downloaded copy go")  # fmt: skip
    args = p.parse_args(argv)
    print(json.dumps(measure(args.gib, args.dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
