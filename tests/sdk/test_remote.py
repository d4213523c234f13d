"""A remote service over TCP: `http://` and `https://` base URLs, API keys, owners.

Each fixture starts its own `python -m aviato.server --listen 127.0.0.1:PORT` (with a self-signed
certificate for TLS) on a private state directory, and creates keys with `aviato keys create`.
The client code runs in subprocesses so that each sees exactly the environment a user would set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _system_tools import require_tools

from .conftest import sandbox_processes


@dataclass
class Remote:
    url: str
    state: Path
    env: dict[str, str]

    def key(self, owner: str = "local") -> str:
        out = subprocess.run(
            [sys.executable, "-m", "aviato", "keys", "create", "--owner", owner],
            capture_output=True,
            text=True,
            env={**self.env, "AVIATO_STATE_DIR": str(self.state)},
            timeout=60,
            check=True,
        )
        return out.stdout.strip()

    def run(self, code: str, key: str | None, **extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in self.env.items() if not k.startswith("AVIATO_")}
        if "AVIATO_TLS_CA" in self.env:
            env["AVIATO_TLS_CA"] = self.env["AVIATO_TLS_CA"]
        env.update({"AVIATO_BASE_URL": self.url, **extra})
        if key is not None:
            env["AVIATO_API_KEY"] = key
        # an unreachable local state dir: the SDK must not fall back to a local service
        env["AVIATO_STATE_DIR"] = "/nonexistent/aviato"
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(tls: bool) -> Iterator[Remote]:
    state = Path(tempfile.mkdtemp(prefix="avr", dir="/tmp"))
    port = _free_port()
    argv = [sys.executable, "-m", "aviato.server", "--state-dir", str(state)]
    argv += ["--listen", f"127.0.0.1:{port}"]
    env = dict(os.environ)
    if tls:
        require_tools("openssl")
        cert, key = state / "cert.pem", state / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
        env["AVIATO_TLS_CA"] = str(cert)
    log = open(state / "test-server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError((state / "test-server.log").read_text())
        time.sleep(0.1)
    scheme = "https" if tls else "http"
    yield Remote(f"{scheme}://127.0.0.1:{port}", state, env)  # the certificate names the IP
    # stop what the tests left, then the service; nothing may remain
    with contextlib.suppress(Exception):
        subprocess.run(
            [sys.executable, "-m", "aviato", "rm", "--all", "-y"],
            env={**env, "AVIATO_STATE_DIR": str(state)},
            capture_output=True,
            timeout=60,
        )
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    log.close()
    assert not sandbox_processes(state)
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def plain() -> Iterator[Remote]:
    yield from _start(tls=False)


@pytest.fixture(scope="module")
def tls() -> Iterator[Remote]:
    yield from _start(tls=True)


ROUND_TRIP = """
    from aviato import Sandbox
    with Sandbox.run() as sb:
        print(sb.exec(["echo", "remote"]).result().stdout, end="")
        sb.write_file("/tmp/f", b"data").result()
        print(sb.read_file("/tmp/f").result().decode())
"""


@pytest.mark.slow
def test_http_with_a_key(plain: Remote) -> None:
    out = plain.run(ROUND_TRIP, plain.key())
    assert out.stdout == "remote\ndata\n", out.stderr


@pytest.mark.slow
def test_https_with_a_key(tls: Remote) -> None:
    out = tls.run(ROUND_TRIP, tls.key())
    assert out.stdout == "remote\ndata\n", out.stderr


def test_https_without_the_ca_fails_cleanly(tls: Remote) -> None:
    code = """
        import time, aviato
        t0 = time.monotonic()
        try:
            aviato.Sandbox.list().result()
        except aviato.AviatoConnectionError as e:
            assert "AVIATO_TLS_CA" in str(e), e
            print("connection error", time.monotonic() - t0 < 5)  # not retried for 20 s
    """
    out = tls.run(code, tls.key(), AVIATO_TLS_CA="")
    assert out.stdout == "connection error True\n", out.stderr


@pytest.mark.parametrize("key", [None, "avt_not-a-real-key"])
def test_missing_or_wrong_key_is_an_authentication_error(plain: Remote, key: str | None) -> None:
    code = """
        import aviato
        try:
            aviato.Sandbox.list().result()
        except aviato.AviatoAuthenticationError as e:
            print("auth error:", e.code)
    """
    out = plain.run(code, key)
    assert out.stdout.startswith("auth error: UNAUTHENTICATED"), out.stdout + out.stderr


@pytest.mark.slow
def test_owners_do_not_see_each_other(plain: Remote) -> None:
    make = """
        from aviato import Sandbox
        print(Sandbox.run().sandbox_id)
    """
    made = plain.run(make, plain.key("alice"))
    sandbox_id = made.stdout.strip()
    assert sandbox_id, made.stderr
    probe = f"""
        import aviato
        print(len(aviato.Sandbox.list().result()))
        try:
            aviato.Sandbox.from_id({sandbox_id!r}).result()
        except aviato.SandboxNotFoundError:
            print("not found")
    """
    out = plain.run(probe, plain.key("bob"))
    assert out.stdout == "0\nnot found\n", out.stderr
    stop = f"""
        import aviato
        aviato.Sandbox.from_id({sandbox_id!r}).result().stop().result()
        print("stopped")
    """
    assert plain.run(stop, plain.key("alice")).stdout == "stopped\n"
