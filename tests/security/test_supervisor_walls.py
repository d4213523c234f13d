"""Attacks on the sandbox supervisor through a real service: each is a wall of issue 14.

- One command that does not read its stdin, or whose output nobody reads, must not stall the
  other commands, file transfers and the stop of its sandbox (flow control per exec/transfer).
- An exec killed for its timeout, or because its client went away, takes down everything it
  started: new sessions (setsid), new process groups, double-forked daemons.
- A sandbox's lifetime and its lease's expiry hold while the service is down.
- `kill -TERM 1` from inside is recorded as what it is, never as a clean exit.
- /proc files are readable through the file API; /proc magic links (/proc/self/fd/N, ...) are
  not followed, so a planted link cannot reach the supervisor's host-side files.
- A command the OOM killer ends says so (ProcessResult.oom_killed, a line from `aviato exec`).

Each test runs against a service of its own (root mode: the tests run as root), so that killing
and restarting it or filling its sandboxes' memory touches nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from _wait import wait_until
from reliability.harness import Client, Service, sdk_env, service

from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

S = pb.SandboxStatus
MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the service runs as root here")


@pytest.fixture(scope="module")
def svc() -> Iterator[Service]:
    with service() as s:
        yield s


@pytest.fixture
def fresh() -> Iterator[Service]:
    """A service of the test's own (for tests that kill it)."""
    with service() as s:
        yield s


def sandbox_pids(svc: Service, sandbox_id: str) -> set[int]:
    return {pid for pid, sid in svc.processes().items() if sid == sandbox_id}


def processes_matching(c: Client, sandbox_id: str, needle: str) -> list[str]:
    """Command lines of the sandbox's processes that contain `needle` (seen from inside)."""
    script = (
        "import os, sys\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit() and int(p) != os.getpid():\n"
        "        try: cmd = open(f'/proc/{p}/cmdline', 'rb').read().replace(b'\\0', b' ')\n"
        "        except OSError: continue\n"
        "        if sys.argv[1].encode() in cmd: print(p, cmd.decode(errors='replace'))\n"
    )
    r = c.exec(sandbox_id, ["python3", "-c", script, needle], deadline=30)
    assert r.exit_code == 0, r.stderr
    return r.stdout.decode().splitlines()


# --- one stuck command must not stall the others ----------------------------------------------


@pytest.mark.slow
def test_unread_stdin_and_output_stall_nothing_else(svc: Service) -> None:
    """`sleep` (never reads stdin) gets 8 MiB pushed at it; `yes` writes while nobody reads its
    output. Meanwhile other execs and a write/read of a file each finish well under a second,
    and the stop of the sandbox is prompt. (Before: 14 s per exec, 10 s for the stop.)"""
    c = svc.client()
    sid = c.running().id
    channel = grpc.insecure_channel(f"unix://{svc.socket_path}")  # the stuck calls' own
    stub = pbg.SandboxServiceStub(channel)
    release = threading.Event()
    pushed = threading.Event()

    def stdin_requests() -> Iterator[pb.ExecRequest]:
        init = pb.ExecInit(sandbox_id=sid, argv=["sh", "-c", "sleep 1000; cat"], stdin=True)
        yield pb.ExecRequest(init=init)
        for _ in range(8 * MiB // 65536):
            yield pb.ExecRequest(stdin=b"s" * 65536)
        pushed.set()
        release.wait(60)

    def quiet_requests() -> Iterator[pb.ExecRequest]:
        yield pb.ExecRequest(init=pb.ExecInit(sandbox_id=sid, argv=["yes"]))
        release.wait(60)

    no_reader = stub.Exec(stdin_requests(), timeout=120)
    unread = stub.Exec(quiet_requests(), timeout=120)
    try:
        assert next(unread).WhichOneof("msg") == "started"  # and never read again
        assert next(no_reader).WhichOneof("msg") == "started"
        time.sleep(1.5)  # every buffer on the way fills up

        for i in range(5):
            t0 = time.monotonic()
            r = c.exec(sid, ["echo", f"fine {i}"], deadline=20)
            took = time.monotonic() - t0
            assert r.stdout == f"fine {i}\n".encode() and took < 1.0, took
        t0 = time.monotonic()
        c.write_file(sid, "/tmp/blob", b"b" * (3 * MiB))
        info, data = c.read_file(sid, "/tmp/blob")
        took = time.monotonic() - t0
        assert info.size == 3 * MiB and data == b"b" * (3 * MiB) and took < 1.0, took

        t0 = time.monotonic()
        rec = c.stop(sid, grace=10, timeout=30)
        took = time.monotonic() - t0
        assert rec.status == S.SANDBOX_STATUS_TERMINATED and took < 3.0, (rec, took)
    finally:
        release.set()
        no_reader.cancel()
        unread.cancel()
        channel.close()


# --- a killed command takes everything it started with it --------------------------------------

SPAWNER = (
    "setsid sh -c 'exec sleep {n}1' &"  # a new session
    " (setsid sh -c 'exec sleep {n}2' &) &"  # a double fork into a new session
    ' python3 -c \'import os; os.setpgid(0, 0); os.execvp("sleep", ["sleep", "{n}3"])\' &'
    " echo ready; exec sleep {n}4"  # (python3: a new process group)
)


@pytest.mark.slow
def test_timeout_kills_setsid_and_daemonized_children(svc: Service) -> None:
    c = svc.client()
    sid = c.running().id
    r = c.sh(sid, SPAWNER.format(n=4711), timeout=1.5, deadline=30)
    assert r.terminal.exit.timed_out, r.frames
    wait_until(lambda: processes_matching(c, sid, "sleep 4711") == [], "the children to die", 5)


@pytest.mark.slow
def test_a_command_cannot_shed_its_lineage_mark(svc: Service) -> None:
    """Hostile code that knows how its lineage is tracked (RLIMIT_RTTIME) tries to change it
    before escaping into a new session: the change is refused and the timeout still gets it."""
    c = svc.client()
    sid = c.running().id
    escape = (
        "import os, resource, subprocess, sys\n"
        "for change in (lambda: resource.setrlimit(resource.RLIMIT_RTTIME, (1000, 1000)),\n"
        "               lambda: resource.prlimit(0, resource.RLIMIT_RTTIME, (5, 5))):\n"
        "    try:\n"
        "        change(); print('changed', flush=True)\n"
        "    except (OSError, ValueError):  # Python's name for EPERM from setrlimit\n"
        "        print('refused', flush=True)\n"
        "subprocess.Popen(['sleep', '4719'], start_new_session=True)\n"
        "print('escaped', flush=True)\n"
    )
    r = c.exec(sid, ["sh", "-c", 'python3 -c "$0"; exec sleep 60', escape], timeout=1.5,
               deadline=30)  # fmt: skip
    assert r.terminal.exit.timed_out, r.frames
    assert r.stdout.split(b"\n")[:3] == [b"refused", b"refused", b"escaped"], r.stdout
    wait_until(lambda: processes_matching(c, sid, "sleep 4719") == [], "the escapee to die", 5)


def test_client_going_away_kills_setsid_and_daemonized_children(svc: Service) -> None:
    c = svc.client()
    sid = c.running().id
    release = threading.Event()

    def requests() -> Iterator[pb.ExecRequest]:
        init = pb.ExecInit(sandbox_id=sid, argv=["sh", "-c", SPAWNER.format(n=4712)])
        yield pb.ExecRequest(init=init)
        release.wait(60)

    call = svc.stub().Exec(requests(), timeout=60)
    for frame in call:
        if frame.WhichOneof("msg") == "output" and b"ready" in frame.output.data:
            break
    wait_until(
        lambda: len(processes_matching(c, sid, "sleep 4712")) == 4, "the four sleeps to start", 10
    )
    call.cancel()  # the client goes away: the service kills the command
    release.set()
    deadline = time.monotonic() + 5
    while processes_matching(c, sid, "sleep 4712") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_matching(c, sid, "sleep 4712") == []


@pytest.mark.slow
def test_service_death_kills_running_commands_lineage(fresh: Service) -> None:
    """The service dies: the supervisor sees its connection close and kills what each running
    command started; a server started earlier by a finished command keeps running."""
    c = fresh.client()
    sid = c.running().id
    c.sh(sid, "(setsid sleep 47140 >/dev/null 2>&1 &); echo started")  # finished: stays
    release = threading.Event()

    def requests() -> Iterator[pb.ExecRequest]:
        init = pb.ExecInit(sandbox_id=sid, argv=["sh", "-c", SPAWNER.format(n=4713)])
        yield pb.ExecRequest(init=init)
        release.wait(60)

    call = fresh.stub().Exec(requests(), timeout=60)
    for frame in call:
        if frame.WhichOneof("msg") == "output" and b"ready" in frame.output.data:
            break
    wait_until(
        lambda: len(processes_matching(c, sid, "sleep 4713")) == 4, "the four sleeps to start", 10
    )
    fresh.kill9()
    release.set()
    time.sleep(1.0)
    fresh.start()
    c = fresh.client()
    assert c.get(sid).status == S.SANDBOX_STATUS_RUNNING
    assert processes_matching(c, sid, "sleep 4713") == []
    assert len(processes_matching(c, sid, "sleep 47140")) == 1


# --- lifetimes and leases hold while the service is down ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["lifetime", "lease"])
def test_deadline_enforced_while_service_is_down(fresh: Service, how: str) -> None:
    c = fresh.client()
    if how == "lifetime":
        sb = c.create(max_lifetime_seconds=3)
        reason = "max lifetime exceeded"
    else:
        sb = c.create(lease_id="walls-lease", lease_ttl=3)
        reason = "lease expired"
    sid = sb.id
    assert c.wait(sid).status == S.SANDBOX_STATUS_RUNNING
    assert sandbox_pids(fresh, sid)
    fresh.kill9()
    time.sleep(5.0)  # well past the deadline; nobody to enforce it but the sandbox itself
    left = sandbox_pids(fresh, sid)
    assert not left, f"sandbox processes outlived its {how}: {left}"
    fresh.start()
    rec = fresh.client().wait(sid, terminal=True, timeout=30)
    assert (rec.status, rec.status_reason) == (S.SANDBOX_STATUS_TERMINATED, reason), rec


@pytest.mark.slow
def test_lease_renewal_moves_the_deadline(svc: Service) -> None:
    """The deadline follows renewals: a sandbox whose lease is renewed outlives the first TTL."""
    c = svc.client()
    sid = c.create(lease_id="walls-renewed", lease_ttl=2).id
    assert c.wait(sid).status == S.SANDBOX_STATUS_RUNNING
    for _ in range(6):
        time.sleep(0.7)
        svc.stub().RenewLease(
            pb.RenewLeaseRequest(lease_id="walls-renewed", ttl_seconds=2), timeout=10
        )
    assert c.get(sid).status == S.SANDBOX_STATUS_RUNNING


# --- a signal from inside is not a clean exit --------------------------------------------------


# SIGTERM to PID 1 without kill(): an I/O signal (F_SETSIG) aimed at it, which shows no sender.
SIGIO_TERM = """
import fcntl, os, signal
r, w = os.pipe()
fcntl.fcntl(r, fcntl.F_SETOWN, 1)
fcntl.fcntl(r, 10, signal.SIGTERM)  # F_SETSIG
fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC)
os.write(w, b"x")
"""


@pytest.mark.parametrize(
    ("command", "attack"),
    [
        ([], ["sh", "-c", "kill -TERM 1; sleep 5"]),
        (
            ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.05; done"],
            ["sh", "-c", "kill -TERM 1; sleep 5"],
        ),
        ([], ["python3", "-c", SIGIO_TERM]),
    ],
    ids=["keepalive", "main-exits-0-on-TERM", "io-signal"],
)
def test_kill_term_1_from_inside_is_recorded(
    svc: Service, command: list[str], attack: list[str]
) -> None:
    c = svc.client()
    sid = c.running(command=command).id
    r = c.exec(sid, attack)
    assert r.terminal.WhichOneof("msg") in ("exit", "error")
    rec = c.wait(sid, terminal=True, timeout=30)
    assert rec.status == S.SANDBOX_STATUS_FAILED, rec
    assert "signal from inside" in rec.status_reason and "SIGTERM" in rec.status_reason, rec


def test_other_signals_from_inside_do_not_end_the_sandbox(svc: Service) -> None:
    c = svc.client()
    sid = c.running().id
    r = c.sh(sid, "kill -KILL 1; kill -HUP 1; kill -USR1 1; kill -STOP 1; sleep 0.3; echo alive")
    assert r.stdout == b"alive\n"
    assert c.get(sid).status == S.SANDBOX_STATUS_RUNNING
    assert c.sh(sid, "echo still").stdout == b"still\n"


def test_stop_from_outside_is_still_a_stop(svc: Service) -> None:
    c = svc.client()
    sid = c.running().id
    rec = c.stop(sid, grace=5)
    assert (rec.status, rec.status_reason) == (S.SANDBOX_STATUS_TERMINATED, "stopped"), rec


# --- /proc through the file API -----------------------------------------------------------------


def sdk_read(svc: Service, sandbox_id: str, path: str) -> dict[str, object]:
    code = (
        "import json, sys, aviato\n"
        "sb = aviato.Sandbox.from_id(sys.argv[1]).result()\n"
        "try:\n"
        "    data = sb.read_file(sys.argv[2]).result()\n"
        "    print(json.dumps({'ok': data.decode(errors='replace')}))\n"
        "except Exception as e:\n"
        "    print(json.dumps({'error': f'{type(e).__name__}: {e}'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, sandbox_id, path],
        capture_output=True,
        text=True,
        env=sdk_env(svc),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_procfs_files_are_readable_through_the_sdk(svc: Service) -> None:
    c = svc.client()
    sid = c.running().id
    status = sdk_read(svc, sid, "/proc/self/status")
    assert "Name:" in str(status.get("ok")), status
    cpuinfo = sdk_read(svc, sid, "/proc/cpuinfo")
    assert "processor" in str(cpuinfo.get("ok")), cpuinfo
    info, data = c.read_file(sid, "/proc/self/status")
    assert info.size == 0 and b"Name:" in data  # 0: unknown size, data to the end
    sys_file = "/sys/kernel/mm/transparent_hugepage/enabled"
    if c.sh(sid, f"test -r {sys_file}").exit_code == 0:
        info, data = c.read_file(sid, sys_file)
        assert info.size == 0 and data.endswith(b"\n")  # sysfs says 4096 for a few bytes
        assert "ok" in sdk_read(svc, sid, sys_file)


def test_magic_links_do_not_reach_the_supervisors_files(svc: Service) -> None:
    """A symlink planted in the sandbox to /proc/self/fd/4 (the main log, a host file the
    supervisor holds), to /proc/1/fd/4, or those paths themselves: the file API refuses them
    (never returns, never writes the host file); ordinary /proc files stay readable."""
    c = svc.client()
    canary = "walls-canary-" + os.urandom(4).hex()
    sid = c.running(command=["sh", "-c", f"echo {canary}; echo {canary} >&2; exec sleep 1000"]).id
    host_log = svc.state_dir / "sandboxes" / sid / "main.log"
    deadline = time.monotonic() + 10
    while canary.encode() not in host_log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    before = host_log.read_bytes()
    assert canary.encode() in before
    links = {
        "/workspace/self4": "/proc/self/fd/4",
        "/workspace/one4": "/proc/1/fd/4",
        "/workspace/self5": "/proc/self/fd/5",
        "/workspace/self2": "/proc/self/fd/2",
        "/workspace/root": "/proc/1/root/proc/self/fd/4",
    }
    script = "; ".join(f"ln -sf {target} {link}" for link, target in links.items())
    assert c.sh(sid, script).exit_code == 0
    for path in [*links, *links.values()]:
        with pytest.raises(grpc.RpcError) as err:
            _, data = c.read_file(sid, path)
            raise AssertionError(f"{path} read: {data[:200]!r}")
        assert err.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.NOT_FOUND,
        ), (path, err.value)
        assert canary not in (err.value.details() or ""), path
    for path in ["/proc/self/fd/4", "/proc/1/fd/4", "/workspace/self4/x"]:
        with pytest.raises(grpc.RpcError):
            c.write_file(sid, path, b"overwritten")
    c.write_file(sid, "/workspace/self4", b"replaces the link, not its target")
    assert c.read_file(sid, "/workspace/self4")[1] == b"replaces the link, not its target"
    after = host_log.read_bytes()
    assert after.startswith(before) and b"overwritten" not in after
    assert b"Name:" in c.read_file(sid, "/proc/self/status")[1]
    assert b"processor" in c.read_file(sid, "/proc/cpuinfo")[1]


# --- OOM kills say so ---------------------------------------------------------------------------

HOG = "b = b'x' * (400 << 20); print(len(b))"


@pytest.mark.slow
def test_oom_killed_exec_is_flagged(svc: Service) -> None:
    c = svc.client()
    sid = c.running(resources={"memory": "64Mi"}).id
    r = c.exec(sid, ["python3", "-c", HOG], deadline=60)
    exit_ = r.terminal.exit
    assert exit_.signal == 9 and exit_.oom_killed, r.frames
    r = c.exec(sid, ["sh", "-c", f'python3 -c "{HOG}"'], deadline=60)  # its shell reports 137
    assert r.terminal.exit.exit_code == 137 and r.terminal.exit.oom_killed, r.frames
    r = c.sh(sid, "kill -9 $$")
    assert r.terminal.exit.signal == 9 and not r.terminal.exit.oom_killed, r.frames
    r = c.sh(sid, "exec sleep 10", timeout=0.5)
    assert r.terminal.exit.timed_out and not r.terminal.exit.oom_killed, r.frames


@pytest.mark.slow
def test_cli_says_when_the_oom_killer_struck(svc: Service) -> None:
    c = svc.client()
    sid = c.running(resources={"memory": "64Mi"}).id
    env = sdk_env(svc)
    argv = [sys.executable, "-m", "aviato", "exec", sid, "--", "python3", "-c", HOG]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 137, (out.returncode, out.stderr)
    assert "killed by the out-of-memory killer" in out.stderr, out.stderr
    argv = [sys.executable, "-m", "aviato", "exec", sid, "--", "sh", "-c", "kill -9 $$"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 137 and "out-of-memory" not in out.stderr, out.stderr
