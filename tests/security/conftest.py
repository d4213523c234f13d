"""Fixtures of the security tests: a real service per isolation mode, canaries, host listeners.

Two modes, each a service of its own (tests parametrized with `mode` run in both):

- ``root``: the service runs as root (the default deployment): bubblewrap gets no user
  namespace, sandbox processes are uid 0 *without any capability*, under seccomp and cgroups.
- ``rootless``: the service runs as an unprivileged user (``nobody`` when the tests run as root,
  else the current user): bubblewrap makes a user namespace and sandbox processes are that
  unprivileged uid, with no capability. This is how the suite runs "as an unprivileged uid
  inside the sandbox": a root sandbox cannot drop to another uid itself (no CAP_SETUID; see
  test_escape.py::test_root_sandbox_cannot_change_uid), and a uid 0 without capabilities is
  already the stronger of the two attackers for everything but uid-based file permissions.
  Without a delegated cgroup subtree a rootless service applies no limits, so the bomb tests
  run in ``root`` mode only.

The host side of each mode (`Host`): a canary string placed in the service's environment, in
its registry (as a key owner), in files under /root and /home (root only, removed afterwards);
a host process with a marker in its command line; TCP, UDP and unix (path and abstract)
listeners that count what reaches them, on every local address; and the service's own TCP port.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from reliability.harness import Client, ExecResult, Service, free_port, interpreter_for

from aviato.v1 import sandbox_pb2 as pb

HERE = Path(__file__).parent
ATTEMPTS = (HERE / "attempts.py").read_bytes()
MODES = ["root", "rootless"]


def local_addresses() -> list[str]:
    """Every address of this host: IPv4 from /proc/net/fib_trie, IPv6 from if_inet6."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for prev, line in itertools.pairwise(lines):
            if "/32 host LOCAL" in line:
                found.add(prev.split()[-1])
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            found.add(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(raw)))
    return sorted(found)


class Listeners:
    """TCP (v4 and v6), UDP and unix listeners on the host that count what arrives."""

    def __init__(self, base: Path, user: str | None) -> None:
        self.hits: list[str] = []
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self.tcp_port = free_port()
        self.udp_port = free_port()
        self.abstract = f"avr-escape-{secrets.token_hex(4)}"
        self.unix_path = str(base / "host.sock")
        tcp4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp4.bind(("0.0.0.0", self.tcp_port))
        self._add(tcp4, "tcp4", listen=True)
        with contextlib.suppress(OSError):
            tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            tcp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            tcp6.bind(("::", self.tcp_port))
            self._add(tcp6, "tcp6", listen=True)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", self.udp_port))
        self._add(udp, "udp", listen=False)
        abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        abstract.bind("\0" + self.abstract)
        self._add(abstract, "abstract", listen=True)
        path = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        if user is not None:
            pw = pwd.getpwnam(user)
            os.chown(self.unix_path, pw.pw_uid, pw.pw_gid)
        self._add(path, "unix", listen=True)

    def _add(self, sock: socket.socket, label: str, listen: bool) -> None:
        if listen:
            sock.listen(16)
        sock.settimeout(0.2)
        self._socks.append(sock)

        def serve() -> None:
            while not self._stop.is_set():
                try:
                    if listen:
                        conn, peer = sock.accept()
                        conn.close()
                        self.hits.append(f"{label} from {peer}")
                    else:
                        _, peer = sock.recvfrom(65536)
                        self.hits.append(f"{label} from {peer}")
                except (TimeoutError, OSError):
                    continue

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        time.sleep(0.3)
        for sock in self._socks:
            sock.close()


@dataclass
class Host:
    """One mode's service and what the host plants for the sandboxes to find."""

    mode: str
    svc: Service
    canary: str
    listeners: Listeners
    service_port: int
    marker_proc: subprocess.Popen[bytes]
    marker: str
    planted: list[Path] = field(default_factory=list)
    attacker: str = ""
    victim: str = ""
    victim_marker: str = ""

    @property
    def client(self) -> Client:
        return self.svc.client()

    def run(self, sandbox_id: str, name: str, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Runs one attempt of attempts.py in the sandbox; returns its JSON line."""
        import json

        r: ExecResult = self.client.exec(
            sandbox_id, ["python3", "/workspace/attempts.py", name, *args], deadline=timeout
        )
        assert r.exit_code == 0, (r.stdout, r.stderr)
        line = r.stdout.decode().strip().splitlines()[-1]
        result: dict[str, Any] = json.loads(line)
        return result

    def sandbox(self, **spec: Any) -> str:
        sb = self.client.running(**spec)
        self.client.write_file(sb.id, "/workspace/attempts.py", ATTEMPTS)
        return sb.id


def _service_user() -> str | None:
    """The user a rootless service runs as: nobody under root, else the current user (None)."""
    return "nobody" if os.geteuid() == 0 else None


@pytest.fixture(scope="package", params=MODES)
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    mode: str = request.param
    user: str | None = None
    if mode == "root":
        if os.geteuid() != 0:
            pytest.skip("root mode needs the tests to run as root")
    else:
        user = _service_user()
        if user is not None:
            try:
                pwd.getpwnam(user)
                interpreter_for(user)
            except (KeyError, LookupError) as e:
                pytest.skip(f"rootless mode: {e}")
    canary = "avrcanary" + secrets.token_hex(8)
    port = free_port()
    svc = Service("--listen", f"127.0.0.1:{port}", user=user, env={"AVIATO_ESCAPE_CANARY": canary})
    listeners = Listeners(svc.base, user)
    marker = f"avr-host-marker-{secrets.token_hex(4)}"
    marker_proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(3600)", marker], start_new_session=True
    )
    planted: list[Path] = []
    try:
        svc.state_dir.mkdir(mode=0o700)
        if user is not None:
            pw = pwd.getpwnam(user)
            os.chown(svc.state_dir, pw.pw_uid, pw.pw_gid)
        # The registry holds the canary (as the owner of an API key): the service's database.
        from aviato.server import auth
        from aviato.server.registry import Registry

        reg = Registry(svc.state_dir / "registry.db")
        auth.create_key(reg, canary, "escape-canary")
        reg.close()
        if user is not None:
            for path in svc.state_dir.iterdir():
                os.chown(path, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        if os.geteuid() == 0:
            for directory in (Path("/root"), Path("/home")):
                if directory.is_dir():
                    planted_file = directory / f".{canary}"
                    planted_file.write_text(f"secret {canary}\n")
                    planted.append(planted_file)
        svc.start()
        h = Host(mode, svc, canary, listeners, port, marker_proc, marker, planted)
        if mode == "rootless":
            info = svc.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert "rootless" in info.runtime, info
        h.victim_marker = f"avr-victim-{secrets.token_hex(4)}"
        h.victim = h.sandbox(
            command=["python3", "-c", "import time; time.sleep(3600)", h.victim_marker]
        )
        h.client.write_file(h.victim, f"/workspace/secret-{canary}", canary.encode())
        h.client.write_file(h.victim, f"/tmp/secret-{canary}", canary.encode())
        h.attacker = h.sandbox()
        yield h
    finally:
        marker_proc.kill()
        marker_proc.wait()
        listeners.close()
        for path in planted:
            with contextlib.suppress(OSError):
                path.unlink()
        if svc.proc is not None:
            svc.finish()
        else:
            shutil.rmtree(svc.base, ignore_errors=True)
