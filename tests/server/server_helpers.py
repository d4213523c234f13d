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
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

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
    """`python -m aviato.server --state-dir D ...` as a child process."""

    def __init__(self, state_dir: Path, *args: str) -> None:
        self.state_dir = state_dir
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
            [sys.executable, "-m", "aviato.server", "--state-dir", str(self.state_dir),
             "--log-level", "DEBUG", *self.args],
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


@dataclass
class ExecResult:
    frames: list[pb.ExecResponse] = field(default_factory=list)

    def _data(self, stream: int) -> bytes:
        return b"".join(
            f.output.data for f in self.frames
            if f.WhichOneof("msg") == "output" and f.output.stream == stream
        )  # fmt: skip

    @property
    def stdout(self) -> bytes:
        return self._data(pb.STREAM_STDOUT)

    @property
    def stderr(self) -> bytes:
        return self._data(pb.STREAM_STDERR)

    @property
    def terminal(self) -> pb.ExecResponse:
        ends = [f for f in self.frames if f.WhichOneof("msg") in ("exit", "error")]
        assert len(ends) == 1, f"expected exactly one terminal frame, got {ends}"
        assert self.frames[-1] is ends[0], "the terminal frame must be the last"
        return ends[0]

    @property
    def exit_code(self) -> int:
        t = self.terminal
        assert t.WhichOneof("msg") == "exit", f"expected exit, got {t}"
        return int(t.exit.exit_code)

    @property
    def error(self) -> pb.ExecError:
        t = self.terminal
        assert t.WhichOneof("msg") == "error", f"expected error, got {t}"
        return t.error


class Client:
    """A thin synchronous client on the raw stubs."""

    def __init__(
        self, stub: pbg.SandboxServiceStub, metadata: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.stub = stub
        self.md = list(metadata)

    def create(
        self, *, request_id: str | None = None, lease_id: str = "", lease_ttl: float = 0.0,
        resources: dict[str, Any] | None = None, mounted: Sequence[tuple[str, bytes]] = (),
        **spec: Any,
    ) -> pb.Sandbox:  # fmt: skip
        s = pb.SandboxSpec(**spec)
        if resources:
            s.resources.CopyFrom(pb.Resources(**resources))
        for path, content in mounted:
            s.mounted_files.add(path=path, content=content)
        req = pb.CreateSandboxRequest(
            spec=s, request_id=request_id or str(uuid.uuid4()), lease_id=lease_id,
            lease_ttl_seconds=lease_ttl,
        )  # fmt: skip
        return self.stub.CreateSandbox(req, metadata=self.md, timeout=30)

    def get(self, sandbox_id: str) -> pb.Sandbox:
        return self.stub.GetSandbox(pb.GetSandboxRequest(sandbox_id=sandbox_id), metadata=self.md)

    def wait(self, sandbox_id: str, terminal: bool = False, timeout: float = 30) -> pb.Sandbox:
        cond = pb.WaitSandboxRequest.CONDITION_TERMINAL if terminal else (
            pb.WaitSandboxRequest.CONDITION_STARTED
        )  # fmt: skip
        return self.stub.WaitSandbox(
            pb.WaitSandboxRequest(sandbox_id=sandbox_id, condition=cond, timeout_seconds=timeout),
            metadata=self.md, timeout=timeout + 10,
        )  # fmt: skip

    def running(self, **spec: Any) -> pb.Sandbox:
        sb = self.create(**spec)
        sb = self.wait(sb.id)
        assert sb.status == S.SANDBOX_STATUS_RUNNING, sb
        return sb

    def stop(self, sandbox_id: str, grace: float = 0.0, timeout: float = 60) -> pb.Sandbox:
        return self.stub.StopSandbox(
            pb.StopSandboxRequest(sandbox_id=sandbox_id, grace_seconds=grace),
            metadata=self.md, timeout=timeout,
        )  # fmt: skip

    def delete(self, sandbox_id: str) -> None:
        self.stub.DeleteSandbox(
            pb.DeleteSandboxRequest(sandbox_id=sandbox_id), metadata=self.md, timeout=60
        )

    def list(self, **kw: Any) -> pb.ListSandboxesResponse:
        return self.stub.ListSandboxes(pb.ListSandboxesRequest(**kw), metadata=self.md)

    def exec(
        self, sandbox_id: str, argv: Sequence[str], *, stdin: bytes | None = None,
        tty: bool = False, timeout: float = 0.0, cwd: str = "", env: dict[str, str] | None = None,
        rows: int = 0, cols: int = 0, extra: Sequence[pb.ExecRequest] = (),
    ) -> ExecResult:  # fmt: skip
        init = pb.ExecInit(
            sandbox_id=sandbox_id, argv=list(argv), cwd=cwd, env=env or {},
            timeout_seconds=timeout, stdin=stdin is not None, tty=tty,
        )  # fmt: skip
        if rows or cols:
            init.tty_size.CopyFrom(pb.TerminalSize(rows=rows, cols=cols))
        reqs = [pb.ExecRequest(init=init), *extra]
        if stdin is not None:
            for i in range(0, len(stdin), 65536):
                reqs.append(pb.ExecRequest(stdin=stdin[i : i + 65536]))
            reqs.append(pb.ExecRequest(stdin_eof=True))
        frames = list(self.stub.Exec(iter(reqs), metadata=self.md, timeout=120))
        return ExecResult(frames)

    def sh(self, sandbox_id: str, script: str, **kw: Any) -> ExecResult:
        return self.exec(sandbox_id, ["/bin/sh", "-c", script], **kw)

    def write_file(
        self, sandbox_id: str, path: str, data: bytes, mode: int = 0, make_parents: bool = False
    ) -> int:
        def reqs() -> Iterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(
                header=pb.WriteFileHeader(
                    sandbox_id=sandbox_id, path=path, mode=mode, make_parents=make_parents
                )
            )
            for i in range(0, len(data), 1 << 20):
                yield pb.WriteFileRequest(data=data[i : i + (1 << 20)])

        return int(self.stub.WriteFile(reqs(), metadata=self.md, timeout=120).size)

    def read_file(self, sandbox_id: str, path: str) -> tuple[pb.FileInfo, bytes]:
        frames = list(
            self.stub.ReadFile(
                pb.ReadFileRequest(sandbox_id=sandbox_id, path=path), metadata=self.md, timeout=120
            )
        )
        assert frames and frames[0].WhichOneof("msg") == "info", frames[:1]
        assert all(f.WhichOneof("msg") == "data" for f in frames[1:])
        assert all(len(f.data) <= 256 * 1024 for f in frames[1:])
        return frames[0].info, b"".join(f.data for f in frames[1:])

    def logs(self, sandbox_id: str, tail: int = -1, follow: bool = False,
             timeout: float = 30) -> list[pb.LogEntry]:  # fmt: skip
        return list(
            self.stub.StreamLogs(
                pb.StreamLogsRequest(sandbox_id=sandbox_id, tail=tail, follow=follow),
                metadata=self.md,
                timeout=timeout,
            )
        )


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


def sandbox_cgroups(ids: set[str]) -> list[Path]:
    found: list[Path] = []
    if not ids or not _CGROUP_ROOT.is_dir():
        return found
    for hierarchy in _CGROUP_ROOT.iterdir():
        parent = hierarchy / "aviato"
        for sid in ids:
            if (parent / sid).exists():
                found.append(parent / sid)
    return found
