"""The floor: the same work with plain `subprocess` on the host, no isolation at all.

A box is a private directory (on /dev/shm, a tmpfs like a sandbox's writable layer); a command
is a child process started in it with the sandbox's environment; files move through `cat` over
pipes (the same bytes-through-a-process path a sandbox takes); an idle box is `sleep infinity`.
`RawBwrapSystem` (raw_bwrap.py) is this class with every command wrapped in `bwrap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from benchmarks._system import DEFAULT_TIMEOUT, ExecOut, Rate, System

# The PATH and environment of aviato's `host` image (aviato.runtime.image_roots), copied so that the
# floor does not depend on the runtime package.
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WRITE_SCRIPT = 'exec cat > "$1"'


@cache
def resolve(program: str) -> str:
    """`program` as the sandbox would find it (its PATH, not the caller's: no pyenv shims)."""
    if "/" in program:
        return program
    found = shutil.which(program, path=SANDBOX_PATH)
    if found is None:
        raise FileNotFoundError(f"{program} is not on {SANDBOX_PATH}")
    return found


def scratch_root() -> str:
    """/dev/shm when it is a writable directory (tmpfs), else the temp dir."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


@dataclass
class ProcBox:
    """A directory standing in for a sandbox; `workspace` is where /workspace maps."""

    workspace: str
    idle: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Spawn:
    """A prepared command: argv, fds to pass, fds to close after the spawn, cwd."""

    argv: list[str]
    pass_fds: tuple[int, ...] = ()
    close_after: tuple[int, ...] = ()
    cwd: str | None = None


class FloorSystem(System):
    name = "floor"
    label = "floor (subprocess)"

    def __init__(self) -> None:
        self._env = {"PATH": SANDBOX_PATH, "HOME": "/root", "LANG": "C.UTF-8"}

    def describe(self) -> dict[str, Any]:
        return {"scratch": scratch_root(), "python3": resolve("python3")}

    # -- how a command is started (raw_bwrap overrides) ----------------------------------------

    def _spawn(self, box: ProcBox, argv: Sequence[str], *, idle: bool = False) -> Spawn:
        return Spawn([resolve(argv[0]), *argv[1:]], cwd=box.workspace)

    def _box_path(self, box: ProcBox, path: str) -> str:
        """A path of the box as the command sees it."""
        if not path.startswith("/workspace/"):
            raise ValueError(f"the floor maps only /workspace, not {path}")
        return os.path.join(box.workspace, path[len("/workspace/") :])

    @staticmethod
    def _close(fds: tuple[int, ...]) -> None:
        for fd in fds:
            os.close(fd)

    # -- sync ----------------------------------------------------------------------------------

    def create(self) -> ProcBox:
        return ProcBox(tempfile.mkdtemp(prefix="avb-", dir=scratch_root()))

    def exec(self, box: ProcBox, argv: Sequence[str], stdin: bytes | None = None) -> ExecOut:
        spawn = self._spawn(box, argv)
        # The plainest way to do the same work: output captured, stdin empty. Neither an
        # `input=b""` pipe nor `timeout=` unless needed: with either, `subprocess.run` takes its
        # selector path, which measured 1.97 ms here against 0.89 ms without (`true`, p50).
        feed: dict[str, Any] = (
            {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
        )
        try:
            done = subprocess.run(
                spawn.argv,
                capture_output=True,
                cwd=spawn.cwd,
                env=self._env,
                pass_fds=spawn.pass_fds,
                check=False,
                **feed,
            )
        finally:
            self._close(spawn.close_after)
        return ExecOut(done.returncode, done.stdout, done.stderr)

    def write_file(self, box: ProcBox, path: str, data: bytes) -> None:
        out = self.exec(box, ["sh", "-c", WRITE_SCRIPT, "sh", self._box_path(box, path)], data)
        if out.code != 0:
            raise OSError(f"write of {path} exited {out.code}: {out.stderr[-300:]!r}")

    def read_file(self, box: ProcBox, path: str) -> bytes:
        out = self.exec(box, ["cat", self._box_path(box, path)])
        if out.code != 0:
            raise OSError(f"read of {path} exited {out.code}: {out.stderr[-300:]!r}")
        return out.stdout

    def stop(self, box: ProcBox) -> None:
        shutil.rmtree(box.workspace, ignore_errors=True)

    # -- async ---------------------------------------------------------------------------------

    async def acreate(self) -> ProcBox:
        return self.create()

    async def aexec(self, box: ProcBox, argv: Sequence[str], stdin: bytes | None = None) -> ExecOut:
        spawn = self._spawn(box, argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *spawn.argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=spawn.cwd,
                env=self._env,
                pass_fds=spawn.pass_fds,
            )
        finally:
            self._close(spawn.close_after)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), DEFAULT_TIMEOUT)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        assert proc.returncode is not None
        return ExecOut(proc.returncode, out, err)

    async def astop(self, box: ProcBox) -> None:
        self.stop(box)

    # -- throughput ----------------------------------------------------------------------------

    def exec_rate(
        self, boxes: list[ProcBox], argv: Sequence[str], in_flight: int, count: int, seconds: float
    ) -> Rate:
        """The machine's own fork+exec rate: `posix_spawn` (a vfork in glibc) with stdin from
        /dev/null and stdout and stderr on pipes, `in_flight` children at once, each reaped
        when its pidfd says it ended and its (empty) output read. No event loop, no
        `subprocess` bookkeeping: the cheapest way to run many commands from Python. The
        children inherit this process's working directory (posix_spawn has no chdir)."""
        rate = Rate()
        running: dict[int, tuple[int, int, int]] = {}  # pidfd -> (pid, stdout, stderr)
        poller = select.poll()
        started = 0
        deadline = time.monotonic() + seconds
        t0 = time.perf_counter()
        try:
            while running or (started < count and time.monotonic() < deadline):
                while len(running) < in_flight and started < count:
                    if time.monotonic() > deadline:
                        break
                    pidfd, entry = self._spawn_one(boxes[started % len(boxes)], argv)
                    started += 1
                    running[pidfd] = entry
                    poller.register(pidfd, select.POLLIN)
                ready = poller.poll(DEFAULT_TIMEOUT * 1000)
                if not ready:
                    raise TimeoutError(f"no command ended within {DEFAULT_TIMEOUT:g} s")
                for pidfd, _ in ready:
                    pid, out, err = running.pop(pidfd)
                    poller.unregister(pidfd)
                    os.close(pidfd)
                    _, status = os.waitpid(pid, 0)
                    for fd in (out, err):
                        while os.read(fd, 65536):
                            pass
                        os.close(fd)
                    code = os.waitstatus_to_exitcode(status)
                    if code == 0:
                        rate.ok += 1
                    else:
                        rate.errors.append(f"exit {code}")
        finally:
            for pidfd, (pid, out, err) in running.items():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                for fd in (pidfd, out, err):
                    os.close(fd)
        rate.seconds = time.perf_counter() - t0
        return rate

    def _spawn_one(self, box: ProcBox, argv: Sequence[str]) -> tuple[int, tuple[int, int, int]]:
        """Starts `argv` in `box`; (its pidfd, (pid, stdout's read end, stderr's))."""
        spawn = self._spawn(box, argv)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            for fd in spawn.pass_fds:
                os.set_inheritable(fd, True)
            pid = os.posix_spawn(
                spawn.argv[0],
                spawn.argv,
                self._env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
            )
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w):
                os.close(fd)
            self._close(spawn.close_after)
        return os.pidfd_open(pid), (pid, out_r, err_r)

    # -- density -------------------------------------------------------------------------------

    def _idle_ready(self, box: ProcBox, proc: subprocess.Popen[bytes]) -> None:
        """Called after an idle box's process was started (raw bwrap waits for its child)."""

    def start_idle(self, n: int, deadline_s: float) -> tuple[list[ProcBox], int]:
        boxes: list[ProcBox] = []
        errors = 0
        end = time.monotonic() + deadline_s
        for _ in range(n):
            if time.monotonic() > end:
                break
            box = self.create()
            spawn = self._spawn(box, ["sleep", "infinity"], idle=True)
            try:
                try:
                    box.idle = subprocess.Popen(
                        spawn.argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        cwd=spawn.cwd,
                        env=self._env,
                        pass_fds=spawn.pass_fds,
                    )
                finally:
                    self._close(spawn.close_after)
                self._idle_ready(box, box.idle)
            except Exception:
                errors += 1
                if box.idle is not None:
                    box.idle.kill()
                    box.idle.wait()
                self._forget_idle(box)
                self.stop(box)
                continue
            boxes.append(box)
        return boxes, errors

    def idle_pids(self, boxes: list[ProcBox]) -> list[int]:
        return [box.idle.pid for box in boxes if box.idle is not None]

    def _forget_idle(self, box: ProcBox) -> None:
        """Releases what `_spawn(idle=True)` left in the box after a failed start."""

    def _kill_idle(self, box: ProcBox) -> None:
        assert box.idle is not None
        box.idle.send_signal(signal.SIGKILL)

    def stop_idle(self, boxes: list[ProcBox]) -> int:
        errors = 0
        for box in boxes:
            try:
                self._kill_idle(box)
            except OSError:
                errors += 1
        for box in boxes:
            assert box.idle is not None
            try:
                box.idle.wait(timeout=30)
            except subprocess.TimeoutExpired:
                errors += 1
            self.stop(box)
        return errors
