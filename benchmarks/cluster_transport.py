"""Exec transport on a Ray cluster: Ray actor calls and streaming generators vs direct gRPC.

`python -m benchmarks.cluster_transport` (root: builds the test cluster of
tests/cluster/raycluster.py) runs, from a driver in the head's network namespace, against a
probe actor pinned to worker w1:
- `ray unary`: one actor call (`await actor.ping.remote()`);
- `ray stream`: a streaming generator yielding two items (an exec's output frame and exit
  frame: the shape of aviato's exec through the node host);
- `grpc stream`: the same two items from a grpc.aio unary-stream method served by the actor on
  its node's IP (the "direct connection" alternative), over one persistent channel.
Prints p50/p99 in ms of each; docs/cluster.md records the figures and the choice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
import asyncio, json, sys, time
import grpc, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

N = 300

def pct(xs, q):
    xs = sorted(xs); return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 3)

@ray.remote(num_cpus=0)
class Probe:
    async def ping(self):
        return 1

    async def stream(self):
        yield b"output"
        yield 0

    async def serve(self):
        async def two(request, context):
            yield b"output"
            yield b"exit"
        handler = grpc.unary_stream_rpc_method_handler(two)
        generic = grpc.method_handlers_generic_handler("probe.Probe", {"Two": handler})
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((generic,))
        ip = ray.util.get_node_ip_address()
        port = self.server.add_insecure_port(f"{ip}:0")
        await self.server.start()
        return f"{ip}:{port}"

async def main():
    ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    w1 = [n["NodeID"] for n in nodes if n.get("Labels", {}).get("aviato-test") == "w1"][0]
    pin = NodeAffinitySchedulingStrategy(w1, soft=False)
    probe = Probe.options(scheduling_strategy=pin).remote()
    target = await probe.serve.remote()
    out = {}
    for name in ("ray unary", "ray stream", "grpc stream"):
        times = []
        channel = grpc.aio.insecure_channel(target)
        call = channel.unary_stream("/probe.Probe/Two")
        for i in range(N + 30):
            t0 = time.perf_counter()
            if name == "ray unary":
                await probe.ping.remote()
            elif name == "ray stream":
                async for ref in probe.stream.options(num_returns="streaming").remote():
                    await ref
            else:
                async for _ in call(b""):
                    pass
            if i >= 30:
                times.append(time.perf_counter() - t0)
        await channel.close()
        out[name] = {"p50_ms": pct(times, 0.5), "p99_ms": pct(times, 0.99)}
    print(json.dumps(out))

asyncio.run(main())
"""


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    from raycluster import RayCluster

    cluster = RayCluster()
    try:
        cluster.start()
        done = subprocess.run(
            [*cluster.enter("head"), sys.executable, "-c", DRIVER, f"{cluster.head_ip}:6379"],
            capture_output=True, text=True, env=cluster.env(), timeout=300,
        )  # fmt: skip
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for name, figures in result.items():
            print(f"{name:12} p50 {figures['p50_ms']:7.3f} ms   p99 {figures['p99_ms']:7.3f} ms")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
