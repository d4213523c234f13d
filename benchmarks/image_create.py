"""create → first exec from a cached OCI image, against the `host` image (target: within 1.5x).

`python -m benchmarks.image_create [--runs N] [--json PATH]`

What it does: starts a private aviato service (its own state directory), a `docker-registry` on
127.0.0.1 (Debian's package), builds a small image from busybox-static's /bin/busybox (the test
suite's builder, tests/images/oci_helpers.py, found from this checkout), pushes it, and pulls it
once, untimed. Then it times `Sandbox.run(container_image=...)` + `exec(["true"])` to the result,
for the image and for `host`, interleaved A/B/A/B (the machine is shared: interleaving spreads
its noise over both), with the stop untimed. Prints p50/p90 of each and the ratio of the p50s.
Needs root (sandboxes with cgroups, as the other figures) and the two Debian packages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.5


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(times: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "p90_ms": round(_percentile(times, 0.9) * 1000, 2),
        "mean_ms": round(statistics.fmean(times) * 1000, 2),
        "runs": len(times),
    }


def measure(runs: int, warmup: int) -> dict[str, Any]:
    sys.path.insert(0, str(CHECKOUT / "tests" / "images"))
    from oci_helpers import Pusher, busybox_layer, have_tools, run_registry

    if not have_tools():
        raise SystemExit("needs docker-registry and busybox-static (apt-get install them)")
    work = Path(tempfile.mkdtemp(prefix="avbi", dir="/tmp"))
    state = work / "state"
    os.environ["AVIATO_STATE_DIR"] = str(state)
    os.environ["AVIATO_INSECURE_REGISTRIES"] = "127.0.0.1"  # the local test registry
    for var in ("AVIATO_BASE_URL", "AVIATO_API_KEY", "AVIATO_IMAGE"):
        os.environ.pop(var, None)
    from aviato import Sandbox

    try:
        with run_registry(work / "registry") as registry:
            Pusher(registry).image("bench/busybox", "v1", [busybox_layer()])
            image = f"{registry.host}/bench/busybox:v1"
            t0 = time.perf_counter()
            first = Sandbox.run(container_image=image)
            first.exec(["true"]).result(timeout=120)
            first_pull = time.perf_counter() - t0
            first.stop().result(timeout=60)
            times: dict[str, list[float]] = {"host": [], "image": []}
            for i in range(warmup + runs):
                order = ("host", "image") if i % 2 == 0 else ("image", "host")
                for which in order:
                    t0 = time.perf_counter()
                    sb = Sandbox.run(container_image=image if which == "image" else "host")
                    out = sb.exec(["true"]).result(timeout=60)
                    elapsed = time.perf_counter() - t0
                    sb.stop().result(timeout=60)
                    if out.returncode != 0:
                        raise RuntimeError(f"{which}: `true` exited {out.returncode}")
                    if i >= warmup:
                        times[which].append(elapsed)
    finally:
        _stop_service(state)
        shutil.rmtree(work, ignore_errors=True)
    host, img = _summary(times["host"]), _summary(times["image"])
    ratio = round(img["p50_ms"] / host["p50_ms"], 3)
    return {
        "figure": "create → first exec: cached OCI image vs host",
        "host": host,
        "image": img,
        "ratio_p50": ratio,
        "target_ratio": TARGET_RATIO,
        "within_target": ratio <= TARGET_RATIO,
        "first_use_with_pull_ms": round(first_pull * 1000, 1),
    }


def _stop_service(state: Path) -> None:
    subprocess.run([sys.executable, "-m", "aviato", "rm", "--all", "-y"], capture_output=True,
                   check=False, timeout=120)  # fmt: skip
    try:
        pid = int((state / "server.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.image_create", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--runs", type=int, default=40, help="timed runs per image (default 40)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per image first")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    result = measure(args.runs, args.warmup)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
