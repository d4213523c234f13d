"""All sandboxes together cannot take the host: the parent cgroup's memory and pids limits.

Every test service here has a cgroup parent of its own (`aviato-test-<random>`, see
reliability/harness.py), so that nothing here lowers the limits of the "aviato" parent that
other services on this machine share.

- The service writes its --cgroup-memory and --cgroup-pids to the parent, shows them in
  `aviato server status`, and derives defaults from the machine (3/4 of its memory, half of
  kernel.pid_max or kernel.threads-max).
- A sandbox's writable layer (a tmpfs) is charged to its memory cgroup, hence to the parent's.
- 40 hostile sandboxes at once, fork bombs and tmpfs fillers, each within its own limits but
  together far over the budget (2 GiB, 500 tasks per core): the parent's limits hold, a host
  `true` runs in bounded time and the service answers. About 15 s, during which the fork bombs
  keep the machine's cores busy. docs/security/limits.md has the figures and what they mean.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability.harness import ROOT, Service

from aviato.v1 import sandbox_pb2 as pb

CGROUP = Path("/sys/fs/cgroup")
V1 = (CGROUP / "memory" / "memory.limit_in_bytes").exists() or (CGROUP / "memory").is_dir()
MiB, GiB = 1 << 20, 1 << 30
# The task budget of these tests: 500 per core. Fork bombs that hold many more runnable tasks
# per core than that stall the host's own execs for many seconds (they contend for the shared
# libc's mapping lock; docs/security/limits.md), whatever the pid space left.
PIDS = 500 * (os.cpu_count() or 1)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need the service as root")


def parent_file(svc: Service, controller: str, v1_name: str, v2_name: str) -> Path:
    if V1:
        return CGROUP / controller / svc.cgroup_parent / v1_name
    unified = CGROUP / "unified" if (CGROUP / "unified" / "cgroup.controllers").exists() else CGROUP
    return unified / svc.cgroup_parent / v2_name


def read_int(path: Path) -> int:
    text = path.read_text().strip()
    return 1 << 63 if text == "max" else int(text)


@pytest.fixture
def budget() -> Iterator[Service]:
    svc = Service("--cgroup-memory", "2Gi", "--cgroup-pids", str(PIDS))
    try:
        svc.start()
        if svc.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=10).cgroups == "none":
            pytest.skip("no cgroups on this host")
        yield svc
    finally:
        svc.finish()


@pytest.mark.slow
def test_parent_limits_are_written_and_shown(budget: Service) -> None:
    memory = parent_file(budget, "memory", "memory.limit_in_bytes", "memory.max")
    pids = parent_file(budget, "pids", "pids.max", "pids.max")
    assert read_int(memory) == 2 * GiB
    assert read_int(pids) == PIDS
    if V1:
        memsw = memory.with_name("memory.memsw.limit_in_bytes")
        if memsw.exists():
            assert read_int(memsw) == 2 * GiB  # swap cannot extend the bound
    info = budget.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.sandbox_limits == f"memory 2Gi, pids {PIDS} (parent cgroup {budget.cgroup_parent})"
    status = subprocess.run(
        [str(Path(sys.executable).with_name("aviato")), "server",
         "--state-dir", str(budget.state_dir), "status"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")},
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "all sandboxes" in status.stdout and f"memory 2Gi, pids {PIDS}" in status.stdout


def test_default_budget_derives_from_the_machine() -> None:
    svc = Service()
    try:
        svc.start()
        total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        threads_max = int(Path("/proc/sys/kernel/threads-max").read_text())
        memory = read_int(parent_file(svc, "memory", "memory.limit_in_bytes", "memory.max"))
        assert abs(memory - total * 3 // 4) < 4096 * 2  # the kernel rounds to pages
        assert (
            read_int(parent_file(svc, "pids", "pids.max", "pids.max"))
            == min(pid_max, threads_max) // 2
        )
    finally:
        svc.finish()


def test_writable_layer_is_charged_to_the_sandbox_memory(budget: Service) -> None:
    c = budget.client()
    sb = c.running(resources={"memory": "256Mi", "disk": "128Mi"})
    r = c.sh(sb.id, "head -c 64M /dev/zero > /workspace/f && sync && echo ok")
    assert r.stdout == b"ok\n", r.stderr
    stat_name = "memory.stat"
    sandbox_stat = parent_file(budget, "memory", stat_name, stat_name).parent / sb.id / stat_name
    stats = dict(line.split() for line in sandbox_stat.read_text().splitlines())
    shmem = int(stats["total_shmem" if V1 else "shmem"])
    assert shmem >= 64 * MiB, stats
    parent_usage = parent_file(budget, "memory", "memory.usage_in_bytes", "memory.current")
    assert read_int(parent_usage) >= 64 * MiB
    c.delete(sb.id)


HOSTILE = 40
ATTACK = (
    # A tmpfs filler (120 MiB of the sandbox's 128 MiB disk) and a fork bomb (up to its 200
    # tasks); the main process then waits without forking again, so that the sandbox stays.
    "head -c 120M /dev/zero > /tmp/fill 2>/dev/null & "
    "(bomb() { bomb | bomb & }; bomb) 2>/dev/null & exec sleep 120"
)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


@pytest.mark.slow
def test_forty_hostile_sandboxes_stay_within_the_budget(budget: Service) -> None:
    c = budget.client()
    memory = parent_file(budget, "memory", "memory.max_usage_in_bytes", "memory.peak")
    peak_pids = parent_file(budget, "pids", "pids.peak", "pids.peak")
    phase = ["starting"]
    host_true: dict[str, list[float]] = {"starting": [], "attack": [], "teardown": []}
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            subprocess.run(["/bin/true"], check=True)
            # Counted in the phase it ended in: a stall that spans phases belongs to the later.
            host_true[phase[0]].append(time.monotonic() - t0)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    service: list[float] = []
    try:
        resources = {"memory": "128Mi", "pids": 200, "disk": "128Mi"}
        ids = [
            c.create(command=["/bin/sh", "-c", ATTACK], resources=resources).id
            for _ in range(HOSTILE)
        ]
        for sid in ids:
            c.wait(sid, timeout=120)
        phase[0] = "attack"
        # At least 10 s of attack; on a loaded machine the fillers (slowed by 40 fork bombs on
        # the same cores) may need longer to press the budget's first GiB: up to 40 s.
        start = time.monotonic()
        while time.monotonic() < start + 10 or (
            read_int(memory) < GiB and time.monotonic() < start + 40
        ):
            t0 = time.monotonic()
            c.list()
            service.append(time.monotonic() - t0)
            time.sleep(0.2)
        pressed = read_int(memory), read_int(peak_pids)
        phase[0] = "teardown"
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(c.delete, ids))
        teardown = time.monotonic() - t0
    finally:
        stop.set()
        prober.join()

    def show(name: str) -> str:
        xs = host_true[name] or [0.0]
        return (
            f"{name}: n={len(xs)} median={statistics.median(xs) * 1e3:.1f} ms "
            f"p95={_quantile(xs, 0.95) * 1e3:.0f} ms max={max(xs) * 1e3:.0f} ms"
        )

    figures = (
        f"host true {show('starting')}; {show('attack')}; {show('teardown')} "
        f"(teardown {teardown:.1f} s); service list: max={max(service) * 1e3:.0f} ms; "
        f"parent peaks: memory {pressed[0] / MiB:.0f} MiB, pids {pressed[1]}"
    )
    print(figures)  # the measurement (shown with -s)
    # The parent's limits held, and the attack did press against them. A task that joins a
    # cgroup by migration (each sandbox's launcher, written to `tasks`) is not refused by
    # pids.max, so the peak may pass the limit by one per sandbox started while it was full.
    assert GiB <= pressed[0] <= 2 * GiB, figures
    assert 0.75 * PIDS <= pressed[1] <= PIDS + HOSTILE, figures
    # The host stayed usable and the service answered while the sandboxes attacked. The tail is
    # not bounded tightly: with ~500 bombing tasks per core a host exec can still wait seconds
    # for the libc mapping lock that the `host` image shares with the host (a CI run saw 12 s
    # once in ~60 samples; docs/security.md, part 5); the median and p95 are what "usable" means.
    attack = host_true["attack"]
    assert statistics.median(attack) < 0.1 and _quantile(attack, 0.95) < 0.5, figures
    assert max(attack) < 60, figures
    assert max(service) < 10, figures
