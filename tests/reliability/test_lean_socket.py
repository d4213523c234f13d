"""Attacks on the service's lean local socket (`server/lean_listener.py`), with raw frames
(`aviato.v1.local_frames`) against a real service:

- garbage, oversized and out-of-place frames end that one connection, cleanly: the service
  logs no traceback, does not grow, and answers the next call;
- a request that does not parse is INVALID_ARGUMENT, as over gRPC;
- a client that goes away mid-upload commits nothing, and one that goes away mid-exec (closed
  socket, or a process killed with SIGKILL while it feeds stdin) has its command killed;
- another uid cannot connect;
- the service killed mid-call gives the client UNAVAILABLE at once, not a hang, and a
  restarted service is picked up by the same channel.

The SDK scripts of test_client_crash.py (killed mid-create, mid-exec, mid-upload, while feeding
stdin) run over this socket too: `test_sdk_scripts_use_the_lean_socket` checks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from aviato._transport.lean_channel import LeanChannel
from aviato.v1 import local_frames as lf
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

from .harness import SRC, Service, read_until, spawn_sdk_script

EXEC = "/aviato.v1.SandboxService/Exec"
RUN = "/aviato.v1.SandboxService/RunCommand"
WRITE = "/aviato.v1.SandboxService/WriteFile"


def _lean(svc: Service) -> str:
    return lf.local_socket_path(str(svc.socket_path))


def _connect(svc: Service) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(_lean(svc))
    return s


def _closed_by_service(s: socket.socket) -> bool:
    """True when the service ends the connection (EOF or reset) within the timeout."""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _frames(s: socket.socket) -> list[tuple[int, bytes]]:
    """Every frame the service sends until it closes or goes quiet for a second."""
    s.settimeout(1.0)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    out = []
    while len(data) >= 5:
        kind, length = struct.unpack(">BI", data[:5])
        out.append((kind, data[5 : 5 + length]))
        data = data[5 + length :]
    return out


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _answers(svc: Service) -> None:
    async def ask() -> None:
        channel = LeanChannel(_lean(svc))
        stub = pbg.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]
        assert (await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)).version
        await channel.close()

    asyncio.run(ask())


def test_garbage_and_oversized_frames_end_only_their_connection(svc: Service) -> None:
    before = _rss_kib(svc.pid)
    attacks = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # an unknown kind
        b"\x02\xff\xff\xff\xff",  # a 4 GiB message announced
        struct.pack(">BI", lf.CALL, 64 << 20),  # 64 MiB: past the service's frame limit
        lf.frame(lf.MESSAGE, b"x"),  # a message where a call must start
        lf.frame(lf.CALL, b"\x00\x01garbage"),  # a call header that does not decode
        lf.frame(lf.CALL, lf.encode_call(RUN, None, ())) + lf.frame(lf.HALF_CLOSE),
        lf.frame(lf.STATUS, b""),  # a frame only the service sends
    ]
    for attack in attacks:
        with _connect(svc) as s:
            s.sendall(attack)
            assert _closed_by_service(s), attack
    # A frame announced at the limit and never completed holds only what arrived, and only
    # that connection.
    holders = []
    for _ in range(8):
        s = _connect(svc)
        s.sendall(struct.pack(">BI", lf.CALL, 8 << 20) + b"\x00" * 1024)
        holders.append(s)
    _answers(svc)
    for s in holders:
        s.close()
    _answers(svc)
    assert _rss_kib(svc.pid) - before < 32 * 1024
    assert "Traceback" not in svc.log_text()


def test_an_unparsable_request_is_invalid_argument(svc: Service) -> None:
    with _connect(svc) as s:
        s.sendall(
            lf.frame(lf.CALL, lf.encode_call("/aviato.v1.SandboxService/GetSandbox", 5, ()))
            + lf.frame(lf.MESSAGE, b"\xff\xff\xff")
        )
        frames = _frames(s)
    assert frames and frames[-1][0] == lf.STATUS, frames
    code, details, _ = lf.decode_status(frames[-1][1])
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "request" in details


def _sandbox(svc: Service) -> str:
    return svc.client().running().id


def _exists(svc: Service, sandbox_id: str, path: str) -> bool:
    out = svc.client().sh(sandbox_id, f"test -e {path} && echo yes || echo no").stdout
    return out.strip() == b"yes"


def test_an_upload_whose_connection_ends_before_half_close_commits_nothing(svc: Service) -> None:
    sandbox_id = _sandbox(svc)
    header = pb.WriteFileRequest(header=pb.WriteFileHeader(sandbox_id=sandbox_id, path="/tmp/up"))
    with _connect(svc) as s:
        s.sendall(lf.frame(lf.CALL, lf.encode_call(WRITE, 30, ())))
        s.sendall(lf.frame(lf.MESSAGE, header.SerializeToString()))
        for _ in range(16):
            chunk = pb.WriteFileRequest(data=b"z" * 65536).SerializeToString()
            s.sendall(lf.frame(lf.MESSAGE, chunk))
        # Even the upload's own end frame: without the HALF_CLOSE, the client may have died.
        s.sendall(lf.frame(lf.MESSAGE, pb.WriteFileRequest(end=True).SerializeToString()))
        time.sleep(0.3)
    time.sleep(1.0)
    assert not _exists(svc, sandbox_id, "/tmp/up")
    # The same upload, half-closed, is kept: the wall is the missing HALF_CLOSE.
    with _connect(svc) as s:
        s.sendall(lf.frame(lf.CALL, lf.encode_call(WRITE, 30, ())))
        s.sendall(lf.frame(lf.MESSAGE, header.SerializeToString()))
        s.sendall(lf.frame(lf.MESSAGE, pb.WriteFileRequest(data=b"z").SerializeToString()))
        s.sendall(lf.frame(lf.MESSAGE, pb.WriteFileRequest(end=True).SerializeToString()))
        s.sendall(lf.frame(lf.HALF_CLOSE))
        frames = _frames(s)
    assert lf.decode_status(frames[-1][1])[0] == 0, frames
    assert _exists(svc, sandbox_id, "/tmp/up")


def test_an_exec_whose_connection_ends_has_its_command_killed(svc: Service) -> None:
    sandbox_id = _sandbox(svc)
    init = pb.ExecInit(sandbox_id=sandbox_id, argv=["sh", "-c", "echo up; sleep 2; touch /tmp/ran"])
    with _connect(svc) as s:
        s.sendall(lf.frame(lf.CALL, lf.encode_call(RUN, 60, ())))
        s.sendall(lf.frame(lf.MESSAGE, init.SerializeToString()))
        kind, _ = struct.unpack(">BI", s.recv(5, socket.MSG_WAITALL))
        assert kind in (lf.HEADERS, lf.MESSAGE)
    time.sleep(3.0)
    assert not _exists(svc, sandbox_id, "/tmp/ran")


FEEDER = r"""
import asyncio, sys
from aviato._transport.lean_channel import LeanChannel
from aviato.v1 import sandbox_pb2 as pb, sandbox_pb2_grpc as pbg

async def main():
    stub = pbg.SandboxServiceStub(LeanChannel(sys.argv[1]))
    call = stub.Exec(timeout=60)
    init = pb.ExecInit(sandbox_id=sys.argv[2], stdin=True,
                       argv=["sh", "-c", "cat > /tmp/fed; touch /tmp/fed-done"])
    await call.write(pb.ExecRequest(init=init))
    await call.write(pb.ExecRequest(stdin=b"half of the input\n"))
    while (await call.read()).WhichOneof("msg") != "started":
        pass
    print("feeding", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_client_killed_while_feeding_stdin_has_its_command_killed(svc: Service) -> None:
    sandbox_id = _sandbox(svc)
    proc = subprocess.Popen(
        [sys.executable, "-c", FEEDER, _lean(svc), sandbox_id],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    try:
        read_until(proc, "feeding", timeout=30)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    time.sleep(1.0)
    # Killed, not handed an end of file: `cat` never finished, so the touch never ran.
    assert not _exists(svc, sandbox_id, "/tmp/fed-done")


def test_another_uid_cannot_connect(svc: Service) -> None:
    path = _lean(svc)
    pid = os.fork()
    if pid == 0:  # the child: nobody
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                code = 0
            except PermissionError:
                code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 1


def _in_thread_loop(work: Callable[[], object]) -> None:
    work()


def test_the_service_killed_mid_call_is_unavailable_and_a_restart_is_picked_up(
    make_service: Callable[..., Service],
) -> None:
    svc = make_service()
    sandbox_id = _sandbox(svc)

    async def main() -> None:
        channel = LeanChannel(_lean(svc))
        stub = pbg.SandboxServiceStub(channel)  # type: ignore[no-untyped-call]
        assert (await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)).version
        call = stub.RunCommand(
            pb.ExecInit(sandbox_id=sandbox_id, argv=["sh", "-c", "echo up; sleep 60"]),
            timeout=120,
        )
        assert (await call.read()).output.data == b"up\n"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, svc.kill9)
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async with asyncio.timeout(10):
                await call.read()
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert loop.time() - started < 5
        # The pooled connection died with the service: a new call is UNAVAILABLE too...
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        # ...until the service is back: the same channel reaches it.
        await loop.run_in_executor(None, svc.start)
        assert (await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)).version
        await channel.close()

    asyncio.run(main())


def test_sdk_scripts_use_the_lean_socket(svc: Service) -> None:
    proc = spawn_sdk_script(
        svc,
        "import asyncio, os\n"
        "from aviato._client import get_client\n"
        "async def main():\n"
        "    client = await get_client(os.environ['AVIATO_BASE_URL'])\n"
        "    print('transport', client.transport, flush=True)\n"
        "asyncio.run(main())\n",
    )
    lines = read_until(proc, "transport", timeout=60)
    proc.wait(30)
    assert "(lean)" in lines[-1], lines
