"""The node protocol over Ray actor calls alone: exec, files and logs when a node host's direct
channel is not there (it could not listen), as a control plane would then use them.

A driver in the head's namespace (a Ray driver must share an IP with a node) attaches to a
running node host, as the placement does, but with the direct channel's address left out of
its facts; everything then travels as node protocol messages in actor calls (codec.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

from raycluster import RayCluster

SCRIPT = r"""
import asyncio, json, sys, tempfile
from pathlib import Path

import ray

from aviato.cluster.remote import NodeRuntime
from aviato.cluster.remote_exec import RayExec
from aviato.runtime.base import ExecExit, ExecOutput, ExecSpec, SandboxConfig


async def main() -> dict:
    ray.init(address=sys.argv[1], namespace="aviato", log_to_driver=False)
    node = next(n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
    actor = ray.get_actor(f"aviato-nodehost-{node['NodeID']}", namespace="aviato")
    facts = {**await actor.start.remote(), "exec_address": ""}  # no direct channel
    runtime = NodeRuntime(node["NodeID"], actor, facts, Path(tempfile.mkdtemp()),
                          holding=lambda sid: (0.0, 0.0), release=lambda sid: None)
    sid = "sbx-fallback" + sys.argv[2]
    config = SandboxConfig(sandbox_id=sid, image="", command=("/bin/sh", "-c", "echo up; sleep 60"),
                           env={"WHO": "ray"}, working_dir="", memory_bytes=256 << 20)
    out = {}
    sandbox = await runtime.create(config)
    try:
        proc = await sandbox.exec(ExecSpec(argv=("sh", "-c", "cat; echo $WHO; exit 5"), stdin=True))
        out["ray_exec"] = isinstance(proc, RayExec)
        await proc.write_stdin(b"\x00in\xff")
        await proc.close_stdin()
        data, exit = b"", None
        async for event in proc.events():
            if isinstance(event, ExecOutput):
                data += event.data
            elif isinstance(event, ExecExit):
                exit = event.exit_code
        out["exec"] = [data.hex(), exit]

        async def chunks():
            yield b"a" * (3 << 20)
            yield b"tail"

        out["written"] = await sandbox.write_file("/tmp/f", 0o600, False, chunks())
        info, content = await sandbox.read_file("/tmp/f")
        got = b"".join([c async for c in content])
        out["read"] = [info.size, len(got), got[-4:].decode()]
        out["logs"] = [r.data.decode() async for r in sandbox.logs()]
        out["tail"] = [r.data.decode() async for r in sandbox.logs(tail=0)]
        exit = await sandbox.kill()
        out["killed"] = exit.reason
    finally:
        await sandbox.kill()
        await runtime.cleanup(sid)
        await runtime.close()
    return out


print(json.dumps(asyncio.run(main())))
"""


def test_exec_files_and_logs_through_ray_alone(ray_cluster: RayCluster) -> None:
    argv = [*ray_cluster.enter("head"), sys.executable, "-c", SCRIPT,
            f"{ray_cluster.head_ip}:6379", str(ray_cluster.prefix)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=ray_cluster.env(), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ray_exec"] is True
    assert out["exec"] == [(b"\x00in\xff" + b"ray\n").hex(), 5]
    assert out["written"] == (3 << 20) + 4
    assert out["read"] == [(3 << 20) + 4, (3 << 20) + 4, "tail"]
    assert out["logs"] == ["up\n"]
    assert out["tail"] == []
    assert out["killed"] == "killed"
