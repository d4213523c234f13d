"""A small internet on this machine, for egress tests: two network namespaces and their servers.

```
 netns avn<pid>s ("sandbox"): loopback only, where a sandbox's programs and the listener of
                              its egress gateway live (as in a real sandbox)
 netns avn<pid>i ("internet")                      netns avn<pid>h ("host")
   eth0 192.0.2.1/24  DNS (UDP+TCP 53)  <-- veth -->  eth0 192.0.2.2/24, default via 192.0.2.1
        198.51.100.10  "pypi"    HTTP 80, HTTPS 443,    lo 127.0.0.1: "host-loopback" HTTP 80
        198.51.100.20  "evil"    flood 9001 (sends      192.0.2.2:    "host-self" HTTP 80
        203.0.113.5    "plain"   forever), sink 9000    (both must never be reached)
        10.8.0.5       "private" (never reads)
        169.254.169.254 "metadata"
```

Addresses come only from the documentation ranges 192.0.2.0/24, 198.51.100.0/24 and
203.0.113.0/24 (the gateway's policy counts them as public) plus the private 10.8.0.5 and the
link-local metadata address, so nothing here can be mistaken for a real outside address. The
root network namespace is not touched: the veth pair is created inside the namespaces.

The DNS table (`DNS`) maps test names to those addresses, including the tricks a name
allow-list must survive (loopback.test, metadata.test, private.test, hostself.test, mixed.test);
`blackhole.test` is never answered (a DNS timeout); any other name is NXDOMAIN. The HTTPS servers
have certificates from a throw-away CA (`ca_file`) for every name in the table. The HTTP(S)
servers answer JSON: which server ("pypi", ...), the Host header and the TLS server name seen.

Use: `SmallInternet().start()` (root only), then `enter("host")` is an argv prefix that runs a
program in the host namespace (`nsenter --net=/run/netns/NAME --`), `socket_in("sandbox")`
makes a socket in a namespace from this process, `dns` is the nameserver's address.
`stop()` kills every process of the namespaces and deletes them; namespaces left by a
process that died are removed by the next `start()` (their names carry the pid).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import trustme

SERVERS = {
    "198.51.100.10": "pypi",
    "198.51.100.20": "evil",
    "203.0.113.5": "plain",
    "10.8.0.5": "private",
    "169.254.169.254": "metadata",
}
DNS_ADDRESS = "192.0.2.1"
HOST_ADDRESS = "192.0.2.2"
HOST_SERVICES = {"127.0.0.1": "host-loopback", HOST_ADDRESS: "host-self"}
DNS = {
    "pypi.test": ["198.51.100.10"],
    "files.pypi.test": ["198.51.100.10"],
    "evil.test": ["198.51.100.20"],
    "plain.test": ["203.0.113.5"],
    "loopback.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "private.test": ["10.8.0.5"],
    "hostself.test": [HOST_ADDRESS],
    "mixed.test": ["198.51.100.10", "127.0.0.1"],
    "mapped.test": ["198.51.100.10", "::ffff:127.0.0.1"],
    "many.test": [f"203.0.113.{100 + i}" for i in range(40)],
}
SILENT_NAMES = ["blackhole.test"]
PREFIX = "avn"
_DIRECTORY_PREFIX = "aviato-small-internet-"
_NAME = re.compile(rf"^{PREFIX}(\d+)[ihs]$")
_CLONE_NEWNET = 0x40000000
_HERE = Path(__file__).resolve().parent


def unsupported_reason() -> str:
    """'' when this process can build the small internet, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (iproute2, util-linux)"
    return ""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


def _kill_namespace(name: str) -> None:
    for _ in range(20):
        pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.05)


def remove_stale() -> list[str]:
    """Deletes the namespaces and directories of small internets whose process is gone;
    returns the namespaces' names."""
    removed = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _kill_namespace(name)
            _run("ip", "netns", "delete", name, check=False)
            removed.append(name)
    for directory in Path(tempfile.gettempdir()).glob(f"{_DIRECTORY_PREFIX}*"):
        owner = directory.name[len(_DIRECTORY_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(directory, ignore_errors=True)
    return removed


# The one package of the small internet's index (served by every server under /simple/).
PACKAGE, PACKAGE_VERSION = "avtdemo", "1.0"


def write_index(root: Path) -> None:
    """A PEP 503 index with one pure-Python wheel, `avtdemo` 1.0 (`import avtdemo;
    avtdemo.ANSWER == 42`), for a real `pip install` through the egress proxy."""
    wheel_name = f"{PACKAGE}-{PACKAGE_VERSION}-py3-none-any.whl"
    info = f"{PACKAGE}-{PACKAGE_VERSION}.dist-info"
    files = {
        f"{PACKAGE}/__init__.py": b"ANSWER = 42\n",
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {PACKAGE_VERSION}\n"
        ).encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: aviato-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},sha256={_digest(data)},{len(data)}\n" for name, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    (root / "packages").mkdir(parents=True)
    wheel = root / "packages" / wheel_name
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (root / "simple" / PACKAGE).mkdir(parents=True)
    (root / "simple" / "index.html").write_text(f'<a href="{PACKAGE}/">{PACKAGE}</a>\n')
    (root / "simple" / PACKAGE / "index.html").write_text(
        f'<a href="/packages/{wheel_name}#sha256={sha}">{wheel_name}</a>\n'
    )


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


class SmallInternet:
    def __init__(self) -> None:
        pid = os.getpid()
        self.namespaces = {
            "internet": f"{PREFIX}{pid}i",
            "host": f"{PREFIX}{pid}h",
            "sandbox": f"{PREFIX}{pid}s",
        }
        self.dns = DNS_ADDRESS
        self.host_address = HOST_ADDRESS
        self.servers = dict(SERVERS)
        self.names = {name: list(addresses) for name, addresses in DNS.items()}
        # Named by its owner's pid, so that remove_stale finds it when the owner was killed.
        self._directory = Path(tempfile.mkdtemp(prefix=f"{_DIRECTORY_PREFIX}{pid}-"))
        self.ca_file = self._directory / "ca.pem"
        self._processes: list[subprocess.Popen[str]] = []

    def enter(self, role: str = "host") -> list[str]:
        """The argv prefix that runs a program in a namespace ("host" or "internet")."""
        return ["nsenter", f"--net=/run/netns/{self.namespaces[role]}", "--"]

    def socket_in(
        self, role: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A new socket in a namespace ("host", "sandbox", "internet"), made on a thread that
        joins it (a socket keeps its namespace wherever it is used)."""
        made: list[socket.socket] = []
        failed: list[BaseException] = []

        def make() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self.namespaces[role]}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                made.append(socket.socket(family, kind))
            except BaseException as e:
                failed.append(e)
            finally:
                os.close(fd)

        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
        if failed:
            raise failed[0]
        return made[0]

    def connect_from(
        self, role: str, address: tuple[str, int], timeout: float = 10.0
    ) -> socket.socket:
        """A TCP connection to `address` made from a namespace."""
        sock = self.socket_in(role)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def host_connect(self, address: tuple[str, int], timeout: float = 10.0) -> socket.socket:
        return self.connect_from("host", address, timeout)

    def start(self) -> None:
        remove_stale()
        try:
            self._certificates()
            self._network()
            self._processes.append(self._start_servers("internet"))
            self._processes.append(self._start_servers("host"))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in self._processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(Exception):
                process.wait(5)
        for name in self.namespaces.values():
            _kill_namespace(name)
            _run("ip", "netns", "delete", name, check=False)
        shutil.rmtree(self._directory, ignore_errors=True)

    def _certificates(self) -> None:
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert = ca.issue_cert(*self.names, *self.servers)
        cert.private_key_and_cert_chain_pem.write_to_path(str(self._directory / "server.pem"))
        config = {
            "servers": self.servers,
            "host_services": HOST_SERVICES,
            "dns": self.names,
            "silent_names": SILENT_NAMES,
        }
        (self._directory / "config.json").write_text(json.dumps(config))
        write_index(self._directory / "index")

    def _network(self) -> None:
        internet, host = self.namespaces["internet"], self.namespaces["host"]
        for name in self.namespaces.values():
            _run("ip", "netns", "add", name)
        _run("ip", "-n", self.namespaces["sandbox"], "link", "set", "lo", "up")
        # Created inside the internet namespace, its peer inside the host's: never in root's.
        _run("ip", "-n", internet, "link", "add", "eth0", "type", "veth",
             "peer", "name", "eth0", "netns", host)  # fmt: skip
        _run("ip", "-n", internet, "addr", "add", f"{DNS_ADDRESS}/24", "dev", "eth0")
        for address in self.servers:
            _run("ip", "-n", internet, "addr", "add", f"{address}/32", "dev", "eth0")
        _run("ip", "-n", host, "addr", "add", f"{HOST_ADDRESS}/24", "dev", "eth0")
        for ns in (internet, host):
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", host, "route", "add", "default", "via", DNS_ADDRESS)

    def _start_servers(self, role: str) -> subprocess.Popen[str]:
        script = str(_HERE / "internet_servers.py")
        process = subprocess.Popen(
            [*self.enter(role), sys.executable, script, role, str(self._directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        if line.strip() != "ready":
            process.kill()
            _, err = process.communicate(timeout=5)
            raise RuntimeError(f"the {role} servers did not start: {line}{err}")
        return process


def main() -> int:
    """`python small_internet.py`: builds it, prints how to use it (one JSON line), tears
    down on Ctrl-C or SIGTERM."""
    reason = unsupported_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    internet = SmallInternet()
    internet.start()
    print(json.dumps({  # one line, for programs that start this script
        "enter_host": " ".join(internet.enter("host")),
        "enter_sandbox": " ".join(internet.enter("sandbox")),
        "dns": internet.dns,
        "ca_file": str(internet.ca_file),
        "names": internet.names,
        "servers": internet.servers,
    }), flush=True)  # fmt: skip
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        internet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
