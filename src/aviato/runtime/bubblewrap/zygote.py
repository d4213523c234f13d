"""The launcher zygote: `aviato-supervisor --zygote`, started once beside the service, forks
each sandbox's launcher instead of the service spawning a new one (native/zygote.c says why:
glibc's start-up of a new launcher and the service's posix_spawn, ~1 ms a create here).

The zygote is an optimisation, and a create never depends on it: whenever it cannot take a
launch (not started, not "ready": a binary without the mode, gone before the request, a
command line too long for one message, a request it refuses), `launch` says so with None and
the caller spawns the launcher itself, as before. Once a request has reached it, though, a
launcher may exist: a zygote that then answers nothing sensible in time is killed (its
launchers not yet in their cgroups die with it) and the launch raises, so that the create
aborts (and kills what is in the sandbox's cgroups) instead of starting a second launcher for
the same sandbox. A zygote that failed is started again at the next launch. It ends when the
service closes its end of the socket (or dies); sandboxes it forked keep running.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import struct
import threading
from typing import Any

__all__ = ["Zygote"]

MAX_REQUEST = 128 << 10  # native/zygote.c's ZYGOTE_MAX_REQUEST
ANSWER = struct.Struct("=ii")  # pid, errno
ANSWER_SECONDS = 10.0  # a fork answers in under a millisecond, or seconds on a host at a load of
# hundreds (as a posix_spawn takes then); the loop waits this long only for a zygote that hangs
GIVE_UP_AFTER = 3  # zygotes in a row that never said "ready": this binary has none
READY = b"ready"


class Zygote:
    """One zygote process of the service's (started at the first `launch`)."""

    def __init__(
        self, supervisor: str, environment: dict[str, str], sigdef: tuple[int, ...]
    ) -> None:
        self._supervisor = supervisor
        self._environment = environment
        self._sigdef = sigdef
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = 0
        self._never_ready = 0  # zygotes in a row that never said "ready"
        self.launched = 0  # launchers forked, by every zygote so far (for tests)

    def launch(self, argv: list[str], fds: list[int]) -> tuple[int, int] | None:
        """Forks a launcher running `argv` (the launcher's whole command line) with `fds` (the
        control socket, main log, exit file, seccomp filter, runtime log, environment) in place;
        its (pid, pidfd), or None when the zygote cannot take it (the caller spawns it itself).
        Raises OSError when the fork failed (no memory, no pids: a spawn would fail too) or the
        zygote took the request and then failed (see the module docstring)."""
        blob = b"".join(os.fsencode(arg) + b"\0" for arg in argv)
        if len(blob) > MAX_REQUEST:
            return None
        with self._lock:
            sock = self._sock or self._start()
            if sock is None:
                return None
            try:
                socket.send_fds(sock, [blob], fds)
            except OSError:  # not taken (a datagram goes whole or not at all)
                self._stop()
                return None
            try:
                data, got, _flags, _addr = socket.recv_fds(sock, ANSWER.size + 1, 1)
            except OSError as exc:
                self._stop()
                raise OSError(errno.EIO, f"the launcher zygote did not answer: {exc}") from exc
            if len(data) != ANSWER.size or len(got) > 1:
                for fd in got:
                    os.close(fd)
                self._stop()
                raise OSError(errno.EIO, "the launcher zygote answered nonsense")
            pid, err = ANSWER.unpack(data)
            if err in (errno.EAGAIN, errno.ENOMEM):  # the fork failed: so would a spawn
                raise OSError(err, os.strerror(err))
            if err or pid <= 0 or len(got) != 1:  # refused before any fork: spawned instead
                for fd in got:
                    os.close(fd)
                return None
            self.launched += 1
            return pid, got[0]

    @property
    def pid(self) -> int:
        """The zygote's pid (0 while none runs)."""
        return self._pid

    def close(self) -> None:
        """Ends the zygote (end of file on its socket) and reaps it."""
        with self._lock:
            self._stop()

    def _start(self) -> socket.socket | None:
        if self._never_ready >= GIVE_UP_AFTER:
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            actions: list[tuple[Any, ...]] = [
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            ]
            pid = os.posix_spawn(
                self._supervisor,
                [self._supervisor, "--zygote"],
                self._environment,
                file_actions=actions,
                setsigdef=self._sigdef,
                setsigmask=(),
            )
        except OSError:
            ours.close()
            self._never_ready += 1
            return None
        finally:
            theirs.close()
        ours.settimeout(ANSWER_SECONDS)
        self._sock, self._pid = ours, pid
        try:
            ready = ours.recv(len(READY) + 1)
        except OSError:
            ready = b""
        if ready != READY:
            self._never_ready += 1
            self._stop()
            return None
        self._never_ready = 0
        return ours

    def _stop(self) -> None:
        sock, pid = self._sock, self._pid
        self._sock, self._pid = None, 0
        if sock is not None:
            sock.close()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # it would end at end of file; none outlives its use
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
