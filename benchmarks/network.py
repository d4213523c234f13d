"""What networking costs: create -> first exec with networking off, with egress and with an
exposed port; and the latency a request gains through the egress proxy.

    python -m benchmarks.network [--n 40] [--requests 200] [--skip-egress-latency]

Prints one JSON line. Each figure is a ratio against a floor measured in the same run:

- create: `Sandbox.run()` then `exec(["true"])`, p50 and p90, for networking off (the floor),
  `egress_mode="internet"` (the supervisor binds the proxy listener and the service serves
  it) and `exposed_ports=[8080]` (the service listens for it), interleaved round by round on
  one fresh local service, so that load shifts hit all three alike;
- egress latency (root only: it builds two network namespaces, a "host" for the service and
  an "internet" with an HTTP server at 192.0.2.10, documentation addresses that never leave
  this machine): a GET on a new connection each time, from a sandbox through its proxy,
  against the same client program run directly in the host namespace (the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[round(q * (len(ordered) - 1))] * 1e3, 3)


def _stop_service(state: str) -> None:
    try:
        os.kill(int(Path(state, "server.pid").read_text().split()[0]), signal.SIGTERM)
        time.sleep(1.5)
    except (OSError, ValueError):
        pass


def create_figures(n: int) -> dict[str, Any]:
    """create -> first exec, p50/p90 in ms, per variant, and each variant's ratio to "off"."""
    from aviato import NetworkOptions, Sandbox

    variants: dict[str, NetworkOptions | None] = {
        "off": None,
        "egress": NetworkOptions(egress_mode="internet"),
        "exposed_port": NetworkOptions(exposed_ports=(8080,)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for net in variants.values():  # warm-up, untimed
        with Sandbox.run(network=net) as sb:
            sb.exec(["true"]).result()
    for _ in range(n):
        for name, net in variants.items():
            t0 = time.perf_counter()
            sb = Sandbox.run(network=net)
            sb.exec(["true"]).result()
            times[name].append(time.perf_counter() - t0)
            sb.stop(graceful_shutdown_seconds=0).result()
    out: dict[str, Any] = {}
    for name, values in times.items():
        out[f"create_{name}_p50_ms"] = _pct(values, 0.5)
        out[f"create_{name}_p90_ms"] = _pct(values, 0.9)
    floor = statistics.median(times["off"])
    for name in ("egress", "exposed_port"):
        out[f"create_{name}_ratio"] = round(statistics.median(times[name]) / floor, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=40, help="creates per variant")
    p.add_argument("--requests", type=int, default=200, help="GETs per path (egress latency)")
    p.add_argument("--skip-egress-latency", action="store_true")
    args = p.parse_args()
    out: dict[str, Any] = {"load": os.getloadavg()[0]}
    state = tempfile.mkdtemp(prefix="avnet", dir="/tmp")
    os.environ["AVIATO_STATE_DIR"] = state
    os.environ.pop("AVIATO_BASE_URL", None)
    try:
        out.update(create_figures(args.n))
    finally:
        _stop_service(state)
        shutil.rmtree(state, ignore_errors=True)
    if not args.skip_egress_latency:
        from benchmarks.network_latency import egress_latency

        out.update(egress_latency(args.requests))
    out["load_end"] = os.getloadavg()[0]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
