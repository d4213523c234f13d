"""The supervisor binary and its asyncio client, run directly as host processes (no bubblewrap).

Each test starts `aviato-supervisor` with fds 3 (listening socket), 4 (main log) and 5 (exit file)
the way the runtime does, and talks to it through `SupervisorConnection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _system_tools import require_tools

from aviato.runtime.base import (
    ExecExit,
    ExecFailed,
    ExecOutput,
    ExecSpec,
    FileNotFound,
    PathRefused,
    PermissionRefused,
    SandboxGone,
)
from aviato.runtime.supervisor import (
    OUT_WINDOW,
    STDIN_WINDOW,
    SupervisorConnection,
    SupervisorExec,
)

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(str(p) for p in (ROOT / "src/aviato/runtime/native").glob("*.c"))
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


@pytest.fixture(scope="session")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The supervisor compiled from the current source (warnings are errors), or
    $AVIATO_SUPERVISOR (e.g. a build with -fsanitize=address,undefined)."""
    if os.environ.get("AVIATO_SUPERVISOR"):
        return Path(os.environ["AVIATO_SUPERVISOR"])
    cc = os.environ.get("CC")
    if not cc:
        require_tools("cc")
        cc = "cc"
    out = tmp_path_factory.mktemp("bin") / "aviato-supervisor"
    base = [cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), *SOURCES]
    proc = subprocess.run([*base, "-static"], capture_output=True, text=True)
    if proc.returncode != 0:
        proc = subprocess.run(base, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


class Supervisor:
    """One supervisor process with its socket, main log and exit file."""

    def __init__(self, binary: Path, workdir: Path, args: list[str], env: dict[str, str]) -> None:
        self.workdir = workdir
        self.sockdir = Path(tempfile.mkdtemp(prefix="avs-", dir="/tmp"))  # short AF_UNIX path
        self.sock_path = self.sockdir / "ctl.sock"
        self.log_path = workdir / "main.log"
        self.exit_path = workdir / "exit"
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(self.sock_path))
        lsock.listen(64)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC)
        exit_fd = os.open(self.exit_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
        # Move the three out of the way of 3..5 before dup2-ing them there in the child.
        import fcntl

        fds = [
            fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 20) for fd in (lsock.fileno(), log_fd, exit_fd)
        ]
        try:
            self.pid = os.posix_spawn(
                str(binary),
                [str(binary), *args],
                env,
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(fds)],
            )
        finally:
            for fd in (*fds, log_fd, exit_fd):
                os.close(fd)
            lsock.close()  # the supervisor holds its own copy
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"supervisor {self.pid} still running")
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def signal(self, signo: int) -> None:
        os.kill(self.pid, signo)

    async def connect(self) -> SupervisorConnection:
        return await SupervisorConnection.connect(self.sock_path, timeout=5)

    def exit_record(self) -> tuple[int, int, int]:
        code, sig, t = self.exit_path.read_text().split()
        assert self.exit_path.read_text().endswith("\n")
        return int(code), int(sig), int(t)

    def log_records(self) -> list[tuple[int, int, bytes]]:
        data = self.log_path.read_bytes()
        out, pos = [], 0
        while pos < len(data):
            t, stream, n = struct.unpack_from("<QBI", data, pos)
            out.append((t, stream, data[pos + 13 : pos + 13 + n]))
            pos += 13 + n
        assert pos == len(data)
        return out

    def children(self) -> list[tuple[int, str]]:
        """(pid, state) of the supervisor's direct children."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[1]) == self.pid:
                found.append((int(entry), fields[0]))
        return found

    def close(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait()
        shutil.rmtree(self.sockdir, ignore_errors=True)


StartSupervisor = Callable[..., Supervisor]


@pytest.fixture
def start(binary: Path, tmp_path: Path) -> Iterator[StartSupervisor]:
    started: list[Supervisor] = []

    def _start(*args: str, env: dict[str, str] | None = None) -> Supervisor:
        workdir = tmp_path / f"sup{len(started)}"
        workdir.mkdir()
        s = Supervisor(binary, workdir, list(args), dict(os.environ) if env is None else env)
        started.append(s)
        return s

    yield _start
    for s in started:
        s.close()


@pytest.fixture
def sup(start: StartSupervisor) -> Supervisor:
    return start("--keepalive")


async def collect(h: SupervisorExec) -> tuple[bytes, bytes, ExecExit | ExecFailed]:
    out, err = bytearray(), bytearray()
    async for ev in h.events():
        if isinstance(ev, ExecOutput):
            (out if ev.stream == 1 else err).extend(ev.data)
        else:
            return bytes(out), bytes(err), ev
    raise AssertionError("events() ended without a terminal event")


async def run_cmd(
    conn: SupervisorConnection, *argv: str, **kw: Any
) -> tuple[bytes, bytes, ExecExit | ExecFailed]:
    return await collect(await conn.exec(ExecSpec(argv=argv, **kw)))


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ------------------------------------------------------------------------------------------ exec


def test_echo_round_trip(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        assert conn.protocol_version == 2 and conn.supervisor_pid == sup.pid
        out, err, end = await run_cmd(conn, "echo", "hello", "world")
        assert (out, err) == (b"hello world\n", b"")
        assert isinstance(end, ExecExit)
        assert (end.exit_code, end.signal, end.timed_out) == (0, 0, False)
        assert 0 < end.wall_seconds < 5 and end.peak_memory_bytes > 0
        await conn.ping()
        await conn.close()
        assert conn.is_closed

    run(main())


def test_exit_codes_and_signals(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        *_, end = await run_cmd(conn, "sh", "-c", "exit 3")
        assert isinstance(end, ExecExit) and (end.exit_code, end.signal) == (3, 0)
        *_, end = await run_cmd(conn, "sh", "-c", "kill -KILL $$")
        assert isinstance(end, ExecExit) and (end.exit_code, end.signal) == (137, 9)
        assert not end.timed_out
        h = await conn.exec(ExecSpec(argv=("sleep", "30")))
        await h.signal(signal.SIGTERM)
        *_, end = await collect(h)
        assert isinstance(end, ExecExit) and (end.exit_code, end.signal) == (143, 15)

    run(main())


def test_stdout_stderr_order_and_tags(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        script = "echo 1; sleep 0.05; echo 2 >&2; sleep 0.05; echo 3; sleep 0.05; echo 4 >&2"
        h = await conn.exec(ExecSpec(argv=("sh", "-c", script)))
        got = [(ev.stream, ev.data) async for ev in h.events() if isinstance(ev, ExecOutput)]
        assert got == [(1, b"1\n"), (2, b"2\n"), (1, b"3\n"), (2, b"4\n")]

    run(main())


def test_env_cwd_and_path_lookup(sup: Supervisor, tmp_path: Path) -> None:
    tool_dir = tmp_path / "tools"
    tool_dir.mkdir()
    tool = tool_dir / "mytool"
    tool.write_text("#!/bin/sh\necho tool:$FOO\n")
    tool.chmod(0o755)
    noshebang = tool_dir / "plain"
    noshebang.write_text("echo plain script\n")
    noshebang.chmod(0o755)

    async def main() -> None:
        conn = await sup.connect()
        out, _, end = await run_cmd(
            conn, "sh", "-c", 'echo "$FOO|$HOME|$(pwd)"', env={"FOO": "bar"}, cwd=str(tmp_path)
        )
        assert isinstance(end, ExecExit) and end.exit_code == 0
        assert out.decode() == f"bar|{os.environ.get('HOME', '')}|{tmp_path}\n"
        # PATH comes from the merged environment, not the supervisor's own.
        path = f"{tool_dir}:/usr/bin:/bin"
        out, _, end = await run_cmd(conn, "mytool", env={"PATH": path, "FOO": "x"})
        assert out == b"tool:x\n"
        out, _, end = await run_cmd(conn, "plain", env={"PATH": path})
        assert out == b"plain script\n"
        # stdin is /dev/null unless requested; oom_score_adj is raised
        out, _, end = await run_cmd(conn, "sh", "-c", "cat; cat /proc/self/oom_score_adj")
        assert out == b"1000\n"

    run(main())


def test_stdin_round_trip(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        h = await conn.exec(ExecSpec(argv=("cat",), stdin=True))
        await h.write_stdin(b"hello ")
        await h.write_stdin(b"cat\n")
        await h.close_stdin()
        out, err, end = await collect(h)
        assert (out, err) == (b"hello cat\n", b"")
        assert isinstance(end, ExecExit) and end.exit_code == 0

        payload = os.urandom(5 * 1024 * 1024 + 123)
        h = await conn.exec(ExecSpec(argv=("cat",), stdin=True))

        async def feed() -> None:
            for i in range(0, len(payload), 300_000):
                await h.write_stdin(payload[i : i + 300_000])
            await h.close_stdin()

        feeder = asyncio.create_task(feed())
        out, err, end = await collect(h)
        await feeder
        assert isinstance(end, ExecExit) and end.exit_code == 0
        assert hashlib.sha256(out).digest() == hashlib.sha256(payload).digest()

        # writing after the command ended is a no-op
        await h.write_stdin(b"late")

    run(main())


def test_tty(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        out, _, end = await run_cmd(conn, "tty", tty=True)
        assert isinstance(end, ExecExit) and end.exit_code == 0
        assert out.decode().strip().startswith("/dev/pts/")
        out, _, end = await run_cmd(conn, "stty", "size", tty=True, rows=30, cols=100)
        assert out.decode().strip() == "30 100"
        # resize, then let the command look
        h = await conn.exec(ExecSpec(argv=("sh", "-c", "read x; stty size"), tty=True, stdin=True))
        await h.resize(40, 120)
        await h.write_stdin(b"go\n")
        out, _, end = await collect(h)
        assert isinstance(end, ExecExit) and end.exit_code == 0
        assert out.decode().splitlines()[-1].strip() == "40 120"
        # close_stdin on a tty sends EOF (^D)
        h = await conn.exec(ExecSpec(argv=("cat",), tty=True, stdin=True))
        await h.write_stdin(b"abc\n")
        await h.close_stdin()
        out, _, end = await collect(h)
        assert isinstance(end, ExecExit) and end.exit_code == 0
        assert out.count(b"abc") == 2  # echoed by the terminal, then by cat

    run(main())


def test_timeout(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        t0 = time.monotonic()
        out, _, end = await run_cmd(
            conn, "sh", "-c", "echo before; exec sleep 30", timeout_seconds=0.3
        )
        assert time.monotonic() - t0 < 3
        assert out == b"before\n"
        assert isinstance(end, ExecExit)
        assert end.timed_out and (end.exit_code, end.signal) == (137, 9)

    run(main())


def test_exec_failures(sup: Supervisor, tmp_path: Path) -> None:
    (tmp_path / "noexec").write_text("x")

    async def main() -> None:
        conn = await sup.connect()
        # A missing or non-executable program ends as a shell reports it: stderr + 127/126.
        for argv, code, words in [
            (("no-such-command-xyz",), 127, b"no-such-command-xyz: command not found"),
            (("/nonexistent/bin/foo",), 127, b"command not found"),
            ((str(tmp_path / "noexec"),), 126, b"Permission denied"),
        ]:
            out, err, end = await run_cmd(conn, *argv)
            assert out == b"" and words in err, err
            assert isinstance(end, ExecExit) and end.exit_code == code, end
        *_, end = await run_cmd(conn, "true", cwd="/nonexistent-dir")
        assert isinstance(end, ExecFailed) and "/nonexistent-dir" in end.message
        *_, end = await run_cmd(conn, "true", env={"=x": "y"})
        assert isinstance(end, ExecFailed) and end.code == "INVALID_ARGUMENT"
        # the connection is still fine
        out, _, end = await run_cmd(conn, "echo", "ok")
        assert out == b"ok\n"

    run(main())


@pytest.mark.slow
def test_large_output_arrives_intact(sup: Supervisor, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(50 * 1024 * 1024))

    async def main() -> None:
        conn = await sup.connect()
        h = await conn.exec(ExecSpec(argv=("cat", str(blob))))
        digest, size, slow = hashlib.sha256(), 0, 0
        async for ev in h.events():
            if isinstance(ev, ExecOutput):
                assert ev.stream == 1
                digest.update(ev.data)
                size += len(ev.data)
                if size < 20 * 1024 * 1024 and slow < 20:  # a slow consumer for a while
                    slow += 1
                    await asyncio.sleep(0.02)
            else:
                assert isinstance(ev, ExecExit) and ev.exit_code == 0
        assert size == blob.stat().st_size
        assert digest.digest() == hashlib.sha256(blob.read_bytes()).digest()

    run(main())


def test_many_concurrent_execs(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        results = await asyncio.gather(
            *(run_cmd(conn, "sh", "-c", f"echo {i}; exit {i % 7}") for i in range(60))
        )
        for i, (out, _, end) in enumerate(results):
            assert out == f"{i}\n".encode()
            assert isinstance(end, ExecExit) and end.exit_code == i % 7

    run(main())


def test_connection_loss_kills_exec(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        h = await conn.exec(ExecSpec(argv=("sh", "-c", "sleep 100 & sleep 100")))
        assert await h.started() > 0 and pid_alive(h.pid)
        other = await sup.connect()
        h2 = await other.exec(ExecSpec(argv=("sleep", "100")))
        await h2.started()
        conn.abort()
        *_, end = await collect(h)
        assert end == ExecFailed("UNAVAILABLE", "sandbox supervisor connection lost")
        with pytest.raises(SandboxGone):
            await conn.exec(ExecSpec(argv=("true",)))
        for _ in range(250):
            if not pid_alive(h.pid):
                break
            await asyncio.sleep(0.02)
        assert not pid_alive(h.pid)
        # the whole process group went, not just the leader
        await asyncio.sleep(0.1)
        assert all(state == "Z" or pid == h2.pid for pid, state in sup.children())
        # other connections are unaffected
        assert pid_alive(h2.pid)
        await h2.kill()
        events = [ev async for ev in h2.events()]
        assert events == [ExecFailed("CANCELLED", "the command was killed")]
        out, _, _ = await run_cmd(other, "echo", "still here")
        assert out == b"still here\n"

    run(main())


def test_orphans_are_reaped(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        for _ in range(5):
            out, _, _ = await run_cmd(
                conn, "sh", "-c", "(sleep 0.2 >/dev/null 2>&1 &); (true &); echo done"
            )
            assert out == b"done\n"
        await asyncio.sleep(0.6)
        # The double-forked sleeps were re-parented to the supervisor (a subreaper) and reaped.
        assert [c for c in sup.children() if c[1] == "Z"] == []

    run(main())
    assert sup.children() == []


def test_background_process_keeping_pipes_does_not_hang_exec(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        t0 = time.monotonic()
        out, _, end = await run_cmd(conn, "sh", "-c", "sleep 5 & echo started")
        assert time.monotonic() - t0 < 2
        assert out == b"started\n" and isinstance(end, ExecExit) and end.exit_code == 0

    run(main())


def test_malformed_frames_close_only_that_connection(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        for garbage in [
            struct.pack("<IBI", 3, 1, 1),  # length too small
            struct.pack("<IBI", 2_000_000, 1, 1),  # too large
            struct.pack("<IBI", 5, 99, 1),  # unknown type
            struct.pack("<IBI", 9, 1, 7) + b"\x00\x00\x00\x00",  # truncated EXEC
            struct.pack("<IBI", 5 + 12, 1, 7) + struct.pack("<IIHHI", 0, 0, 0, 0, 99),
        ]:
            reader, writer = await asyncio.open_unix_connection(sup.sock_path)
            assert (await reader.readexactly(17))[4] == 64  # HELLO
            writer.write(garbage)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the supervisor
            writer.close()
        out, _, _ = await run_cmd(conn, "echo", "alive")
        assert out == b"alive\n"

    run(main())


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_output_backpressure_bounds_memory(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        h = await conn.exec(ExecSpec(argv=("cat", "/dev/zero")))
        await asyncio.sleep(1.0)  # nobody consumes: both sides must stop buffering
        assert vm_hwm(sup.pid) < 24 * 2**20
        assert conn._queued < 9 * 2**20
        other = await sup.connect()  # the supervisor itself is still responsive
        await other.ping()
        total = 0
        async for ev in h.events():
            if isinstance(ev, ExecOutput):
                total += len(ev.data)
                if total > 64 * 2**20:
                    await h.kill()
            else:
                assert ev == ExecFailed("CANCELLED", "the command was killed")
        assert conn._queued == 0
        out, _, _ = await run_cmd(conn, "echo", "next")
        assert out == b"next\n"
        assert vm_hwm(sup.pid) < 24 * 2**20

    run(main())


@pytest.mark.slow
def test_stdin_backpressure_bounds_memory(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        h = await conn.exec(ExecSpec(argv=("sh", "-c", "sleep 1; exec wc -c"), stdin=True))
        writer = asyncio.create_task(h.write_stdin(b"s" * (40 * 2**20)))
        await asyncio.sleep(0.5)
        assert not writer.done()  # blocked: the command does not read yet
        other = await sup.connect()
        await asyncio.wait_for(other.ping(), 1)
        await writer
        await h.close_stdin()
        out, _, end = await collect(h)
        assert out.strip() == str(40 * 2**20).encode()
        assert isinstance(end, ExecExit) and end.exit_code == 0
        assert vm_hwm(sup.pid) < 24 * 2**20

    run(main())


def test_random_frames_never_crash_the_supervisor(sup: Supervisor) -> None:
    import random

    rng = random.Random(1234)
    # EXEC, WRITE_BEGIN and TERMINATE are left out: random ones could run or write things.
    types = [t for t in range(256) if t not in (1, 7, 12)]

    async def main() -> None:
        conn = await sup.connect()
        reader, writer = await asyncio.open_unix_connection(sup.sock_path)
        for _ in range(400):
            if writer.is_closing() or reader.at_eof():
                writer.close()
                reader, writer = await asyncio.open_unix_connection(sup.sock_path)
            payload = rng.randbytes(rng.choice([0, 1, 2, 3, 4, 8, 13, 100]))
            length = 5 + len(payload)
            if rng.random() < 0.1:
                length = rng.choice([0, 4, 2**31, 2**20 + 70])
            frame = struct.pack("<IBI", length, rng.choice(types), rng.randrange(4)) + payload
            writer.write(frame)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        writer.close()
        await asyncio.sleep(0.1)
        assert sup.poll() is None
        out, _, _ = await run_cmd(conn, "echo", "survived")
        assert out == b"survived\n"

    run(main())


# ----------------------------------------------------------------------------------------- files


async def chunks_of(data: bytes, size: int = 700_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_file_round_trip(sup: Supervisor, tmp_path: Path) -> None:
    payload = os.urandom(20 * 1024 * 1024 + 7)
    target = tmp_path / "sub" / "dir" / "data.bin"

    async def main() -> None:
        conn = await sup.connect()
        n = await conn.write_file(str(target), 0o640, True, chunks_of(payload))
        assert n == len(payload)
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
        assert target.read_bytes() == payload
        info, it = await conn.read_file(str(target))
        assert (info.size, info.mode) == (len(payload), 0o640)
        got = bytearray()
        async for chunk in it:
            assert 0 < len(chunk) <= 256 * 1024
            got.extend(chunk)
        assert bytes(got) == payload
        # overwrite atomically, empty file, mode 0755
        assert await conn.write_file(str(target), 0o755, False, chunks_of(b"")) == 0
        assert target.read_bytes() == b"" and stat.S_IMODE(target.stat().st_mode) == 0o755
        info, it = await conn.read_file(str(target))
        assert info.size == 0 and [c async for c in it] == []
        assert sorted(p.name for p in target.parent.iterdir()) == ["data.bin"]

    run(main())


def test_file_errors(sup: Supervisor, tmp_path: Path) -> None:
    async def main() -> None:
        conn = await sup.connect()
        with pytest.raises(FileNotFound):
            await conn.read_file(str(tmp_path / "missing"))
        with pytest.raises(PathRefused):
            await conn.read_file(str(tmp_path))
        with pytest.raises(PathRefused):
            await conn.read_file("/dev/null")
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(PathRefused):  # refused without blocking on the open
            await conn.read_file(str(fifo))
        with pytest.raises(FileNotFound):  # no parent, make_parents off
            await conn.write_file(str(tmp_path / "a" / "b"), 0o644, False, chunks_of(b"x"))
        with pytest.raises(PathRefused):
            await conn.write_file(str(tmp_path), 0o644, False, chunks_of(b"x"))
        out, _, _ = await run_cmd(conn, "echo", "ok")
        assert out == b"ok\n"

    run(main())
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".aviato-tmp")] == []


def test_aborted_write_leaves_no_file(sup: Supervisor, tmp_path: Path) -> None:
    target = tmp_path / "out" / "file"
    target.parent.mkdir()

    async def failing() -> AsyncIterator[bytes]:
        yield b"x" * 3_000_000
        raise RuntimeError("client went away")

    async def slow() -> AsyncIterator[bytes]:
        yield b"y" * 100_000
        await asyncio.sleep(30)

    async def main() -> None:
        conn = await sup.connect()
        with pytest.raises(RuntimeError, match="client went away"):
            await conn.write_file(str(target), 0o644, False, failing())
        await conn.ping()  # the abort was processed
        assert list(target.parent.iterdir()) == []
        # connection loss in the middle of a write
        task = asyncio.create_task(conn.write_file(str(target), 0o644, False, slow()))
        await asyncio.sleep(0.2)
        assert len(list(target.parent.iterdir())) == 1  # the temporary file
        conn.abort()
        with pytest.raises(SandboxGone):
            await task
        conn2 = await sup.connect()
        await conn2.ping()
        assert list(target.parent.iterdir()) == []

    run(main())


def test_abandoned_read_does_not_stall_connection(sup: Supervisor, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"z" * (30 * 1024 * 1024))

    async def main() -> None:
        conn = await sup.connect()
        info, it = await conn.read_file(str(big))
        assert info.size == big.stat().st_size
        await it.__anext__()
        await it.aclose()  # type: ignore[attr-defined]
        out, _, _ = await run_cmd(conn, "echo", "after")
        assert out == b"after\n"

    run(main())


# ------------------------------------------------------- flow control per exec and per transfer


def test_unread_stdin_stalls_only_its_exec(sup: Supervisor, tmp_path: Path) -> None:
    """8 MiB pushed at a command that never reads stdin: the writer waits for acknowledgements
    (STDIN_WINDOW), and the same connection keeps serving other execs and files at once."""

    async def main() -> None:
        conn = await sup.connect()
        h = await conn.exec(ExecSpec(argv=("sh", "-c", "sleep 100; cat"), stdin=True))
        writer = asyncio.create_task(h.write_stdin(b"s" * (8 * 2**20)))
        await asyncio.sleep(0.5)
        assert not writer.done() and h._stdin_inflight <= STDIN_WINDOW
        t0 = time.monotonic()
        for i in range(5):
            out, _, _ = await run_cmd(conn, "echo", str(i))
            assert out == f"{i}\n".encode()
        await conn.write_file(str(tmp_path / "f"), 0o644, False, chunks_of(b"f" * 3_000_000))
        _, it = await conn.read_file(str(tmp_path / "f"))
        assert b"".join([c async for c in it]) == b"f" * 3_000_000
        await conn.ping()
        assert time.monotonic() - t0 < 2
        await h.kill()
        await asyncio.wait_for(writer, 5)  # released by the end of the exec
        assert vm_hwm(sup.pid) < 24 * 2**20

    run(main())


@pytest.mark.slow
def test_unread_output_stalls_only_its_exec(sup: Supervisor, tmp_path: Path) -> None:
    """Nobody reads `cat /dev/zero` nor a big file read: each holds at most about its window
    here, and the same connection keeps serving everything else."""
    big = tmp_path / "big"
    big.write_bytes(b"z" * (20 * 2**20))

    async def main() -> None:
        conn = await sup.connect()
        h = await conn.exec(ExecSpec(argv=("cat", "/dev/zero")))
        _, unread = await conn.read_file(str(big))
        await asyncio.sleep(1.0)
        assert h._credits.held <= OUT_WINDOW + 64 * 1024
        assert unread._credits.held <= OUT_WINDOW + 256 * 1024  # type: ignore[attr-defined]
        t0 = time.monotonic()
        for i in range(5):
            out, _, _ = await run_cmd(conn, "echo", str(i))
            assert out == f"{i}\n".encode()
        info, it = await conn.read_file(str(big))
        assert len(b"".join([c async for c in it])) == info.size
        assert time.monotonic() - t0 < 2
        # the stalled ones resume when read
        total = 0
        async for ev in h.events():
            assert isinstance(ev, ExecOutput)
            total += len(ev.data)
            if total > 16 * 2**20:
                break
        got = 0
        async for chunk in unread:
            got += len(chunk)
        assert got == big.stat().st_size
        await h.kill()
        assert vm_hwm(sup.pid) < 24 * 2**20

    run(main())


def test_abandoned_read_is_aborted(sup: Supervisor, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"z" * (30 * 2**20))

    async def main() -> None:
        conn = await sup.connect()
        _, it = await conn.read_file(str(big))
        await it.__anext__()
        await it.aclose()  # type: ignore[attr-defined]
        await conn.ping()
        await asyncio.sleep(0.2)
        assert conn._queued == 0 and conn._streams == {}
        # the supervisor dropped the read: it no longer holds the file open
        assert not any(
            os.readlink(f"/proc/{sup.pid}/fd/{fd}") == str(big)
            for fd in os.listdir(f"/proc/{sup.pid}/fd")
        )

    run(main())


# --------------------------------------------------------------- killing a command's whole lineage

LINEAGE = (
    "setsid sh -c 'exec sleep {n}1' &"  # a new session
    " (setsid sh -c 'exec sleep {n}2' &) &"  # a double fork into a new session
    ' python3 -c \'import os; os.setpgid(0, 0); os.execvp("sleep", ["sleep", "{n}3"])\' &'
    " echo ready; exec sleep {n}4"  # (python3: a new process group)
)


def sleepers(n: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                prefix = str(n).encode()
                if cmd[:1] == [b"sleep"] and cmd[1:2] and cmd[1].startswith(prefix):
                    found.append(int(entry))
    return [pid for pid in found if pid_alive(pid)]
    return found


async def gone(n: int, seconds: float = 5) -> bool:
    for _ in range(int(seconds / 0.05)):
        if not sleepers(n):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("how", ["timeout", "kill", "connection closed"])
def test_kill_takes_the_whole_lineage(sup: Supervisor, how: str) -> None:
    n = 90000 + os.getpid() % 1000 * 10 + ["timeout", "kill", "connection closed"].index(how)

    async def main() -> None:
        try:
            await attack()
        finally:  # a failure must not leave sleepers behind (outside a sandbox, nobody reaps them)
            for pid in sleepers(n):
                os.kill(pid, signal.SIGKILL)

    async def attack() -> None:
        conn = await sup.connect()
        survivor = await run_cmd(conn, "sh", "-c", f"(setsid sleep {n}9 >/dev/null 2>&1 &)")
        assert isinstance(survivor[2], ExecExit)  # ended: what it left keeps running
        spec = ExecSpec(argv=("sh", "-c", LINEAGE.format(n=n)))
        if how == "timeout":
            spec = ExecSpec(argv=spec.argv, timeout_seconds=3.0)
        h = await conn.exec(spec)
        first = await h.__anext__()
        assert first == ExecOutput(1, b"ready\n")
        for _ in range(100):
            if len(sleepers(n)) == 5:
                break
            await asyncio.sleep(0.02)
        assert len(sleepers(n)) == 5
        if how == "kill":
            await h.kill()
        elif how == "connection closed":
            conn.abort()
        else:
            *_, end = await collect(h)
            assert isinstance(end, ExecExit) and end.timed_out
        await asyncio.sleep(0.2)
        assert await gone(n * 10 + 1) and await gone(n * 10 + 2)
        assert await gone(n * 10 + 3) and await gone(n * 10 + 4)
        assert len(sleepers(n * 10 + 9)) == 1

    run(main())


def test_lineage_mark_is_inherited_and_unique(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        script = "grep 'realtime timeout' /proc/self/limits; (setsid sh -c \"$0\")"
        marks = []
        for _ in range(2):
            out, _, _ = await run_cmd(
                conn, "sh", "-c", script, "grep 'realtime timeout' /proc/self/limits"
            )
            lines = out.decode().splitlines()
            assert len(lines) == 2 and lines[0] == lines[1]
            soft, hard = lines[0].split()[3:5]
            assert soft == hard and int(soft) >= 2**62
            marks.append(soft)
        assert marks[0] != marks[1]

    run(main())


# ---------------------------------------------------------------------------------------- deadline


def test_deadline_ends_keepalive_and_says_why(start: StartSupervisor) -> None:
    s = start("--keepalive")

    async def main() -> None:
        conn = await s.connect()
        conn.set_deadline(time.time_ns() + 3600 * 10**9, 1.0, "lifetime")  # replaced below
        conn.set_deadline(time.time_ns() + 300 * 10**6, 1.0, "lease")
        await asyncio.wait_for(conn.closed.wait(), 5)

    t0 = time.monotonic()
    run(main())
    assert s.wait() == 0 and time.monotonic() - t0 < 3
    assert s.exit_path.read_text().split()[:2] == ["0", "0"]
    assert s.exit_path.read_text().split()[3] == "deadline:lease"


def test_deadline_terminates_main_then_kills_after_grace(start: StartSupervisor) -> None:
    s = start("--", "sh", "-c", "trap '' TERM; while :; do sleep 0.05; done")
    main_pids: list[int] = []

    async def main() -> None:
        conn = await s.connect()
        main_pids.extend(pid for pid, _ in s.children())
        conn.set_deadline(time.time_ns() + 200 * 10**6, 0.5, "lifetime")
        await asyncio.wait_for(conn.closed.wait(), 5)

    try:
        run(main())
        assert s.wait() == 137
    finally:  # not PID 1 here: its exit does not take the main process with it
        for pid in main_pids:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
    code, sig, _, why = s.exit_path.read_text().split()
    assert (code, sig, why) == ("137", "9", "deadline:lifetime")


@pytest.mark.slow
def test_deadline_moved_later_and_removed(start: StartSupervisor) -> None:
    s = start("--keepalive")

    async def main() -> None:
        conn = await s.connect()
        conn.set_deadline(time.time_ns() + 300 * 10**6, 1.0, "lease")
        conn.set_deadline(time.time_ns() + 3600 * 10**9, 1.0, "lease")  # renewed
        conn.set_deadline(0, 1.0, "lifetime")  # none
        await asyncio.sleep(1.0)
        await conn.ping()
        with pytest.raises(ValueError):
            conn.set_deadline(1, 1.0, "No Spaces")

    run(main())
    assert s.poll() is None


def test_malformed_deadline_closes_the_connection(sup: Supervisor) -> None:
    async def main() -> None:
        reader, writer = await asyncio.open_unix_connection(sup.sock_path)
        await reader.readexactly(17)
        why = b"Bad Reason"
        payload = struct.pack("<QI", 1, 0) + struct.pack("<I", len(why)) + why
        writer.write(struct.pack("<IBI", 5 + len(payload), 14, 0) + payload)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        conn = await sup.connect()
        await conn.ping()  # the supervisor runs on, without a deadline
        await asyncio.sleep(0.2)
        assert sup.poll() is None

    run(main())


# ------------------------------------------------------------------------------ files and /proc


SYSFS_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def test_proc_files_are_read_to_their_end(sup: Supervisor) -> None:
    sysfs_data = Path(SYSFS_FILE).read_bytes() if os.path.exists(SYSFS_FILE) else None

    async def main() -> None:
        conn = await sup.connect()
        info, it = await conn.read_file("/proc/self/status")
        data = b"".join([c async for c in it])
        assert info.size == 0 and b"Name:" in data and data.endswith(b"\n")
        if sysfs_data is not None:
            info, it = await conn.read_file(SYSFS_FILE)
            data = b"".join([c async for c in it])
            assert info.size == 0 and data == sysfs_data

    run(main())


def test_magic_links_are_not_followed(sup: Supervisor, tmp_path: Path) -> None:
    """The supervisor's fd 4 is the main log, a host file: no path may lead the file API there."""
    sup_log = sup.log_path
    (tmp_path / "via-self").symlink_to("/proc/self/fd/4")
    (tmp_path / "via-pid").symlink_to(f"/proc/{sup.pid}/fd/4")
    (tmp_path / "dir-link").symlink_to(f"/proc/{sup.pid}/fd")
    (tmp_path / "plain").symlink_to("/proc/self/status")  # an ordinary link into /proc

    async def main() -> None:
        conn = await sup.connect()
        for path in [
            "/proc/self/fd/4",
            f"/proc/{sup.pid}/fd/4",
            "/proc/self/fd/5",
            "/proc/self/fd/1",
            "/dev/fd/4",
            "/proc/thread-self/fd/4",
            str(tmp_path / "via-self"),
            str(tmp_path / "via-pid"),
            str(tmp_path / "dir-link" / "4"),
            f"/proc/{sup.pid}/root{sup_log}",  # a path under a magic link is refused too
        ]:
            with pytest.raises(PathRefused, match=r"do not follow those"):
                await conn.read_file(path)
        _, it = await conn.read_file(str(tmp_path / "plain"))
        assert b"Name:" in b"".join([c async for c in it])
        with pytest.raises((PathRefused, FileNotFound, PermissionRefused)):
            await conn.write_file(f"/proc/{sup.pid}/fd/4", 0o644, False, chunks_of(b"x"))
        with pytest.raises((PathRefused, FileNotFound, PermissionRefused)):
            await conn.write_file(str(tmp_path / "dir-link" / "4"), 0o644, False, chunks_of(b"x"))
        # a write to the planted link replaces the link, never its target
        await conn.write_file(str(tmp_path / "via-self"), 0o644, False, chunks_of(b"mine"))
        assert (tmp_path / "via-self").read_bytes() == b"mine"
        assert not (tmp_path / "via-self").is_symlink()

    before = sup_log.read_bytes()
    run(main())
    assert sup_log.read_bytes() == before


# --------------------------------------------------------------------------- main process, exit


def test_main_process_log_and_exit_file(start: StartSupervisor) -> None:
    s = start("--", "sh", "-c", "echo out; sleep 0.05; echo err >&2; exit 7")
    t0 = time.time_ns()
    assert s.wait() == 7
    code, sig, t = s.exit_record()
    assert (code, sig) == (7, 0) and abs(t - t0) < 10 * 10**9
    records = s.log_records()
    assert [(r[1], r[2]) for r in records] == [(1, b"out\n"), (2, b"err\n")]
    assert all(abs(r[0] - t0) < 10 * 10**9 for r in records)


def test_main_process_killed_by_signal(start: StartSupervisor) -> None:
    s = start("--", "sh", "-c", "kill -TERM $$")
    assert s.wait() == 143
    assert s.exit_record()[:2] == (143, 15)


def test_main_process_that_cannot_start(start: StartSupervisor) -> None:
    s = start("--", "no-such-main-xyz")
    assert s.wait() == 127
    assert s.exit_record()[:2] == (127, 0)
    assert b"no-such-main-xyz" in b"".join(r[2] for r in s.log_records() if r[1] == 2)


def test_sigterm_forwarded_to_main(start: StartSupervisor) -> None:
    s = start("--", "sh", "-c", "trap 'echo got-term; exit 42' TERM; while :; do sleep 0.02; done")

    async def main() -> None:
        conn = await s.connect()  # the main process is up and the loop runs
        await conn.ping()
        await asyncio.sleep(0.1)

    run(main())
    s.signal(signal.SIGTERM)
    assert s.wait() == 42
    assert s.exit_record()[:2] == (42, 0)
    assert (1, b"got-term\n") in [(r[1], r[2]) for r in s.log_records()]


def test_terminate_frame(start: StartSupervisor) -> None:
    s = start("--", "sleep", "100")

    async def main() -> None:
        conn = await s.connect()
        await conn.terminate(signal.SIGTERM)
        await asyncio.wait_for(conn.closed.wait(), 5)  # the supervisor exits with its sandbox

    run(main())
    assert s.wait() == 143
    assert s.exit_record()[:2] == (143, 15)


def test_keepalive(start: StartSupervisor) -> None:
    s = start("--keepalive")

    async def main() -> None:
        conn = await s.connect()
        out, _, _ = await run_cmd(conn, "echo", "hi")
        assert out == b"hi\n"
        h = await conn.exec(ExecSpec(argv=("sleep", "100")))
        s.signal(signal.SIGTERM)
        *_, end = await collect(h)
        assert isinstance(end, ExecFailed) and end.code == "UNAVAILABLE"
        await asyncio.sleep(0.2)
        assert not pid_alive(h.pid)  # killed when the supervisor exited

    run(main())
    assert s.wait() == 0
    assert s.exit_record()[:2] == (0, 0)

    s2 = start("--keepalive")

    async def main2() -> None:
        conn = await s2.connect()
        await conn.terminate(signal.SIGTERM)
        await asyncio.wait_for(conn.closed.wait(), 5)

    run(main2())
    assert s2.wait() == 0
    assert s2.exit_record()[:2] == (0, 0)


def test_log_truncated_at_64_mib(start: StartSupervisor) -> None:
    s = start("--", "sh", "-c", "head -c 70000000 /dev/zero; echo tail >&2")
    assert s.wait(60) == 0
    size = s.log_path.stat().st_size
    assert 64 * 2**20 - 2**17 < size <= 64 * 2**20 + 100
    records = s.log_records()
    assert records[-1][1:] == (2, b"[aviato: log truncated at 64 MiB]")
    assert s.exit_record()[:2] == (0, 0)


def test_supervisor_fds_are_not_inherited(sup: Supervisor) -> None:
    async def main() -> None:
        conn = await sup.connect()
        out, _, _ = await run_cmd(conn, "sh", "-c", "ls /proc/self/fd")
        assert sorted(int(x) for x in out.split()) == [0, 1, 2, 3]  # 3: ls's own dir fd

    run(main())


# ---------------------------------------------------------------------------------------- launch


def test_launch_mode(binary: Path, tmp_path: Path) -> None:
    procs = [tmp_path / "procs1", tmp_path / "procs2"]
    for p in procs:
        p.write_text("")
    proc = subprocess.run(
        [
            str(binary),
            "--launch",
            "--cgroup-procs",
            str(procs[0]),
            "--cgroup-procs",
            str(procs[1]),
            "--oom-score-adj",
            "500",
            "--",
            "/bin/sh",
            "-c",
            'echo "$$ $(cut -d" " -f6 /proc/$$/stat) $(cat /proc/$$/oom_score_adj)"',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    pid, sid, adj = proc.stdout.split()
    assert pid == sid  # a new session, led by the exec'd program (same pid as the launcher)
    assert adj == "500"
    assert [p.read_text().strip() for p in procs] == [pid, pid]

    bad = subprocess.run(
        [str(binary), "--launch", "--cgroup-procs", "/nonexistent/cgroup.procs", "--", "true"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 125 and "cgroup" in bad.stderr
    bad = subprocess.run(
        [str(binary), "--launch", "--", "/no/such/prog"], capture_output=True, text=True
    )
    assert bad.returncode == 127 and "/no/such/prog" in bad.stderr


def test_installed_binary_is_found() -> None:
    from aviato.runtime.supervisor import SupervisorMissing, supervisor_binary

    try:
        path = supervisor_binary()
    except SupervisorMissing as e:
        assert "reinstall" in str(e)
        pytest.skip("package not built (setup.py compiles the supervisor at install time)")
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=True)
    assert "protocol 2" in out.stdout


def test_connect_to_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(SandboxGone):
        run(SupervisorConnection.connect(tmp_path / "nope.sock", timeout=1))
    assert errno.ENOENT  # keep the import meaningful for readers: ENOENT maps to FileNotFound
