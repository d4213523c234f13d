"""The service is killed with SIGKILL while 50 sandboxes run and an exec streams.

After a restart on the same state directory: all 50 sandboxes are RUNNING and usable (an exec
in each, a file written before the crash reads back), the registry passes SQLite's integrity
check and holds exactly the records it held before, and the clients of the interrupted exec (a
raw gRPC client and an SDK program) get a typed error within seconds: never a hang, never an
exit code 0.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

from .harness import RUNNING, Service, code_of, read_until, spawn_sdk_script

N = 50
PROMPT_SECONDS = 5.0

SDK_EXEC = """
import json, sys, time
from aviato import Sandbox
sb = Sandbox.from_id(sys.argv[1]).result()
p = sb.exec(["/bin/sh", "-c", "while :; do echo sdk-stream-line; sleep 0.01; done"])
printed = False
t0 = None
try:
    for chunk in p.stdout:
        if not printed:
            print("streaming", flush=True)
            printed = True
    t0 = time.monotonic()
    result = p.result()
    print("outcome " + json.dumps({"kind": "exit", "code": result.returncode}), flush=True)
except BaseException as e:
    print("outcome " + json.dumps({"kind": type(e).__name__, "module": type(e).__module__,
                                   "msg": str(e)[:300]}), flush=True)
"""


@pytest.mark.slow
def test_kill9_with_50_sandboxes_and_a_streaming_exec(
    make_service: Callable[..., Service],
) -> None:
    svc = make_service()
    c = svc.client()
    with ThreadPoolExecutor(16) as pool:
        created = list(pool.map(lambda i: c.create(tags=["crash", f"n{i}"]), range(N)))
        running = list(pool.map(lambda sb: c.wait(sb.id), created))
        not_running = [
            (sb.id, sb.status, sb.status_reason) for sb in running if sb.status != RUNNING
        ]
        assert not not_running, not_running[:5]
        list(pool.map(lambda sb: c.write_file(sb.id, "/tmp/before", sb.id.encode()), created))
    ids = sorted(sb.id for sb in created)
    rows_before = svc.rows("SELECT id, status, model, created_ns FROM sandboxes ORDER BY id")
    assert len(rows_before) == N

    # A raw client streaming output from the first sandbox.
    raw_outcome: dict[str, object] = {}
    streaming = threading.Event()

    def raw_exec() -> None:
        init = pb.ExecInit(
            sandbox_id=ids[0],
            argv=["/bin/sh", "-c", "while :; do echo raw-stream-line; sleep 0.01; done"],
        )
        channel = grpc.insecure_channel(f"unix://{svc.socket_path}")  # its own connection
        frames = pbg.SandboxServiceStub(channel).Exec(
            iter([pb.ExecRequest(init=init)]), timeout=120
        )
        try:
            for frame in frames:
                if frame.WhichOneof("msg") == "output":
                    streaming.set()
                if frame.WhichOneof("msg") in ("exit", "error"):
                    raw_outcome["terminal"] = frame
            raw_outcome["ended"] = "without a terminal frame or status"
        except grpc.RpcError as e:
            raw_outcome["status"] = code_of(e)
        raw_outcome["at"] = time.monotonic()
        channel.close()

    raw = threading.Thread(target=raw_exec, daemon=True)
    raw.start()
    sdk = spawn_sdk_script(svc, SDK_EXEC, ids[1])
    read_until(sdk, "streaming")
    assert streaming.wait(30), "the raw exec never streamed"

    svc.kill9()
    killed_at = time.monotonic()

    raw.join(PROMPT_SECONDS + 5)
    assert not raw.is_alive(), "the raw exec client hangs after the service died"
    assert "terminal" not in raw_outcome, f"a terminal frame after a crash: {raw_outcome}"
    assert raw_outcome.get("status") == grpc.StatusCode.UNAVAILABLE, raw_outcome
    assert float(raw_outcome["at"]) - killed_at < PROMPT_SECONDS  # type: ignore[arg-type]

    lines = read_until(sdk, "outcome", timeout=PROMPT_SECONDS + 10)
    sdk_took = time.monotonic() - killed_at
    outcome = json.loads(lines[-1].split(" ", 1)[1])
    assert outcome["kind"] != "exit", f"the SDK reported an exit after a crash: {outcome}"
    assert outcome["module"] == "aviato.exceptions", outcome
    assert outcome["kind"] in ("AviatoConnectionError", "SandboxError"), outcome
    assert sdk_took < PROMPT_SECONDS, f"the SDK took {sdk_took:.1f}s to report the crash"
    print(
        f"raw: {raw_outcome['status']} after {float(raw_outcome['at']) - killed_at:.2f}s; "  # type: ignore[arg-type]
        f"sdk: {outcome} after {sdk_took:.2f}s"
    )
    sdk.wait(10)

    # While the service is down, every sandbox keeps running.
    assert len(svc.processes()) >= 2 * N

    svc.start()
    c = svc.client()
    assert svc.rows("PRAGMA integrity_check") == [("ok",)]
    rows_after = svc.rows("SELECT id, status, model, created_ns FROM sandboxes ORDER BY id")
    assert rows_after == rows_before
    listed = sorted(sb.id for sb in c.list_all(include_terminated=True))
    assert listed == ids

    def usable(sandbox_id: str) -> bytes:
        assert c.get(sandbox_id).status == RUNNING
        r = c.exec(sandbox_id, ["/bin/cat", "/tmp/before"])
        assert r.exit_code == 0
        return r.stdout

    with ThreadPoolExecutor(16) as pool:
        contents = list(pool.map(usable, ids))
    assert contents == [i.encode() for i in ids]
    # The commands of the interrupted execs died with their connections.
    for sandbox_id, marker in ((ids[0], "raw-stream-line"), (ids[1], "sdk-stream-line")):
        r = c.sh(sandbox_id, f"ps -eo args | grep -c '[{marker[0]}]{marker[1:]}'")
        assert r.stdout.strip() == b"0", (sandbox_id, r.stdout)
    assert svc.footprint().runtime_dirs == N
