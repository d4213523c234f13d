"""The lean local transport (docs/internals/transport.md) against the SDK's real local service:
chosen by default for the unix socket, the same calls and statuses as gRPC, deadlines,
cancellation and the pool of connections."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat

import grpc
import grpc.aio
import pytest

from aviato import Sandbox, SandboxNotFoundError
from aviato._transport.grpc import GrpcTransport
from aviato._transport.lean_channel import MAX_IDLE_CONNECTIONS, LeanChannel
from aviato.v1 import error_detail, sandbox_pb2_grpc
from aviato.v1 import errors_pb2 as epb
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1.local_frames import local_socket_path

from .conftest import TEST_TAG, state_dir


def _grpc_socket() -> str:
    Sandbox.list().result(timeout=60)  # the service is up
    return str(state_dir() / "aviato.sock")


def _lean_socket() -> str:
    return local_socket_path(_grpc_socket())


def _channel_of(url: str) -> object:
    async def made() -> object:
        transport = GrpcTransport(url)
        channel = transport._channel
        await transport.close()
        return channel

    return asyncio.run(made())


def test_the_unix_socket_is_served_by_the_lean_channel_unless_grpc_is_forced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"unix://{_grpc_socket()}"
    monkeypatch.delenv("AVIATO_TRANSPORT", raising=False)
    assert isinstance(_channel_of(url), LeanChannel)
    monkeypatch.setenv("AVIATO_TRANSPORT", "grpc")
    assert not isinstance(_channel_of(url), LeanChannel)


def test_without_the_lean_socket_the_transport_is_grpc() -> None:
    """An older service has no lean socket: gRPC, as before."""
    assert not isinstance(_channel_of("unix:///nonexistent/aviato.sock"), LeanChannel)
    assert not isinstance(_channel_of("http://127.0.0.1:1"), LeanChannel)


def test_the_lean_socket_is_private_to_the_service_user() -> None:
    mode = os.stat(_lean_socket()).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_a_status_travels_with_its_detail_in_the_trailing_metadata() -> None:
    async def main() -> None:
        channel = LeanChannel(_lean_socket())
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]
        info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
        assert info.version
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetSandbox(pb.GetSandboxRequest(sandbox_id="sb-nothing"), timeout=30)
        err = raised.value
        assert err.code() == grpc.StatusCode.NOT_FOUND
        detail = error_detail.from_metadata(err.trailing_metadata())
        assert detail is not None
        assert (detail.reason, detail.sandbox_id) == (epb.SANDBOX_NOT_FOUND, "sb-nothing")
        # The connection went back to the pool after each call: one is reused.
        assert len(channel._idle) == 1
        await channel.close()

    asyncio.run(main())


def test_an_unknown_method_is_unimplemented() -> None:
    async def main() -> None:
        channel = LeanChannel(_lean_socket())
        call = channel.unary_unary("/aviato.v1.SandboxService/NoSuchThing")(b"")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await channel.close()

    asyncio.run(main())


def test_the_sdk_maps_errors_over_the_lean_channel_as_over_grpc() -> None:
    with pytest.raises(SandboxNotFoundError) as gone:
        Sandbox.from_id("sb-nothing-here").result(timeout=60)
    assert gone.value.sandbox_id == "sb-nothing-here"


def test_a_deadline_ends_a_waiting_call_with_deadline_exceeded() -> None:
    sb = Sandbox.run(tags=[TEST_TAG])
    sb.wait()

    async def main() -> None:
        channel = LeanChannel(_lean_socket())
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]
        request = pb.WaitSandboxRequest(
            sandbox_id=sb.sandbox_id or "",
            condition=pb.WaitSandboxRequest.CONDITION_TERMINAL,
            timeout_seconds=30,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.WaitSandbox(request, timeout=0.5)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert loop.time() - started < 5
        await channel.close()

    try:
        asyncio.run(main())
    finally:
        sb.stop().result(timeout=60)


def test_a_cancelled_exec_kills_its_command() -> None:
    sb = Sandbox.run(tags=[TEST_TAG])
    sb.wait()
    marker = "/tmp/lean-cancelled"

    async def main() -> None:
        channel = LeanChannel(_lean_socket())
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]
        init = pb.ExecInit(
            sandbox_id=sb.sandbox_id or "",
            argv=["sh", "-c", f"echo up; sleep 3; touch {marker}"],
        )
        call = stub.RunCommand(init, timeout=30)
        first = await call.read()
        assert first.output.data == b"up\n"
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call.read()
        await channel.close()

    try:
        asyncio.run(main())
        import time

        time.sleep(4)
        check = sb.exec(["sh", "-c", f"test -e {marker} && echo ran || echo killed"]).result()
        assert check.stdout.strip() == "killed"
    finally:
        sb.stop().result(timeout=60)


def test_many_calls_in_flight_each_get_a_connection_and_the_pool_keeps_some() -> None:
    async def main() -> None:
        channel = LeanChannel(_lean_socket())
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]
        calls = [stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=60) for _ in range(300)]
        assert all(info.version for info in await asyncio.gather(*calls))
        assert 0 < len(channel._idle) <= MAX_IDLE_CONNECTIONS
        await channel.close()

    asyncio.run(main())


def test_a_full_accept_queue_is_waited_out_not_taken_for_a_connection() -> None:
    """asyncio reports a unix socket connected when the listener's queue was full (EAGAIN):
    the channel must notice and connect again once there is room."""
    path = f"/tmp/avt-backlog-{os.getpid()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fillers = []
    try:
        while True:  # fill the queue
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            try:
                filler.connect(path)
            except BlockingIOError:
                break

        async def main() -> None:
            channel = LeanChannel(path)
            connecting = asyncio.ensure_future(channel.connect())
            await asyncio.sleep(0.3)
            assert not connecting.done()  # not handed an unconnected socket
            listener.setblocking(False)
            accepted = []
            deadline = asyncio.get_running_loop().time() + 5
            while not connecting.done() and asyncio.get_running_loop().time() < deadline:
                with contextlib.suppress(BlockingIOError):
                    accepted.append(listener.accept()[0])
                await asyncio.sleep(0.01)
            conn = await connecting
            assert not conn.closed and conn.transport is not None
            assert conn.transport.get_extra_info("socket").getpeername() == path
            conn.fail(ConnectionError("done"))
            for s in accepted:
                s.close()

        asyncio.run(main())
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
        os.unlink(path)
