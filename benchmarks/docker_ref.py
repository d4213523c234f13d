"""Docker: the `docker.io` engine from Debian, started by the benchmark, driven by its HTTP API.

When `dockerd` is installed (and we are root), `start()` runs a private daemon (its own data
root, exec root and socket; no bridge, no iptables rules, so the host's network is untouched),
imports a locally built image, and `close()` removes every container and stops the daemon. The
image is a tarball made from the host's own files: `true`, `echo`, `cat`, `sh`, `sleep`, `python3`
with the shared libraries they load and Python's standard library — enough for every scenario,
and the same interpreter the sandboxes run. Nothing is pulled from a registry.

create = `docker run -d --network none IMAGE sleep infinity` (API create + start); exec = the
API's exec (create, attached start, inspect for the exit code); files = the archive API; stop =
`docker rm -f`. Blocking HTTP calls run on a thread pool for the async scenarios.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from benchmarks._docker_api import DockerAPI, DockerError
from benchmarks._system import ExecOut, Skip, System
from benchmarks.floor import SANDBOX_PATH, resolve

T = TypeVar("T")

LABEL = "aviato-bench"
REPO = "aviato-bench"
PROGRAMS = ("true", "echo", "cat", "sh", "sleep", "python3")
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip"}
START_TIMEOUT = 60.0
IDLE_CONCURRENCY = 16
STOP_CONCURRENCY = 32


class _RootfsBuilder:
    """Collects host files (with their symlink chains and parent directories) into a tarball."""

    def __init__(self) -> None:
        self.paths: dict[str, None] = {}  # ordered set

    def add(self, path: str) -> None:
        """Adds `path` as the host has it: symlinks are kept and their targets added too."""
        for _ in range(40):
            parent = os.path.realpath(os.path.dirname(path))
            path = os.path.join(parent, os.path.basename(path))
            if path in self.paths:
                return
            self.paths[path] = None
            if not os.path.islink(path):
                return
            path = os.path.join(parent, os.readlink(path))

    def add_tree(self, top: str) -> None:
        for directory, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d not in STDLIB_SKIP]
            for name in (*dirs, *files):
                self.add(os.path.join(directory, name))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path in self.paths:
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:12]

    def tarball(self) -> bytes:
        buf = io.BytesIO()
        dirs_done: set[str] = set()
        with tarfile.open(fileobj=buf, mode="w") as tar:

            def directory(name: str, mode: int = 0o755) -> None:
                if name in dirs_done or name in ("", "."):
                    return
                directory(os.path.dirname(name))
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                info.mode = mode
                tar.addfile(info)
                dirs_done.add(name)

            for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
                host = "/" + name
                if os.path.islink(host):
                    info = tarfile.TarInfo(name)
                    info.type = tarfile.SYMTYPE
                    info.linkname = os.readlink(host)
                    tar.addfile(info)
            for name, mode in (("tmp", 0o1777), ("root", 0o700), ("etc", 0o755)):
                directory(name, mode)
            for name, text in (
                ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                ("etc/group", "root:x:0:\n"),
            ):
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
            for path in self.paths:
                arc = path.lstrip("/")
                directory(os.path.dirname(arc))
                if os.path.isdir(path) and not os.path.islink(path):
                    directory(arc)
                else:
                    tar.add(path, arcname=arc, recursive=False)
        return buf.getvalue()


def _libraries(program: str) -> list[str]:
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=False).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            target = parts[parts.index("=>") + 1]
            if target.startswith("/"):
                found.append(target)
        elif parts and parts[0].startswith("/"):
            found.append(parts[0])
    return found


def _python_trees(python: str) -> list[str]:
    code = "import sysconfig; p = sysconfig.get_paths(); print(p['stdlib']); print(p['platstdlib'])"
    out = subprocess.run([python, "-S", "-c", code], capture_output=True, text=True, check=True)
    trees = {line for line in out.stdout.splitlines() if line}
    version = subprocess.run(
        [python, "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    etc = f"/etc/python{version}"  # Debian's sitecustomize lives here
    if os.path.isdir(etc):
        trees.add(etc)
    return sorted(trees)


def build_rootfs() -> _RootfsBuilder:
    builder = _RootfsBuilder()
    for program in PROGRAMS:
        path = resolve(program)
        builder.add(path)
        for lib in _libraries(os.path.realpath(path)):
            builder.add(lib)
    python = os.path.realpath(resolve("python3"))
    for tree in _python_trees(python):
        builder.add_tree(tree)
    for path in list(builder.paths):  # extension modules need their libraries too
        if path.endswith(".so") and "/lib-dynload/" in path:
            for lib in _libraries(path):
                builder.add(lib)
    return builder


class DockerSystem(System):
    name = "docker"
    label = "docker"

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = ""
        self._data_root = ""
        self.api = DockerAPI("")
        self.image = ""
        self._info: dict[str, Any] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=128)
        self._env = [f"PATH={SANDBOX_PATH}", "HOME=/root", "LANG=C.UTF-8"]

    # -- daemon --------------------------------------------------------------------------------

    def start(self) -> None:
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise Skip("dockerd is not installed (Debian: apt-get install docker.io)")
        if os.geteuid() != 0:
            raise Skip("dockerd needs root")
        self._dir = tempfile.mkdtemp(prefix="avbd", dir="/tmp")
        self._data_root = tempfile.mkdtemp(prefix="aviato-bench-docker-", dir="/var/tmp")
        sock = os.path.join(self._dir, "docker.sock")
        log = open(os.path.join(self._dir, "dockerd.log"), "wb")  # noqa: SIM115 - handed over
        try:
            self._proc = subprocess.Popen(
                [dockerd, "--data-root", self._data_root,
                 "--exec-root", os.path.join(self._dir, "x"),
                 "--pidfile", os.path.join(self._dir, "dockerd.pid"),
                 "-H", f"unix://{sock}", "--bridge=none", "--iptables=false",
                 "--ip-masq=false", "--log-level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        self.api = DockerAPI(sock)
        deadline = time.monotonic() + START_TIMEOUT
        while not (os.path.exists(sock) and self.api.ping()):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise Skip(f"dockerd did not start: {self._log_tail()}")
            time.sleep(0.1)
        version = self.api.version()
        t0 = time.perf_counter()
        rootfs = build_rootfs()
        self.image = f"{REPO}:{rootfs.fingerprint()}"
        if not self.api.image_exists(self.image):
            repo, tag = self.image.split(":")
            self.api.import_image(rootfs.tarball(), repo, tag)
        self._info = {
            "engine": version.get("Version"),
            "api": version.get("ApiVersion"),
            "image": self.image,
            "image_files": len(rootfs.paths),
            "image_seconds": round(time.perf_counter() - t0, 2),
            "daemon": "private dockerd: --bridge=none --iptables=false, data root "
            + self._data_root,
        }
        box = self.create()  # fail early, and warm the image's layer
        try:
            out = self.exec(box, ["python3", "-c", "print(6 * 7)"])
            if out.code != 0 or out.stdout.strip() != b"42":
                raise Skip(f"the docker image does not run python3: {out}")
        finally:
            self.stop(box)

    def _log_tail(self) -> str:
        try:
            text = Path(self._dir, "dockerd.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-5:])[-800:]

    def describe(self) -> dict[str, Any]:
        return dict(self._info)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.api.containers(f"{LABEL}=1")
                list(self._pool.map(self.api.remove, ids))
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for directory in (self._data_root, self._dir):
            if directory:
                shutil.rmtree(directory, ignore_errors=True)

    # -- sync ----------------------------------------------------------------------------------

    def create(self) -> str:
        return self.api.run(self.image, ["sleep", "infinity"], self._env, {LABEL: "1"})

    def exec(self, box: str, argv: Sequence[str], stdin: bytes | None = None) -> ExecOut:
        code, out = self.api.exec(box, list(argv), stdin)
        return ExecOut(code, out)

    def write_file(self, box: str, path: str, data: bytes) -> None:
        self.api.put_file(box, path, data)

    def read_file(self, box: str, path: str) -> bytes:
        return self.api.get_file(box, path)

    def stop(self, box: str) -> None:
        self.api.remove(box)

    def files_dir(self) -> str:
        return "/tmp"

    # -- async ---------------------------------------------------------------------------------

    async def _off(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def acreate(self) -> str:
        return await self._off(self.create)

    async def aexec(self, box: str, argv: Sequence[str], stdin: bytes | None = None) -> ExecOut:
        return await self._off(self.exec, box, argv, stdin)

    async def astop(self, box: str) -> None:
        await self._off(self.stop, box)

    # -- density -------------------------------------------------------------------------------

    def _map(self, fn: Callable[[Any], T], items: Iterable[Any], workers: int) -> list[T | None]:
        """fn over items with at most `workers` at once; None where it raised."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fn, item) for item in items]
            out: list[T | None] = []
            for f in futures:
                try:
                    out.append(f.result())
                except (OSError, DockerError):
                    out.append(None)
            return out

    def start_idle(self, n: int, deadline_s: float) -> tuple[list[Any], int]:
        end = time.monotonic() + deadline_s

        def one(_: int) -> str:
            return self.create() if time.monotonic() < end else ""  # "": out of time

        made = self._map(one, range(n), IDLE_CONCURRENCY)
        return [cid for cid in made if cid], sum(1 for cid in made if cid is None)

    def idle_pids(self, boxes: list[Any]) -> list[int]:
        """Each container's containerd-shim (the parent of its init), with the init below it."""
        from benchmarks._stats import parent_map

        parents = parent_map()
        pids = []
        for cid in boxes:
            with contextlib.suppress(OSError, DockerError):
                init = int(self.api.json("GET", f"/containers/{cid}/json")["State"]["Pid"])
                pids.append(parents.get(init, init))
        return pids

    def stop_idle(self, boxes: list[Any]) -> int:
        def one(cid: str) -> bool:
            self.stop(cid)
            return True

        return sum(1 for ok in self._map(one, boxes, STOP_CONCURRENCY) if ok is None)
