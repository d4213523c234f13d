"""Protected commands and per-sandbox host uid ranges (issue 14), attacked for real.

The forgery: a reward check runs in the same sandbox as the code it judges. The judged code
leaves a daemon behind (an earlier command, `setsid ... &`) that waits for the check to start
and then writes into its stdout through /proc/PID/fd/1, opens its memory for writing, and
signals it. Against an ordinary command every step works (the test shows it, so that it can
fail); against `protected=True` every step is refused, and the check's output and exit status
are its own.

The uid ranges: as root the service gives every sandbox a user namespace mapped to host ids of
its own, so none of its processes is host root, and a sandbox that exhausts a per-user kernel
counter (inotify instances) exhausts only its own.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path

import grpc
import pytest

from .conftest import Host

DAEMON = r"""
import json, os, signal, sys, time
marker, log = sys.argv[1].encode(), sys.argv[2]
me, seen, end = os.getpid(), set(), time.time() + 60
while time.time() < end and not seen:
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) in (1, me):
            continue
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read()
        except OSError:
            continue
        if marker not in cmd or b"attacker" in cmd:
            continue
        seen.add(p)
        pid, out = int(p), {"pid": p}
        def attempt(name, fn):
            try:
                fn()
                out[name] = "done"
            except OSError as e:
                out[name] = f"refused errno {e.errno}"
        def forge():
            for fd in (1, 2):
                with open(f"/proc/{pid}/fd/{fd}", "w") as f:
                    f.write("FORGED\n")
        attempt("write_output", forge)
        attempt("open_memory", lambda: open(f"/proc/{pid}/mem", "r+b").close())
        attempt("read_environ", lambda: open(f"/proc/{pid}/environ", "rb").read())
        attempt("signal", lambda: os.kill(pid, 0))
        attempt("open_fd_dir", lambda: os.listdir(f"/proc/{pid}/fd"))
        with open(log, "w") as f:
            json.dump(out, f)
    time.sleep(0.002)
"""

CHECK = "sleep 1.5; echo genuine; exit 1"


def _attack(host: Host, sandbox_id: str, protected: bool) -> tuple[dict[str, str], object]:
    client = host.client
    marker = f"check-{os.urandom(4).hex()}"
    log = f"/tmp/attack-{marker}.json"
    client.write_file(sandbox_id, "/tmp/daemon.py", DAEMON.encode())
    started = client.exec(
        sandbox_id,
        ["sh", "-c", f"setsid python3 /tmp/daemon.py {marker} {log} attacker >/dev/null 2>&1 &"],
    )
    assert started.exit_code == 0, started.stderr
    result = client.exec(sandbox_id, ["sh", "-c", CHECK, marker], protected=protected)
    for _ in range(100):
        got = client.exec(sandbox_id, ["cat", log])
        if got.exit_code == 0:
            return json.loads(got.stdout), result
        time.sleep(0.05)
    raise AssertionError("the daemon never saw the check run: the test proves nothing")


def _root_only(host: Host) -> None:
    if host.mode != "root":
        pytest.skip("protected commands and uid ranges need a service running as root")


@pytest.mark.slow
def test_a_left_behind_daemon_forges_an_ordinary_command(host: Host) -> None:
    """The attack works on an ordinary command: the test can tell a wall from no wall."""
    _root_only(host)
    sid = host.sandbox()
    seen, result = _attack(host, sid, protected=False)
    assert seen["write_output"] == "done", seen
    assert seen["open_memory"] == "done", seen
    assert seen["signal"] == "done", seen
    assert b"FORGED" in result.stdout  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_left_behind_daemon_cannot_touch_a_protected_command(host: Host) -> None:
    _root_only(host)
    sid = host.sandbox()
    seen, result = _attack(host, sid, protected=True)
    for step in ("write_output", "open_memory", "read_environ", "signal", "open_fd_dir"):
        assert seen[step].startswith("refused"), seen
    assert result.stdout == b"genuine\n"  # type: ignore[attr-defined]
    assert result.stderr == b""  # type: ignore[attr-defined]
    assert result.exit_code == 1  # type: ignore[attr-defined]


def test_a_protected_command_works_with_what_the_sandbox_made(host: Host) -> None:
    """It reads and writes the sandbox user's files (0600 ones too), reaches a server that an
    earlier command started, and its own children are protected with it."""
    _root_only(host)
    client = host.client
    sid = host.sandbox()
    server = (
        "import socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('127.0.0.1', 8765)); s.listen()\n"
        "while True:\n"
        "    c, _ = s.accept(); c.sendall(b'pong'); c.close()\n"
    )
    client.write_file(sid, "/workspace/server.py", server.encode())
    assert client.exec(sid, ["sh", "-c", "setsid python3 /workspace/server.py &"]).exit_code == 0
    made = client.sh(sid, "echo answer > /workspace/out && chmod 600 /workspace/out")
    assert made.exit_code == 0
    check = (
        "import socket, time, os\n"
        "for _ in range(100):\n"
        "    try:\n"
        "        c = socket.create_connection(('127.0.0.1', 8765)); break\n"
        "    except OSError: time.sleep(0.05)\n"
        "print(c.recv(10).decode(), open('/workspace/out').read().strip(), os.getuid())\n"
        "open('/workspace/out', 'a').write('graded\\n')\n"
    )
    r = client.exec(sid, ["python3", "-c", check], protected=True)
    assert r.exit_code == 0, r.stderr
    pong, answer, uid = r.stdout.decode().split()
    assert (pong, answer) == ("pong", "answer")
    assert uid != "0"
    after = client.exec(sid, ["cat", "/workspace/out"])
    assert after.stdout == b"answer\ngraded\n"
    # What the protected command leaves running is out of reach too (and still alive).
    left = client.sh(sid, "setsid sleep 30 >/dev/null 2>&1 & echo $!", protected=True)
    pid = int(left.stdout.decode())
    probe = f"import os\ntry:\n    os.kill({pid}, 0)\nexcept OSError as e:\n    print(e.errno)"
    assert client.exec(sid, ["python3", "-c", probe]).stdout.strip() == b"1"  # EPERM


def test_a_protected_command_still_obeys_its_timeout_and_the_stop(host: Host) -> None:
    _root_only(host)
    client = host.client
    sid = host.sandbox()
    r = client.exec(sid, ["sleep", "30"], protected=True, timeout=0.5, deadline=10)
    assert r.terminal.exit.timed_out
    assert r.terminal.exit.signal == 9


def test_a_protected_command_gets_no_terminal(host: Host) -> None:
    """A terminal's device could be opened by any process of the sandbox's user."""
    sid = host.sandbox()
    r = host.client.exec(sid, ["true"], protected=True, tty=True)
    assert r.terminal.WhichOneof("msg") == "error"
    assert r.terminal.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "terminal" in r.terminal.error.message


def test_rootless_refuses_protected_commands_clearly(host: Host) -> None:
    if host.mode != "rootless":
        pytest.skip("a root service supports protected commands")
    sid = host.sandbox()
    r = host.client.exec(sid, ["true"], protected=True)
    assert r.terminal.WhichOneof("msg") == "error"
    assert r.terminal.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "protected" in r.terminal.error.message
    assert "root" in r.terminal.error.message


# --- host uid ranges --------------------------------------------------------------------------


def _uids(pid: int) -> tuple[int, ...]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return tuple(int(x) for x in line.split()[1:])
    raise AssertionError(f"no Uid line for {pid}")


def test_sandbox_processes_are_never_host_root_and_never_share_uids(host: Host) -> None:
    _root_only(host)
    a, b = host.sandbox(), host.sandbox()
    for sid in (a, b):
        host.client.exec(sid, ["sh", "-c", "setsid sleep 60 &"])
    by_sandbox: dict[str, set[int]] = {a: set(), b: set()}
    for pid, sid in host.svc.processes().items():
        if sid not in by_sandbox:
            continue
        try:
            uids = _uids(pid)
        except OSError:
            continue
        by_sandbox[sid].update(uids)
    for sid, uids in by_sandbox.items():
        assert uids, f"no process of {sid} found"
        assert min(uids) >= 1 << 30, (sid, uids)  # bwrap's monitor process included
    assert not by_sandbox[a] & by_sandbox[b]


def test_exhausting_inotify_in_a_sandbox_leaves_the_host_and_others_theirs(host: Host) -> None:
    """inotify instances are counted per host user: a sandbox that takes all of them took them
    from host root (and every root sandbox) before each sandbox had uids of its own."""
    _root_only(host)
    hog, other = host.sandbox(), host.sandbox()
    hold = (
        "import ctypes, sys, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fds = []\n"
        "while libc.inotify_init() >= 0: fds.append(1)\n"
        "print(len(fds), flush=True); time.sleep(30)\n"
    )
    host.client.write_file(hog, "/tmp/hog.py", hold.encode())
    host.client.exec(hog, ["sh", "-c", "setsid python3 /tmp/hog.py > /tmp/hog.out 2>&1 &"])
    for _ in range(100):
        out = host.client.exec(hog, ["cat", "/tmp/hog.out"]).stdout.strip()
        if out:
            break
        time.sleep(0.05)
    assert int(out) > 0
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init()
    assert fd >= 0, f"host root lost its inotify instances (errno {ctypes.get_errno()})"
    os.close(fd)
    probe = "import ctypes; print(ctypes.CDLL(None).inotify_init() >= 0)"
    r = host.client.exec(other, ["python3", "-c", probe])
    assert r.stdout.strip() == b"True", r
