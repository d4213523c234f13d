"""A small synchronous client on the raw aviato.v1 stubs, shared by the service's test suites.

Written against the stubs, not the SDK, so that the tests that use it pin the wire contract
itself: frame order, status codes, the end frame of an upload. `tests/server/server_helpers.py`
and `tests/reliability/harness.py` both hand it out (pytest puts `tests/` on `sys.path`, as
the test directories are packages).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

__all__ = ["Client", "ExecResult"]

RUNNING = pb.SandboxStatus.SANDBOX_STATUS_RUNNING


@dataclass
class ExecResult:
    """Every frame of one exec, with the checks the protocol promises on reading them."""

    frames: list[pb.ExecResponse] = field(default_factory=list)

    def _data(self, stream: int) -> bytes:
        return b"".join(
            f.output.data
            for f in self.frames
            if f.WhichOneof("msg") == "output" and f.output.stream == stream
        )

    @property
    def stdout(self) -> bytes:
        return self._data(pb.STREAM_STDOUT)

    @property
    def stderr(self) -> bytes:
        return self._data(pb.STREAM_STDERR)

    @property
    def terminal(self) -> pb.ExecResponse:
        """The one exit or error frame, which must also be the last."""
        ends = [f for f in self.frames if f.WhichOneof("msg") in ("exit", "error")]
        assert len(ends) == 1, f"expected exactly one terminal frame, got {ends}"
        assert self.frames[-1] is ends[0], "the terminal frame must be the last"
        return ends[0]

    @property
    def exit_code(self) -> int:
        t = self.terminal
        assert t.WhichOneof("msg") == "exit", f"expected exit, got {t} (stderr {self.stderr!r})"
        return int(t.exit.exit_code)

    @property
    def error(self) -> pb.ExecError:
        t = self.terminal
        assert t.WhichOneof("msg") == "error", f"expected error, got {t}"
        return t.error


class Client:
    """One caller (its metadata: an API key or none) on a stub.

    `on_create` sees every sandbox this client creates (the reliability harness uses it to
    account for every id when it counts leftovers).
    """

    def __init__(
        self,
        stub: pbg.SandboxServiceStub,
        metadata: Sequence[tuple[str, str]] = (),
        on_create: Callable[[pb.Sandbox], None] | None = None,
    ) -> None:
        self.stub = stub
        self.md = list(metadata)
        self._on_create = on_create

    def create(
        self,
        *,
        request_id: str | None = None,
        lease_id: str = "",
        lease_ttl: float = 0.0,
        resources: dict[str, Any] | None = None,
        mounted: Sequence[tuple[str, bytes]] = (),
        **spec: Any,
    ) -> pb.Sandbox:
        s = pb.SandboxSpec(**spec)
        if resources:
            s.resources.CopyFrom(pb.Resources(**resources))
        for path, content in mounted:
            s.mounted_files.add(path=path, content=content)
        req = pb.CreateSandboxRequest(
            spec=s,
            request_id=request_id or str(uuid.uuid4()),
            lease_id=lease_id,
            lease_ttl_seconds=lease_ttl,
        )
        sb: pb.Sandbox = self.stub.CreateSandbox(req, metadata=self.md, timeout=60)
        if self._on_create is not None:
            self._on_create(sb)
        return sb

    def get(self, sandbox_id: str) -> pb.Sandbox:
        req = pb.GetSandboxRequest(sandbox_id=sandbox_id)
        return self.stub.GetSandbox(req, metadata=self.md, timeout=30)  # type: ignore[no-any-return]

    def wait(self, sandbox_id: str, terminal: bool = False, timeout: float = 60) -> pb.Sandbox:
        cond = (
            pb.WaitSandboxRequest.CONDITION_TERMINAL
            if terminal
            else pb.WaitSandboxRequest.CONDITION_STARTED
        )
        req = pb.WaitSandboxRequest(sandbox_id=sandbox_id, condition=cond, timeout_seconds=timeout)
        return self.stub.WaitSandbox(req, metadata=self.md, timeout=timeout + 15)  # type: ignore[no-any-return]

    def running(self, **spec: Any) -> pb.Sandbox:
        """Creates a sandbox and waits until it runs."""
        sb = self.wait(self.create(**spec).id)
        assert sb.status == RUNNING, sb
        return sb

    def stop(self, sandbox_id: str, grace: float = 0.0, timeout: float = 60) -> pb.Sandbox:
        req = pb.StopSandboxRequest(sandbox_id=sandbox_id, grace_seconds=grace)
        return self.stub.StopSandbox(req, metadata=self.md, timeout=timeout)  # type: ignore[no-any-return]

    def delete(self, sandbox_id: str) -> None:
        req = pb.DeleteSandboxRequest(sandbox_id=sandbox_id)
        self.stub.DeleteSandbox(req, metadata=self.md, timeout=60)

    def list(self, **kw: Any) -> pb.ListSandboxesResponse:
        return self.stub.ListSandboxes(  # type: ignore[no-any-return]
            pb.ListSandboxesRequest(**kw), metadata=self.md, timeout=30
        )

    def list_all(self, include_terminated: bool = True) -> list[pb.Sandbox]:
        """Every page of the listing."""
        out: list[pb.Sandbox] = []
        token = ""
        while True:
            page = self.list(
                include_terminated=include_terminated, page_size=1000, page_token=token
            )
            out.extend(page.sandboxes)
            token = page.next_page_token
            if not token:
                return out

    def exec(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        tty: bool = False,
        timeout: float = 0.0,
        cwd: str = "",
        env: dict[str, str] | None = None,
        rows: int = 0,
        cols: int = 0,
        extra: Sequence[pb.ExecRequest] = (),
        deadline: float = 120,
        protected: bool = False,
    ) -> ExecResult:
        """One exec over the bidirectional stream; `stdin` is sent whole, then its EOF.

        `timeout` is the command's own (ExecInit.timeout_seconds); `deadline` the call's.
        """
        init = pb.ExecInit(
            sandbox_id=sandbox_id,
            argv=list(argv),
            cwd=cwd,
            env=env or {},
            timeout_seconds=timeout,
            stdin=stdin is not None,
            tty=tty,
            protected=protected,
        )
        if rows or cols:
            init.tty_size.CopyFrom(pb.TerminalSize(rows=rows, cols=cols))
        reqs = [pb.ExecRequest(init=init), *extra]
        if stdin is not None:
            for i in range(0, len(stdin), 65536):
                reqs.append(pb.ExecRequest(stdin=stdin[i : i + 65536]))
            reqs.append(pb.ExecRequest(stdin_eof=True))
        return ExecResult(list(self.stub.Exec(iter(reqs), metadata=self.md, timeout=deadline)))

    def sh(self, sandbox_id: str, script: str, **kw: Any) -> ExecResult:
        return self.exec(sandbox_id, ["/bin/sh", "-c", script], **kw)

    def write_file(
        self, sandbox_id: str, path: str, data: bytes, mode: int = 0, make_parents: bool = False
    ) -> int:
        """A whole upload: header, 1 MiB data frames, end frame. Returns the size written."""

        def reqs() -> Iterator[pb.WriteFileRequest]:
            header = pb.WriteFileHeader(
                sandbox_id=sandbox_id, path=path, mode=mode, make_parents=make_parents
            )
            yield pb.WriteFileRequest(header=header)
            for i in range(0, len(data), 1 << 20):
                yield pb.WriteFileRequest(data=data[i : i + (1 << 20)])
            yield pb.WriteFileRequest(end=True)

        return int(self.stub.WriteFile(reqs(), metadata=self.md, timeout=120).size)

    def read_file(self, sandbox_id: str, path: str) -> tuple[pb.FileInfo, bytes]:
        """The info frame and the content; checks that data frames follow one info frame."""
        req = pb.ReadFileRequest(sandbox_id=sandbox_id, path=path)
        frames = list(self.stub.ReadFile(req, metadata=self.md, timeout=120))
        assert frames and frames[0].WhichOneof("msg") == "info", frames[:1]
        assert all(f.WhichOneof("msg") == "data" for f in frames[1:])
        assert all(len(f.data) <= 256 * 1024 for f in frames[1:])
        return frames[0].info, b"".join(f.data for f in frames[1:])

    def logs(
        self, sandbox_id: str, tail: int = -1, follow: bool = False, timeout: float = 30
    ) -> list[pb.LogEntry]:
        req = pb.StreamLogsRequest(sandbox_id=sandbox_id, tail=tail, follow=follow)
        return list(self.stub.StreamLogs(req, metadata=self.md, timeout=timeout))
