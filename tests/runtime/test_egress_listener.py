"""SandboxHandle.egress_listener against real sandboxes: the listening socket the supervisor
makes on the sandbox's loopback for its egress proxy (EGRESS_LISTEN), the proxy variables every
process it starts from then on finds, and what a program that ignores them gets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from _system_tools import require_tools
from _wait import async_wait_until
from supervisor_descriptors import open_fds, settled_fds, supervisor_pid

from aviato.runtime.base import (
    ExecExit,
    ExecOutput,
    ExecSpec,
    SandboxConfig,
    SandboxHandle,
)
from aviato.runtime.bubblewrap import BubblewrapRuntime, BubblewrapSandbox
from aviato.runtime.bubblewrap.command import build_argv
from aviato.runtime.image_roots import resolve_image
from aviato.runtime.model import EgressPolicy, EgressRule
from aviato.runtime.supervisor import frames, supervisor_binary

T = TypeVar("T")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run sandboxes as root")

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
NO_PROXY_VARS = ("NO_PROXY", "no_proxy")
LOOPBACK_ONLY = "localhost,127.0.0.1,::1"
ISOLATED = EgressPolicy()
INTERNET = EgressPolicy(internet=True)
SHOW_ENV = "env | grep -i proxy | sort"
# Connects to the proxy named by $HTTP_PROXY, sends a line, prints the answer.
TALK_TO_PROXY = r"""
import os, socket, sys, urllib.parse
url = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
with socket.create_connection((url.hostname, url.port), timeout=10) as s:
    s.sendall(b"ping from the sandbox\n")
    print(s.makefile("rb").readline().decode().strip())
"""
# Connects straight to an address outside the sandbox (argv[1]); prints the errno's name and
# how long the failure took.
DIRECT_CONNECT = r"""
import errno, socket, sys, time
started = time.monotonic()
try:
    socket.create_connection((sys.argv[1], 443), timeout=20).close()
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno), round(time.monotonic() - started, 3))
"""


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="aveg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config(
    *command: str, egress: EgressPolicy = ISOLATED, env: dict[str, str] | None = None
) -> SandboxConfig:
    sid = "t-" + uuid.uuid4().hex[:12]
    return SandboxConfig(
        sandbox_id=sid, image="host", command=command, env=env or {}, working_dir="", egress=egress
    )


def run_with(state_dir: Path, body: Callable[[BubblewrapRuntime], Awaitable[T]]) -> T:
    async def main() -> T:
        rt = BubblewrapRuntime(state_dir, supervisor=supervisor_binary())
        try:
            return await asyncio.wait_for(body(rt), 120)
        finally:
            for sid in rt.list_present():
                await rt.cleanup(sid)
            await rt.close()

    return asyncio.run(main())


async def run_in(h: SandboxHandle, *argv: str, env: dict[str, str] | None = None) -> str:
    """Runs `argv` (which must exit 0); its stdout and stderr together."""
    e = await h.exec(ExecSpec(argv=argv, env=env or {}, timeout_seconds=60))
    out = bytearray()
    code = -1
    async for ev in e.events():
        if isinstance(ev, ExecOutput):
            out.extend(ev.data)
        elif isinstance(ev, ExecExit):
            code = ev.exit_code
    assert code == 0, out
    return out.decode(errors="replace")


def parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def proxy_url(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def main_output(h: SandboxHandle) -> str:
    """The main process's output up to its first line that says "end"."""
    out = bytearray()
    async for record in h.logs(follow=True):
        out += record.data
        if b"end\n" in out:
            break
    return out.decode()


def accept_and_answer(listener: socket.socket, answer: bytes) -> bytes:
    """Accepts one connection on `listener` (as the service would), reads a line, answers."""
    listener.settimeout(20)
    conn, peer = listener.accept()
    with conn:
        conn.settimeout(20)
        assert peer[0] == "127.0.0.1"
        line = conn.makefile("rb").readline()
        conn.sendall(answer)
        return line


# --- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("egress", "flagged"),
    [
        (ISOLATED, False),
        (INTERNET, True),
        (EgressPolicy(rules=(EgressRule(dns_name="pypi.org"),)), True),
    ],
)
def test_the_supervisor_opens_the_listener_at_start_unless_isolated(
    egress: EgressPolicy, flagged: bool
) -> None:
    root = resolve_image("host", 1 << 20)
    for command in ((), ("sleep", "1")):
        argv = build_argv(
            "/bw", config(*command, egress=egress), root, supervisor="/s", seccomp_fd=None,
            rootless=True,
        )  # fmt: skip
        supervisor = argv[argv.index("--chdir") + 3 :]  # after `--chdir DIR --`: its argv
        assert supervisor[0] == "/.aviato/supervisor"
        assert ("--egress" in supervisor) is flagged
        if flagged:  # an option: before `--` or `--keepalive`
            end = supervisor.index("--") if command else supervisor.index("--keepalive")
            assert supervisor.index("--egress") < end


# --- one socket, one port ------------------------------------------------------------------


@as_root
def test_every_call_returns_the_same_listening_socket(state_dir: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> list[tuple[str, int]]:
        h = await rt.create(config("sleep", "600"))
        addresses = []
        for _ in range(3):
            sock = await h.egress_listener()
            with sock:
                assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                assert sock.getblocking()
                assert sock.get_inheritable() is False
                addresses.append(sock.getsockname())
            # closed here: the supervisor's copy keeps the port listening for the next call
        return addresses

    addresses = run_with(state_dir, body)
    assert addresses[0][0] == "127.0.0.1"
    assert addresses[0][1] > 0
    assert addresses == [addresses[0]] * 3


@as_root
def test_a_second_attach_after_a_restart_gets_the_same_port(state_dir: Path) -> None:
    async def main() -> tuple[int, int, bytes, str]:
        rt = BubblewrapRuntime(state_dir, supervisor=supervisor_binary())
        h = await rt.create(config("sleep", "600", egress=INTERNET))
        sid = h.sandbox_id
        with await h.egress_listener() as first:
            port = first.getsockname()[1]
        await rt.close()  # the service goes away; the sandbox keeps running
        rt2 = BubblewrapRuntime(state_dir, supervisor=supervisor_binary())
        try:
            h2 = await rt2.attach(sid)
            assert isinstance(h2, SandboxHandle)
            with await h2.egress_listener() as again:
                talk = asyncio.create_task(run_in(h2, "python3", "-c", TALK_TO_PROXY))
                line = await asyncio.to_thread(accept_and_answer, again, b"pong\n")
                return port, again.getsockname()[1], line, await talk
        finally:
            for present in rt2.list_present():
                await rt2.cleanup(present)
            await rt2.close()

    port, port_again, line, answer = asyncio.run(asyncio.wait_for(main(), 120))
    assert port_again == port
    assert line == b"ping from the sandbox\n"
    assert answer == "pong\n"


# --- the proxy variables -------------------------------------------------------------------


@as_root
def test_a_sandbox_with_egress_starts_its_main_process_with_the_proxy_variables(
    state_dir: Path,
) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[str, str, str]:
        h = await rt.create(config("sh", "-c", f"{SHOW_ENV}; echo end; sleep 600", egress=INTERNET))
        main = await main_output(h)
        with await h.egress_listener() as sock:
            return main, await run_in(h, "sh", "-c", SHOW_ENV), proxy_url(sock)

    main, exec_env, url = run_with(state_dir, body)
    for env in (parse_env(main), parse_env(exec_env)):
        assert {k: env.get(k) for k in PROXY_VARS} == dict.fromkeys(PROXY_VARS, url)
        assert {k: env.get(k) for k in NO_PROXY_VARS} == dict.fromkeys(NO_PROXY_VARS, LOOPBACK_ONLY)


@as_root
def test_an_isolated_sandbox_has_no_proxy_until_asked_then_new_processes_have_it(
    state_dir: Path,
) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[str, str, str, str]:
        h = await rt.create(config("sh", "-c", "echo end; sleep 600"))
        await main_output(h)
        before = await run_in(h, "sh", "-c", SHOW_ENV + "; true")
        sock = await h.egress_listener()
        with sock:
            after = await run_in(h, "sh", "-c", SHOW_ENV)
            # the main process started before: it keeps the environment it had
            main_env = await run_in(
                h, "sh", "-c", "for p in /proc/[0-9]*; do [ \"$(tr -d '\\0' < $p/cmdline)\" = "
                "sleep600 ] && tr '\\0' '\\n' < $p/environ; done | grep -i proxy; true",
            )  # fmt: skip
            return before, after, main_env, proxy_url(sock)

    before, after, main_env, url = run_with(state_dir, body)
    assert before == ""
    assert main_env == ""
    env = parse_env(after)
    assert {k: env.get(k) for k in PROXY_VARS} == dict.fromkeys(PROXY_VARS, url)
    assert {k: env.get(k) for k in NO_PROXY_VARS} == dict.fromkeys(NO_PROXY_VARS, LOOPBACK_ONLY)


@as_root
def test_a_no_proxy_of_the_users_own_is_kept(state_dir: Path) -> None:
    """NO_PROXY set by the sandbox's spec stays (no_proxy, unset, gets the default); an exec's
    own env wins over the supervisor's for every variable, HTTP_PROXY too."""

    async def body(rt: BubblewrapRuntime) -> tuple[str, str, str]:
        spec_env = {"NO_PROXY": "internal.example,10.0.0.0/8"}
        h = await rt.create(config("sleep", "600", egress=INTERNET, env=spec_env))
        sandbox_env = await run_in(h, "sh", "-c", SHOW_ENV)
        exec_env = await run_in(
            h, "sh", "-c", SHOW_ENV, env={"no_proxy": "mine.example", "HTTP_PROXY": "http://x:1"}
        )
        with await h.egress_listener() as sock:
            return sandbox_env, exec_env, proxy_url(sock)

    sandbox_env, exec_env, url = run_with(state_dir, body)
    env = parse_env(sandbox_env)
    assert env["NO_PROXY"] == "internal.example,10.0.0.0/8"
    assert env["no_proxy"] == LOOPBACK_ONLY
    assert env["HTTP_PROXY"] == url
    env = parse_env(exec_env)
    assert env["NO_PROXY"] == "internal.example,10.0.0.0/8"
    assert env["no_proxy"] == "mine.example"
    assert env["HTTP_PROXY"] == "http://x:1"
    assert env["HTTPS_PROXY"] == url


@as_root
def test_a_proxy_variable_in_the_sandboxs_spec_is_replaced(state_dir: Path) -> None:
    """The listener is the sandbox's only way out: the supervisor's address wins over one the
    spec set (an exec may still set its own, as above)."""

    async def body(rt: BubblewrapRuntime) -> tuple[str, str]:
        h = await rt.create(
            config("sleep", "600", egress=INTERNET, env={"HTTPS_PROXY": "http://corp:3128"})
        )
        with await h.egress_listener() as sock:
            return await run_in(h, "sh", "-c", SHOW_ENV), proxy_url(sock)

    out, url = run_with(state_dir, body)
    assert parse_env(out)["HTTPS_PROXY"] == url


# --- bytes through the listener --------------------------------------------------------------


@as_root
def test_a_program_that_connects_to_the_proxy_reaches_the_holder_of_the_socket(
    state_dir: Path,
) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[bytes, str]:
        h = await rt.create(config("sleep", "600", egress=INTERNET))
        with await h.egress_listener() as sock:
            talk = asyncio.create_task(run_in(h, "python3", "-c", TALK_TO_PROXY))
            line = await asyncio.to_thread(accept_and_answer, sock, b"pong from the service\n")
            return line, await talk

    line, answer = run_with(state_dir, body)
    assert line == b"ping from the sandbox\n"
    assert answer == "pong from the service\n"


@as_root
def test_curl_sends_its_request_to_the_proxy(state_dir: Path) -> None:
    """A real client honours the variables: curl asks the proxy with CONNECT for an https URL."""
    require_tools("curl")  # the host image runs the host's curl

    async def body(rt: BubblewrapRuntime) -> tuple[bytes, str]:
        h = await rt.create(config("sleep", "600", egress=INTERNET))
        with await h.egress_listener() as sock:
            curl = asyncio.create_task(
                run_in(h, "sh", "-c", "curl -sS https://example.test/ 2>&1; true")
            )
            refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
            line = await asyncio.to_thread(accept_and_answer, sock, refusal)
            return line, await curl

    line, out = run_with(state_dir, body)
    assert line.startswith(b"CONNECT example.test:443 HTTP/1.1"), line
    assert "403" in out, out


@as_root
def test_connecting_outside_loopback_fails_at_once_without_and_with_the_listener(
    state_dir: Path,
) -> None:
    """No route leaves the sandbox: a program that ignores the proxy gets ENETUNREACH at once
    (never a hang), before the listener exists and after."""

    async def body(rt: BubblewrapRuntime) -> list[str]:
        h = await rt.create(config("sleep", "600"))
        results = []
        for address in ("192.0.2.1", "203.0.113.7"):
            results.append(await run_in(h, "python3", "-c", DIRECT_CONNECT, address))
        with await h.egress_listener():
            results.append(await run_in(h, "python3", "-c", DIRECT_CONNECT, "198.51.100.9"))
        return results

    for out in run_with(state_dir, body):
        name, seconds = out.split()
        assert name == "ENETUNREACH", out
        assert float(seconds) < 1.0, out


# --- bounded ---------------------------------------------------------------------------------


@as_root
def test_300_calls_leave_no_descriptor_behind(state_dir: Path) -> None:
    async def body(rt: BubblewrapRuntime) -> tuple[list[str], list[str], int, set[int], float]:
        async def same_as_before() -> bool:
            return open_fds(sup) == before

        h = await rt.create(config("sleep", "600"))
        assert isinstance(h, BubblewrapSandbox)
        (await h.egress_listener()).close()  # the first call makes the supervisor's own copy
        sup = supervisor_pid(h)
        before = await settled_fds(sup)
        ours = len(open_fds("self"))
        ports = set()
        started = time.perf_counter()
        for _ in range(300):
            with await h.egress_listener() as sock:
                ports.add(sock.getsockname()[1])
        elapsed = time.perf_counter() - started
        leaked_here = len(open_fds("self")) - ours
        with contextlib.suppress(AssertionError):  # a leak never settles back to `before`
            await async_wait_until(same_as_before, "the supervisor's descriptors", timeout=5)
        return before, open_fds(sup), leaked_here, ports, elapsed

    before, after, leaked_here, ports, elapsed = run_with(state_dir, body)
    assert after == before
    assert leaked_here == 0
    assert len(ports) == 1
    print(f"egress_listener: {elapsed / 300 * 1e3:.2f} ms per call over 300")


@as_root
def test_a_body_on_egress_listen_is_a_protocol_error(state_dir: Path) -> None:
    """The frame as a client could send it: anything in its body closes that connection, with
    no listener made and no variable set."""

    async def body(rt: BubblewrapRuntime) -> tuple[bytes, str]:
        h = await rt.create(config("sleep", "600"))
        ctl = state_dir / "sandboxes" / h.sandbox_id / "ctl.sock"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(ctl))
            s.sendall(frames.header(frames.F_EGRESS_LISTEN, 1, 1) + b"x")
            data = bytearray()
            while chunk := s.recv(4096):  # until the supervisor closes the connection
                data += chunk
        return bytes(data), await run_in(h, "sh", "-c", SHOW_ENV + "; true")

    data, env = run_with(state_dir, body)
    length, ftype, _ = frames.unpack_header(data, 0)
    assert ftype == frames.F_HELLO
    assert len(data) == 4 + length  # HELLO and nothing else
    assert env == ""
