"""Escape attempts from inside a sandbox; each must fail. Runs in both modes (see conftest.py).

Every attempt is real: tests/security/attempts.py runs in the "attacker" sandbox and calls libc,
opens files, connects sockets; the host side is checked too (listeners that count what reaches
them, host processes that must still be alive, the host's clock and hostname). A "victim"
sandbox of the same service holds files and a process the attacker must not reach.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from _wait import wait_until

from aviato.v1 import sandbox_pb2 as pb

from .conftest import Host, local_addresses

RUNNING = pb.SandboxStatus.SANDBOX_STATUS_RUNNING


def _clean(result: dict[str, Any]) -> None:
    print(result["name"], result["uid"], result["details"])  # shown with -s
    assert not result["escaped"], "\n".join(result["details"])


def _host_pids_with(text: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ")
                if text.encode() in cmdline:
                    found.append(int(entry.name))
    return found


def _victim_pids(host: Host) -> list[int]:
    return [pid for pid, sid in host.svc.processes().items() if sid == host.victim]


# --- secrets ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_host_secrets_are_unreachable(host: Host) -> None:
    """The service's state (registry.db holds the canary), /root, /home, the rest of the host's
    filesystem that is not the read-only system, and /etc's secrets."""
    state = str(host.svc.state_dir)
    paths = [
        state,
        f"{state}/registry.db",
        f"{state}/aviato.sock",
        str(host.svc.base),
        "/root",
        "/home",
        "/tmp",
        "/var/tmp",
        "/workspace",
        "/run",
        "/var",
        "/srv",
        "/opt",
        "/mnt",
        "/media",
        "/etc",
        "/proc/self/environ",
    ]
    paths += [str(p) for p in host.planted]
    r = host.run(host.attacker, "find_canary", host.canary, *paths)
    _clean(r)
    assert any("absent" in d for d in r["details"]), r  # the state directory does not exist
    _clean(host.run(host.attacker, "shadow"))
    for name in ("registry.db", "aviato.sock", "server.pid", f".{host.canary}"):
        _clean(host.run(host.attacker, "find_name", name, "/"))


@pytest.mark.slow
def test_host_proc_1_environ_and_service_environment(host: Host) -> None:
    """The canary is in the service's environment; /proc/1 is the sandbox's supervisor, and
    no /proc entry (environ, cmdline, the supervisor's fds) leaks the host's."""
    _clean(host.run(host.attacker, "proc_environ", host.canary))


def test_other_sandbox_files_are_unreachable(host: Host) -> None:
    name = f"secret-{host.canary}"
    _clean(host.run(host.attacker, "find_name", name, "/"))
    # Through /proc/<pid>/root with the victim's *host* pids (which name nothing here).
    paths = [f"/proc/{pid}/root/workspace/{name}" for pid in _victim_pids(host)]
    assert paths, "the victim sandbox has no processes"
    _clean(host.run(host.attacker, "find_canary", host.canary, *paths))
    # The victim still has its file.
    assert host.client.read_file(host.victim, f"/workspace/{name}")[1] == host.canary.encode()


# --- processes --------------------------------------------------------------------------------


def test_host_and_other_sandbox_processes_are_invisible(host: Host) -> None:
    assert _host_pids_with(host.marker) and _host_pids_with(host.victim_marker)
    markers = [host.marker, host.victim_marker, "aviato.server", "pytest"]
    _clean(host.run(host.attacker, "see_processes", *markers))


def test_host_and_other_sandbox_processes_cannot_be_signalled(host: Host) -> None:
    assert host.svc.proc is not None
    targets = [host.marker_proc.pid, host.svc.proc.pid, *_victim_pids(host)]
    r = host.run(host.attacker, "signal_pids", *map(str, targets))
    _clean(r)
    time.sleep(0.3)
    assert host.marker_proc.poll() is None, "the host process was killed from the sandbox"
    assert host.svc.running(), "the service was killed from the sandbox"
    assert host.client.get(host.victim).status == RUNNING
    assert _host_pids_with(host.victim_marker), "the victim's process was killed"


# --- network ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_host_network_is_unreachable(host: Host) -> None:
    """The service's TCP port, a listener on every host address (TCP v4/v6, UDP), the host's
    abstract and path unix sockets, and the service's own unix socket."""
    ls = host.listeners
    targets = [f"127.0.0.1:{host.service_port}", f"localhost:{ls.tcp_port}"]
    for addr in local_addresses():
        if ":" in addr:
            targets.append(f"[{addr}]:{ls.tcp_port}")
        else:
            targets += [f"{addr}:{ls.tcp_port}", f"udp:{addr}:{ls.udp_port}"]
    targets += [f"abstract:{ls.abstract}", f"unix:{ls.unix_path}", f"unix:{host.svc.socket_path}"]
    # Sanity: the host itself reaches its listener.
    with socket.create_connection(("127.0.0.1", ls.tcp_port), timeout=2):
        pass
    wait_until(lambda: ls.hits, "the host listener to see the host's own connection", 10)
    ls.hits.clear()
    r = host.run(host.attacker, "connect", *targets)
    _clean(r)
    time.sleep(0.5)
    assert ls.hits == [], f"reached from the sandbox: {ls.hits}"
    assert any(d.startswith("interfaces: lo") for d in r["details"]), r["details"]


# --- privileged operations --------------------------------------------------------------------


def test_mount_unshare_setns_and_kernel_interfaces(host: Host) -> None:
    r = host.run(host.attacker, "kernel")
    _clean(r)
    assert len([d for d in r["details"] if "EPERM" in d or "ENOSYS" in d]) >= 15, r["details"]


def test_ptrace_and_process_memory(host: Host) -> None:
    _clean(host.run(host.attacker, "ptrace"))


def test_kernel_modules(host: Host) -> None:
    _clean(host.run(host.attacker, "modules"))


def test_clock_and_hostname_of_the_host(host: Host) -> None:
    offset = time.time() - time.monotonic()
    hostname = socket.gethostname()
    _clean(host.run(host.attacker, "clock_and_hostname"))
    assert abs((time.time() - time.monotonic()) - offset) < 1.0, "the host clock moved"
    assert socket.gethostname() == hostname


def test_rlimits_cannot_be_raised(host: Host) -> None:
    _clean(host.run(host.attacker, "rlimits"))


def test_credentials_have_no_capabilities(host: Host) -> None:
    r = host.run(host.attacker, "uid")
    _clean(r)
    assert r["uid"] == (0 if host.mode == "root" else 65534 if os.geteuid() == 0 else os.geteuid())


def test_root_sandbox_cannot_change_uid(host: Host) -> None:
    """Why the unprivileged-uid run is the rootless mode: uid 0 without CAP_SETUID may not
    switch to another uid, so no helper inside can drop to 65534 (setresuid fails EPERM)."""
    if host.mode != "root":
        pytest.skip("about the root mode")
    r = host.run(host.attacker, "--as", "65534", "uid")
    assert r["uid"] == 0 and "EPERM" in str(r["dropped"]), r


# --- staying alive ----------------------------------------------------------------------------


def test_no_process_survives_the_sandbox(host: Host) -> None:
    """nohup, setsid and a double-forked daemon ignoring SIGTERM and SIGHUP: all die when the
    sandbox is stopped, even with a grace period the main process uses to exit cleanly."""
    sid = host.sandbox()
    marker = f"avr-daemon-{os.urandom(4).hex()}"
    _clean(host.run(sid, "daemonize", marker))
    deadline = time.monotonic() + 5
    while len(_host_pids_with(marker)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_host_pids_with(marker)) >= 3, "the daemons did not start"
    end = host.client.stop(sid, grace=2)
    assert end.status == pb.SandboxStatus.SANDBOX_STATUS_TERMINATED
    deadline = time.monotonic() + 5
    while _host_pids_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _host_pids_with(marker), "a process outlived its sandbox"
    host.client.delete(sid)


# --- bombs (root mode: limits need cgroups) ---------------------------------------------------


def _bomb_sandbox(host: Host, **resources: Any) -> str:
    if host.mode != "root":
        pytest.skip("rootless services apply no cgroup limits without a delegated subtree")
    info = host.svc.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    if info.cgroups == "none":
        pytest.skip("no cgroups on this host")
    return host.sandbox(resources=resources)


def _host_still_fine(host: Host) -> None:
    t0 = time.monotonic()
    host.svc.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert host.client.exec(host.victim, ["/bin/echo", "ok"]).stdout == b"ok\n"
    assert time.monotonic() - t0 < 5, "the service or the other sandbox became slow"


@pytest.mark.slow
def test_fork_bomb(host: Host) -> None:
    sid = _bomb_sandbox(host, pids=64)
    t0 = time.monotonic()
    r = host.client.sh(sid, "f() { f | f & }; f; sleep 3; echo after", timeout=8)
    assert r.terminal.WhichOneof("msg") == "exit"
    _host_still_fine(host)
    assert time.monotonic() - t0 < 30
    end = host.client.stop(sid)
    assert end.status == pb.SandboxStatus.SANDBOX_STATUS_TERMINATED
    host.client.delete(sid)


def test_memory_bomb(host: Host) -> None:
    sid = _bomb_sandbox(host, memory="128Mi")
    r = host.client.exec(
        sid, ["python3", "-c", "a = []\nwhile True: a.append(bytearray(16 << 20))"]
    )
    assert r.exit_code == 137  # the OOM killer took the bomb, inside the sandbox's limit
    assert host.client.get(sid).status == RUNNING
    _host_still_fine(host)
    host.client.delete(sid)


def test_disk_bomb(host: Host) -> None:
    sid = _bomb_sandbox(host, disk="32Mi")
    r = host.client.sh(sid, "cat /dev/zero > /workspace/bomb; echo rc=$?")
    assert b"rc=1" in r.stdout and b"No space left" in r.stderr, (r.stdout, r.stderr)
    _host_still_fine(host)
    host.client.delete(sid)
