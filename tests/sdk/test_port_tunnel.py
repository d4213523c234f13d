"""Exposed ports for remote clients (issue 16): `Sandbox.forward_port` and ForwardPort, through a
real service over TCP with TLS and API keys (the fixtures of test_remote), and `aviato port`
forwarding against it.

The clients run in subprocesses, each with exactly the environment a user would set; the
service's own walls (owner, exposed port, running) are also checked on the raw stubs, without
the SDK's early checks in front of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from aviato.server.port_tunnel import MAX_TUNNELS
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

from .test_remote import Remote, _start

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tls() -> Iterator[Remote]:
    yield from _start(tls=True)


def _env(remote: Remote, key: str | None) -> dict[str, str]:
    env = {k: v for k, v in remote.env.items() if not k.startswith("AVIATO_")}
    env["AVIATO_TLS_CA"] = remote.env["AVIATO_TLS_CA"]
    env["AVIATO_BASE_URL"] = remote.url
    env["AVIATO_STATE_DIR"] = "/nonexistent/aviato"  # never a local service
    if key is not None:
        env["AVIATO_API_KEY"] = key
    return env


PRELUDE = """
import asyncio, socket, sys, time, urllib.request
from aviato import NetworkOptions, Sandbox
import aviato

HTTP = ["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", "/srv"]

def served(body, **kw):
    return Sandbox.run(*HTTP, mounted_files=[{"path": "/srv/who.txt", "content": body}],
                       network=NetworkOptions(exposed_ports=[8080]), **kw)

def fetch(address, path="/who.txt", timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:  # until the server in the sandbox listens
        try:
            with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as answer:
                return answer.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)

def rss_kib(pid="self"):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
"""


def _run(remote: Remote, key: str | None, code: str, timeout: float = 180) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=_env(remote, key),
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@contextlib.contextmanager
def _held(remote: Remote, key: str, code: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Runs `code` (which prints a sandbox id, then waits for a line on stdin before it ends
    and its `with` stops the sandbox); yields the process and the id."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(remote, key),
    )
    try:
        assert proc.stdout is not None
        sandbox_id = proc.stdout.readline().strip()
        assert sandbox_id.startswith("sbx-"), proc.stderr.read() if proc.stderr else ""
        yield proc, sandbox_id
    finally:
        with contextlib.suppress(Exception):
            assert proc.stdin is not None
            proc.stdin.write("done\n")
            proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


HOLD_A_SERVER = """
with served(b"alice\\n") as sb:
    sb.wait()
    print(sb.sandbox_id, flush=True)
    sys.stdin.readline()
"""


def _channel(remote: Remote) -> grpc.Channel:
    ca = Path(remote.env["AVIATO_TLS_CA"]).read_bytes()
    target = remote.url.removeprefix("https://")
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca))


def _raw_forward(
    remote: Remote, key: str | None, sandbox_id: str, port: int, send: bytes
) -> tuple[bytes, grpc.StatusCode]:
    """One ForwardPort call on the raw stubs: the header, `send` and eof; what came back and
    the status. The answers are small (under the window), so no credit is given."""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()

    def requests() -> Iterator[pb.PortData]:
        yield pb.PortData(sandbox_id=sandbox_id, port=port)
        yield pb.PortData(data=send)
        yield pb.PortData(eof=True)
        time.sleep(3)  # the service ends the call once both sides are done

    with _channel(remote) as channel:
        stub = pbg.SandboxServiceStub(channel)
        received = b""
        try:
            for message in stub.ForwardPort(requests(), metadata=metadata, timeout=30):
                received += message.data
        except grpc.RpcError as err:
            return received, err.code()
    return received, grpc.StatusCode.OK


def test_forward_port_reaches_the_sandbox_over_tls_with_a_key(tls: Remote) -> None:
    code = """
        with served(b"alice\\n") as sb:
            with sb.forward_port(8080) as fwd:
                assert fwd.address.startswith("127.0.0.1:"), fwd.address
                print(fetch(fwd.address))
                print(fetch(fwd.address))  # a second connection, its own stream

            async def main():
                async with sb.forward_port(8080) as fwd:
                    return await asyncio.to_thread(fetch, fwd.address)

            print(asyncio.run(main()))
            fixed = socket.socket(); fixed.bind(("127.0.0.1", 0))
            wanted = fixed.getsockname()[1]; fixed.close()
            with sb.forward_port(8080, local_port=wanted) as fwd:
                print(fwd.address == f"127.0.0.1:{wanted}", fetch(fwd.address))
    """
    out = _run(tls, tls.key("alice"), code)
    assert out.splitlines() == ["b'alice\\n'"] * 3 + ["True b'alice\\n'"]


def test_refusals_other_owner_no_key_port_not_exposed_and_stopped(tls: Remote) -> None:
    alice, bob = tls.key("alice"), tls.key("bob")
    with _held(tls, alice, HOLD_A_SERVER) as (_, sandbox_id):
        probe = f"""
            for port in (8080, 9999):
                try:
                    Sandbox.from_id({sandbox_id!r}).result().forward_port(port).address
                    print("open")
                except aviato.AviatoError as e:
                    print(type(e).__name__, e)
        """
        as_bob = _run(tls, bob, probe).splitlines()
        assert as_bob[0].startswith("SandboxNotFoundError"), as_bob
        as_nobody = _run(tls, None, probe).splitlines()
        assert as_nobody[0].startswith("AviatoAuthenticationError"), as_nobody
        as_alice = _run(tls, alice, probe).splitlines()
        assert as_alice[0] == "open", as_alice
        assert as_alice[1].startswith("SandboxValidationError"), as_alice
        assert "does not expose port 9999 (it exposes: 8080)" in as_alice[1]

        # The service's own walls, without the SDK's checks in front of them.
        get = b"GET /who.txt HTTP/1.0\r\n\r\n"
        deadline = time.monotonic() + 30
        while True:  # until http.server listens
            answer, status = _raw_forward(tls, alice, sandbox_id, 8080, get)
            if status == grpc.StatusCode.OK or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == grpc.StatusCode.OK and answer.endswith(b"\r\n\r\nalice\n"), answer
        assert _raw_forward(tls, bob, sandbox_id, 8080, get)[1] == grpc.StatusCode.NOT_FOUND
        assert _raw_forward(tls, None, sandbox_id, 8080, get)[1] == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        not_exposed = _raw_forward(tls, alice, sandbox_id, 9999, get)[1]
        assert not_exposed == grpc.StatusCode.INVALID_ARGUMENT
        assert _raw_forward(tls, alice, "sbx-nothing", 8080, get)[1] == grpc.StatusCode.NOT_FOUND
    # the holder's `with` stopped it
    stopped = _raw_forward(tls, alice, sandbox_id, 8080, b"")[1]
    assert stopped == grpc.StatusCode.FAILED_PRECONDITION
    after = f"""
        try:
            Sandbox.from_id({sandbox_id!r}).result().forward_port(8080).address
        except aviato.SandboxNotRunningError as e:
            print("not running:", e)
    """
    assert _run(tls, alice, after).startswith("not running: forward port failed: sandbox sbx-")


HOLD_CONNECTIONS = """
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by what it accepts
s.bind(("127.0.0.1", 7002))
s.listen(128)
held = []
while True:
    conn, _ = s.accept()
    held.append(conn)  # never read
"""


async def _window_and_cap(
    remote: Remote, ca: bytes, key: str, sandbox_id: str
) -> tuple[str, str, str]:
    """A client that ignores the credit (the service must end the call, not buffer), and one
    call more than a sandbox's MAX_TUNNELS."""
    target = remote.url.removeprefix("https://")
    metadata = (("authorization", f"Bearer {key}"),)
    header = pb.PortData(sandbox_id=sandbox_id, port=7002)
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(target, creds) as channel:
        stub = pbg.SandboxServiceStub(channel)
        greedy = stub.ForwardPort(metadata=metadata, timeout=60)
        await greedy.write(header)
        with contextlib.suppress(Exception):  # the service ends the call on its own
            for _ in range(512):  # 32 MiB: past the window and what the sockets hold
                await greedy.write(pb.PortData(data=b"x" * 65536))
            await greedy.done_writing()
        with contextlib.suppress(Exception):  # the credit it was given, then the status
            while await greedy.read() != grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
        greedy_code = (await greedy.code()).name

        calls = [stub.ForwardPort(metadata=metadata, timeout=60) for _ in range(MAX_TUNNELS)]
        for call in calls:
            await call.write(header)
        await asyncio.sleep(2)  # all of them connected, none ended
        one_more = stub.ForwardPort(metadata=metadata, timeout=60)
        await one_more.write(header)
        refused = (await one_more.code()).name
        details = await one_more.details() or ""
        for call in calls:
            call.cancel()
        await asyncio.sleep(2)  # the service sees them go and gives their places back
        again = stub.ForwardPort(metadata=metadata, timeout=60)
        await again.write(header)
        try:
            await asyncio.wait_for(asyncio.shield(again.code()), 3)
            accepted = f"ended: {(await again.code()).name}"
        except TimeoutError:
            accepted = "open"  # connected and relaying: not refused
        again.cancel()
        return greedy_code, refused, details + "|" + accepted


def test_a_client_past_its_window_is_cut_off_and_the_calls_per_sandbox_are_capped(
    tls: Remote,
) -> None:
    alice = tls.key("alice")
    hold = f"""
        holder = {HOLD_CONNECTIONS!r}
        with Sandbox.run("python3", "-c", holder, network={{"exposed_ports": [7002]}}) as sb:
            sb.wait()
            time.sleep(1)  # the holder listens
            print(sb.sandbox_id, flush=True)
            sys.stdin.readline()
    """
    with _held(tls, alice, hold) as (_, sandbox_id):
        greedy, refused, details = asyncio.run(
            _window_and_cap(tls, Path(tls.env["AVIATO_TLS_CA"]).read_bytes(), alice, sandbox_id)
        )
    assert greedy == "INVALID_ARGUMENT"
    details, accepted = details.rsplit("|", 1)
    assert refused == "RESOURCE_EXHAUSTED", details
    assert f"{MAX_TUNNELS} forwarded connections open already" in details
    assert accepted == "open"  # once those calls went, a new one has a place


def test_two_sandboxes_with_the_same_port_reach_only_their_own(tls: Remote) -> None:
    code = """
        with served(b"first\\n") as one, served(b"second\\n") as two:
            with one.forward_port(8080) as a, two.forward_port(8080) as b:
                print(fetch(b.address), fetch(a.address), fetch(b.address))
    """
    out = _run(tls, tls.key("alice"), code)
    assert out.strip() == "b'second\\n' b'first\\n' b'second\\n'"


ANSWER_AFTER_EOF = """
import socket
s = socket.socket()
s.bind(("127.0.0.1", 7001))
s.listen()
while True:
    conn, _ = s.accept()
    asked = b""
    while data := conn.recv(65536):
        asked += data
    conn.sendall(asked * ((4 << 20) // len(asked)))
    conn.close()
"""


def test_a_half_close_is_passed_on_and_the_answer_arrives_whole(tls: Remote) -> None:
    code = f"""
        server = {ANSWER_AFTER_EOF!r}
        with Sandbox.run("python3", "-c", server, network={{"exposed_ports": [7001]}}) as sb:
            with sb.forward_port(7001) as fwd:
                host, _, port = fwd.address.rpartition(":")
                deadline = time.monotonic() + 30
                while True:  # until the server listens (earlier connections are closed)
                    conn = socket.create_connection((host, int(port)), timeout=10)
                    conn.sendall(b"ping")
                    conn.shutdown(socket.SHUT_WR)  # it answers only after our end-of-file
                    time.sleep(1)
                    chunks = []
                    with conn:
                        while data := conn.recv(1 << 16):
                            chunks.append(data)
                    if chunks or time.monotonic() > deadline:
                        break
                answer = b"".join(chunks)
                print(len(answer), answer[:8])
    """
    out = _run(tls, tls.key("alice"), code)
    assert out.strip() == f"{4 << 20} b'pingping'"


FLOOD_MIB = 50
FLOOD = f"""
import socket
s = socket.socket()
s.bind(("127.0.0.1", 7000))
s.listen()
conn, _ = s.accept()
chunk = b"x" * (1 << 20)
for _ in range({FLOOD_MIB}):
    conn.sendall(chunk)
conn.close()
"""


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_download_to_a_slow_reader_keeps_the_service_and_the_client_bounded(
    tls: Remote,
) -> None:
    pid = int((tls.state / "server.pid").read_text().split()[0])
    code = f"""
        flood = {FLOOD!r}
        with Sandbox.run("python3", "-c", flood, network={{"exposed_ports": [7000]}}) as sb:
            with sb.forward_port(7000) as fwd:
                host, _, port = fwd.address.rpartition(":")
                deadline = time.monotonic() + 30
                while True:  # until the flooder listens
                    conn = socket.create_connection((host, int(port)), timeout=10)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                    first = conn.recv(1 << 16)
                    if first:
                        break
                    conn.close()
                    assert time.monotonic() < deadline, "the flooder never answered"
                    time.sleep(0.1)
                before = rss_kib()
                peak = before
                print("connected", flush=True)
                time.sleep(2)  # not reading at all: both ends must hold, not buffer
                received, reads = len(first), 0
                conn.settimeout(30)
                while data := conn.recv(1 << 16):
                    received += len(data)
                    reads += 1
                    if reads % 64 == 0:
                        peak = max(peak, rss_kib())
                        time.sleep(0.002)  # a slow reader
                conn.close()
                print(received, (peak - before) // 1024, flush=True)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tls, tls.key("alice")),
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = proc.stdout.readline()
        assert line == "connected\n", line + proc.stderr.read()
        before = _rss_kib(pid)
        peak = before
        while proc.poll() is None:
            peak = max(peak, _rss_kib(pid))
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    received, client_grown_mib = (int(word) for word in out.split())
    grown_mib = (peak - before) / 1024
    print(
        f"service RSS before {before} KiB, peak {peak} KiB (+{grown_mib:.1f} MiB); "
        f"client +{client_grown_mib} MiB"
    )
    assert received == FLOOD_MIB << 20
    assert grown_mib < 20, f"the service grew by {grown_mib:.1f} MiB relaying {FLOOD_MIB} MiB"
    assert client_grown_mib < 20, f"the client grew by {client_grown_mib} MiB"


def test_cli_port_forwards_in_the_foreground_against_a_remote_service(tls: Remote) -> None:
    alice = tls.key("alice")
    with _held(tls, alice, HOLD_A_SERVER) as (_, sandbox_id):
        cli = subprocess.Popen(
            [sys.executable, "-m", "aviato", "port", sandbox_id, "8080"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(tls, alice),
        )
        assert cli.stdout is not None and cli.stderr is not None
        try:
            line = cli.stdout.readline()
            assert line.startswith("Forwarding 127.0.0.1:"), line + cli.stderr.read()
            address = line.split()[1]
            assert line.strip() == f"Forwarding {address} -> {sandbox_id}:8080 (Ctrl-C to stop)"
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://{address}/who.txt", timeout=10) as r:
                        assert r.read() == b"alice\n"
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            cli.send_signal(signal.SIGINT)
            assert cli.wait(30) == 0, cli.stderr.read()
            with pytest.raises(OSError):  # the forwarder is gone
                host, _, port = address.rpartition(":")
                socket.create_connection((host, int(port)), timeout=5).close()
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        # without PORT: the addresses, as before, and where they are
        listed = subprocess.run(
            [sys.executable, "-m", "aviato", "port", sandbox_id],
            capture_output=True,
            text=True,
            env=_env(tls, alice),
            timeout=60,
        )
        assert listed.stdout.startswith("8080 -> 127.0.0.1:"), listed.stderr
        assert "addresses on the service's host" in listed.stderr
        # a port the sandbox does not expose: one clear line, no forwarder
        refused = subprocess.run(
            [sys.executable, "-m", "aviato", "port", sandbox_id, "9999"],
            capture_output=True,
            text=True,
            env=_env(tls, alice),
            timeout=60,
        )
        assert refused.returncode == 1 and "does not expose port 9999" in refused.stderr


def test_the_forward_ends_when_the_sandbox_ends(tls: Remote) -> None:
    code = """
        with served(b"x\\n") as sb:
            fwd = sb.forward_port(8080)
            print(fetch(fwd.address))
            sb.stop(graceful_shutdown_seconds=0).result()
            try:
                fwd.wait_closed().result(timeout=30)
            except aviato.SandboxNotRunningError as e:
                print("ended:", e)
            print(fwd.closed)
    """
    out = _run(tls, tls.key("alice"), code).splitlines()
    assert out[0] == "b'x\\n'" and out[1].startswith("ended: sandbox sbx-"), out
    assert "forwarding of port 8080 stopped" in out[1] and out[2] == "True"
