"""A real aviato service for the reliability and security tests, and ways to count what it leaves.

`Service` runs `python -m aviato.server` on a private, short state directory
(`/tmp/avrXXXX/s`: unix socket paths are limited to 107 bytes) with a private `TMPDIR`, so that
every temporary file the service makes can be counted. It can be killed with SIGKILL and started
again on the same state. `Service.as_user` runs it as another (non-root) uid: rootless mode,
where bubblewrap makes a user namespace.

Each `Service` puts its sandboxes under a cgroup parent of its own (`aviato-test-<random>`,
removed by `finish()`), so that the limits it writes to that parent (all sandboxes together)
never touch the parent other services on this machine share.

`Footprint` counts what sandboxes leave on the host: processes and cgroups of the service's
sandboxes (found by sandbox id), mounts, runtime directories under `sandboxes/`, kept logs, and
entries of the service's `TMPDIR`. `Service.finish()` removes everything and fails the test if
anything remains.

The client (`Client`) is written on the raw aviato.v1 stubs, so that these tests pin the wire
contract; SDK behaviour is exercised by scripts run in child processes (`run_sdk_script`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from raw_client import Client as Client
from raw_client import ExecResult as ExecResult

import aviato.server
from aviato.v1 import sandbox_pb2 as pb
from aviato.v1 import sandbox_pb2_grpc as pbg

SRC = str(Path(aviato.server.__file__).resolve().parents[2])
ROOT = Path(__file__).resolve().parents[2]  # the checkout (aviato may be installed elsewhere)
S = pb.SandboxStatus
RUNNING = S.SANDBOX_STATUS_RUNNING
TERMINAL = {S.SANDBOX_STATUS_COMPLETED, S.SANDBOX_STATUS_FAILED, S.SANDBOX_STATUS_TERMINATED}
ALL_STATUSES = {1, 2, 3, 4, 5, 6}
CGROUP_ROOT = Path("/sys/fs/cgroup")
_ID_IN_LOG = re.compile(r"\bid=(sbx-[0-9a-f]+)")
_SBX = re.compile(r"sbx-[0-9a-f]{12}")


def slow_enabled() -> bool:
    return os.environ.get("AVIATO_SLOW_TESTS", "") not in ("", "0", "false", "no")


def short_tempdir(prefix: str = "avr") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def code_of(err: BaseException) -> grpc.StatusCode | None:
    code = getattr(err, "code", None)
    return code() if callable(code) else None


def details_of(err: BaseException) -> str:
    details = getattr(err, "details", None)
    return str(details() if callable(details) else err)


def interpreter_for(user: str) -> tuple[str, str]:
    """A Python (and PYTHONPATH) that `user` can run this checkout's service with.

    This interpreter first; when `user` cannot reach it (e.g. a pyenv build under /root), the
    system's python3 of the same version with this environment's site-packages. Raises
    LookupError when neither works.
    """
    import site

    pw = pwd.getpwnam(user)
    path = os.pathsep.join([SRC, *site.getsitepackages()])
    candidates = [sys.executable]
    for name in (f"python{sys.version_info[0]}.{sys.version_info[1]}", "python3"):
        found = shutil.which(name, path="/usr/bin:/usr/local/bin:/bin")
        if found:
            candidates.append(found)
    probe = "import sys, grpc, aviato.server; print(sys.version_info[:2])"
    want = str(tuple(sys.version_info[:2]))
    for python in candidates:
        try:
            out = subprocess.run(
                [python, "-c", probe],
                capture_output=True,
                text=True,
                timeout=60,
                cwd="/",
                env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": path},
                user=pw.pw_uid,
                group=pw.pw_gid,
                extra_groups=[],
            )
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip() == want:
            return python, path
    raise LookupError(f"no Python {want} that user {user!r} can run with aviato's dependencies")


# --- counting what sandboxes leave ------------------------------------------------------------


def processes_of(ids: Iterable[str]) -> dict[int, str]:
    """Host pids whose cgroup path names one of these sandbox ids → that id.

    Sandboxes without cgroups (rootless mode) are not found here: `Service.processes` adds the
    bwrap pids recorded in the sandboxes' runtime.json and their descendants.
    """
    wanted = set(ids)
    found: dict[int, str] = {}
    if not wanted:
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            text = Path(entry.path, "cgroup").read_text()
            for sid in _SBX.findall(text):
                if sid in wanted:
                    found[int(entry.name)] = sid
                    break
    return found


def cgroups_of(ids: Iterable[str], parent_name: str = "aviato") -> list[Path]:
    found: list[Path] = []
    if not CGROUP_ROOT.is_dir():
        return found
    wanted = set(ids)
    for hierarchy in CGROUP_ROOT.iterdir():
        parent = hierarchy / parent_name
        if not parent.is_dir():
            continue
        for sid in wanted:
            if (parent / sid).exists():
                found.append(parent / sid)
    return found


def cgroup_parent_dirs(parent_name: str) -> list[Path]:
    """The directories of a cgroup parent, one per hierarchy (v1) or one (v2)."""
    if not CGROUP_ROOT.is_dir():
        return []
    found = [h / parent_name for h in CGROUP_ROOT.iterdir() if (h / parent_name).is_dir()]
    if (CGROUP_ROOT / parent_name).is_dir():  # a pure v2 host mounts the tree at the root
        found.append(CGROUP_ROOT / parent_name)
    return found


def remove_cgroup_parent(parent_name: str) -> list[Path]:
    """Removes a test's cgroup parent (children first); returns what could not be removed.

    Only parents named "aviato-test-...": never one that other services may share."""
    left: list[Path] = []
    if not parent_name.startswith("aviato-test-"):
        return left
    for directory in cgroup_parent_dirs(parent_name):
        for child in sorted(directory.glob("**/"), key=lambda p: -len(p.parts)):
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        if directory.exists():
            left.append(directory)
    return left


def mount_count(base: Path, ids: Iterable[str]) -> int:
    """Mounts of the host's namespace that belong to a service: naming its directory, one of
    its sandboxes or bubblewrap's staging paths. Sandbox mounts live in their own namespaces
    and must never show up here (the machine's total changes with other programs)."""
    needles = [str(base), "newroot", "bwrap", ".aviato", *ids]
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return sum(1 for line in lines if any(n in line for n in needles))


def descendants(pid: int) -> set[int]:
    """Every live descendant of `pid` (via /proc/*/stat ppid links)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            data = Path(entry.path, "stat").read_bytes()
            ppid = int(data[data.rfind(b")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return state[state.rfind(b")") + 2 : state.rfind(b")") + 3] != b"Z"


def start_time(pid: int) -> int | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
        return int(data[data.rfind(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Footprint:
    """What the service's sandboxes occupy on the host at one moment."""

    processes: int
    cgroups: int
    mounts: int
    runtime_dirs: int
    kept_logs: int
    tmp_entries: int
    records: int

    def as_dict(self) -> dict[str, int]:
        return {
            "processes": self.processes,
            "cgroups": self.cgroups,
            "mounts": self.mounts,
            "runtime_dirs": self.runtime_dirs,
            "kept_logs": self.kept_logs,
            "tmp_entries": self.tmp_entries,
            "records": self.records,
        }


# --- the service ------------------------------------------------------------------------------


class Service:
    """`python -m aviato.server` on a private state directory, as a child process."""

    def __init__(self, *args: str, user: str | None = None, env: dict[str, str] | None = None):
        import secrets

        self.base = short_tempdir()
        os.chmod(self.base, 0o755)
        self.state_dir = self.base / "s"
        self.tmpdir = self.base / "t"
        self.tmpdir.mkdir()
        self.log_path = self.base / "server.log"
        self.args = list(args)
        if "--cgroup-parent" in self.args:
            self.cgroup_parent = self.args[self.args.index("--cgroup-parent") + 1]
        else:
            self.cgroup_parent = f"aviato-test-{secrets.token_hex(4)}"
            self.args += ["--cgroup-parent", self.cgroup_parent]
        self.user = user
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self._bwrap_pids: dict[tuple[int, int], str] = {}
        self.seen_ids: set[str] = set()
        if user is not None:
            pw = pwd.getpwnam(user)
            for path in (self.base, self.tmpdir):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            os.chmod(self.tmpdir, 0o700)

    # -- process --

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "aviato.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> Service:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
        env["TMPDIR"] = str(self.tmpdir)
        env.update(self.extra_env)
        python = sys.executable
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
            env["HOME"] = str(self.base)
            python, path = interpreter_for(self.user)
            env["PYTHONPATH"] = path
        argv = [
            python,
            "-m",
            "aviato.server",
            "--state-dir",
            str(self.state_dir),
            "--log-level",
            "DEBUG",
            *self.args,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
                cwd=self.base,
                **kwargs,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket_path.exists():
                with contextlib.suppress(grpc.RpcError):
                    self.stub().GetServerInfo(pb.GetServerInfoRequest(), timeout=2)
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"server did not answer in {timeout}s:\n{self.log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket_path}")
        return self._channel

    def stub(self) -> pbg.SandboxServiceStub:
        return pbg.SandboxServiceStub(self.channel())

    def client(self, metadata: Sequence[tuple[str, str]] = ()) -> Client:
        return Client(self.stub(), metadata, self.record)

    def record(self, sandbox: pb.Sandbox) -> None:
        """Counts a sandbox created through this service's clients (for the leftover checks)."""
        self.seen_ids.add(sandbox.id)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (sandboxes keep running)."""
        self._close_channel()
        self._remember()
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def kill9(self) -> None:
        self._remember()
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._close_channel()

    # -- what exists --

    def _remember(self) -> None:
        self.seen_ids |= self.known_ids()
        sandboxes = self.state_dir / "sandboxes"
        if sandboxes.is_dir():
            import json

            for entry in sandboxes.iterdir():
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    record = json.loads((entry / "runtime.json").read_text())
                    key = (int(record["pid"]), int(record["starttime"]))
                    self._bwrap_pids[key] = entry.name

    def known_ids(self) -> set[str]:
        """Every sandbox id this service ever logged, recorded or has state for."""
        ids = set(_ID_IN_LOG.findall(self.log_text()))
        sandboxes = self.state_dir / "sandboxes"
        if sandboxes.is_dir():
            ids.update(p.name for p in sandboxes.iterdir())
        ids.update(r[0] for r in self.rows("SELECT id FROM sandboxes"))
        self.seen_ids |= ids
        return set(self.seen_ids)

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        db = self.state_dir / "registry.db"
        if not db.exists():
            return []
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return list(conn.execute(sql, args))
        finally:
            conn.close()

    def processes(self) -> dict[int, str]:
        """Host processes of this service's sandboxes (by cgroup, plus bwrap descendants)."""
        self._remember()
        found = processes_of(self.known_ids())
        for (pid, starttime), sid in list(self._bwrap_pids.items()):
            if alive(pid) and start_time(pid) == starttime:
                found.setdefault(pid, sid)
                for child in descendants(pid):
                    found.setdefault(child, sid)
        return found

    def footprint(self) -> Footprint:
        ids = self.known_ids()
        sandboxes = self.state_dir / "sandboxes"
        logs = self.state_dir / "logs"
        return Footprint(
            processes=len(self.processes()),
            cgroups=len(cgroups_of(ids, self.cgroup_parent)),
            mounts=mount_count(self.base, ids),
            runtime_dirs=len(list(sandboxes.iterdir())) if sandboxes.is_dir() else 0,
            kept_logs=len(list(logs.iterdir())) if logs.is_dir() else 0,
            tmp_entries=len(list(self.tmpdir.iterdir())),
            records=len(self.rows("SELECT id FROM sandboxes")),
        )

    def wait_no_processes(self, timeout: float = 20.0) -> dict[int, str]:
        deadline = time.monotonic() + timeout
        left = self.processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.processes()
        return left

    # -- the end --

    def finish(self) -> None:
        """Stops the service, removes every sandbox, fails if anything of them remains."""
        with contextlib.suppress(Exception):
            if self.running():
                c = self.client()
                for rec in c.list_all():
                    with contextlib.suppress(grpc.RpcError):
                        c.delete(rec.id)
        if self.running():
            with contextlib.suppress(Exception):
                self.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._remember()
        ids = self.known_ids()
        _runtime_cleanup(self.state_dir, self.cgroup_parent)
        procs = self.wait_no_processes(10)
        groups = cgroups_of(ids, self.cgroup_parent)
        for pid in procs:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)
        if not procs:
            remove_cgroup_parent(self.cgroup_parent)
        assert not procs, f"sandbox processes remain: {procs}"
        assert not groups, f"sandbox cgroups remain: {groups}"


def _runtime_cleanup(state_dir: Path, cgroup_parent: str = "aviato") -> None:
    """Removes every sandbox the state directory still has, through the runtime itself, and
    unmounts its sized volumes."""
    from aviato.runtime.volume_store import VolumeStore

    VolumeStore(state_dir).unmount_all()
    if not (state_dir / "sandboxes").is_dir():
        return
    import asyncio

    from aviato.runtime.bubblewrap import BubblewrapRuntime

    async def run() -> None:
        runtime = BubblewrapRuntime(state_dir, cgroup_parent=cgroup_parent)
        for sid in runtime.list_present():
            with contextlib.suppress(Exception):
                await runtime.cleanup(sid)
        await runtime.close()

    asyncio.run(run())


@contextlib.contextmanager
def service(
    *args: str,
    user: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Service]:
    svc = Service(*args, user=user, env=env)
    try:
        svc.start()
        yield svc
    finally:
        svc.finish()


# --- a small synchronous client ---------------------------------------------------------------


# --- SDK scripts in child processes -----------------------------------------------------------


def sdk_env(svc: Service, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["AVIATO_BASE_URL"] = f"unix://{svc.socket_path}"
    env.update(extra)
    return env


def spawn_sdk_script(svc: Service, code: str, *args: str, **extra: str) -> subprocess.Popen[str]:
    """Starts `python -c code ARGS` using the SDK against `svc`; stdout is a pipe of lines."""
    return subprocess.Popen(
        [sys.executable, "-u", "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=sdk_env(svc, **extra),
        start_new_session=True,
    )


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float = 60) -> list[str]:
    """Lines of the child's stdout up to (and including) the first that starts with `marker`."""
    import selectors

    assert proc.stdout is not None
    lines: list[str] = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith(marker):
                return lines
    finally:
        sel.close()
    err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
    raise AssertionError(f"no line {marker!r} from the script; got {lines}; stderr {err}")
