"""The state directory, the content store and everything under them are private to the service.

Directories 0700 and files 0600 on every start, also when they already existed looser (as an
older version, an operator or a restore left them), and for everything the service makes while
it runs: the registry (registry.db and its -wal/-shm hold sandboxes' environments), logs, the
image store (blobs, refs, roots), sandboxes' runtime files. Two kinds of file are what sandboxes
use through the launcher's id-mapped view and keep another mode, still below 0700 directories:
the supervisor binary (0700) and mounted files (0644). The contents of an unpacked image root
keep their own modes (without set-id bits: test_image_unpack.py). A symlink planted in the state
directory is never followed by the fixing walk.
"""

from __future__ import annotations

import os
import pwd
import sqlite3
import stat
from pathlib import Path

import pytest
from _wait import wait_until

from .image_support import Canary, busybox_layer, lab, require_root_and_tools

KEEP = ("rootfs",)


def _loose(state: Path) -> dict[str, Path]:
    """A state directory as a careless restore would leave it; returns the planted canaries."""
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    db = sqlite3.connect(state / "registry.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    db.close()
    os.chmod(state / "registry.db", 0o644)
    (state / "server.log").write_text("old\n")
    os.chmod(state / "server.log", 0o644)
    for d in ("logs", "images", "images/blobs", "images/blobs/sha256", "images/roots",
              "images/roots/abc", "images/roots/abc/rootfs", "images/roots/abc/rootfs/bin",
              "images/tmp", "sandboxes", "cluster-logs"):  # fmt: skip
        (state / d).mkdir(mode=0o755)
        os.chmod(state / d, 0o755)
    os.chmod(state / "images", 0o711)
    for f in ("logs/sbx-1.log", "images/refs.json", "images/blobs/sha256/00", "cluster-logs/x"):
        (state / f).write_text("{}")
        os.chmod(state / f, 0o644)
    tool = state / "images/roots/abc/rootfs/bin/tool"
    tool.write_text("#!/bin/sh\n")
    os.chmod(tool, 0o755)
    canary = Canary(state.parent / "canary")
    os.symlink(canary.file, state / "link-to-host-file")
    os.symlink(canary.dir, state / "logs" / "link-to-host-dir")
    return {"canary_file": canary.file, "canary_dir": canary.dir, "tool": tool}


def _not_private(state: Path) -> list[str]:
    """Every path under `state` (not below an image's rootfs) whose mode is not 0700/0600."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(state):
        if Path(dirpath).name in KEEP:
            dirnames[:] = []
            filenames = []
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            rel = path.relative_to(state).parts
            if stat.S_ISDIR(st.st_mode):
                want = 0o700
            elif rel[0] == "bin":
                want = 0o700  # the supervisor sandboxes run (the owner's, through an id-map)
            elif len(rel) == 4 and rel[0] == "sandboxes" and rel[2] == "files":
                want = 0o644  # mounted files: the sandbox's own non-root user reads them
            else:
                want = 0o600
            if stat.S_IMODE(st.st_mode) != want:
                found.append(f"{path.relative_to(state)} {oct(stat.S_IMODE(st.st_mode))}")
    if stat.S_IMODE(state.stat().st_mode) != 0o700:
        found.append(f". {oct(stat.S_IMODE(state.stat().st_mode))}")
    return found


def test_a_loose_state_directory_is_made_private_at_start() -> None:
    planted: dict[str, Path] = {}

    def prepare(state: Path) -> None:
        planted.update(_loose(state))

    with lab(state=prepare) as env:
        state = env.svc.state_dir
        assert _not_private(state) == []
        # What a symlink in the state directory points to is never touched.
        assert stat.S_IMODE(planted["canary_file"].stat().st_mode) == 0o640
        assert stat.S_IMODE(planted["canary_dir"].stat().st_mode) == 0o755
        # Inside an image root, modes are the image's.
        assert stat.S_IMODE(planted["tool"].stat().st_mode) == 0o755


@pytest.mark.slow
def test_everything_the_service_makes_is_private() -> None:
    with lab() as env:
        ref = env.push("state/bb", [busybox_layer()])
        ok, detail = env.pull(ref)
        assert ok, detail
        client = env.svc.client()
        sb = client.running(image=ref, mounted=[("/srv/app.conf", b"secret=1\n")])
        assert client.exec(sb.id, ["cat", "/srv/app.conf"]).stdout == b"secret=1\n"
        client.write_file(sb.id, "/workspace/f", b"x")
        other = client.running(image=ref)
        client.stop(other.id)  # its main log is kept under logs/
        state = env.svc.state_dir
        # its directory is removed in the background after the stop: walk once it is gone
        wait_until(
            lambda: not (state / "sandboxes" / other.id).exists(), "the stopped sandbox cleaned up"
        )
        made = {str(p.relative_to(state)) for p in state.rglob("*") if "rootfs" not in p.parts}
        assert {"registry.db", "registry.db-wal", "images/refs.json", "logs"} <= made, made
        assert any(p.startswith("sandboxes/") and p.endswith("files/0") for p in made), made
        assert _not_private(state) == []


@pytest.mark.slow
def test_nobody_else_can_read_the_store_or_the_registry() -> None:
    """As another host user (nobody): the state directory cannot be entered at all."""
    require_root_and_tools()
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    with lab() as env:
        ok, detail = env.pull(env.push("state/bb2", [busybox_layer()]))
        assert ok, detail
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 0
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                for path in (env.svc.state_dir / "registry.db", env.store, env.store / "refs.json"):
                    try:
                        os.stat(path)
                        code = 1  # even the name was reachable
                    except PermissionError:
                        pass
                try:
                    os.listdir(env.svc.state_dir)
                    code = 1
                except PermissionError:
                    pass
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_a_state_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    """A root service never takes over (chmods, writes into) a directory that another user
    owns: a symlink or a directory planted where the state directory should be."""
    require_root_and_tools()
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")

    def theirs(state: Path) -> None:
        state.mkdir(mode=0o755)
        os.chown(state, nobody.pw_uid, nobody.pw_gid)

    with pytest.raises(RuntimeError, match="belongs to uid"), lab(state=theirs):
        pass
