"""Raw bubblewrap: aviato's isolation without its service, one `bwrap` per command.

The command line is aviato's own (`aviato.runtime.bubblewrap.command.build_argv` on the `host`
image: new pid/ipc/uts/net/cgroup namespaces, `--cap-drop ALL`, the seccomp deny-list, the
read-only host image with its secrets masked, a tmpfs root), with the supervisor replaced by the
command itself. Differences from an aviato sandbox, on purpose: no cgroup (bwrap has no limits of
its own), no supervisor, no service; a box's `/workspace` is a host directory bound in, so that
files survive from one command to the next. An idle box is `bwrap ... sleep infinity` with
`--die-with-parent`; `--info-fd` tells when its child runs and which pid to kill.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

from benchmarks._system import Skip
from benchmarks.floor import FloorSystem, ProcBox, Spawn

DISK_BYTES = 1 << 30  # the service's default writable layer


class RawBwrapSystem(FloorSystem):
    name = "bwrap"
    label = "raw bwrap"
    persistent_boxes = False

    def __init__(self) -> None:
        super().__init__()
        self._prefix: list[str] = []
        self._seccomp_at = -1
        self._info: dict[str, Any] = {}

    def start(self) -> None:
        try:
            from aviato.runtime import image_roots, seccomp
            from aviato.runtime.base import SandboxConfig
            from aviato.runtime.bubblewrap import command as bwrap
        except ImportError as exc:  # pragma: no cover - the checkout is always importable
            raise Skip(f"aviato.runtime is not importable: {exc}") from exc
        try:
            found = bwrap.find_bwrap()
        except Exception as exc:
            raise Skip(f"no usable bwrap: {exc}") from exc
        config = SandboxConfig(sandbox_id="bench", image="host", command=(), env={},
                               working_dir="")  # fmt: skip
        root = image_roots.host_image(DISK_BYTES)
        true = shutil.which("true", path=root.env[0][1]) or "/bin/true"
        argv = bwrap.build_argv(
            found.path,
            config,
            root,
            supervisor=true,  # bound where the supervisor goes: the same mount, never run
            seccomp_fd=-1,
            rootless=os.geteuid() != 0,
        )
        tail = ["--", image_roots.SUPERVISOR_PATH, "--keepalive"]
        if argv[-3:] != tail or "--chdir" not in argv:
            raise Skip(
                "aviato.runtime.bubblewrap.command.build_argv changed shape; cannot reuse it"
            )
        self._prefix = argv[:-3]
        # aviato hands bwrap the environment on a descriptor (`--args`, kept off the host's
        # command lines); one command line is the cheapest equivalent here.
        if "--args" in self._prefix:
            at = self._prefix.index("--args")
            given = bwrap.environment_args(config, root).split(b"\0")[:-1]
            self._prefix[at : at + 2] = [part.decode() for part in given]
        self._seccomp_at = self._prefix.index("--seccomp") + 1
        self._filter_fd = seccomp.filter_fd
        self._info = {"bwrap": found.path, "version": found.version_text, "origin": found.origin}
        # one run to fail early (and to warm the page cache)
        box = self.create()
        try:
            out = self.exec(box, ["true"])
            if out.code != 0:
                raise Skip(f"bwrap does not run here: exit {out.code}: {out.stderr[-300:]!r}")
        finally:
            self.stop(box)

    def describe(self) -> dict[str, Any]:
        return {**self._info, "argv_length": len(self._prefix)}

    def _spawn(self, box: ProcBox, argv: Sequence[str], *, idle: bool = False) -> Spawn:
        fd = self._filter_fd()
        full = list(self._prefix)
        full[self._seccomp_at] = str(fd)
        full += ["--bind", box.workspace, "/workspace"]
        close_after: tuple[int, ...] = (fd,)
        if idle:
            read_end, write_end = os.pipe()
            box.extra["info"] = read_end
            full += ["--die-with-parent", "--info-fd", str(write_end)]
            close_after = (fd, write_end)
            return Spawn([*full, "--", *argv], (fd, write_end), close_after)
        return Spawn([*full, "--", *argv], (fd,), close_after)

    def _box_path(self, box: ProcBox, path: str) -> str:
        return path  # /workspace is bound to the box's directory

    def _idle_ready(self, box: ProcBox, proc: subprocess.Popen[bytes]) -> None:
        read_end = box.extra.pop("info")
        try:
            data = b""
            while chunk := os.read(read_end, 4096):
                data += chunk
        finally:
            os.close(read_end)
        box.extra["child"] = int(json.loads(data)["child-pid"])

    def _forget_idle(self, box: ProcBox) -> None:
        read_end = box.extra.pop("info", None)
        if read_end is not None:
            os.close(read_end)

    def _kill_idle(self, box: ProcBox) -> None:
        os.kill(box.extra["child"], signal.SIGKILL)  # pid 1 of its namespace: bwrap then exits
