"""A scriptable in-process stand-in for the aviato service, for client-logic tests.

It answers on a unix socket from its own thread and event loop, keeps sandboxes in a dict, and
lets a test inject the failures a real service rarely produces on demand: UNAVAILABLE after a
create was committed (a lost response), an exec stream that ends without an exit frame, an
error frame. It runs no processes: `Exec` "runs" a tiny built-in vocabulary
(``echo ARGS...``, ``exit N``, ``cat`` of stdin, ``sleep S``); `ReadFile` sends what the
script says, whatever size it announced.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc


@dataclass
class Script:
    """Failures to inject; counters are decremented as they fire."""

    create_unavailable_after_commit: int = 0
    unary_unavailable: int = 0
    exec_drop_exit_frame: bool = False
    exec_error_frame: tuple[int, str] | None = None
    # ReadFile: the size announced, and how many bytes are then really sent (a lying service)
    read_file_size: int = 0
    read_file_data: int = 0


@dataclass
class State:
    sandboxes: dict[str, pb.Sandbox] = field(default_factory=dict)
    by_request: dict[str, str] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    metadata: list[dict[str, str]] = field(default_factory=list)
    leases: dict[str, float] = field(default_factory=dict)
    signals: list[int] = field(default_factory=list)


class FakeService(sandbox_pb2_grpc.SandboxServiceServicer):
    def __init__(self) -> None:
        self.script = Script()
        self.state = State()

    def _note(self, name: str, context: grpc.aio.ServicerContext) -> None:
        self.state.calls[name] += 1
        self.state.metadata.append({k: v for k, v in context.invocation_metadata() or ()})

    async def _maybe_unavailable(self, context: grpc.aio.ServicerContext) -> None:
        if self.script.unary_unavailable > 0:
            self.script.unary_unavailable -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: unavailable")

    async def _get(self, sandbox_id: str, context: grpc.aio.ServicerContext) -> pb.Sandbox:
        sb = self.state.sandboxes.get(sandbox_id)
        if sb is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"sandbox {sandbox_id} not found")
        assert sb is not None
        return sb

    async def CreateSandbox(self, request: Any, context: Any) -> pb.Sandbox:
        self._note("CreateSandbox", context)
        await self._maybe_unavailable(context)
        existing = self.state.by_request.get(request.request_id)
        if existing is None:
            sid = f"fake-{len(self.state.sandboxes) + 1}"
            sb = pb.Sandbox(
                id=sid,
                status=pb.SANDBOX_STATUS_RUNNING,
                spec=request.spec,
                lease_id=request.lease_id,
            )
            sb.created_at.GetCurrentTime()
            sb.started_at.GetCurrentTime()
            self.state.sandboxes[sid] = sb
            self.state.by_request[request.request_id] = sid
            if request.lease_id:
                self.state.leases[request.lease_id] = time.monotonic()
            existing = sid
        if self.script.create_unavailable_after_commit > 0:
            self.script.create_unavailable_after_commit -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: response lost")
        return self.state.sandboxes[existing]

    async def GetSandbox(self, request: Any, context: Any) -> pb.Sandbox:
        self._note("GetSandbox", context)
        await self._maybe_unavailable(context)
        return await self._get(request.sandbox_id, context)

    async def ListSandboxes(self, request: Any, context: Any) -> pb.ListSandboxesResponse:
        self._note("ListSandboxes", context)
        await self._maybe_unavailable(context)
        out = [
            sb
            for sb in self.state.sandboxes.values()
            if set(request.tags) <= set(sb.spec.tags)
            and (request.include_terminated or sb.status == pb.SANDBOX_STATUS_RUNNING)
        ]
        return pb.ListSandboxesResponse(sandboxes=out)

    async def WaitSandbox(self, request: Any, context: Any) -> pb.Sandbox:
        self._note("WaitSandbox", context)
        sb = await self._get(request.sandbox_id, context)
        if request.condition == pb.WaitSandboxRequest.CONDITION_TERMINAL:
            deadline = time.monotonic() + (request.timeout_seconds or 60)
            while sb.status == pb.SANDBOX_STATUS_RUNNING and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        return sb

    async def StopSandbox(self, request: Any, context: Any) -> pb.Sandbox:
        self._note("StopSandbox", context)
        sb = await self._get(request.sandbox_id, context)
        if sb.status == pb.SANDBOX_STATUS_RUNNING:
            sb.status = pb.SANDBOX_STATUS_TERMINATED
            sb.status_reason = "stopped"
            sb.exit_code = 143
        return sb

    async def DeleteSandbox(self, request: Any, context: Any) -> pb.DeleteSandboxResponse:
        self._note("DeleteSandbox", context)
        await self._get(request.sandbox_id, context)
        del self.state.sandboxes[request.sandbox_id]
        return pb.DeleteSandboxResponse()

    async def RenewLease(self, request: Any, context: Any) -> pb.Lease:
        self._note("RenewLease", context)
        self.state.leases[request.lease_id] = time.monotonic()
        return pb.Lease(id=request.lease_id)

    async def ReleaseLease(self, request: Any, context: Any) -> pb.Lease:
        self._note("ReleaseLease", context)
        self.state.leases.pop(request.lease_id, None)
        return pb.Lease(id=request.lease_id)

    async def GetServerInfo(self, request: Any, context: Any) -> pb.ServerInfo:
        self._note("GetServerInfo", context)
        return pb.ServerInfo(version="fake", placement="fake")

    async def Exec(self, request_iterator: Any, context: Any) -> Any:
        self._note("Exec", context)
        first = await request_iterator.__anext__()
        init = first.init
        await self._get(init.sandbox_id, context)
        yield pb.ExecResponse(started=pb.ExecStarted())
        argv = list(init.argv)
        out = pb.STREAM_STDOUT
        code = 0
        if argv[0] == "echo":
            yield pb.ExecResponse(
                output=pb.ExecOutput(stream=out, data=(" ".join(argv[1:]) + "\n").encode())
            )
        elif argv[0] == "exit":
            yield pb.ExecResponse(output=pb.ExecOutput(stream=pb.STREAM_STDERR, data=b"bye\n"))
            code = int(argv[1])
        elif argv[0] == "cat":
            async for req in request_iterator:
                kind = req.WhichOneof("msg")
                if kind == "stdin":
                    yield pb.ExecResponse(output=pb.ExecOutput(stream=out, data=req.stdin))
                elif kind == "stdin_eof":
                    break
                elif kind == "signal":
                    self.state.signals.append(req.signal)
                    code = 128 + req.signal
                    break
        elif argv[0] == "sleep":
            try:
                await asyncio.wait_for(self._watch_signal(request_iterator), float(argv[1]))
                code = 137
            except TimeoutError:
                pass
        if self.script.exec_error_frame is not None:
            c, msg = self.script.exec_error_frame
            yield pb.ExecResponse(error=pb.ExecError(code=c, message=msg))
            return
        if self.script.exec_drop_exit_frame:
            return
        yield pb.ExecResponse(
            exit=pb.ExecExit(exit_code=code, usage=pb.ResourceUsage(wall_seconds=0.01))
        )

    async def ReadFile(self, request: Any, context: Any) -> Any:
        self._note("ReadFile", context)
        await self._get(request.sandbox_id, context)
        yield pb.ReadFileResponse(info=pb.FileInfo(size=self.script.read_file_size, mode=0o644))
        left = self.script.read_file_data
        while left > 0:
            n = min(left, 1 << 20)
            yield pb.ReadFileResponse(data=b"z" * n)
            left -= n

    async def _watch_signal(self, request_iterator: Any) -> None:
        async for req in request_iterator:
            if req.WhichOneof("msg") == "signal":
                self.state.signals.append(req.signal)
                return
        await asyncio.Event().wait()


class FakeServer:
    """Runs a FakeService on `unix://<path>` in a background thread."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.url = f"unix://{socket_path}"
        self.service = FakeService()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None

    def start(self) -> FakeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(self.service, self._server)
        self._server.add_insecure_port(self.url)
        await self._server.start()

    def stop(self) -> None:
        assert self._server is not None
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
