"""Filling a sandbox's disk gives the disk-full error, every time, through the SDK.

A sandbox's writable layer is a tmpfs of its disk size (`resources.disk`); writing beyond it is
the user's own mistake and must come back as `SandboxFileError` with code RESOURCE_EXHAUSTED and
"No space left on device", never as "Internal error" (the service used to end the upload's call
while the client was still sending, and the gRPC client then reported its own failed send as
INTERNAL instead of the service's status: a race, hence "sometimes"), and never by killing the
sandbox (the layer lives in the sandbox's memory: with disk >= memory, the upload used to run the
memory cgroup out and the OOM killer took the sandbox down).

Each case loops, since the failure was a race: an upload larger than the disk, an upload after a
command filled the disk, concurrent uploads that together overflow it, and uploads into a
sandbox whose disk is as large as its memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from reliability.harness import Service, service, spawn_sdk_script

SCRIPT = r"""
import concurrent.futures as cf, json, sys
import aviato

MiB = 1 << 20
rounds = int(sys.argv[1])


def outcome(fn):
    try:
        fn()
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}|{getattr(e, 'code', '')}|{e}"


def report(case, results, **extra):
    print(json.dumps({"case": case, "results": results, **extra}), flush=True)


sb = aviato.Sandbox.run(resources={"disk": "32Mi"})
report("bigger than the disk", [
    outcome(lambda: sb.write_file("/workspace/big", b"x" * (48 * MiB)).result())
    for _ in range(rounds)
])
results = []
for _ in range(rounds):
    sb.exec(["sh", "-c", "head -c 40M /dev/zero > /tmp/fill; true"]).result()
    results.append(outcome(lambda: sb.write_file("/workspace/small", b"y" * (2 * MiB)).result()))
    sb.exec(["rm", "-f", "/tmp/fill"]).result()
report("after a command filled the disk", results)
results = []
for _ in range(rounds):
    with cf.ThreadPoolExecutor(4) as pool:
        def upload(i):
            return outcome(lambda: sb.write_file(f"/workspace/c{i}", b"z" * (12 * MiB)).result())
        futures = [pool.submit(upload, i) for i in range(4)]
        results += [f.result() for f in futures]
    sb.exec(["sh", "-c", "rm -f /workspace/c*"]).result()
report("concurrent uploads", results, status=str(sb.status))
sb.stop().result()

tight = aviato.Sandbox.run(resources={"disk": "64Mi", "memory": "64Mi"})
results = [
    outcome(lambda: tight.write_file("/workspace/big", b"x" * (80 * MiB)).result())
    for _ in range(max(2, rounds // 3))
]
alive = outcome(lambda: tight.exec(["true"]).result())
report("disk as large as memory", results, alive=alive, status=str(tight.status))
tight.stop().result()
"""

DISK_FULL = "No space left on device"


@pytest.fixture(scope="module")
def svc() -> Iterator[Service]:
    with service() as running:
        yield running


def _disk_full(outcome: str) -> bool:
    kind, _, rest = outcome.partition("|")
    code, _, message = rest.partition("|")
    return kind == "SandboxFileError" and code == "RESOURCE_EXHAUSTED" and DISK_FULL in message


@pytest.mark.slow
def test_filling_the_disk_always_says_disk_full(svc: Service) -> None:
    proc = spawn_sdk_script(svc, SCRIPT, "15")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    cases = {c["case"]: c for c in map(json.loads, out.splitlines())}
    for name in ("bigger than the disk", "after a command filled the disk"):
        results = cases[name]["results"]
        wrong = [r for r in results if not _disk_full(r)]
        assert not wrong, (name, wrong)
    concurrent = cases["concurrent uploads"]["results"]
    # 4 x 12 MiB into 32 MiB: at most two fit; every other upload is refused as disk-full.
    wrong = [r for r in concurrent if r != "ok" and not _disk_full(r)]
    assert not wrong, ("concurrent uploads", wrong)
    assert any(_disk_full(r) for r in concurrent)
    tight = cases["disk as large as memory"]
    wrong = [r for r in tight["results"] if not _disk_full(r)]
    assert not wrong, ("disk as large as memory", wrong)
    assert tight["alive"] == "ok", tight
