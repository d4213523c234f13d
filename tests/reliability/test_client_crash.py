"""The client is killed with SIGKILL mid-create, mid-exec and mid-upload.

Each case runs a real SDK program (`aviato.Session` with a 3 s lease, `AVIATO_LEASE_TTL=3`) in a
child process against a real service, SIGKILLs it at the named moment, then checks that:

- the session's sandboxes are stopped by the service within the lease TTL (plus the reaper's
  half-second tick and the stop itself), with reason "lease expired";
- every record has a status, and none stays PENDING/CREATING; no sandbox process exists without
  a non-terminal record, and after the stops none exists at all;
- an upload cut short leaves no file at its path (nor the supervisor's temporary file): a
  half-written file is never presented as complete.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from .harness import ALL_STATUSES, RUNNING, TERMINAL, Service, read_until, spawn_sdk_script

LEASE_TTL = 3.0
# TTL after the last renewal, + reaper tick (0.5 s) + stopping a keep-alive sandbox (SIGTERM
# exits it at once) + this test's polling. The SDK renews every ttl/3, so the last renewal is at
# most ttl/3 before the kill.
STOP_DEADLINE = LEASE_TTL + 3.0

PRELUDE = f"""
import json, os, sys, time
from aviato import Session
session = Session({{"lease_ttl_seconds": {LEASE_TTL}, "tags": ["client-crash"]}})
print("lease " + session._lease_id, flush=True)
"""


def _kill(proc) -> float:  # type: ignore[no-untyped-def]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    return time.monotonic()


def _lease_records(svc: Service, lease_id: str) -> list[tuple[str, int, str]]:
    return [
        (str(r[0]), int(r[1]), str(r[2]))
        for r in svc.rows("SELECT id, status, reason FROM sandboxes WHERE lease_id=?", (lease_id,))
    ]


def _check_registry_consistent(svc: Service) -> None:
    """Every record has a valid status; terminal ones have an end time; every sandbox process
    belongs to a record that is not terminal."""
    rows = svc.rows("SELECT id, status, ended_ns FROM sandboxes")
    for sid, status, ended in rows:
        assert status in ALL_STATUSES, (sid, status)
        if status in TERMINAL:
            assert ended is not None, f"{sid} is terminal without an end time"
    live = {sid for sid, status, _ in rows if status not in TERMINAL}
    for pid, sid in svc.processes().items():
        if sid.startswith("sbx-"):
            assert sid in live, f"process {pid} of {sid} runs without a live record"


def _wait_lease_stopped(svc: Service, lease_id: str, killed_at: float) -> float:
    """Waits until every sandbox of the lease is terminal; returns the seconds since the kill."""
    deadline = killed_at + STOP_DEADLINE + 20  # generous: the assertion below is the real bound
    while time.monotonic() < deadline:
        _check_registry_consistent(svc)
        rows = _lease_records(svc, lease_id)
        if rows and all(status in TERMINAL for _, status, _ in rows):
            return time.monotonic() - killed_at
        time.sleep(0.1)
    raise AssertionError(f"lease sandboxes not stopped: {_lease_records(svc, lease_id)}")


def _assert_stopped_by_lease(svc: Service, lease_id: str, took: float, n: int) -> None:
    rows = _lease_records(svc, lease_id)
    assert len(rows) == n, rows
    for sid, status, reason in rows:
        assert status == 6 and reason == "lease expired", (sid, status, reason)
    print(f"lease {lease_id}: {len(rows)} sandbox(es) stopped {took:.2f}s after the kill")
    assert took <= STOP_DEADLINE, f"stopped {took:.1f}s after the kill (TTL {LEASE_TTL}s)"
    left = svc.wait_no_processes(10)
    assert not {p: s for p, s in left.items() if s in {r[0] for r in rows}}, left
    _check_registry_consistent(svc)


@pytest.mark.slow
def test_killed_mid_create(svc: Service) -> None:
    """SIGKILL while several CreateSandbox calls are in flight, at a few different instants."""
    n = 4
    for delay in (0.0, 0.03, 0.15):
        proc = spawn_sdk_script(
            svc,
            PRELUDE
            + f"""
sandboxes = [session.sandbox() for _ in range({n})]
print("creating", flush=True)
refs = [sb.start() for sb in sandboxes]
for ref in refs:
    ref.result()
print("created", flush=True)
time.sleep(600)
""",
        )
        lines = read_until(proc, "creating")
        lease = lines[0].split()[1]
        time.sleep(delay)
        killed = _kill(proc)
        # Creates that reached the service became records under the lease; none may hang.
        took = _wait_lease_stopped(svc, lease, killed) if _lease_records(svc, lease) else 0.0
        rows = _lease_records(svc, lease)
        if not rows:
            # Killed before any create arrived: nothing may exist for it either.
            time.sleep(LEASE_TTL + 1)
            assert not _lease_records(svc, lease)
            continue
        _assert_stopped_by_lease(svc, lease, took, len(rows))


# The streaming shells: processes whose command line names the marker, not counting a child the
# shell has forked and not yet turned into `sleep` (it shows its parent's command line meanwhile).
COUNT_STREAMERS = (
    "ps -eo pid=,ppid=,args= | awk '/[s]treaming-marker-line/ {parent[$1] = $2} "
    "END {n = 0; for (p in parent) if (!(parent[p] in parent)) n++; print n}'"
)


@pytest.mark.slow
def test_killed_mid_exec_while_streaming(svc: Service) -> None:
    proc = spawn_sdk_script(
        svc,
        PRELUDE
        + """
sb = session.sandbox()
sb.start().result()
print("sandbox " + sb.sandbox_id, flush=True)
script = "echo begin; while :; do echo streaming-marker-line; sleep 0.01; done"
p = sb.exec(["/bin/sh", "-c", script])
for chunk in p.stdout:
    if "streaming-marker-line" in chunk:
        print("streaming", flush=True)
""",
    )
    lines = read_until(proc, "streaming")
    lease = lines[0].split()[1]
    sandbox_id = lines[1].split()[1]
    c = svc.client()
    before = c.sh(sandbox_id, COUNT_STREAMERS)
    assert int(before.stdout) == 1, before.stdout
    killed = _kill(proc)
    # The command outlives its client (issue 18: a new process may attach to it, see
    # tests/sdk/test_attach.py) until the lease, no longer renewed, stops its sandbox.
    time.sleep(1.0)
    assert c.sh(sandbox_id, COUNT_STREAMERS).stdout.strip() == b"1"
    assert c.get(sandbox_id).status == RUNNING
    took = _wait_lease_stopped(svc, lease, killed)
    _assert_stopped_by_lease(svc, lease, took, 1)


@pytest.mark.slow
def test_killed_mid_upload(svc: Service) -> None:
    size = 512 << 20
    proc = spawn_sdk_script(
        svc,
        PRELUDE
        + f"""
sb = session.sandbox(resources={{"disk": "1Gi"}})
sb.start().result()
print("sandbox " + sb.sandbox_id, flush=True)
data = b"\\x5a" * {size}
print("uploading", flush=True)
sb.write_file("/workspace/upload.bin", data).result()
print("uploaded", flush=True)
time.sleep(600)
""",
    )
    lines = read_until(proc, "uploading")
    lease = lines[0].split()[1]
    sandbox_id = lines[1].split()[1]
    c = svc.client()
    # Kill once the supervisor's temporary file has data in it: truly mid-upload.
    probe = "stat -c '%n %s' /workspace/.aviato-tmp-* 2>/dev/null || true"
    seen = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        seen = c.sh(sandbox_id, probe).stdout
        parts = seen.split()
        # At most half written: the rest cannot be in flight in any buffer when the kill lands.
        if len(parts) == 2 and 0 < int(parts[1]) < size // 2:
            break
        time.sleep(0.005)
    else:
        raise AssertionError(f"never saw the upload in progress (last {seen!r})")
    killed = _kill(proc)
    # The client never printed "uploaded"; the sandbox shows no file, complete or partial.
    assert proc.stdout is not None and "uploaded" not in proc.stdout.read()
    deadline = time.monotonic() + LEASE_TTL
    listing = b""
    while time.monotonic() < deadline:
        listing = c.sh(sandbox_id, "ls -A /workspace").stdout
        if listing == b"":
            break
        time.sleep(0.05)
    if listing != b"":
        detail = c.sh(sandbox_id, "ls -la /workspace").stdout.decode()
        raise AssertionError(f"left in /workspace after the upload killed at {seen!r}: {detail}")
    took = _wait_lease_stopped(svc, lease, killed)
    _assert_stopped_by_lease(svc, lease, took, 1)


RAW_UPLOADER = r"""
import sys, time, grpc
from aviato.v1 import sandbox_pb2 as pb, sandbox_pb2_grpc as pbg
sock, sandbox_id = sys.argv[1], sys.argv[2]
stub = pbg.SandboxServiceStub(grpc.insecure_channel("unix://" + sock))
def frames():
    yield pb.WriteFileRequest(header=pb.WriteFileHeader(sandbox_id=sandbox_id,
                                                        path="/workspace/partial.bin"))
    for _ in range(16):
        yield pb.WriteFileRequest(data=b"x" * (1 << 20))
    print("sent", flush=True)
    time.sleep(600)  # never ends the stream: the upload is incomplete
stub.WriteFile(frames(), timeout=600)
"""


@pytest.mark.slow
def test_killed_with_an_unfinished_upload_stream(svc: Service) -> None:
    """Deterministic: a raw client sends a header and 16 MiB, never ends its stream, and is
    SIGKILLed (right away, or after its data surely reached the sandbox). No file appears."""
    import subprocess
    import sys

    from .harness import sdk_env

    c = svc.client()
    sb = c.running()
    for pause in (0.0, 0.0, 0.0, 0.0, 0.3, 0.3):
        proc = subprocess.Popen(
            [sys.executable, "-u", "-c", RAW_UPLOADER, str(svc.socket_path), sb.id],
            stdout=subprocess.PIPE, text=True, env=sdk_env(svc), start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline().strip() == "sent"
        time.sleep(pause)
        _kill(proc)
        time.sleep(0.5)
        assert c.sh(sb.id, "ls -A /workspace").stdout == b"", pause
    c.delete(sb.id)


def test_registry_has_no_orphans_after_the_kills(svc: Service) -> None:
    """Runs last in the module: after all the kills, nothing is left half-done or behind."""
    _check_registry_consistent(svc)
    assert not svc.rows("SELECT id FROM sandboxes WHERE status IN (1, 2, 3)")
    deadline = time.monotonic() + 10
    left = svc.footprint()
    while (left.processes or left.cgroups or left.runtime_dirs) and time.monotonic() < deadline:
        time.sleep(0.2)
        left = svc.footprint()
    print(json.dumps(left.as_dict()))
    assert (left.processes, left.cgroups, left.mounts, left.runtime_dirs, left.tmp_entries) == (
        0,
        0,
        0,
        0,
        0,
    ), left


RAW_STDIN_WRITER = r"""
import sys, time, grpc
from aviato.v1 import sandbox_pb2 as pb, sandbox_pb2_grpc as pbg
sock, sandbox_id = sys.argv[1], sys.argv[2]
stub = pbg.SandboxServiceStub(grpc.insecure_channel("unix://" + sock))
script = "cat > /workspace/out; echo complete > /workspace/flag"
def frames():
    yield pb.ExecRequest(init=pb.ExecInit(sandbox_id=sandbox_id, argv=["/bin/sh", "-c", script],
                                          stdin=True))
    for _ in range(8):
        yield pb.ExecRequest(stdin=b"x" * 65536)
    print("sent", flush=True)
    time.sleep(600)  # never sends stdin_eof nor ends the stream
for _ in stub.Exec(frames(), timeout=600):
    pass
"""


@pytest.mark.slow
def test_killed_while_feeding_stdin(svc: Service) -> None:
    """A client killed while it feeds an exec's stdin: the command must not see a clean end of
    its input (it would take a half-sent input for the whole); it is killed instead."""
    import subprocess
    import sys

    from .harness import sdk_env

    c = svc.client()
    sb = c.running()
    for pause in (0.0, 0.0, 0.0, 0.0, 0.3, 0.3):
        proc = subprocess.Popen(
            [sys.executable, "-u", "-c", RAW_STDIN_WRITER, str(svc.socket_path), sb.id],
            stdout=subprocess.PIPE, text=True, env=sdk_env(svc), start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline().strip() == "sent"
        time.sleep(pause)
        _kill(proc)
        time.sleep(0.5)
        flag = c.sh(sb.id, "cat /workspace/flag 2>/dev/null; rm -f /workspace/flag /workspace/out")
        assert flag.stdout == b"", f"the command saw a clean end of input (pause {pause})"
    c.delete(sb.id)
