"""A sandbox's main process crashes or is OOM-killed; a sandbox fills its writable layer.

- crash (SIGSEGV, abort) or a non-zero exit: status FAILED, the reason says why, the exit code
  is 128+signal (or the code). OOM of the main process itself: tests/server/test_limits.py
  (`test_oom_is_failed_oomkilled_137`); here the OOM-killed process is the command of a shell
  that passes the 137 on, which must still read "OOMKilled".
- disk: a sandbox writing past its `disk` size gets ENOSPC at that size in every writable place
  (/workspace, /tmp, /root, /dev/shm); another sandbox writes normally meanwhile, the host's
  memory and the service are unaffected. The writable layer lives in RAM and counts against the
  memory limit: when `disk` is larger than `memory`, the writer is OOM-killed at the memory
  limit instead (the sandbox keeps running).
"""

from __future__ import annotations

import pytest

from aviato.v1 import sandbox_pb2 as pb

from .harness import RUNNING, Service

FAILED = pb.SandboxStatus.SANDBOX_STATUS_FAILED


def _needs_cgroups(svc: Service) -> None:
    if svc.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=10).cgroups == "none":
        pytest.skip("no cgroups on this host")


@pytest.mark.parametrize(
    ("command", "reason", "code"),
    [
        (["python3", "-c", "import ctypes; ctypes.string_at(0)"], "killed by signal 11", 139),
        (["python3", "-c", "import os; os.abort()"], "killed by signal 6", 134),
        (["/bin/sh", "-c", "kill -KILL $$"], "killed by signal 9", 137),
        (["/bin/sh", "-c", "exit 3"], "exited with code 3", 3),
        (["/nonexistent/program"], "exited with code 127", 127),
    ],
    ids=["segfault", "abort", "sigkill", "exit-3", "cannot-exec"],
)
def test_main_process_crash_is_failed_with_reason_and_code(
    svc: Service, command: list[str], reason: str, code: int
) -> None:
    c = svc.client()
    sb = c.create(command=command)
    end = c.wait(sb.id, terminal=True)
    assert end.status == FAILED, end
    assert end.status_reason == reason
    assert end.HasField("exit_code") and end.exit_code == code
    assert end.ended_at.ToNanoseconds() >= end.created_at.ToNanoseconds()
    c.delete(sb.id)


def test_oom_killed_command_of_a_shell_main_is_oomkilled(svc: Service) -> None:
    _needs_cgroups(svc)
    c = svc.client()
    sb = c.create(
        command=["/bin/sh", "-c", "python3 -c 'b = bytearray(512 << 20)'; exit $?"],
        resources={"memory": "64Mi"},
    )
    end = c.wait(sb.id, terminal=True)
    assert (end.status, end.status_reason, end.exit_code) == (FAILED, "OOMKilled", 137), end
    c.delete(sb.id)


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


def test_disk_fill_gets_enospc_at_the_limit_and_spares_others(svc: Service) -> None:
    _needs_cgroups(svc)
    c = svc.client()
    full = c.running(resources={"disk": "32Mi"})
    other = c.running(resources={"disk": "64Mi"})
    host_before = _mem_available()
    for place in ("/workspace", "/tmp", "/root", "/dev/shm"):
        r = c.sh(full.id, f"dd if=/dev/zero of={place}/fill bs=1M count=100 2>&1; echo rc=$?")
        out = r.stdout.decode()
        assert "No space left on device" in out and "rc=1" in out, (place, out)
        size = int(c.sh(full.id, f"stat -c %s {place}/fill").stdout)
        assert 28 << 20 <= size <= 32 << 20, (place, size)
        if place != "/dev/shm":  # /dev/shm is its own tmpfs of the same size
            c.sh(full.id, f"rm {place}/fill")
        # Meanwhile another sandbox writes normally.
        w = c.sh(
            other.id, "dd if=/dev/zero of=/workspace/ok bs=1M count=16 2>&1 && rm /workspace/ok"
        )
        assert w.exit_code == 0, w.stdout
    # The full sandbox still works: small writes succeed once space is freed, commands run.
    assert (
        c.sh(full.id, "rm /dev/shm/fill; echo ok > /workspace/small && cat /workspace/small").stdout
        == b"ok\n"
    )
    assert c.get(full.id).status == RUNNING
    # The host lost at most what the sandbox may hold (two 32 MiB layers), not more.
    assert host_before - _mem_available() < 256 << 20
    for sb in (full, other):
        c.delete(sb.id)


def test_disk_larger_than_memory_oom_kills_the_writer_only(svc: Service) -> None:
    _needs_cgroups(svc)
    c = svc.client()
    sb = c.running(resources={"disk": "512Mi", "memory": "96Mi"})
    r = c.sh(sb.id, "dd if=/dev/zero of=/workspace/f bs=1M count=400 2>/dev/null; echo rc=$?")
    assert r.stdout.strip() in (b"rc=137", b"rc=1"), r.stdout  # OOM-killed, or ENOSPC/ENOMEM
    size = int(c.sh(sb.id, "stat -c %s /workspace/f").stdout)
    assert size <= 96 << 20
    assert c.get(sb.id).status == RUNNING
    assert c.sh(sb.id, "rm /workspace/f; echo alive").stdout == b"alive\n"
    c.delete(sb.id)
