"""An in-process fake of `runtime.base.Runtime`: no isolation, commands run on the host.

Used only by the fast service tests (`test_service_fake.py`) to exercise the control plane's
logic (states, stops, leases, reconciliation, error paths) deterministically and without
bubblewrap. The real runtime is exercised by every other test in this directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aviato.runtime.base import (
    ExecEvent,
    ExecExit,
    ExecHandle,
    ExecOutput,
    ExecSpec,
    FileInfo,
    FileNotFound,
    LogRecord,
    MainExit,
    Runtime,
    SandboxConfig,
    SandboxGone,
    SandboxHandle,
    SandboxRuntimeError,
)
from aviato.runtime.logs import read_log


class FakeExec(ExecHandle):
    def __init__(self, proc: asyncio.subprocess.Process, started: float) -> None:
        self._proc = proc
        self._started = started

    async def events(self) -> AsyncIterator[ExecEvent]:  # type: ignore[override]
        assert self._proc.stdout is not None
        while chunk := await self._proc.stdout.read(65536):
            yield ExecOutput(1, chunk)
        code = await self._proc.wait()
        sig = -code if code < 0 else 0
        yield ExecExit(128 + sig if sig else code, sig, False, 0.0, 0.0, 0,
                       time.monotonic() - self._started)  # fmt: skip

    async def write_stdin(self, data: bytes) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.write(data)
            await self._proc.stdin.drain()

    async def close_stdin(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()

    async def resize(self, rows: int, cols: int) -> None:
        return None

    async def signal(self, signo: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signo)

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()


class FakeSandbox(SandboxHandle):
    def __init__(self, runtime: FakeRuntime, sandbox_id: str, directory: Path) -> None:
        self.sandbox_id = sandbox_id
        self._runtime = runtime
        self._dir = directory
        self.ended: asyncio.Future[MainExit] = asyncio.get_running_loop().create_future()
        self.ignore_term = False
        self.terminate_never_returns = False  # a node host whose answer is lost

    @property
    def log_path(self) -> Path:
        return self._dir / "main.log"

    def logs(
        self, since_ns: int = 0, tail: int = -1, follow: bool = False
    ) -> AsyncIterator[LogRecord]:
        return read_log(self.log_path, since_ns, tail, follow, self.ended.done)

    def log(self, stream: int, data: bytes) -> None:
        with open(self.log_path, "ab") as f:
            f.write(struct.pack("<QBI", time.time_ns(), stream, len(data)) + data)

    def end(self, code: int, signo: int = 0, reason: str = "") -> None:
        if not self.ended.done():
            self.ended.set_result(MainExit(code, signo, time.time_ns(), reason))

    async def exec(self, spec: ExecSpec) -> ExecHandle:
        if self.ended.done():
            raise SandboxGone("ended")
        if not shutil.which(spec.argv[0]):
            raise FileNotFound(f"{spec.argv[0]}: not found")
        proc = await asyncio.create_subprocess_exec(
            *spec.argv, stdin=asyncio.subprocess.PIPE if spec.stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        return FakeExec(proc, time.monotonic())

    async def read_file(self, path: str) -> tuple[FileInfo, AsyncIterator[bytes]]:
        data = self._runtime.files.get((self.sandbox_id, path))
        if data is None:
            raise FileNotFound(path)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(data), 100_000):
                yield data[i : i + 100_000]

        return FileInfo(len(data), 0o644), chunks()

    async def write_file(
        self, path: str, mode: int, make_parents: bool, chunks: AsyncIterator[bytes]
    ) -> int:
        buf = bytearray()
        async for chunk in chunks:
            buf += chunk
        self._runtime.files[(self.sandbox_id, path)] = bytes(buf)
        return len(buf)

    async def wait_exit(self) -> MainExit:
        return await asyncio.shield(self.ended)

    async def terminate(self, grace_seconds: float) -> MainExit:
        if self.terminate_never_returns:
            self.end(0)
            await asyncio.Event().wait()
        if not self.ignore_term:
            self.end(0)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.ended), grace_seconds)
            self.end(137, 9, "killed")
        return await self.wait_exit()

    async def kill(self) -> MainExit:
        self.end(137, 9, "killed")
        return await self.wait_exit()


class FakeRuntime(Runtime):
    """`create_delay` slows creates; `cleanup_delay` slows cleanups (`overlapping_cleanups`
    counts those that ran while another of the same sandbox did); `fail_next` makes the next
    create raise."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "sandboxes"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.handles: dict[str, FakeSandbox] = {}
        self.files: dict[tuple[str, str], bytes] = {}
        self.create_delay = 0.0
        self.cleanup_delay = 0.0
        self.cleaning: set[str] = set()
        self.overlapping_cleanups = 0
        self.fail_next = ""
        self.created: list[str] = []
        self.cleaned: list[str] = []
        self.attach_results: dict[str, MainExit] = {}

    async def create(self, config: SandboxConfig) -> SandboxHandle:
        if self.create_delay:
            await asyncio.sleep(self.create_delay)
        if self.fail_next:
            msg, self.fail_next = self.fail_next, ""
            raise SandboxRuntimeError(msg)
        d = self.dir / config.sandbox_id
        d.mkdir()
        handle = FakeSandbox(self, config.sandbox_id, d)
        handle.log(1, b"hello from " + config.sandbox_id.encode() + b"\n")
        if config.command[:1] == ("exit",):
            handle.end(int(config.command[1]))
        if config.command[:1] == ("ignore-term",):
            handle.ignore_term = True
        if config.command[:1] == ("lose-terminate-answer",):
            handle.terminate_never_returns = True
        self.handles[config.sandbox_id] = handle
        self.created.append(config.sandbox_id)
        return handle

    async def attach(self, sandbox_id: str) -> SandboxHandle | MainExit:
        if sandbox_id in self.attach_results:
            return self.attach_results[sandbox_id]
        handle = self.handles.get(sandbox_id)
        if handle is None or handle.ended.done():
            return MainExit(-1, 0, time.time_ns(), "lost")
        # A new service (a new event loop in these tests) re-attaches: rebind the future.
        handle.ended = asyncio.get_running_loop().create_future()
        return handle

    def keep_log(self, sandbox_id: str, into: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.dir / sandbox_id / "main.log", into)

    async def cleanup(self, sandbox_id: str) -> None:
        if sandbox_id in self.cleaning:
            self.overlapping_cleanups += 1
        self.cleaning.add(sandbox_id)
        if self.cleanup_delay:
            await asyncio.sleep(self.cleanup_delay)
        self.cleaning.discard(sandbox_id)
        handle = self.handles.pop(sandbox_id, None)
        if handle is not None:
            handle.end(137, 9, "killed")
        shutil.rmtree(self.dir / sandbox_id, ignore_errors=True)
        self.cleaned.append(sandbox_id)

    def list_present(self) -> list[str]:
        return sorted(os.listdir(self.dir))

    def describe(self) -> dict[str, str]:
        return {"isolation": "fake", "cgroups": "none"}

    async def close(self) -> None:
        return None
