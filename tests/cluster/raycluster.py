"""A real Ray cluster on this machine, plus an aviato control plane placed on it.

Three "hosts" are network namespaces joined by veth pairs and a bridge in the root namespace
(Ray rewrites loopback addresses, so nodes on one machine need their own IPs):

```
bridge <p>br 10.213.N.254 (root ns)
  ├─ netns <p>h  10.213.N.1   ray head (--num-cpus=0) + the aviato control plane
  ├─ netns <p>w1 10.213.N.2   ray worker: 2 cpu, 4 GiB, label aviato-test=w1
  └─ netns <p>w2 10.213.N.3   ray worker: 2 cpu, 4 GiB, label aviato-test=w2
```

Ray runs with token auth (a fresh token file in the cluster's directory), health checks tuned
to declare a dead node within about 3-4 s, and the memory monitor off. The control plane runs in
the head's namespace (a Ray driver must share an IP with a node) and serves its unix socket in
the cluster's directory, which the root namespace reaches (unix sockets are not namespaced).

Teardown kills every process of each namespace by pid (`ip netns pids`; never `ray stop`, which
is machine-wide) and deletes the namespaces, veths and the bridge.

Also a script: `python tests/cluster/raycluster.py` starts everything, prints the control
plane's `AVIATO_BASE_URL`, and tears down on Ctrl-C or SIGTERM (the benchmarks use it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _system_tools import missing_reason

WORKERS = ("w1", "w2")
WORKER_CPUS = 2
WORKER_MEMORY = 4 << 30
HEALTH_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "1000",
}


def netns_supported() -> str:
    """'' when this process can build the cluster, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = missing_reason("ip", "nsenter")
    if missing:
        return missing
    probe = f"avrprobe{os.getpid() % 10000}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns add` fails: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install 'aviato[ray]')"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


class RayCluster:
    """Builds, runs and removes the cluster and the control plane (see the module docstring)."""

    def __init__(self, placement_timeout: float = 20.0, node_lease: float = 5.0) -> None:
        n = os.getpid() % 200 + 20
        self.prefix = f"avr{n}"
        self.subnet = f"10.213.{n}"
        self.head_ip = f"{self.subnet}.1"
        self.dir = Path(tempfile.mkdtemp(prefix="avr", dir="/tmp"))
        self.bridge = f"{self.prefix}br"
        self.namespaces = {"head": f"{self.prefix}h", **{w: f"{self.prefix}{w}" for w in WORKERS}}
        self.ips = {"head": self.head_ip}
        self.ips.update({w: f"{self.subnet}.{i + 2}" for i, w in enumerate(WORKERS)})
        # Where a test's image registry may listen (on the bridge, which every node reaches);
        # the control plane names it as an insecure registry, as an operator would.
        self.registry_address = f"{self.subnet}.254:{_free_port()}"
        self.state_dir = self.dir / "cp"
        self.node_state_dir = self.dir / "nodes"
        self.placement_timeout = placement_timeout
        self.node_lease = node_lease
        self.server: subprocess.Popen[bytes] | None = None
        # More options of the control plane (a test module may restart it with its own).
        self.server_args: list[str] = []
        self.left_behind: set[str] = set()
        self.known_ids: set[str] = set()
        self._links: list[str] = []

    @property
    def base_url(self) -> str:
        return f"unix://{self.state_dir / 'aviato.sock'}"

    @property
    def server_log(self) -> Path:
        return self.dir / "server.log"

    def enter(self, role: str) -> list[str]:
        """The command prefix that runs a program in a node's network namespace.

        `nsenter --net`, not `ip netns exec`: the latter also makes a mount namespace with a
        fresh /sys, which hides the cgroup hierarchies the sandboxes' limits need.
        """
        return ["nsenter", f"--net=/run/netns/{self.namespaces[role]}", "--"]

    def env(self) -> dict[str, str]:
        token = self.dir / "auth_token"
        return {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_memory_monitor_refresh_ms": "0",
            "RAY_DEDUP_LOGS": "0",
            **HEALTH_ENV,
        }

    # --- network ---

    def _network(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        _run("ip", "addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, (role, ns) in enumerate(self.namespaces.items()):
            veth = f"{self.prefix}v{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._links.append(veth)
            _run("ip", "link", "set", veth, "master", self.bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ips[role]}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", f"{self.subnet}.254")

    # --- ray ---

    def _ray(self, role: str, *args: str) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        argv = [*self.enter(role), ray, "start", *args,
                f"--node-ip-address={self.ips[role]}", "--object-store-memory=80000000",
                "--disable-usage-stats"]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env(), timeout=120)
        (self.dir / f"ray-start-{role}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"ray start ({role}) failed:\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        try:
            (self.dir / "auth_token").write_text(secrets.token_hex(32))
            os.chmod(self.dir / "auth_token", 0o600)
            self._network()
            self._ray("head", "--head", "--port=6379", "--num-cpus=0", "--memory=1000000000",
                      "--include-dashboard=false", f"--temp-dir={self.dir / 'ray'}")  # fmt: skip
            for w in WORKERS:
                label = f'--labels={{"aviato-test":"{w}"}}'
                self._ray(w, f"--address={self.head_ip}:6379", f"--num-cpus={WORKER_CPUS}",
                          f"--memory={WORKER_MEMORY}", label)  # fmt: skip
            self.start_server()
        except BaseException:
            self.stop()
            raise

    def start_server(self, wait_nodes: int = len(WORKERS)) -> None:
        """Starts the control plane in the head's namespace; returns when it serves and has a
        node host on `wait_nodes` nodes."""
        self.state_dir.mkdir(exist_ok=True)
        log = open(self.server_log, "ab")  # noqa: SIM115 (the child keeps it)
        start = log.tell()
        argv = [*self.enter("head"), sys.executable, "-m",
                "aviato.server", "--state-dir", str(self.state_dir), "--placement", "ray",
                "--ray-address", f"{self.head_ip}:6379",
                "--ray-node-state-dir", str(self.node_state_dir),
                "--placement-timeout", str(self.placement_timeout),
                "--ray-node-lease", str(self.node_lease), "--usage-interval", "1",
                "--insecure-registry", self.registry_address, *self.server_args]  # fmt: skip
        self.server = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env())
        log.close()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = self.server_log.read_bytes()[start:].decode(errors="replace")
            if "aviato server ready" in text and text.count("node host ready") >= wait_nodes:
                return
            if self.server.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"the control plane did not start:\n{self.server_log.read_text()}")

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        self.server = None

    def partition(self, role: str) -> None:
        """Cuts a node off the others (its veth on the bridge goes down); processes keep running."""
        index = list(self.namespaces).index(role)
        _run("ip", "link", "set", f"{self.prefix}v{index}", "down")

    def kill_node(self, role: str) -> None:
        """SIGKILLs every process of a node's namespace (raylet, workers, sandboxes)."""
        self._kill_namespace(self.namespaces[role])

    def _kill_namespace(self, ns: str) -> None:
        for _ in range(5):
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.2)

    def stop(self) -> None:
        """Removes everything; safe after a partial start."""
        self.stop_server()
        self.known_ids = self._registry_ids()
        for ns in self.namespaces.values():
            self._kill_namespace(ns)
        for ns in self.namespaces.values():
            _run("ip", "netns", "delete", ns, check=False)
        for link in reversed(self._links):
            _run("ip", "link", "delete", link, check=False)
        self.left_behind = self._clean_nodes()
        keep = os.environ.get("AVIATO_CLUSTER_LOG")  # where to keep the control plane's log
        if keep and self.server_log.exists():
            shutil.copy(self.server_log, keep)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _registry_ids(self) -> set[str]:
        """Ids of every sandbox the control plane recorded (for the leak check at the end)."""
        import sqlite3

        db = self.state_dir / "registry.db"
        if not db.exists():
            return set()
        with contextlib.closing(sqlite3.connect(db)) as conn:
            return {row[0] for row in conn.execute("SELECT id FROM sandboxes")}

    def leaked_processes(self) -> list[int]:
        """Pids of processes still in the cgroup of a sandbox this cluster ran."""
        ids = self.known_ids | self.left_behind
        found = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    text = Path(entry.path, "cgroup").read_text()
                    if any(f"/{sid}" in text for sid in ids):
                        found.append(int(entry.name))
        return found

    def _clean_nodes(self) -> set[str]:
        """Removes, through a BubblewrapRuntime, what sandboxes left in every node's state (a killed
        node leaves its sandboxes' cgroups); returns the ids it found."""
        from aviato.runtime.bubblewrap import BubblewrapRuntime
        from aviato.runtime.volume_store import VolumeStore

        found: set[str] = set()
        if not self.node_state_dir.is_dir():
            return found

        async def run(directory: Path) -> None:
            VolumeStore(directory).unmount_all()
            runtime = BubblewrapRuntime(directory)
            for sid in runtime.list_present():
                found.add(sid)
                await runtime.cleanup(sid)
            await runtime.close()

        for directory in self.node_state_dir.iterdir():
            with contextlib.suppress(Exception):
                asyncio.run(run(directory))
        return found


def main() -> int:
    cluster = RayCluster()
    stopping = False

    def stop(signo: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    cluster.start()
    print(cluster.base_url, flush=True)
    try:
        while not stopping:
            time.sleep(0.2)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
