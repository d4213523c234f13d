"""Helpers for the service's tests: a real `python -m aviato.server` process and a small client.

The client is deliberately written against the raw stubs (not the SDK) so that these tests pin
the wire contract of aviato.v1 itself.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from raw_client import Client as Client
from raw_client import ExecResult as ExecResult

import aviato.server
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

SRC = str(Path(aviato.server.__file__).resolve().parents[2])
S = pb.SandboxStatus
TERMINAL = {S.SANDBOX_STATUS_COMPLETED, S.SANDBOX_STATUS_FAILED, S.SANDBOX_STATUS_TERMINATED}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m aviato.server --state-dir D ...` as a child process.

    Its sandboxes go under a cgroup parent of its own (`aviato-test-<random>`; `finish` in
    conftest.py removes it): the limits the service writes to its parent must never touch the
    parent that other services on this machine share.
    """

    def __init__(self, state_dir: Path, *args: str, prefix: Sequence[str] = ()) -> None:
        """`prefix`: an argv that runs the service elsewhere (`nsenter --net=... --`: in a
        network namespace of a test's own)."""
        import secrets

        self.prefix = list(prefix)
        self.state_dir = state_dir
        self.cgroup_parent = f"aviato-test-{secrets.token_hex(4)}"
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir.parent / f"{state_dir.name}-server.log"
        self._channel: grpc.Channel | None = None

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "aviato.sock"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
        log = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "aviato.server",
             "--state-dir", str(self.state_dir), "--log-level", "DEBUG",
             "--cgroup-parent", self.cgroup_parent, *self.args],
            stdout=log, stderr=log, env=env, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket_path.exists():
                try:
                    self.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=2)
                    return self
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not answer in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket_path}")
        return self._channel

    def stub(self) -> pbg.SandboxServiceStub:
        return pbg.SandboxServiceStub(self.channel())

    def client(self) -> Client:
        return Client(self.stub())

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: the graceful shutdown (sandboxes keep running)."""
        self._close_channel()
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def kill9(self) -> None:
        self._close_channel()
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def stdin_stream(
    init: pb.ExecInit,
) -> tuple[queue.Queue[pb.ExecRequest | None], Iterator[pb.ExecRequest]]:
    """A request iterator fed from a queue (None ends it): for interactive exec tests."""
    q: queue.Queue[pb.ExecRequest | None] = queue.Queue()

    def gen() -> Iterator[pb.ExecRequest]:
        yield pb.ExecRequest(init=init)
        while (item := q.get()) is not None:
            yield item

    return q, gen()


def code_of(err: grpc.RpcError) -> grpc.StatusCode:
    return err.code()  # type: ignore[attr-defined, no-any-return]


# -- leftovers ---------------------------------------------------------------------------------

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def sandbox_processes(ids: set[str]) -> list[int]:
    """Host pids whose cgroup path names one of these sandbox ids."""
    if not ids:
        return []
    pattern = re.compile("|".join(re.escape(i) for i in ids))
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if pattern.search(Path(entry.path, "cgroup").read_text()):
                found.append(int(entry.name))
    return found


def sandbox_cgroups(ids: set[str], parent_name: str = "aviato") -> list[Path]:
    found: list[Path] = []
    if not ids or not _CGROUP_ROOT.is_dir():
        return found
    for hierarchy in _CGROUP_ROOT.iterdir():
        parent = hierarchy / parent_name
        for sid in ids:
            if (parent / sid).exists():
                found.append(parent / sid)
    return found


def remove_cgroup_parent(parent_name: str) -> None:
    """Removes a test service's own cgroup parent (children first), where it exists; only
    parents named "aviato-test-...", never one that other services may share."""
    if not _CGROUP_ROOT.is_dir() or not parent_name.startswith("aviato-test-"):
        return
    roots = [*_CGROUP_ROOT.iterdir(), _CGROUP_ROOT]
    for directory in (root / parent_name for root in roots):
        if not directory.is_dir():
            continue
        for child in sorted(directory.glob("**/"), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                child.rmdir()
