"""Helpers for the command-line tests: run `aviato` as a separate process, check its errors.

Kept out of conftest.py so that tests can import them by a name no other test directory uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TAG = "cli-tests"
# grpc's C core logs TLS handshake failures on stderr itself ("I1128 00:18:44.018686 ...") unless
# GRPC_VERBOSITY is set before grpc is imported, which happens before the CLI's code runs.
GRPC_CORE_LOG = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def aviato_argv() -> list[str]:
    """The console script installed beside this Python, else `python -m aviato`."""
    script = Path(sys.executable).with_name("aviato")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "aviato"]


def clean_env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
    env["AVIATO_STATE_DIR"] = str(state_dir)
    env.pop("COLUMNS", None)
    return env


@dataclass
class Cli:
    """Runs `aviato ...` in a subprocess with this state directory."""

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.env:
            self.env = clean_env(self.state_dir)

    def __call__(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 120,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `aviato ARGS`; stdin is `input`, else /dev/null (never the test runner's)."""
        return subprocess.run(
            [*aviato_argv(), *args],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=timeout,
        )

    def raw(
        self, *args: str, input: bytes | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        """As `__call__`, with bytes in and out."""
        return subprocess.run(
            [*aviato_argv(), *args],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            env=self.env,
            timeout=timeout,
        )

    def ok(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run and assert exit status 0, showing stderr when it is not."""
        result = self(*args, input=input)
        assert result.returncode == 0, (
            f"aviato {' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout!r}\nstderr: {result.stderr!r}"
        )
        return result

    def with_env(self, **extra: str) -> Cli:
        env = dict(self.env)
        env.update(extra)
        return Cli(self.state_dir, env)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A failure as the command line promises it: non-zero, one stderr line, no traceback."""
    assert result.returncode != 0, result
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not GRPC_CORE_LOG.match(line)
    ]
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    assert lines[0].startswith("aviato: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"


def short_tempdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def ids_of(output: str) -> Sequence[str]:
    return [line.strip() for line in output.splitlines() if line.strip()]


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Terminal:
    """The user's side of a pseudo-terminal running a command (`aviato sh`, `aviato cp`).

    `pty.fork()` makes the pseudo-terminal the child's controlling terminal, as a terminal
    emulator does, so a resize of the master really sends SIGWINCH to the child.
    """

    def __init__(self, argv: list[str], env: dict[str, str], rows: int, cols: int) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: size the terminal it was given, then become aviato
            try:
                _set_size(0, rows, cols)
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.seen = b""
        self.status: int | None = None

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, needle: str, timeout: float = 30) -> str:
        """Read until `needle` appears in the output; return everything read so far."""
        deadline = time.monotonic() + timeout
        while needle.encode() not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{needle!r} not seen; the terminal showed: {self.seen!r}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {needle!r}: {self.seen!r}")
                self.seen += chunk
        return self.seen.decode(errors="replace")

    def resize(self, rows: int, cols: int) -> None:
        _set_size(self.fd, rows, cols)  # the kernel sends SIGWINCH to the foreground group

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with_data, _, _ = select.select([self.fd], [], [], 0.1)
            if with_data:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.fd, 65536)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        raise AssertionError(f"aviato sh did not exit; the terminal showed: {self.seen!r}")

    def close(self) -> None:
        if self.status is None:  # never reaped: the pid is still ours to kill
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
        os.close(self.fd)
